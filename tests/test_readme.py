"""The README's examples run as a reader would run them.

* Its Python blocks run in order, in one namespace, in an empty working directory. The blocks
  before the first one that loads the bundled SmolLM2 run in the default tier; all of them,
  in order, in the slow tier.
* Every `sea ...` command of its bash blocks runs on a tiny random Llama and a small text file,
  with the sizes shrunk (steps, lengths, budgets); the set-up lines are what CI itself runs.
"""

import re
import shlex
from pathlib import Path

import pytest

from sea_attention.app.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"
NEEDS_SMOLLM2 = "load_model("

# option -> the value it takes on the tiny model (commands keep their other options)
TINY_VALUES = {
    "--steps": "2", "--seq-len": "32", "--stride": "32", "--k": "2,4", "--estimate-width": "8",
    "--max-new-tokens": "4", "--lengths": "64,128", "--decode-tokens": "2", "--layer": "1", "--repeats": "1",
    "--query-block": "8", "--max-tokens": "256", "--last": "8", "--max-examples": "24", "--max-len": "32",
    "--batch-size": "4",
}
# per command, where the generic tiny value does not fit (quest selects pages of 16 keys)
TINY_OVERRIDES = {"compare": {"--k": "16,32", "--seq-len": "64", "--lengths": "96"},
                  "diagnose": {"--k": "4", "--length": "96"}}
# options a command's defaults would make too big for the tiny model, added where a README line omits them
TINY_DEFAULTS = {"eval": {"--seq-len": "32", "--max-tokens": "256", "--max-examples": "24"},
                 "plot": {"--seq-len": "32"}, "finetune": {"--max-len": "32", "--max-examples": "24"},
                 "distill": {"--max-examples": "24"}}


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), flags=re.S)


def sea_commands() -> list[list[str]]:
    """The README's `sea ...` command lines (comments and line continuations resolved)."""
    commands = []
    for block in code_blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            for part in line.split("#", 1)[0].split("&&"):
                part = part.strip().removeprefix(".venv/bin/")
                if part.startswith("sea "):
                    commands.append(shlex.split(part)[1:])
    return commands


def tiny(argv: list[str], model_dir: Path, text: Path) -> list[str]:
    """``argv`` with the bundled model and corpus replaced by tiny ones and the sizes shrunk."""
    out = list(argv)
    for i, word in enumerate(out[:-1]):
        value = out[i + 1]
        if word in TINY_OVERRIDES.get(out[0], {}):
            out[i + 1] = TINY_OVERRIDES[out[0]][word]
        elif word in TINY_VALUES:
            out[i + 1] = TINY_VALUES[word]
        elif word == "--model" and value in ("smollm2-135m", "my-sea-model"):  # the latter: the Python blocks' save
            out[i + 1] = str(model_dir)
        elif word == "--data" and value in ("wiki", "bbc"):
            out[i + 1] = str(text)
    for option, value in TINY_DEFAULTS.get(out[0], {}).items():
        if option not in out:
            out += [option, value]
    return out


def test_readme_shows_python_and_commands():
    assert len(code_blocks("python")) >= 3
    names = {argv[0] for argv in sea_commands()}
    assert {"distill", "eval", "plot", "generate", "bench", "diagnose"} <= names


def run_python_blocks(blocks: list[str]) -> None:
    namespace: dict = {"__name__": "__readme__"}
    for number, block in enumerate(blocks, 1):
        exec(compile(block, f"README.md python block {number}", "exec"), namespace)


def test_python_blocks_before_the_bundled_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    blocks = code_blocks("python")
    first_slow = next((i for i, b in enumerate(blocks) if NEEDS_SMOLLM2 in b), len(blocks))
    assert first_slow > 0, "the README should open with an example that needs no model"
    run_python_blocks(blocks[:first_slow])


@pytest.mark.slow
def test_all_python_blocks_in_order(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_python_blocks(code_blocks("python"))
    assert (tmp_path / "my-sea-model" / "sea_config.json").exists()


def test_readme_commands_on_a_tiny_model(tiny_model_dir, tmp_path, monkeypatch):
    """Each command in the README's order; later ones read what earlier ones wrote (runs/est ...)."""
    monkeypatch.chdir(tmp_path)
    commands = [argv for argv in sea_commands() if argv[0] != "demo"]
    for argv in commands:
        argv = tiny(argv, tiny_model_dir / "model", tiny_model_dir / "text.txt")
        assert main(argv) == 0, f"README command failed: sea {shlex.join(argv)}"
    assert (tmp_path / "runs" / "full" / "sea_config.json").exists()


@pytest.mark.slow
def test_readme_demo_command_runs_small(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert ["demo"] in [argv[:1] for argv in sea_commands()]
    assert main(["demo", "--steps", "2", "--seq-len", "64", "--eval-len", "64", "--eval-tokens", "128", "--k", "32",
                 "--needle-prompts", "1", "--needle-lengths", "128",
                 "--quiet"]) == 0
    for name in ("attention.png", "coverage.png", "diagnosis.json", "results.json", "retrieval.json"):
        assert (tmp_path / "sea-demo" / name).exists(), name
