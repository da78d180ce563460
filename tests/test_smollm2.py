"""Integration on the real bundled teacher, SmolLM2-135M (converted once into the default cache)."""

import pytest
import torch

from sea_attention.app import assets
from sea_attention.tools.distill import DistillConfig, Distiller, TokenWindows, tokenize
from sea_attention.tools.evaluate import perplexity
from sea_attention.hf import cache_kwargs, dense_attention, from_pretrained, patch, save_pretrained

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    model, tokenizer = assets.load_model("smollm2-135m")
    return patch(model, k=32, estimate_width=64), tokenizer


def test_distil_evaluate_save_load(smollm2, tmp_path):
    model, tokenizer = smollm2
    assert model.config.sea_config["num_kv_heads"] == 3
    tokens = tokenize(tokenizer, assets.load_text("wiki", "train"))[:2000]
    config = DistillConfig(steps=6, seq_len=128, lr=3e-3, warmup_steps=1, checkpoint_every=0)
    history = Distiller(model, TokenWindows(tokens, 128), config).run(progress=False)
    assert sum(r.loss for r in history[-2:]) < sum(r.loss for r in history[:2])

    test = tokenize(tokenizer, assets.load_text("wiki", "test"))[:257]
    with dense_attention(model):
        dense, count = perplexity(model, test, 128, 128, progress=False)
    sea, _ = perplexity(model, test, 128, 128, progress=False)
    assert count == 254 and 5 < dense < 60 and dense < sea < 50 * dense

    save_pretrained(model, tmp_path / "sea", base_model="smollm2-135m", tokenizer=tokenizer)
    loaded, loaded_tokenizer = from_pretrained(tmp_path / "sea")
    ids = test[:64].unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    assert loaded_tokenizer("hello")["input_ids"] == tokenizer("hello")["input_ids"]


def test_decoding_equals_full_forward(smollm2):
    from transformers import DynamicCache

    model, tokenizer = smollm2
    ids = tokenize(tokenizer, assets.load_text("wiki", "test"))[300:348].unsqueeze(0)
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False).logits
        cache, steps = DynamicCache(), []
        for start, end in [(0, 40), (40, 45)] + [(i, i + 1) for i in range(45, 48)]:
            steps.append(model(input_ids=ids[:, start:end], **cache_kwargs(cache), use_cache=True).logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-4, rtol=0)
