"""Distillation on a tiny random Llama: losses go down, checkpoints resume exactly."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from sea_attention.distill import DistillConfig, Distiller, TokenWindows
from sea_attention.distill.checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint
from sea_attention.hf import patch


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


@pytest.mark.parametrize("stage", ["estimator", "full"])
def test_resume_reaches_the_same_weights(tmp_path, stage):
    config = DistillConfig(stage=stage, steps=6, seq_len=32, checkpoint_every=3, warmup_steps=1)
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
