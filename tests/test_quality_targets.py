"""benchmarks/quality_targets.py: issue 10's targets read off compare/diagnose JSONs."""

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "quality_targets.py"


@pytest.fixture(scope="module")
def qt():
    spec = importlib.util.spec_from_file_location("quality_targets", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _compare(path: Path, data: str, seq_len: int, points: list[tuple[str, int | None, float]]) -> str:
    path.write_text(json.dumps({"data": data, "setup": {"seq_len": seq_len},
                                "points": [{"method": m, "k": k, "perplexity": p} for m, k, p in points]}))
    return str(path)


def _checks(qt, sea: list[str], reference: list[str]) -> dict[tuple[str, str], dict]:
    return {(c["target"], c["text"]): c for c in qt.collect_checks(sea, reference)}


def test_targets_met_and_missed(qt, tmp_path):
    sea = _compare(tmp_path / "sea.json", "wiki", 1024, [("dense", None, 20.0), ("sea", 64, 21.5), ("sea", 128, 20.8)])
    ref = _compare(tmp_path / "ref.json", "wiki", 1024, [("dense", None, 20.0), ("oracle", 64, 20.0),
                                                          ("window_sinks", 64, 21.0), ("window_sinks", 128, 21.0)])
    diag = tmp_path / "diag.json"
    diag.write_text(json.dumps({"data": "wiki", "summary": {"recall": 0.96}}))
    checks = _checks(qt, [sea, str(diag)], [ref])
    assert checks["SEA@64 / oracle@64 (1024)", "wiki"]["measured"] == pytest.approx(1.075)
    assert not checks["SEA@64 / oracle@64 (1024)", "wiki"]["met"]             # 1.075 > 1.05
    assert not checks["SEA@128 / dense (1024)", "wiki"]["met"]                 # 1.04 > 1.03
    assert checks["SEA@128 / dense (1024)", "wiki"]["measured"] == pytest.approx(1.04)
    assert checks["SEA@64 / window_sinks@64 (1024)", "wiki"]["met"] is False   # 21.5 > 21.0
    assert checks["SEA@128 / window_sinks@128 (1024)", "wiki"]["met"] is True
    assert checks["recall@64 of the oracle's mass", "wiki"]["met"] is True


def test_rows_that_disagree_are_refused(qt, tmp_path):
    a = _compare(tmp_path / "a.json", "bbc", 1024, [("dense", None, 20.0)])
    b = _compare(tmp_path / "b.json", "bbc", 1024, [("dense", None, 20.5)])
    with pytest.raises(ValueError, match="one set of windows"):
        qt.load_rows([a, b], {"dense"})


def test_targets_only_where_rows_exist(qt, tmp_path):
    sea = _compare(tmp_path / "sea.json", "bbc", 4096, [("dense", None, 19.0), ("sea", 64, 21.0)])
    checks = _checks(qt, [sea], [])
    assert checks == {}  # no oracle, window or recall rows: nothing to judge, nothing claimed
