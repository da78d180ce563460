"""The `sea` command end to end on a tiny random Llama with a real tokenizer (no downloads)."""

import json
import re
from pathlib import Path

import pytest
import torch

from sea_attention.app.cli import main
from conftest import TEXT
from sea_attention.hf import from_pretrained

HERE = str(Path(__file__).resolve())  # a regular file: no folder can be created under it


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
    # ...and refuse every setting that shapes the weights, the SEA layers' included; a finished run says how to go on
    for change, message in ((["--k", "2"], "sea.k: checkpoint 4, now 2"),
                            (["--k", "4", "--grouping", "block"], "sea.grouping: checkpoint 'query', now 'block'"),
                            (["--k", "4", "--steps", "8"], "steps: checkpoint 4, now 8). The checkpoint's run finished")):
        argv = ["distill", "--model", model, "--data", text, "--steps", "4", "--seq-len", "32", "--estimate-width", "8",
                "--out", str(out), "--resume", "--quiet", *change]
        assert main(argv) == 2
        assert message in capsys.readouterr().err

    report = tmp_path / "eval.json"
    assert main(["eval", "--model", str(out), "--data", text, "--split", "test", "--seq-len", "32",
                 "--k", "2,4", "--dense-until", "8", "--json", str(report), "--quiet"]) == 0
    rows = json.loads(report.read_text())["rows"]
    assert json.loads(report.read_text())["sea_config"]["dense_until"] == 8  # what SEA ran with
    assert json.loads(report.read_text())["machine"]["cpus"] >= 1  # and where
    assert [(r["name"], r["k"]) for r in rows] == [("dense", None), ("oracle", 2), ("sea", 2), ("oracle", 4), ("sea", 4)]
    assert all(r["perplexity"] > 1 and r["tokens"] > 0 for r in rows)
    printed = capsys.readouterr().out
    assert "perplexity" in printed and "oracle" in printed

    png = tmp_path / "attention.png"
    assert main(["plot", "--model", str(out), "--data", text, "--seq-len", "32", "--layer", "1", "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for rows in (["--rows", "16:32"], ["--rows", "8:"], ["--last", "8"]):
        assert main(["plot", "--model", str(out), "--data", text, "--seq-len", "32", *rows, "--out", str(png)]) == 0
    assert main(["plot", "--model", str(out), "--data", text, "--seq-len", "32", "--last", "40",
                 "--out", str(png)]) == 2
    assert "rows -8:32 are outside the snapshot's 32 query rows" in capsys.readouterr().err


def test_distill_on_row_subsets(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "sea"
    assert main(["distill", "--model", str(tiny_model_dir / "model"), "--data", str(tiny_model_dir / "text.txt"),
                 "--steps", "4", "--seq-len", "32", "--k", "4", "--estimate-width", "8", "--query-rows", "8",
                 "--updates-per-pass", "2", "--out", str(out), "--quiet"]) == 0
    state = torch.load(tmp_path / "sea-checkpoints" / "checkpoint.pt", weights_only=False)
    assert state["config"]["query_rows"] == 8 and state["config"]["updates_per_pass"] == 2
    assert main(["distill", "--model", str(tiny_model_dir / "model"), "--data", str(tiny_model_dir / "text.txt"),
                 "--stage", "full", "--query-rows", "8", "--out", str(tmp_path / "full"), "--quiet"]) == 2
    assert "stage 'estimator' only" in capsys.readouterr().err


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
    # nor does the exact refinement, nor the prefix sums' dtype
    assert main(["generate", "--model", str(out), "--prompt", "the cat sat", "--max-new-tokens", "8",
                 "--candidates", "3"]) == 0
    assert capsys.readouterr().out.startswith("the cat sat")
    assert main(["generate", "--model", str(out), "--prompt", "the cat sat", "--max-new-tokens", "8",
                 "--bin-sums-dtype", "float32"]) == 0
    assert capsys.readouterr().out.startswith("the cat sat")


def test_key_bounds_are_distilled_saved_and_decoded(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "sea"
    assert main(["distill", "--model", str(tiny_model_dir / "model"), "--data", str(tiny_model_dir / "text.txt"),
                 "--steps", "2", "--seq-len", "32", "--k", "4", "--estimate-width", "8", "--key-bounds",
                 "--out", str(out), "--quiet"]) == 0
    assert json.loads((out / "sea_config.json").read_text())["sea_config"]["key_bounds"] is True
    capsys.readouterr()
    assert main(["generate", "--model", str(out), "--prompt", "the cat sat", "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.startswith("the cat sat")


def test_bad_arguments_give_clear_errors(tiny_model_dir, capsys):
    assert main(["eval", "--model", str(tiny_model_dir / "model"), "--data", "no-such-corpus.txt", "--quiet"]) == 2
    assert "expected one of" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", "--model", "x", "--k", "32,abc"])


@pytest.mark.parametrize("argv, message", [
    (["distill", "--out", "x", "--lr", "-1"], "argument --lr: expected a finite number > 0, got '-1'"),
    (["distill", "--out", "x", "--lr", "nan"], "argument --lr: expected a finite number > 0, got 'nan'"),
    (["distill", "--out", "x", "--base-lr", "inf"], "argument --base-lr: expected a finite number > 0"),
    (["distill", "--out", "x", "--steps", "0"], "argument --steps: expected a positive integer, got '0'"),
    (["distill", "--out", "x", "--warmup-steps", "-2"], "argument --warmup-steps: expected an integer >= 0"),
    (["eval", "--model", "m", "--max-tokens", "-5"], "argument --max-tokens: expected a positive integer"),
    (["eval", "--model", "m", "--max-tokens", "0"], "argument --max-tokens: expected a positive integer"),
    (["eval", "--model", "m", "--stride", "0"], "argument --stride: expected a positive integer, got '0'"),
    (["eval", "--model", "m", "--seq-len", "1.5"], "argument --seq-len: expected a positive integer"),
    (["generate", "--model", "m", "--prompt", "p", "--temperature", "-1"],
     "argument --temperature: expected a finite number >= 0, got '-1'"),
    (["generate", "--model", "m", "--prompt", "p", "--top-p", "5"], r"argument --top-p: expected a number in \(0, 1\]"),
    (["generate", "--model", "m", "--prompt", "p", "--top-p", "0"], r"argument --top-p: expected a number in \(0, 1\]"),
    (["plot", "--model", "m", "--layer", "-1"], "argument --layer: expected an integer >= 0"),
    (["plot", "--model", "m", "--rows", "5"], "argument --rows: expected START:STOP with integers >= 0"),
    (["plot", "--model", "m", "--rows", "a:b"], "argument --rows: expected START:STOP"),
    (["plot", "--model", "m", "--rows", "1:2", "--last", "3"], "argument --last: not allowed with argument --rows"),
    (["distill", "--out", "x", "--query-block", "0"], "argument --query-block: expected a positive integer"),
    (["distill", "--out", "x", "--updates-per-pass", "0"], "argument --updates-per-pass: expected a positive integer"),
    (["distill", "--out", "x", "--query-rows", "-1"], "argument --query-rows: expected an integer >= 0"),
    (["diagnose", "--model", "m", "--k", "0"], "argument --k: expected a positive integer, got '0'"),
    (["diagnose", "--model", "m", "--coverage-skip", "1"],
     r"argument --coverage-skip: expected a number in \[0, 1\), got '1'"),
    (["diagnose", "--model", "m", "--coverage-skip", "-0.1"],
     r"argument --coverage-skip: expected a number in \[0, 1\)"),
    (["diagnose", "--model", "m", "--seq-len", "0"], "argument --seq-len: expected a positive integer"),
    (["diagnose", "--model", "m", "--max-tokens", "-3"], "argument --max-tokens: expected a positive integer"),
    (["diagnose", "--model", "m", "--split", "dev"], "argument --split: invalid choice: 'dev'"),
    (["compare", "--model", "m", "--stride", "0"], "argument --stride: expected a positive integer, got '0'"),
    (["compare", "--model", "m", "--seq-len", "-4"], "argument --seq-len: expected a positive integer"),
    (["compare", "--model", "m", "--coverage-skip", "1"], r"argument --coverage-skip: expected a number in \[0, 1\)"),
    # a file to write whose folder is a regular file (this test file): refused before any work
    *[(argv, f"argument {option}: cannot write '{re.escape(HERE)}/x': '{re.escape(HERE)}' is a file, not a folder")
      for argv, option in [
          (["eval", "--model", "m", "--json", f"{HERE}/x"], "--json"),
          (["diagnose", "--model", "m", "--plot", f"{HERE}/x"], "--plot"),
          (["diagnose", "--model", "m", "--json", f"{HERE}/x"], "--json"),
          (["compare", "--model", "m", "--json", f"{HERE}/x"], "--json"),
          (["compare", "--model", "m", "--plot", f"{HERE}/x"], "--plot"),
          (["plot", "--model", "m", "--out", f"{HERE}/x"], "--out"),
          (["bench", "attention", "--json", f"{HERE}/x"], "--json"),
          (["bench", "attention", "--plot", f"{HERE}/x"], "--plot"),
          (["bench", "model", "--model", "tiny", "--json", f"{HERE}/x"], "--json"),
          (["distill", "--out", f"{HERE}/x"], "--out"),
          (["distill", "--out", "x", "--checkpoint-dir", f"{HERE}/x"], "--checkpoint-dir"),
          (["demo", "--out", f"{HERE}/x"], "--out")]],
    (["eval", "--model", "m", "--json", str(Path(HERE).parent)], r"argument --json: cannot write .*: .* is a folder"),
])
def test_out_of_range_arguments_are_refused_by_the_parser(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)


def test_a_setting_the_stage_ignores_is_refused_before_the_model_loads(capsys):
    """--hidden-loss in the estimator stage, like --query-rows with --stage full: refused, not ignored."""
    for extra, message in ((["--hidden-loss", "mse"], "hidden_loss applies to stage 'full' only"),
                           (["--stage", "full", "--query-rows", "8"], "stage 'estimator' only")):
        assert main(["distill", "--model", "no-such-model", "--out", "x", *extra, "--quiet"]) == 2
        assert message in capsys.readouterr().err


def test_distill_config_rejects_bad_learning_rates():
    from sea_attention.tools.distill import DistillConfig

    for value in (-1.0, 0.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="lr must be a finite number > 0"):
            DistillConfig(lr=value)


def test_distill_refuses_an_out_that_is_a_file_before_training(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "model.bin"
    out.write_bytes(b"precious")
    assert main(["distill", "--model", str(tiny_model_dir / "model"), "--data", str(tiny_model_dir / "text.txt"),
                 "--steps", "1", "--seq-len", "32", "--out", str(out), "--quiet"]) == 2
    assert "model.bin exists and is not a directory" in capsys.readouterr().err
    assert out.read_bytes() == b"precious" and not (tmp_path / "model.bin-checkpoints").exists()


def test_resume_from_a_garbage_checkpoint_names_the_file(tiny_model_dir, tmp_path, capsys):
    checkpoints = tmp_path / "ckpt"
    checkpoints.mkdir()
    (checkpoints / "checkpoint.pt").write_bytes(b"")
    assert main(["distill", "--model", str(tiny_model_dir / "model"), "--data", str(tiny_model_dir / "text.txt"),
                 "--steps", "1", "--seq-len", "32", "--k", "4", "--estimate-width", "8", "--out",
                 str(tmp_path / "sea"), "--checkpoint-dir", str(checkpoints), "--resume", "--quiet"]) == 2
    assert f"{checkpoints / 'checkpoint.pt'} is not a readable checkpoint" in capsys.readouterr().err


def test_data_by_datasets_name_loads_a_local_dataset_and_names_an_unreachable_hub(tiny_model_dir, tmp_path, capsys,
                                                                                   monkeypatch):
    """A local parquet dataset goes through `datasets.load_dataset` like a hub id: its split's text column
    joined with blank lines, as the paper's WikiText protocol."""
    import datasets
    import huggingface_hub.constants

    from sea_attention.app.corpora import DatasetText, load_dataset_text

    folder = tmp_path / "corpus"
    folder.mkdir()
    lines = TEXT.split(". ")
    datasets.Dataset.from_dict({"body": lines[:300]}).to_parquet(str(folder / "train.parquet"))
    datasets.Dataset.from_dict({"body": lines[300:]}).to_parquet(str(folder / "validation.parquet"))
    assert load_dataset_text(DatasetText(str(folder), "validation", text_column="body")) == "\n\n".join(lines[300:])
    model = str(tiny_model_dir / "model")
    argv = ["eval", "--model", model, "--data", str(folder), "--data-split", "validation", "--seq-len", "32", "--k",
            "4", "--no-oracle", "--quiet"]
    assert main(argv) == 2 and "has no column 'text'" in capsys.readouterr().err
    assert main([*argv, "--text-column", "body"]) == 0 and "dense" in capsys.readouterr().out
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # as without internet, at once
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert main(["eval", "--model", model, "--data", "wikitext-2", "--quiet"]) == 2
    error = capsys.readouterr().err
    assert "'Salesforce/wikitext' (config 'wikitext-2-raw-v1')" in error and "hub cannot be reached" in error
