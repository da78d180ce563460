"""Many processes (gloo on CPU): the same weights, checkpoints and perplexities as one process."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from sea_attention.app.cli import main
from sea_attention.hf.io import WEIGHTS_NAME

from sea_attention.tools.distill import DistillConfig, Distiller
from sea_attention.tools.distributed import Group, process_group
from test_distill import tiny_llama, windows

WORLD = 2


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def config(stage: str, batch_size: int, **kwargs) -> DistillConfig:
    return DistillConfig(stage=stage, steps=4, seq_len=32, batch_size=batch_size, grad_accum=2, warmup_steps=1,
                         lr=3e-3, base_lr=1e-3, checkpoint_every=2, **kwargs)


def _as_rank(rank: int, port: int) -> None:
    """The environment torchrun gives its processes."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)


def _distill_worker(rank: int, port: int, out: Path) -> None:
    _as_rank(rank, port)
    with process_group() as group:
        for stage in ("estimator", "full"):
            distiller = Distiller(tiny_llama().double(), windows(), config(stage, 1), out / f"{stage}-checkpoints",
                                  group=group)
            history = distiller.run(progress=False)
            trained = distiller.trained_model()
            if group.is_main:
                torch.save({"weights": trained.state_dict(), "losses": [r.loss for r in history]}, out / f"{stage}.pt")
        # stopped at step 2 (as if killed after its checkpoint): resumed in one process by a test below
        Distiller(tiny_llama().double(), windows(), config("estimator", 1), out / "half", group=group).run(
            progress=False, until=2)


def spawn(worker, *args) -> None:
    mp.start_processes(worker, args=(free_port(), *args), nprocs=WORLD, start_method="spawn")


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[n].float() - b[n].float()).abs().max()) for n in a)


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("ranks")
    spawn(_distill_worker, out)
    return out


@pytest.mark.parametrize("stage", ["estimator", "full"])
def test_two_processes_train_the_weights_of_one_with_the_global_batch(two_process_runs, stage):
    model = tiny_llama().double()  # float64: the sums' order (2 x 1 rows vs 2 rows) is below 1e-12
    history = Distiller(model, windows(), config(stage, WORLD)).run(progress=False)
    ranks = torch.load(two_process_runs / f"{stage}.pt")
    difference = max_difference(model.state_dict(), ranks["weights"])
    changed = max_difference(tiny_llama().double().state_dict(), ranks["weights"])
    print(f"{stage}: max |1 process - {WORLD} processes| = {difference:.3g}, max change {changed:.3g}")
    # the estimator stage is exact; stage full's losses are float32, where the relative hidden loss's scale
    # (all-reduced: without that the difference is 3e-3) rounds differently over 2 x 1 rows than over 2
    assert difference < (1e-10 if stage == "estimator" else 5e-5)
    assert changed > 1e-3  # it trained
    torch.testing.assert_close([r.loss for r in history], ranks["losses"], rtol=1e-5, atol=1e-6)


def test_a_two_process_checkpoint_resumes_in_one_process_with_the_same_global_batch(two_process_runs):
    """Checkpoints hold full tensors: 2 x --batch-size 1 continues as 1 x --batch-size 2, to the same weights."""
    straight = tiny_llama().double()
    Distiller(straight, windows(), config("estimator", WORLD)).run(progress=False)
    resumed_model = tiny_llama().double()
    resumed = Distiller(resumed_model, windows(), config("estimator", WORLD), two_process_runs / "half")
    state = torch.load(two_process_runs / "half" / "checkpoint.pt", weights_only=False)
    assert state["step"] == 2 and state["world_size"] == WORLD
    with pytest.raises(ValueError, match="global batch of 2 windows, and 1 x --batch-size 3 make 3: use "
                                         "--batch-size 2"):
        Distiller(tiny_llama().double(), windows(), config("estimator", 3)).load_state_dict(state)
    assert resumed.resume() and resumed.step == 2
    resumed.run(progress=False)
    for (name, a), b in zip(straight.state_dict().items(), resumed_model.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0, msg=name)


def torchrun(*argv: str) -> list[str]:
    """`sea ...` on 2 processes of this machine, as a user launches it."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(WORLD),
            "-m", "sea_attention", *argv]


def distill_argv(model_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["distill", "--model", str(model_dir / "model"), "--data", str(model_dir / "text.txt"), "--stage", "full",
            "--steps", "12", "--seq-len", "32", "--k", "4", "--estimate-width", "8", "--out", str(out),
            "--checkpoint-every", "1", "--quiet", *extra]


def kill_rank(launcher: subprocess.Popen, rank: int) -> None:
    """SIGKILL the process torchrun started as ``rank``."""
    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank):
                child.send_signal(signal.SIGKILL)
                return
        except psutil.NoSuchProcess:
            continue
    raise AssertionError(f"no process of rank {rank} under torchrun")


@pytest.mark.slow
def test_torchrun_kill_one_rank_resume_then_eval_on_two_processes(tiny_model_dir, tmp_path, capsys):
    """`torchrun ... sea distill` (stage full, FSDP2): rank 1 killed after a checkpoint, `--resume` reaches the
    uninterrupted run's weights exactly; `torchrun ... sea eval` of the result equals one process."""
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run = subprocess.run(torchrun(*distill_argv(tiny_model_dir, straight)), capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "2 processes (gloo), global batch 2 windows" in run.stdout
    log = tmp_path / "killed.log"  # the launcher's output, quoted when an assertion fails
    with log.open("w") as sink:
        launcher = subprocess.Popen(torchrun(*distill_argv(tiny_model_dir, killed)), stdout=sink, stderr=subprocess.STDOUT)
    checkpoint = tmp_path / "killed-checkpoints" / "checkpoint.pt"
    deadline = time.monotonic() + 180
    while not checkpoint.exists():
        assert launcher.poll() is None and time.monotonic() < deadline, \
            f"no checkpoint before the run ended:\n{log.read_text()[-3000:]}"
        time.sleep(0.05)
    kill_rank(launcher, 1)
    assert launcher.wait(timeout=120) != 0, f"the run survived its killed rank:\n{log.read_text()[-3000:]}"
    reached = torch.load(checkpoint, weights_only=False)["step"]
    assert 1 <= reached < 12 and not killed.exists()
    run = subprocess.run(torchrun(*distill_argv(tiny_model_dir, killed, "--resume")), capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"resumed at step {reached}" in run.stdout
    want, got = (load_file(path / WEIGHTS_NAME) for path in (straight, killed))
    assert want.keys() == got.keys() and all(torch.equal(want[n], got[n]) for n in want)
    assert [p.name for p in checkpoint.parent.iterdir()] == ["checkpoint.pt"]

    argv = ["eval", "--model", str(killed), "--data", str(tiny_model_dir / "text.txt"), "--split", "all",
            "--seq-len", "64", "--k", "4", "--quiet"]
    run = subprocess.run(torchrun(*argv, "--json", str(tmp_path / "two.json")), capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert main([*argv, "--json", str(tmp_path / "one.json")]) == 0
    one, two = (json.loads((tmp_path / f"{n}.json").read_text())["rows"] for n in ("one", "two"))
    assert [(r["name"], r["k"], r["tokens"]) for r in one] == [(r["name"], r["k"], r["tokens"]) for r in two]
    differences = [abs(a["perplexity"] - b["perplexity"]) / a["perplexity"] for a, b in zip(one, two)]
    print(f"eval: max relative perplexity difference, 1 vs {WORLD} processes: {max(differences):.3g}")
    assert max(differences) < 1e-6
