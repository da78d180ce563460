"""`sea bench`: attention points in fresh processes, the stage breakdown, the model benchmark, the CLI."""

import json
import math

import pytest
import torch

from sea_attention.tools.bench import (
    STAGES, AttentionBenchPoint, AttentionBenchSetup, bench_attention, format_attention_table, stage_flops,
    write_bench_json,
)
from sea_attention.tools.bench.breakdown import EstimatorShape, measure_breakdown
from sea_attention.tools.bench.runtime import in_fresh_process
from sea_attention.app.cli import main

TINY = ["--heads", "2", "--head-dim", "16", "--k", "4", "--estimate-width", "8", "--repeats", "1", "--threads", "1"]


def test_bench_runs_each_point_and_writes_json(tmp_path):
    setup = AttentionBenchSetup(heads=2, head_dim=16, k=4, estimate_width=8, repeats=1, threads=1)
    points = bench_attention([64], ("sdpa", "sea", "sea_reference"), setup=setup, memory_limit_gb=1.0)
    assert [p.method for p in points] == ["sdpa", "sea", "sea_reference"]
    assert all(p.seconds and p.seconds > 0 and p.peak_mb is not None for p in points)
    write_bench_json(points, tmp_path / "bench.json")
    assert "sea_reference" in (tmp_path / "bench.json").read_text()


def test_a_failing_point_becomes_a_note():
    assert in_fresh_process(math.sqrt, (4.0,), 60) == (2.0, "")
    result, note = in_fresh_process(math.sqrt, (-1.0,), 60)
    assert result is None and note == "error: ValueError: math domain error"


def test_reference_is_skipped_when_it_cannot_fit():
    points = bench_attention([1 << 20], methods=("sea_reference", "eager"), memory_limit_gb=1.0)
    assert all(p.seconds is None and "skipped" in p.note for p in points)
    table = format_attention_table(points + [AttentionBenchPoint("sdpa", 1 << 20, 2.0, 1.0)])
    assert "skipped" in table


def test_cli_attention_writes_json_and_plot(tmp_path, capsys):
    report, png = tmp_path / "out" / "attention.json", tmp_path / "attention.png"
    assert main(["bench", "attention", "--lengths", "64,128", "--methods", "sdpa,eager,sea,sea_chunked,sea_block",
                 *TINY, "--json", str(report), "--plot", str(png)]) == 0
    data = json.loads(report.read_text())
    assert data["setup"]["heads"] == 2 and data["machine"]["torch"] == torch.__version__
    assert data["machine"]["cpu_model"] and data["machine"]["cpu_capability"]
    points = {(p["method"], p["length"]): p for p in data["points"]}
    assert set(points) == {(m, t) for m in ("sdpa", "eager", "sea", "sea_chunked", "sea_block") for t in (64, 128)}
    assert all(p["seconds"] > 0 and p["peak_mb"] is not None and p["note"] == "" for p in points.values())
    for (method, length), p in points.items():  # speed-up = SDPA's time / the method's time
        assert p["speedup_vs_sdpa"] == pytest.approx(points[("sdpa", length)]["seconds"] / p["seconds"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [f for f in tmp_path.rglob("*") if ".tmp" in f.name]  # atomic writes leave no temp files
    printed = capsys.readouterr().out
    assert "x SDPA" in printed and "eager" in printed


def test_the_opt_in_methods_run_with_their_setting(tmp_path):
    from sea_attention.tools.bench.attention import CHUNKED, DEFAULT_METHODS, SEA_METHODS

    assert SEA_METHODS["sea_f32"] == SEA_METHODS["sea_chunked_f32"] == {"bin_sums_dtype": "float32"}
    assert SEA_METHODS["sea_block_refined_chunked"] == {"grouping": "block", "candidates": 4}
    assert SEA_METHODS["sea_long_rows_chunked"] == {"block_from": 1024, "block_candidates": 4}
    assert SEA_METHODS["sea_long_rows_c16_chunked"] == {"block_from": 1024, "block_candidates": 16}
    assert SEA_METHODS["sea_per_query_chunked"] == {"block_from": 0}
    for method in ("sea_block_refined_chunked", "sea_long_rows_chunked", "sea_long_rows_c16_chunked",
                   "sea_per_query_chunked"):
        assert method in CHUNKED and method not in DEFAULT_METHODS
    report = tmp_path / "opt_in.json"
    methods = ["sdpa", "sea_f32", "sea_chunked_f32", "sea_block_refined_chunked", "sea_long_rows_chunked",
               "sea_long_rows_c16_chunked", "sea_per_query_chunked"]
    assert main(["bench", "attention", "--lengths", "64", "--methods", ",".join(methods), *TINY,
                 "--json", str(report)]) == 0
    points = json.loads(report.read_text())["points"]
    assert [p["method"] for p in points] == methods
    assert all(p["seconds"] > 0 and p["note"] == "" for p in points)


def test_cli_rejects_bad_lengths_and_unknown_methods(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "attention", "--lengths", "64,abc"])
    assert "comma-separated integers" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "attention", "--methods", "sdpa,flash"])
    err = capsys.readouterr().err
    assert "unknown method 'flash'" in err and "sdpa,eager,sea,sea_chunked,sea_block,sea_block_chunked,sea_reference,sea_flex,sea_bounds" in err


def test_stage_flops_against_hand_computed_values():
    # T=128, H=2, d=16, m=5, K=8, c=2, w=K/4=2, S=10
    flops = stage_flops(EstimatorShape(2, 16, 5, 8, 2, 4), 128, 10.0)
    assert flops == {
        "features": 2 * (2 * 128 * 2 * 16 * 5),  # 81,920
        "linear_attention": 163_840 + 1_212_416,  # state 2*128*2*5*32*2, chunks 128*2*64*37*2
        "encoder": 884_736,  # 2*128*2*(1536 + 128 + 64)
        "decoder": 147_456 + 4_096,  # 2*128*2*16*9*2, 2*128*2*4*2
        "sparse_attention": 81_920,  # 2*2*128*10*16
    }
    assert stage_flops(EstimatorShape(2, 16, 5, 8, 4, 2, causal=False), 128, 10.0)["linear_attention"] == 163_840


def test_the_cnn_rows_of_some_estimated_rows_count_each_history_row_once():
    from sea_attention.tools.bench.breakdown import cnn_rows

    assert cnn_rows(torch.arange(100)) == 100  # every row: the CNN runs once over them
    assert cnn_rows(torch.tensor([64, 128, 192])) == 3 * 9  # isolated rows: each with its 8 history rows
    assert cnn_rows(torch.tensor([3, 4, 100])) == 4 + 1 + 9  # rows 0-3, then 4, then 92-100


@pytest.mark.parametrize("grouping, length", [("query", 256), ("block", 256), ("long_rows", 1152)])
def test_breakdown_stages_add_up_to_the_forward(grouping, length):
    setup = AttentionBenchSetup(heads=2, head_dim=16, k=4, estimate_width=8, repeats=1)
    breakdown = measure_breakdown(length, setup, grouping)
    assert [s.stage for s in breakdown.stages] == list(STAGES[grouping])
    assert sum(s.seconds for s in breakdown.stages) == pytest.approx(breakdown.total_seconds)
    assert 0 < breakdown.mean_keys <= 2 * (4 + 64)  # two heads: k each, plus the block grouping's tile
    gflop = {s.stage: s.gflop for s in breakdown.stages}
    assert gflop["estimator"] > 0
    if grouping == "long_rows":  # the default: per query up to 1,024 keys, then blocks, which estimate their first rows only
        from sea_attention.tools.bench.breakdown import stage_flops

        every_row = stage_flops(EstimatorShape.of(setup.sea_config(length)), length, breakdown.mean_keys)
        assert STAGES[grouping][1:3] == ("query_rows", "block_rows")
        assert 0 < breakdown.flops["decoder"] < every_row["decoder"]
    else:
        assert gflop["sparse_attention"] > 0 and gflop["selection"] == 0


def test_cli_model_dense_vs_sea(tiny_model_dir, tmp_path, capsys):  # noqa: F811
    model, text = str(tiny_model_dir / "model"), str(tiny_model_dir / "text.txt")
    report = tmp_path / "model.json"
    assert main(["bench", "model", "--model", model, "--data", text, "--lengths", "32,64", "--decode-tokens", "4",
                 "--k", "4", "--estimate-width", "8", "--json", str(report), "--plot", str(tmp_path / "model.png")]) == 0
    assert (tmp_path / "model.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    points = json.loads(report.read_text())["points"]
    assert [(p["mode"], p["length"]) for p in points] == [("dense", 32), ("dense", 64), ("sea", 32), ("sea", 64)]
    assert all(p["prefill_tok_s"] > 0 and p["decode_tok_s"] > 0 and p["prefill_peak_mb"] >= 0 for p in points)
    assert "decode SEA" in capsys.readouterr().out

    written = json.loads(report.read_text())
    assert written["setup"]["cache"] == "growing"  # both modes on the same cache class
    assert written["sea_options"] == {"k": 4, "estimate_width": 8}  # what SEA ran with

    assert main(["bench", "model", "--model", model, "--lengths", "300", "--decode-tokens", "4"]) == 2
    assert "at most 256 positions" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "model", "--model", model, "--cache", "static"])
    assert "--cache: invalid choice: 'static'" in capsys.readouterr().err


def test_the_model_bench_measures_the_prefills_memory_and_keeps_the_last_logits_only():
    """The prefill's peak counts what it allocates (a 30 MB tensor shows), and it asks for the last
    position's logits only, as generate does."""
    from sea_attention.tools.bench.model import prefill_and_decode
    from sea_attention.tools.bench.runtime import PeakMemory

    with PeakMemory() as peak:
        torch.ones(30 * 2**20 // 4).add_(1)
    assert 25 < peak.mb < 60
    seen, caches = [], []

    class Model(torch.nn.Module):
        def forward(self, input_ids, use_cache=True, logits_to_keep=0, **cache):  # cache: the cache keyword
            seen.append(logits_to_keep)
            caches.extend(cache.values())
            logits = torch.zeros(1, 1 if logits_to_keep else input_ids.shape[1], 5)
            return type("Out", (), {"logits": logits})()

    prefill, decode, mb = prefill_and_decode(Model(), torch.zeros(1, 7, dtype=torch.long), 2, "dynamic")
    assert seen == [1, 0, 0] and prefill > 0 and decode > 0 and mb >= 0
    assert len(caches) == 3 and all(c is caches[0] for c in caches)  # one cache, handed to every step


def test_the_model_bench_names_the_caches_it_accepts():
    from sea_attention.tools.bench import ModelBenchSetup

    with pytest.raises(ValueError, match="cache must be one of growing, dynamic; got 'static'"):
        ModelBenchSetup("tiny", [64], cache="static")


@pytest.mark.parametrize("method", ["sdpa", "sea", "sea_block", "sea_bounds", "sea_f32"])
def test_the_decode_bench_times_real_decoding_steps(method):
    """Each timed call decodes one more token of the same sequence: its output is that row of one
    full causal forward over every token."""
    from sea_attention.core.attention import SEAAttention
    from sea_attention.tools.bench.attention import AttentionBenchSetup
    from sea_attention.tools.bench.decode import SEA_DECODE, _step_calls

    setup = AttentionBenchSetup(heads=2, head_dim=16, k=4, estimate_width=8)
    steps = _step_calls(method, 40, 5, setup)
    q, k, v = setup.inputs(45)
    with torch.no_grad():
        got = torch.cat([call() for call in steps], dim=2)
        if method == "sdpa":
            full = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            full = SEAAttention(setup.sea_config(45, **SEA_DECODE[method])).eval().context_only(q, k, v)
    torch.testing.assert_close(got, full[:, :, 40:], atol=1e-5, rtol=1e-4)


def test_cli_decode_bench_writes_points_and_refuses_what_cannot_decode(tmp_path, capsys):
    from sea_attention.tools.bench import bench_decode

    report = tmp_path / "decode.json"
    assert main(["bench", "decode", "--lengths", "48", "--steps", "4", "--heads", "2", "--head-dim", "16", "--k", "4",
                 "--estimate-width", "8", "--methods", "sdpa,sea", "--json", str(report)]) == 0
    points = json.loads(report.read_text())["points"]
    assert [p["method"] for p in points] == ["sdpa", "sea"] and all(p["seconds"] > 0 for p in points)
    assert points[0]["speedup_vs_sdpa"] == 1.0 and "ms/token" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--steps must be at least 4"):
        bench_decode([48], steps=2)
    with pytest.raises(SystemExit):
        main(["bench", "decode", "--methods", "eager"])
    assert "eager" in capsys.readouterr().err
