"""The `sea` command end to end on a tiny random Llama with a real tokenizer (no downloads)."""

import json

import pytest

from sea_attention.cli import main
from sea_attention.hf import from_pretrained


def test_distill_eval_plot_resume(tiny_model_dir, tmp_path, capsys):
    model, text = str(tiny_model_dir / "model"), str(tiny_model_dir / "text.txt")
    out = tmp_path / "sea"
    assert main(["distill", "--model", model, "--data", text, "--steps", "4", "--seq-len", "32", "--k", "4",
                 "--estimate-width", "8", "--out", str(out), "--checkpoint-every", "2", "--quiet"]) == 0
    assert (out / "sea_config.json").exists() and (tmp_path / "sea-checkpoints" / "checkpoint.pt").exists()
    sea_model, _ = from_pretrained(out)
    assert sea_model.config.sea_config["k"] == 4

    # --resume after the last step has nothing left to do but must load the checkpoint
    assert main(["distill", "--model", model, "--data", text, "--steps", "4", "--seq-len", "32", "--k", "4",
                 "--estimate-width", "8", "--out", str(out), "--resume", "--quiet"]) == 0
    assert "resumed at step 4" in capsys.readouterr().out

    report = tmp_path / "eval.json"
    assert main(["eval", "--model", str(out), "--data", text, "--split", "test", "--seq-len", "32",
                 "--k", "2,4", "--json", str(report), "--quiet"]) == 0
    rows = json.loads(report.read_text())["rows"]
    assert [(r["name"], r["k"]) for r in rows] == [("dense", None), ("oracle", 2), ("sea", 2), ("oracle", 4), ("sea", 4)]
    assert all(r["perplexity"] > 1 and r["tokens"] > 0 for r in rows)
    printed = capsys.readouterr().out
    assert "perplexity" in printed and "oracle" in printed

    png = tmp_path / "attention.png"
    assert main(["plot", "--model", str(out), "--data", text, "--seq-len", "32", "--layer", "1", "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_generate_streams_text(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "sea"
    assert main(["distill", "--model", str(tiny_model_dir / "model"), "--data", str(tiny_model_dir / "text.txt"),
                 "--steps", "1", "--seq-len", "32", "--k", "4", "--estimate-width", "8", "--out", str(out),
                 "--quiet"]) == 0
    capsys.readouterr()
    assert main(["generate", "--model", str(out), "--prompt", "the cat sat", "--max-new-tokens", "8"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("the cat sat") and len(printed.split()) > 3
    # the block grouping changes no weight: a saved model runs with it, decoding through the open block
    assert main(["generate", "--model", str(out), "--prompt", "the cat sat", "--max-new-tokens", "8",
                 "--grouping", "block", "--query-block", "4"]) == 0
    assert capsys.readouterr().out.startswith("the cat sat")


def test_bad_arguments_give_clear_errors(tiny_model_dir, capsys):
    assert main(["eval", "--model", str(tiny_model_dir / "model"), "--data", "no-such-corpus", "--quiet"]) == 2
    assert "expected one of" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", "--model", "x", "--k", "32,abc"])
