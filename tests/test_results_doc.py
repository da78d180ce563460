"""benchmarks/results_doc.py: the docs' tables are what the committed JSONs give."""

import importlib
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def rd():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        yield importlib.import_module("results_doc")
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_committed_docs_match_the_jsons(rd, capsys):
    """What CI re-runs: every generated table of docs/results.md and README.md equals its JSONs."""
    assert rd.main(["--check"]) == 0, capsys.readouterr().out


def test_every_table_is_shown_once(rd):
    names = [m["name"] for doc in rd.DOCS for m in rd.REGION.finditer(doc.read_text())]
    assert sorted(names) == sorted(rd.load_tables()), "a table without a region, or a region twice"


def _results(tmp_path: Path, perplexity: float) -> Path:
    results = tmp_path / "results"
    results.mkdir(exist_ok=True)
    points = [{"method": "dense", "k": None, "perplexity": 20.0, "ratio": 1.0},
              {"method": "sea", "k": 64, "perplexity": perplexity, "ratio": perplexity / 20.0}]
    (results / "run.json").write_text(json.dumps({"machine": {"cpus": 2, "cpu_model": "Test CPU", "threads": 1},
                                                  "points": points}))
    return results


def test_check_finds_a_changed_number_and_regenerate_fixes_it(rd, tmp_path):
    tables = {"quality": rd.grid(["method", "wiki"], [[rd.text("sea"), rd.ppl("run.json", ks=(64,), ratio=True)]])}
    doc = tmp_path / "doc.md"
    doc.write_text("Intro.\n\n<!-- generated: quality -->\nstale\n<!-- end -->\n\nOutro.\n")
    results = _results(tmp_path, 21.0)
    assert rd.check([doc], tables, results)                        # "stale" is not what the JSON gives
    doc.write_text(rd.regenerate(doc.read_text(), tables, results))
    assert rd.check([doc], tables, results) == []
    text = doc.read_text()
    assert "| sea | 21.00 (x1.050) |" in text and text.startswith("Intro.") and text.endswith("Outro.\n")
    assert "`run.json`: 2-core Test CPU, 1 thread" in text      # the file and its machine under the table
    _results(tmp_path, 22.0)                                       # a re-run changes the JSON
    assert "22.00" in rd.check([doc], tables, results)[0]


def test_errors_name_the_problem(rd, tmp_path):
    results = _results(tmp_path, 21.0)
    with pytest.raises(KeyError, match="no table named 'nope'"):
        rd.render("nope", {}, results)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        rd.render("t", {"t": rd.ppl("missing.json")}, results)
    with pytest.raises(KeyError, match="no points of method 'quest'"):
        rd.render("t", {"t": rd.ppl("run.json", "quest")}, results)


def test_machine_lines(rd):
    assert rd.machine({}) == "machine not recorded"
    assert rd.machine({"machine": "x86_64"}) == "x86_64 (CPU model not recorded)"
    assert rd.machine({"machine_note": "2-core AMD EPYC, shared"}) == "2-core AMD EPYC, shared"
    line = rd.machine({"machine": {"cpus": 2, "cpu_model": "AMD EPYC", "cpu_capability": "AVX2", "threads": 2,
                                   "matmul_gflops": 108.5}})
    assert line == "2-core AMD EPYC, AVX2, 2 threads, 108 GFLOP/s fp32 matmul"


def test_encoder_results_split_over_budgets_merge(rd):
    """encoder_tasks_summary.merge_results: budgets evaluated in separate files read as one evaluation."""
    summary = importlib.import_module("encoder_tasks_summary")
    row = lambda method, k: {"method": method, "k": k, "accuracy": 0.5}  # noqa: E731
    about = {"model": "m", "task": "t", "split": "test", "examples": 4}
    parts = [{**about, "setup": {"budgets": [k]}, "rows": [row("dense", None), row("oracle", k), row("sea", k)]}
             for k in (64, 8)]
    merged = summary.merge_results(parts)
    assert [(r["method"], r["k"]) for r in merged["rows"]] == [("dense", None), ("oracle", 8), ("sea", 8),
                                                                ("oracle", 64), ("sea", 64)]
    assert merged["setup"]["budgets"] == [8, 64]
    with pytest.raises(ValueError, match="must share"):
        summary.merge_results([parts[0], {**parts[1], "examples": 5}])
