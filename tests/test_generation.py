"""Generation through the Hugging Face cache: step-by-step decoding equals the full forward."""

import pytest
import torch
from transformers import (
    DynamicCache, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM,
    QuantizedCache, StaticCache,
)

from sea_attention.hf import cache_kwargs, patch, sea_attention_forward, sea_layers, set_runtime
from sea_attention.hf.decoding import STATE_ATTR, DecodingStateError, find_cache

VOCAB = 101


def build(family, **sea):
    torch.manual_seed(0)
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                             num_hidden_layers=2, intermediate_size=128, vocab_size=VOCAB,
                                             max_position_embeddings=256))
    elif family == "opt":
        model = OPTForCausalLM(OPTConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, ffn_dim=128,
                                         vocab_size=VOCAB, max_position_embeddings=256, word_embed_proj_dim=64))
    else:
        model = GPT2LMHeadModel(GPT2Config(n_embd=64, n_head=4, n_layer=2, vocab_size=VOCAB, n_positions=256))
    model.config.pad_token_id = 0
    return patch(model.eval(), k=3, estimate_width=8, **sea)


FAMILIES = ["llama", "opt", "gpt2"]


@pytest.mark.parametrize("family", FAMILIES)
def test_chunked_prefill_and_steps_equal_full_forward(family):
    model = build(family)
    ids = torch.randint(1, VOCAB, (2, 60))
    mask = torch.ones_like(ids)
    mask[1, :6] = 0  # left padding
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask, output_attentions=True, use_cache=False)
        cache, logits, maps, start = DynamicCache(), [], [], 0
        for size in [30, 7, 7, 1, 1, 1, 13]:
            end = start + size
            out = model(input_ids=ids[:, start:end], attention_mask=mask[:, :end], **cache_kwargs(cache),
                        use_cache=True, output_attentions=True)
            logits.append(out.logits)
            maps.append(out.attentions)
            start = end
    real = mask.bool()
    torch.testing.assert_close(torch.cat(logits, 1)[real], full.logits[real], atol=1e-4, rtol=0)
    for layer, dense in enumerate(full.attentions):  # the same keys are selected
        stepped = torch.cat([torch.nn.functional.pad(m[layer], (0, 60 - m[layer].shape[-1])) for m in maps], 2)
        assert torch.equal(stepped[real.unsqueeze(1).expand_as(stepped[..., 0])] > 0,
                           dense[real.unsqueeze(1).expand_as(dense[..., 0])] > 0)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_row_chunked_prefill_then_steps_equal_the_full_forward(family, monkeypatch):
    from sea_attention.core import chunked

    model = build(family)
    set_runtime(model, query_chunk=7)  # several row chunks in the prefill
    spans = []
    monkeypatch.setattr(chunked, "_span_context", lambda *a, f=chunked._span_context: spans.append(a[-2:]) or f(*a))
    ids = torch.randint(1, VOCAB, (2, 40))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask, output_attentions=True, use_cache=False)  # the full forward
        assert not spans
        cache = DynamicCache()
        logits = [model(input_ids=ids[:, :30], attention_mask=mask[:, :30], **cache_kwargs(cache),
                        use_cache=True).logits]
        assert len(spans) == 2 * 5  # two layers, rows 0..29 in spans of 7
        for end in range(31, 41):
            logits.append(model(input_ids=ids[:, end - 1:end], attention_mask=mask[:, :end], **cache_kwargs(cache),
                                use_cache=True).logits)
    assert len(spans) == 2 * 5  # decoding steps run the full forward
    real = mask.bool()
    torch.testing.assert_close(torch.cat(logits, 1)[real], full.logits[real], atol=1e-4, rtol=0)


@pytest.mark.parametrize("family, mode, sea", [
    ("llama", "greedy", {}), ("opt", "greedy", {}), ("gpt2", "greedy", {}), ("llama", "sample", {}),
    ("llama", "beam", {}), ("opt", "beam", {}), ("llama", "beam", {"key_bounds": True}),
    ("llama", "beam", {"grouping": "block", "query_block": 8, "candidates": 3}),
    ("gpt2", "greedy", {"grouping": "block", "query_block": 8, "candidates": 3}),
    ("llama", "beam", {"block_from": 16, "query_block": 8, "block_candidates": 3})])  # the prompt's rows, then blocks
def test_generate_matches_generation_without_cache(family, mode, sea):
    model = build(family, **sea)
    ids = torch.randint(1, VOCAB, (2, 12))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=24, min_new_tokens=24, pad_token_id=0)
    if mode == "sample":
        kwargs.update(do_sample=True, top_k=0, top_p=1.0)
    elif mode == "beam":
        kwargs.update(num_beams=3, do_sample=False)
    else:
        kwargs.update(do_sample=False)
    torch.manual_seed(1)
    cached = model.generate(**kwargs, use_cache=True)
    torch.manual_seed(1)
    recomputed = model.generate(**kwargs, use_cache=False)
    assert cached.shape == (2, 36)
    assert torch.equal(cached, recomputed)


def test_cropping_the_cache_is_refused():
    model = build("llama")
    cache = DynamicCache()
    with torch.no_grad():
        model(input_ids=torch.randint(1, VOCAB, (1, 10)), **cache_kwargs(cache), use_cache=True)
    with pytest.raises(NotImplementedError, match="cannot be cropped"):
        cache.crop(5)


def test_out_of_sync_cache_is_an_error():
    model = build("llama")
    cache = DynamicCache()
    with torch.no_grad():
        model(input_ids=torch.randint(1, VOCAB, (1, 10)), **cache_kwargs(cache), use_cache=True)
        for layer in cache.layers:
            layer.sea_state.seen = 3  # simulate a cache that lost track
        with pytest.raises(ValueError, match="past keys"):
            model(input_ids=torch.randint(1, VOCAB, (1, 1)), **cache_kwargs(cache), use_cache=True)


def test_each_step_reuses_the_decoding_state():
    """Per-token decoding continues the prefill's state: the Performer sums grow by exactly the
    new key's features (a fallback that recomputed or skipped the state would not)."""
    model = build("llama")
    ids = torch.randint(1, VOCAB, (1, 11))
    cache = DynamicCache()
    with torch.no_grad():
        model(input_ids=ids[:, :10], **cache_kwargs(cache), use_cache=True)
        before = [(layer.sea_state, *(x.clone() for x in layer.sea_state.performer)) for layer in cache.layers]
        model(input_ids=ids[:, 10:], **cache_kwargs(cache), use_cache=True)
    for (_, module, sea), layer, (state, kv, normaliser) in zip(sea_layers(model), cache.layers, before):
        assert layer.sea_state is state and state.seen == 11
        new_key, new_value = layer.keys[:, :, -1:], layer.values[:, :, -1:]  # (B, H_kv, 1, d)
        phi = sea.estimator.features(new_key, is_query=False, root=module.scaling ** 0.5)  # (B, H_kv, 1, m)
        torch.testing.assert_close(state.performer[1] - normaliser, phi[:, :, 0], atol=1e-5, rtol=1e-5)
        grown_values = (state.performer[0] - kv)[..., -new_value.shape[-1]:]  # (B, H_kv, m, d): the V part
        torch.testing.assert_close(grown_values, phi.transpose(-1, -2) @ new_value, atol=1e-5, rtol=1e-5)


def test_the_cache_is_found_whatever_its_keyword():
    cache = DynamicCache()
    assert find_cache((), {"cache": cache}) is cache
    assert find_cache((), {"past_key_values": cache}) is cache
    assert find_cache((), {"a_future_name": cache, "use_cache": True}) is cache
    assert find_cache((torch.zeros(1), cache), {}) is cache
    assert find_cache((), {"use_cache": True}) is None


def test_decoding_without_a_state_is_refused():
    """A call with past keys and no cache to carry SEA's state must not compute something else."""
    model = build("llama")
    module = sea_layers(model)[0][1]
    q, k, v = torch.randn(1, 4, 1, 16), torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 16)
    with pytest.raises(DecodingStateError, match=r"4 past keys .* no transformers Cache .*transformers \d"):
        sea_attention_forward(module, q, k, v, None, scaling=0.25)


def test_a_quantized_cache_is_refused_before_it_computes():
    """A quantized cache hands back dequantized past keys, not the ones SEA's state was built from: the first
    call that would build that state is refused, naming the layer type and the caches that work."""
    model = build("llama")
    ids = torch.randint(1, VOCAB, (1, 12))
    cache = QuantizedCache(backend="fp8", config=model.config)
    with torch.no_grad(), pytest.raises(DecodingStateError, match=r"Fp8QuantizedLayer .*GrowingCache, DynamicCache"):
        model(input_ids=ids, **cache_kwargs(cache), use_cache=True)


def test_a_static_cache_is_refused():
    """A static cache hands the attention its whole preallocated length, not the keys so far: refused."""
    model = build("llama")
    cache = StaticCache(config=model.config, max_cache_len=64)
    with torch.no_grad(), pytest.raises(ValueError, match="static caches are not supported"):
        model(input_ids=torch.randint(1, VOCAB, (1, 12)), **cache_kwargs(cache), use_cache=True)


def test_float32_prefix_sums_are_a_runtime_choice_that_generates_like_its_full_forward():
    """``set_runtime(bin_sums_dtype="float32")`` changes no weight: its layers store float32 sums, and greedy
    generation with the cache gives the tokens its own full forwards pick."""
    model = build("llama")
    set_runtime(model, bin_sums_dtype="float32")
    assert all(sea.config.bin_sums_dtype == "float32" for *_, sea in sea_layers(model))
    ids = torch.randint(1, VOCAB, (1, 30))
    with torch.no_grad():
        out = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False)
        for end in range(30, out.shape[1]):
            assert model(input_ids=out[:, :end], use_cache=False).logits[0, -1].argmax() == out[0, end]


@pytest.mark.parametrize("family, mode", [("llama", "greedy"), ("opt", "beam"), ("gpt2", "greedy"), ("llama", "beam")])
def test_the_length_policy_generates_like_its_full_forward_across_the_length(family, mode):
    """``dense_until=20``: a 12-token prompt is prefilled densely (the states keep the queries), generation
    passes 20 tokens and SEA takes over; the tokens equal generation without a cache, and the logits
    of each step equal one full forward's."""
    model = build(family, dense_until=20)
    ids = torch.randint(1, VOCAB, (2, 12))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=24, min_new_tokens=24, pad_token_id=0,
                  do_sample=False, num_beams=3 if mode == "beam" else 1)
    cached = model.generate(**kwargs, use_cache=True)
    assert torch.equal(cached, model.generate(**kwargs, use_cache=False))
    full_mask = torch.cat([mask, torch.ones(2, 24, dtype=mask.dtype)], 1)
    with torch.no_grad():
        full = model(input_ids=cached, attention_mask=full_mask, use_cache=False).logits
        cache, logits = DynamicCache(), []
        logits.append(model(input_ids=cached[:, :12], attention_mask=full_mask[:, :12], **cache_kwargs(cache),
                            use_cache=True).logits)
        states = [getattr(layer, STATE_ATTR) for layer in cache.layers]
        assert all(state.queries is not None for state in states)  # dense so far: queries kept
        for end in range(13, 37):
            logits.append(model(input_ids=cached[:, end - 1:end], attention_mask=full_mask[:, :end],
                                **cache_kwargs(cache), use_cache=True).logits)
        assert all(state.holds_sea for state in states)
    real = full_mask.bool()
    torch.testing.assert_close(torch.cat(logits, 1)[real], full[real], atol=1e-4, rtol=0)
