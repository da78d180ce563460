"""Distillation on a tiny random Llama: losses go down, checkpoints resume exactly."""

import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from sea_attention.tools.distill import DistillConfig, Distiller, TokenWindows
from sea_attention.tools.distill.checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint
from sea_attention.tools.distill.trainer import CHECKPOINT_KEYS
from sea_attention.hf import patch, save_pretrained, sea_layers
from sea_attention.hf.io import WEIGHTS_NAME


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                         intermediate_size=128, vocab_size=97, max_position_embeddings=128)
    model = LlamaForCausalLM(config).eval()
    return patch(model, k=4, estimate_width=8)


def windows(seed=0):
    generator = torch.Generator().manual_seed(seed)
    # a repetitive token stream gives the attention some structure to learn
    base = torch.randint(0, 97, (40,), generator=generator)
    return TokenWindows(base.repeat(20), seq_len=32, seed=seed)


@pytest.mark.parametrize("stage", ["estimator", "full"])
def test_loss_goes_down(stage):
    model = tiny_llama()
    config = DistillConfig(stage=stage, steps=25, seq_len=32, lr=3e-3, base_lr=1e-4, warmup_steps=2,
                           checkpoint_every=0)
    history = Distiller(model, windows(), config).run(progress=False)
    first = sum(r.loss for r in history[:3]) / 3
    last = sum(r.loss for r in history[-3:]) / 3
    assert last < 0.85 * first, (first, last)


def test_estimator_stage_trains_only_sea():
    model = tiny_llama()
    before = {n: p.clone() for n, p in model.named_parameters()}
    Distiller(model, windows(), DistillConfig(steps=2, seq_len=32, checkpoint_every=0)).run(progress=False)
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    assert changed and all(".sea." in n for n in changed)


@pytest.mark.parametrize("stage, rows, updates", [("estimator", 0, 1), ("full", 0, 1), ("estimator", 10, 2)])
def test_resume_reaches_the_same_weights(tmp_path, stage, rows, updates):
    # with two updates per teacher pass, step 3 resumes in the middle of a pass: its teacher runs again
    config = DistillConfig(stage=stage, steps=6, seq_len=32, checkpoint_every=3, warmup_steps=1, query_rows=rows,
                           updates_per_pass=updates)
    straight = tiny_llama()
    Distiller(straight, windows(), config, tmp_path / "a").run(progress=False)

    interrupted = tiny_llama()
    Distiller(interrupted, windows(), config, tmp_path / "b").run(progress=False, until=3)
    resumed_model = tiny_llama()  # the same base model, as a user would load it again
    resumed = Distiller(resumed_model, windows(), config, tmp_path / "b")
    with torch.no_grad():  # scramble what is trained: it must all come back from the checkpoint
        for param in resumed_model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param))
    assert resumed.resume() and resumed.step == 3
    resumed.run(progress=False)
    for (name, a), b in zip(straight.state_dict().items(), resumed_model.state_dict().values()):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=name)


def test_interrupted_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, {"step": 1})

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, {"step": 2})
    assert load_checkpoint(tmp_path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == [CHECKPOINT_NAME]


def test_windows_are_deterministic_and_validated():
    w = windows()
    assert torch.equal(w.batch(5, 2), w.batch(5, 2))
    assert not torch.equal(w.batch(5, 2), w.batch(6, 2))
    with pytest.raises(ValueError, match="fewer than seq_len"):
        TokenWindows(torch.arange(10), seq_len=32)
    with pytest.raises(ValueError, match="stage must be one of"):
        DistillConfig(stage="all")


def test_resume_refuses_changed_settings(tmp_path):
    Distiller(tiny_llama(), windows(), DistillConfig(steps=4, seq_len=32), tmp_path).run(progress=False, until=2)
    changed = Distiller(tiny_llama(), windows(), DistillConfig(steps=8, seq_len=32), tmp_path)
    with pytest.raises(ValueError, match="steps: checkpoint 4, now 8"):
        changed.resume()


def _patched(**sea):
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                         intermediate_size=128, vocab_size=97, max_position_embeddings=128)
    return patch(LlamaForCausalLM(config).eval(), **{"k": 4, "estimate_width": 8, **sea})


@pytest.mark.parametrize("sea, message", [  # what the resumed run was patched with, the error it must give
    (dict(k=2), "sea.k: checkpoint 4, now 2"),
    (dict(grouping="block"), "sea.grouping: checkpoint 'query', now 'block'"),
    (dict(grouping="query_head"), "sea.grouping: checkpoint 'query', now 'query_head'"),
    (dict(estimate_width=16), "sea.estimate_width: checkpoint 8, now 16"),
    (dict(feature_factor=4), "sea.feature_factor: checkpoint 8, now 4"),
    (dict(sinks=0), "sea.sinks: checkpoint 4, now 0"),
    (dict(seed=1), "sea.seed: checkpoint 0, now 1"),
])
def test_resume_refuses_other_sea_settings(tmp_path, sea, message):
    """Every setting that shapes the weights is part of the run, the SEA layers' included (k and the
    grouping change no tensor shape, so only the settings can tell)."""
    config = DistillConfig(steps=4, seq_len=32)
    Distiller(_patched(), windows(), config, tmp_path).run(progress=False, until=2)
    with pytest.raises(ValueError, match=f"cannot resume: the run's settings differ from the checkpoint's .*{message}"):
        Distiller(_patched(**sea), windows(), config, tmp_path).resume()
    assert Distiller(_patched(attention_path="reference"), windows(), config, tmp_path).resume()  # same computation


def test_a_finished_run_asked_for_more_steps_says_how_to_train_further(tmp_path):
    Distiller(tiny_llama(), windows(), DistillConfig(steps=2, seq_len=32), tmp_path).run(progress=False)
    with pytest.raises(ValueError, match=r"steps: checkpoint 2, now 4\)\. The checkpoint's run finished its 2 steps.*"
                                         r"start a new run from the saved model \(sea distill --model SAVED"):
        Distiller(tiny_llama(), windows(), DistillConfig(steps=4, seq_len=32), tmp_path).resume()


def test_full_stage_resume_is_exact_with_dropout(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    def gpt2():
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_head=4, n_layer=2, vocab_size=97, n_positions=64,
                                           resid_pdrop=0.2, embd_pdrop=0.2, attn_pdrop=0.0))
        return patch(model, k=4, estimate_width=8)

    config = DistillConfig(stage="full", steps=4, seq_len=32, warmup_steps=1)
    straight = gpt2()
    Distiller(straight, windows(), config, tmp_path / "a").run(progress=False)
    resumed = gpt2()
    Distiller(resumed, windows(), config, tmp_path / "b").run(progress=False, until=2)
    again = gpt2()
    later = Distiller(again, windows(), config, tmp_path / "b")
    assert later.resume()
    later.run(progress=False)
    for (name, a), b in zip(straight.state_dict().items(), again.state_dict().values()):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=name)


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _debris(target: Path, kind: str, pid: int, directory: bool = False) -> Path:
    path = target.with_name(f".{target.name}.{kind}-{socket.gethostname().replace('-', '_')}-{pid}-abc")
    if directory:
        path.mkdir()
        (path / "half.safetensors").write_bytes(b"")
    else:
        path.write_bytes(b"")
    return path


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", None])
def test_a_garbage_checkpoint_is_an_error_naming_the_file(tmp_path, content):
    target = tmp_path / CHECKPOINT_NAME
    if content is None:
        torch.save({"step": 3}, target)  # a torch file, but not ours
    else:
        target.write_bytes(content)
    with pytest.raises(ValueError, match=f"{target}.*delete it to start fresh"):
        load_checkpoint(tmp_path, CHECKPOINT_KEYS)


def test_killed_checkpoint_writes_leave_no_debris_after_the_next_save(tmp_path):
    target = tmp_path / CHECKPOINT_NAME
    dead = _debris(target, "tmp", _dead_pid())
    live = _debris(target, "tmp", os.getppid())  # a writer that still runs: keep its file
    legacy = tmp_path / ".checkpoint-x1y2.tmp"  # an earlier version's name: removed once stale
    legacy.write_bytes(b"")
    fresh_legacy = tmp_path / ".checkpoint-z3.tmp"
    fresh_legacy.write_bytes(b"")
    os.utime(legacy, (0, 0))
    save_checkpoint(tmp_path, {"step": 1})
    assert not dead.exists() and not legacy.exists()
    assert live.exists() and fresh_legacy.exists() and target.exists()


def test_killed_saves_leave_no_debris_after_the_next_save(tmp_path):
    from test_hf_io import trained

    final = tmp_path / "sea"
    pid = _dead_pid()
    leftovers = [_debris(final, "tmp", pid, directory=True), _debris(final, "old", pid, directory=True)]
    other_output = _debris(tmp_path / "other", "tmp", pid, directory=True)  # not this output's
    save_pretrained(trained("llama"), final, include_base_weights=True)
    assert not any(p.exists() for p in leftovers)
    assert other_output.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([other_output.name, "sea"])


def _distill_command(model_dir: Path, out: Path, steps: int, *extra: str) -> list[str]:
    """`sea distill` on the tiny model as its own process, checkpointing every step."""
    return [sys.executable, "-m", "sea_attention.app.cli", "distill", "--model", str(model_dir / "model"),
            "--data", str(model_dir / "text.txt"), "--steps", str(steps), "--seq-len", "32", "--k", "4",
            "--estimate-width", "8", "--out", str(out), "--checkpoint-every", "1", "--quiet", *extra]


def _wait_for(path: Path, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, f"the run ended (rc {process.returncode}) before writing {path}"
        assert time.monotonic() < deadline, f"no {path} after {timeout} s"
        time.sleep(0.01)


@pytest.mark.slow
def test_kill_9_during_distillation_then_resume_gives_the_uninterrupted_weights(tiny_model_dir, tmp_path):
    """SIGKILL at a random (seeded) moment after the first checkpoint, then `--resume` to the end:
    the same SEA weights as a run never interrupted, and no temporary file or folder left."""
    steps = 120
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(_distill_command(tiny_model_dir, straight, steps), check=True, capture_output=True)

    run = subprocess.Popen(_distill_command(tiny_model_dir, killed, steps), stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    checkpoint = tmp_path / "killed-checkpoints" / CHECKPOINT_NAME
    _wait_for(checkpoint, run, timeout=120)
    time.sleep(random.Random(11).uniform(0.0, 1.0))
    assert run.poll() is None, "the run finished before the kill: give it more steps"
    run.send_signal(signal.SIGKILL)
    run.wait()
    reached = load_checkpoint(checkpoint.parent)["step"]
    assert 1 <= reached < steps and not killed.exists()

    resumed = subprocess.run(_distill_command(tiny_model_dir, killed, steps, "--resume"), check=True,
                             capture_output=True, text=True)
    assert f"resumed at step {reached}" in resumed.stdout
    want, got = (load_file(path / WEIGHTS_NAME) for path in (straight, killed))
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["killed", "killed-checkpoints", "straight",
                                                          "straight-checkpoints"]
    assert [p.name for p in checkpoint.parent.iterdir()] == [CHECKPOINT_NAME]


def test_relative_hidden_loss_is_the_mse_over_each_states_mean_square():
    from sea_attention.tools.distill.losses import hidden_mse

    g = torch.Generator().manual_seed(0)
    teacher = (torch.randn(2, 5, 8, generator=g), 300 * torch.randn(2, 5, 8, generator=g), torch.zeros(2, 5, 8))
    student = tuple(t + torch.randn(t.shape, generator=g) for t in teacher)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    keep = mask.unsqueeze(-1).expand(-1, -1, 8)
    expected = []
    for s, t in zip(student, teacher):
        error = ((s - t)[keep] ** 2).mean()
        scale = (t[keep] ** 2).mean()
        expected.append(error / scale if scale > 0 else error)  # a state of zeros counts as scale 1
    assert float(hidden_mse(student, teacher, mask, relative=True)) == pytest.approx(float(sum(expected) / 3), rel=1e-5)
    plain = sum(((s - t)[keep] ** 2).mean() for s, t in zip(student, teacher)) / 3
    assert float(hidden_mse(student, teacher, mask)) == pytest.approx(float(plain), rel=1e-5)


def test_distill_config_refuses_an_unknown_hidden_loss():
    with pytest.raises(ValueError, match="hidden_loss must be one of"):
        DistillConfig(stage="full", hidden_loss="l1")
    assert DistillConfig(stage="full").hidden_loss == "relative"


@pytest.mark.parametrize("hidden_loss", ["mse", "relative"])
def test_the_hidden_loss_is_refused_in_the_estimator_stage(hidden_loss):
    """Like query_rows with stage full: a setting the stage would ignore is an error, not a no-op."""
    with pytest.raises(ValueError, match=f"hidden_loss applies to stage 'full' only .* got hidden_loss='{hidden_loss}'"):
        DistillConfig(stage="estimator", hidden_loss=hidden_loss)


def _sea_call(model, ids):
    """The first layer's call in the dense forward of ``ids``."""
    from sea_attention.hf import layer_override

    calls = []

    def hold(call):
        calls.append(call)
        return call.dense()[0], None

    with torch.no_grad(), layer_override(model, hold):
        model(input_ids=ids)
    return calls[0]


@pytest.mark.parametrize("pad", [0, 5])
def test_targets_of_some_rows_are_those_rows_of_the_full_targets(pad):
    model = tiny_llama()
    distiller = Distiller(model, windows(), DistillConfig(steps=1, seq_len=32, query_rows=6))
    call = _sea_call(model, windows().batch(0, 2))
    call.key_valid[1, :pad] = False  # left padding in the second sample
    rows = torch.tensor([0, 3, 4, 17, 30, 31])
    full_context, full = distiller._dense_targets(call)
    context, part = distiller._dense_targets(call, rows)
    torch.testing.assert_close(context, full_context.index_select(2, rows))
    torch.testing.assert_close(part.estimate, full.estimate.index_select(2, rows))
    torch.testing.assert_close(part.context, full.context.index_select(2, rows))
    assert torch.equal(part.query_valid, full.query_valid.index_select(1, rows))


def test_rows_are_drawn_from_the_step_and_layer_only():
    model = tiny_llama()
    distiller = Distiller(model, windows(), DistillConfig(steps=4, seq_len=32, query_rows=8))
    call = _sea_call(model, windows().batch(0, 1))
    first = distiller._query_rows(call)
    assert first.tolist() == sorted(set(first.tolist())) and len(first) == 8 and int(first.max()) < 32
    assert int(first[0]) % 8 == 0 and first.tolist() == list(range(int(first[0]), int(first[0]) + 8))  # one run
    assert torch.equal(first, distiller._query_rows(call))
    distiller.step = 1
    assert not torch.equal(first, distiller._query_rows(call))
    every = Distiller(tiny_llama(), windows(), DistillConfig(steps=1, seq_len=32, query_rows=32))
    assert every._query_rows(call) is None  # as many rows as the window has: all of them


def test_each_teacher_pass_serves_updates_per_pass_steps(monkeypatch):
    model = tiny_llama()
    seen = []
    forward = type(model).forward

    def counting(self, *args, **kwargs):
        seen.append(kwargs["input_ids"].clone())
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(type(model), "forward", counting)
    config = DistillConfig(steps=6, seq_len=32, query_rows=8, updates_per_pass=3, checkpoint_every=0)
    history = Distiller(model, windows(), config).run(progress=False)
    assert len(seen) == 2  # steps 0-2 on window 0, steps 3-5 on window 1
    assert torch.equal(seen[0], windows().batch(0, 1)) and torch.equal(seen[1], windows().batch(1, 1))
    assert all(r.extra["rows_per_s"] > 0 for r in history)


def test_training_on_row_subsets_lowers_the_loss_on_every_row():
    from sea_attention.tools.distill.losses import layer_losses

    def full_loss(model):
        call = _sea_call(model, windows().batch(99, 1))
        _, targets = Distiller(model, windows(), DistillConfig(steps=1, seq_len=32))._dense_targets(call)
        with torch.no_grad():
            return float(layer_losses(call.run_sea(), targets).estimate_kl)

    model = tiny_llama()
    before = full_loss(model)
    config = DistillConfig(steps=30, seq_len=32, lr=3e-3, warmup_steps=2, query_rows=8, updates_per_pass=2,
                           checkpoint_every=0)
    Distiller(model, windows(), config).run(progress=False)
    assert full_loss(model) < 0.8 * before


@pytest.mark.parametrize("kwargs, match", [
    (dict(query_rows=-1), "query_rows must be >= 0"),
    (dict(updates_per_pass=0), "updates_per_pass must be >= 1"),
    (dict(stage="full", query_rows=8), "stage 'estimator' only"),
    (dict(stage="full", updates_per_pass=2), "stage 'estimator' only"),
])
def test_row_sampling_settings_are_validated(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DistillConfig(**kwargs)


def test_row_sampling_is_refused_for_bidirectional_layers_and_baselines():
    from transformers import BertConfig, BertForMaskedLM

    from sea_attention.tools.baselines.trained import attach_baseline, baseline_layers

    torch.manual_seed(0)
    bert = patch(BertForMaskedLM(BertConfig(hidden_size=32, num_attention_heads=4, num_hidden_layers=1,
                                            intermediate_size=64, vocab_size=97)), k=4, estimate_width=8)
    with pytest.raises(ValueError, match="query_rows needs causal SEA layers"):
        Distiller(bert, windows(), DistillConfig(steps=1, seq_len=32, query_rows=4))
    model = tiny_llama()
    attach_baseline(model, "indexer")
    with pytest.raises(ValueError, match="train SEA only"):
        Distiller(model, windows(), DistillConfig(steps=1, seq_len=32, updates_per_pass=2),
                  method=baseline_layers(model))


def test_rows_come_in_aligned_runs():
    from sea_attention.tools.distill.trainer import ROW_RUN

    model = tiny_llama()
    call = _sea_call(model, windows().batch(0, 1))
    call.query = torch.randn(1, 4, 200, 16)  # a longer window: 200 rows, the last run 8 rows short
    distiller = Distiller(model, windows(), DistillConfig(steps=40, seq_len=32, query_rows=3 * ROW_RUN))
    for step in range(40):
        distiller.step = step
        rows = distiller._query_rows(call)
        starts = rows[::ROW_RUN]
        assert bool((starts % ROW_RUN == 0).all()) and int(rows.max()) < 200
        assert len(rows) == 3 * ROW_RUN or int(rows[-1]) == 199  # short only where the tail run was drawn


def test_a_checkpoint_from_before_the_relative_hidden_loss_resumes_only_with_the_plain_one(tmp_path):
    config = DistillConfig(stage="full", steps=4, seq_len=32, hidden_loss="mse")
    Distiller(tiny_llama(), windows(), config, tmp_path).run(progress=False, until=2)
    state = load_checkpoint(tmp_path)
    for name in ("hidden_loss", "query_rows", "updates_per_pass"):  # as written before these settings existed
        del state["config"][name]
    save_checkpoint(tmp_path, state)
    with pytest.raises(ValueError, match="hidden_loss: checkpoint 'mse', now 'relative'"):
        Distiller(tiny_llama(), windows(), DistillConfig(stage="full", steps=4, seq_len=32), tmp_path).resume()
    assert Distiller(tiny_llama(), windows(), config, tmp_path).resume()


def test_an_estimator_checkpoint_resumes_whatever_the_hidden_loss_and_a_wider_k_is_named(tmp_path):
    config = DistillConfig(steps=4, seq_len=32)
    Distiller(tiny_llama(), windows(), config, tmp_path).run(progress=False, until=2)
    state = load_checkpoint(tmp_path)
    del state["config"]["hidden_loss"]  # an estimator-stage checkpoint from before the setting: no effect there
    del state["layers"]  # nor the layers' settings: the shapes are still checked
    save_checkpoint(tmp_path, state)
    assert Distiller(tiny_llama(), windows(), config, tmp_path).resume()
    torch.manual_seed(0)
    wider = patch(LlamaForCausalLM(tiny_llama().config).eval(), k=4, estimate_width=16)
    with pytest.raises(ValueError, match="patched with other SEA settings"):
        Distiller(wider, windows(), config, tmp_path).resume()


def test_row_subsets_are_refused_for_the_block_grouping():
    model = tiny_llama()
    from sea_attention.hf import set_runtime

    set_runtime(model, grouping="block")
    with pytest.raises(ValueError, match="needs a per-query grouping"):
        Distiller(model, windows(), DistillConfig(steps=1, seq_len=32, query_rows=8))


@pytest.mark.parametrize("rows, expected", [(0, 2), (8, 4)])
def test_the_teachers_attention_is_computed_once_per_layer_when_every_row_trains(monkeypatch, rows, expected):
    import sea_attention.tools.distill.trainer as trainer
    from sea_attention.hf import interface

    calls = []
    for module in (trainer, interface):  # the trainer's targets and LayerCall.dense
        original = getattr(module, "reference_attention", None) or module.exact_attention
        name = "reference_attention" if hasattr(module, "reference_attention") else "exact_attention"
        monkeypatch.setattr(module, name, lambda *a, _f=original, **k: calls.append(1) or _f(*a, **k))
    config = DistillConfig(steps=1, seq_len=32, query_rows=rows, checkpoint_every=0)
    Distiller(tiny_llama(), windows(), config).run(progress=False)
    assert len(calls) == expected  # 2 layers: every row, once each; rows: the dense forward + the rows' targets


def test_query_rows_past_block_from_train_per_query_and_the_policy_comes_back():
    """Row subsets of windows longer than block_from train every sampled row per query (the estimate the
    policy's blocks select with): the same weights as training with the policy off, which then stays on."""
    from sea_attention.hf import set_runtime

    trained = {}
    for block_from in (16, 0):
        model = tiny_llama()
        set_runtime(model, block_from=block_from, query_block=8)  # 16: rows past 16 keys run the block grouping
        config = DistillConfig(steps=2, seq_len=32, query_rows=24, checkpoint_every=0)  # runs of 16: past row 16 too
        Distiller(model, windows(), config).run(progress=False)
        assert all(sea.config.block_from == block_from for _, _, sea in sea_layers(model))
        trained[block_from] = {name: p.detach().clone() for name, p in model.named_parameters() if ".sea." in name}
    assert trained[0] and trained[16].keys() == trained[0].keys()
    for name, value in trained[0].items():
        torch.testing.assert_close(trained[16][name], value, rtol=0, atol=0)
