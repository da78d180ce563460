from sea_attention.bench import (
    AttentionBenchPoint, AttentionBenchSetup, bench_attention, format_attention_table, write_bench_json,
)


def test_bench_runs_each_point_and_writes_json(tmp_path):
    setup = AttentionBenchSetup(heads=2, head_dim=16, k=4, estimate_width=8, repeats=1, threads=1)
    points = bench_attention([64], setup=setup, memory_limit_gb=1.0)
    assert [p.method for p in points] == ["sdpa", "sea", "sea_reference"]
    assert all(p.seconds and p.seconds > 0 and p.peak_mb is not None for p in points)
    write_bench_json(points, tmp_path / "bench.json")
    assert "sea_reference" in (tmp_path / "bench.json").read_text()


def test_reference_is_skipped_when_it_cannot_fit():
    points = bench_attention([1 << 20], methods=("sea_reference",), memory_limit_gb=1.0)
    assert points[0].seconds is None and "skipped" in points[0].note
    table = format_attention_table(points + [AttentionBenchPoint("sdpa", 1 << 20, 2.0, 1.0)])
    assert "skipped" in table
