"""sea_attention.hf.patch on tiny random models of every supported family (no downloads)."""

import pytest
import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    DynamicCache,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.masking_utils import eager_mask, sdpa_mask

from sea_attention import SEAConfig
from sea_attention.hf import (
    LayerCall,
    cache_kwargs,
    dense_attention,
    family_of,
    is_patched,
    layer_override,
    patch,
    sea_budget,
    sea_layers,
    set_budget,
    set_runtime,
    unpatch,
)
from sea_attention.hf.masks import key_padding_mask

VOCAB, T = 100, 12
_DECODER = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128)
BUILDERS = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**_DECODER)),
    "mistral": lambda: MistralForCausalLM(MistralConfig(**_DECODER)),  # sliding_window=4096 > T
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**_DECODER)),
    "opt": lambda: OPTForCausalLM(OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                            num_attention_heads=4, max_position_embeddings=128,
                                            word_embed_proj_dim=32)),
    "gpt2": lambda: GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128)),
    "bert": lambda: BertModel(BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=64, max_position_embeddings=128)),
    "bert-cls": lambda: BertForSequenceClassification(
        BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                   intermediate_size=64, max_position_embeddings=128, num_labels=3)),
}
NAMES = list(BUILDERS)
CAUSAL = ["llama", "mistral", "qwen2", "opt", "gpt2"]
EXACT = dict(gating=False, k=T, estimate_width=16)  # every key selected, no gates: dense attention


def tiny_model(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return BUILDERS[name]().eval()


def batch(name: str, padded: bool = True, t: int = T, seed: int = 1) -> dict[str, torch.Tensor]:
    """Two sequences; the second padded by 4 (left for decoders, right for BERT)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (2, t), generator=g)
    mask = torch.ones(2, t, dtype=torch.long)
    if padded:
        if name.startswith("bert"):
            mask[1, -4:] = 0
        else:
            mask[1, :4] = 0
    return {"input_ids": ids, "attention_mask": mask}


def output(model, inputs, **kw):
    """(per-token output, mask of the positions to compare)."""
    out = model(**inputs, **kw)
    if hasattr(out, "logits") and out.logits.dim() == 2:  # sequence classification: one row per sample
        return out.logits, torch.ones(out.logits.shape[0], dtype=torch.bool)
    values = out.logits if hasattr(out, "logits") else out.last_hidden_state
    return values, inputs["attention_mask"].bool()


def assert_same_outputs(a, b, atol=1e-4):
    (x, mask), (y, _) = a, b
    torch.testing.assert_close(x[mask], y[mask], atol=atol, rtol=1e-4)


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("name", NAMES)
@torch.no_grad()
def test_full_budget_without_gating_matches_dense(name, padded):
    model = tiny_model(name)
    inputs = batch(name, padded)
    dense = output(model, inputs)
    patch(model, **EXACT)
    assert model.config._attn_implementation == "sea"
    assert_same_outputs(output(model, inputs), dense)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
@torch.no_grad()
def test_greedy_generation_with_padding_matches_dense(name):
    """Decoding: queries are a suffix of the cached keys, and the padding mask grows."""
    model = tiny_model(name)
    inputs = batch(name, padded=True)
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    dense = model.generate(**inputs, **kw)
    patch(model, gating=False, k=T + 5, estimate_width=16)
    assert torch.equal(model.generate(**inputs, **kw), dense)


@pytest.mark.parametrize("name", CAUSAL)
@torch.no_grad()
def test_causality_canary(name):
    """Changing token j never changes the outputs before j (default gating, small k)."""
    model = patch(tiny_model(name), k=2, estimate_width=8)
    t, j = 24, 15
    ids = batch(name, padded=False, t=t)["input_ids"]
    changed = ids.clone()
    changed[:, j:] = (changed[:, j:] + 7) % VOCAB
    before = model(input_ids=ids).logits
    after = model(input_ids=changed).logits
    torch.testing.assert_close(after[:, :j], before[:, :j], atol=1e-6, rtol=0)
    assert not torch.allclose(after[:, j:], before[:, j:])


@pytest.mark.parametrize("name", NAMES)
@torch.no_grad()
def test_output_attentions_are_sparse_probabilities(name):
    model = patch(tiny_model(name), k=3, estimate_width=8)
    t = 20
    out = model(**batch(name, t=t), output_attentions=True)
    heads = model.config.num_attention_heads
    assert len(out.attentions) == model.config.num_hidden_layers
    for attention in out.attentions:
        assert attention.shape == (2, heads, t, t)
        sums = attention.sum(-1)
        got_keys = sums > 0
        torch.testing.assert_close(sums[got_keys], torch.ones_like(sums[got_keys]))
        assert bool(got_keys[0].any(0).all())  # unpadded: every query gets keys in some head (budgets span heads)
        assert bool((attention > 0).sum(-1).le(t).all())
        assert int((attention[0] > 0).sum(-1).max()) < t  # k=3 out of 20 keys: sparse


@pytest.mark.parametrize("name", NAMES)
@torch.no_grad()
def test_dense_attention_switch(name):
    model = tiny_model(name)
    inputs = batch(name)
    dense = output(model, inputs)
    patch(model, k=2, estimate_width=8)
    sea = output(model, inputs)
    with dense_attention(model):
        assert model.config._attn_implementation == "eager"
        assert_same_outputs(output(model, inputs), dense, atol=1e-5)
    assert model.config._attn_implementation == "sea"
    assert_same_outputs(output(model, inputs), sea, atol=0)


def softmax_attention(call: LayerCall):
    """Dense attention written out here, independent of the library's reference ops."""
    groups = call.query.shape[1] // call.key.shape[1]
    k, v = (x.repeat_interleave(groups, 1) for x in (call.key, call.value))
    scores = call.query @ k.transpose(-1, -2) * call.scaling  # (B, H, Tq, Tk)
    tq, tk = scores.shape[-2:]
    allowed = call.key_valid[:, None, None, :]
    if call.causal:
        allowed = allowed & torch.ones(tq, tk, dtype=torch.bool).tril(tk - tq)
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num(0.0)
    return probs @ v, probs


@pytest.mark.parametrize("name", NAMES)
@torch.no_grad()
def test_layer_override(name):
    model = tiny_model(name)
    inputs = batch(name)
    dense = output(model, inputs)
    patch(model, k=2, estimate_width=8)
    sea = output(model, inputs)
    calls = []

    def record(call: LayerCall):
        calls.append((call.layer_idx, call.query.shape, call.key.shape, call.key_valid.shape, call.causal))
        return softmax_attention(call)

    with layer_override(model, record):
        assert_same_outputs(output(model, inputs), dense, atol=1e-5)
    heads = model.config.num_attention_heads
    assert [c[0] for c in calls] == [0, 1]
    assert calls[0][1][:3] == (2, heads, T) and calls[0][3] == (2, T)
    assert calls[0][4] is (not name.startswith("bert"))
    with layer_override(model, lambda call: None):  # None: SEA runs as usual
        assert_same_outputs(output(model, inputs), sea, atol=0)
    assert all(m.sea_override is None for _, m, _ in sea_layers(model))
    with pytest.raises(ZeroDivisionError), layer_override(model, lambda call: 1 / 0):
        output(model, inputs)
    assert all(m.sea_override is None for _, m, _ in sea_layers(model))  # cleared on errors too


@torch.no_grad()
def test_layer_override_is_per_model():
    a, b = patch(tiny_model("llama"), k=2, estimate_width=8), patch(tiny_model("llama"), k=2, estimate_width=8)
    inputs = batch("llama")
    seen = []
    with layer_override(a, lambda call: seen.append(call.layer_idx)):
        b(**inputs)
        assert seen == []
        a(**inputs)
    assert seen == [0, 1]


@torch.no_grad()
def test_layer_call_helpers_match_the_layer():
    model = patch(tiny_model("llama"), k=3, estimate_width=8)
    inputs = batch("llama")
    sea = output(model, inputs)
    with layer_override(model, lambda call: (call.run_sea().context, None)):
        assert_same_outputs(output(model, inputs), sea, atol=0)
    with layer_override(model, lambda call: call.dense()):
        via_helper = output(model, inputs)
    with layer_override(model, softmax_attention):
        assert_same_outputs(via_helper, output(model, inputs), atol=1e-5)


def test_sea_modules_are_submodules_with_state():
    model = patch(tiny_model("llama"), k=4, estimate_width=8)
    keys = model.state_dict().keys()
    assert "model.layers.0.self_attn.sea.estimator.features.projection" in keys  # a buffer
    assert "model.layers.1.self_attn.sea.estimator.key_scale" in keys  # a parameter
    assert any(".sea." in n for n, _ in model.named_parameters())
    names = [name for name, _, _ in sea_layers(model)]
    assert names == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    assert [sea.layer_idx for _, _, sea in sea_layers(model)] == [0, 1]
    bert = patch(tiny_model("bert-cls"), k=4, estimate_width=8)
    assert any(k.startswith("bert.encoder.layer.0.attention.self.sea.") for k in bert.state_dict())
    assert sea_layers(bert)[0][2].config.causal is False
    assert model.config.sea_config["k"] == 4 and model.config.sea_dense_implementation == "sdpa"


def test_config_is_read_from_the_model():
    llama = patch(tiny_model("llama"), SEAConfig(num_heads=4, num_kv_heads=2, head_dim=8, k=5, estimate_width=8),
                  k=6, max_positions=64)
    cfg = sea_layers(llama)[0][2].config
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.causal) == (4, 2, 8, True)
    assert (cfg.k, cfg.estimate_width, cfg.max_positions) == (6, 8, 64)  # overrides win
    gpt2 = sea_layers(patch(tiny_model("gpt2")))[0][2].config
    assert (gpt2.num_kv_heads, gpt2.max_positions, gpt2.causal) == (4, 128, True)
    assert family_of(tiny_model("bert")).name == "bert"


def test_errors():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="valid fields"):
        patch(model, not_a_field=3)
    with pytest.raises(ValueError, match="does not match"):
        patch(model, SEAConfig(num_heads=8, head_dim=8))
    with pytest.raises(ValueError, match="does not match"):
        patch(model, causal=False)
    assert not is_patched(model) and model.config._attn_implementation == "sdpa"
    with pytest.raises(ValueError, match="not SEA-patched"):
        set_budget(model, 4)
    patch(model, k=4, estimate_width=8)
    with pytest.raises(ValueError, match="already SEA-patched"):
        patch(model)
    with pytest.raises(ValueError, match="positive integer"):
        set_budget(model, 0)
    neox = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1,
                                            num_attention_heads=4, intermediate_size=64))
    with pytest.raises(ValueError, match="supported families: llama .*opt.*gpt2.*bert"):
        patch(neox)


@torch.no_grad()
def test_unpatch_restores_dense_model():
    model = tiny_model("opt")
    inputs = batch("opt")
    dense = output(model, inputs)
    unpatch(patch(model, k=2, estimate_width=8))
    assert not is_patched(model) and model.config._attn_implementation == "sdpa"
    assert not any(".sea." in k for k in model.state_dict())
    assert not hasattr(model.config, "sea_config")
    assert_same_outputs(output(model, inputs), dense, atol=0)


@torch.no_grad()
def test_dynamic_budget_changes_nnz():
    model = patch(tiny_model("llama"), k=2, estimate_width=8)
    inputs = batch("llama", padded=False, t=32)

    def nnz():
        return sum(int((a > 0).sum()) for a in model(**inputs, output_attentions=True).attentions)

    base = nnz()
    with sea_budget(model, 8):
        wide = nnz()
        with sea_budget(model, 1):
            narrow = nnz()
        assert nnz() == wide
    assert narrow < base < wide
    assert nnz() == base
    set_budget(model, 8)
    assert nnz() == wide
    set_budget(model, None)
    assert nnz() == base


def test_set_runtime_switches_grouping_without_touching_weights():
    model = patch(tiny_model("llama"), k=2, estimate_width=8)
    inputs = batch("llama", padded=True, t=40)
    weights = {n: p.clone() for n, p in model.named_parameters()}
    per_query = output(model, inputs)[0]
    set_runtime(model, grouping="block", query_block=8)
    assert all(sea.config.grouping == "block" and sea.config.query_block == 8 for _, _, sea in sea_layers(model))
    per_block = output(model, inputs)[0]
    assert not torch.allclose(per_query, per_block)  # a different selection
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())
    set_runtime(model, grouping="query")
    torch.testing.assert_close(output(model, inputs)[0], per_query)
    set_runtime(model, block_from=16, query_block=8, block_candidates=2)  # rows past 16 keys in blocks
    assert all(sea.config.block_from == 16 for _, _, sea in sea_layers(model))
    assert not torch.allclose(output(model, inputs)[0], per_query)
    with pytest.raises(ValueError, match="block_from=0 hands it none"):  # block_candidates=2 would do nothing
        set_runtime(model, block_from=0)
    set_runtime(model, block_from=0, block_candidates=4)
    torch.testing.assert_close(output(model, inputs)[0], per_query)
    with pytest.raises(ValueError, match="set_runtime changes only"):
        set_runtime(model, estimate_width=16)
    with pytest.raises(ValueError, match="grouping must be one of"):
        set_runtime(model, grouping="rows")


def test_new_modules_take_the_model_dtype():
    model = tiny_model("llama").to(torch.bfloat16)
    patch(model, k=2, estimate_width=8)
    assert {t.dtype for _, _, s in sea_layers(model) for t in s.state_dict().values()} == {torch.bfloat16}
    with torch.no_grad():
        assert model(**batch("llama")).logits.dtype == torch.bfloat16


@pytest.mark.parametrize("causal", [True, False])
def test_4d_masks_reduce_to_key_padding(causal):
    """The dense masks of the built-in implementations give back the padding mask."""
    pad = torch.tensor([[True] * 6, [False, False, True, True, True, True]])
    if not causal:
        pad = pad.flip(-1)  # right padding
    for make in (sdpa_mask, eager_mask):
        kw = dict(dtype=torch.float32) if make is eager_mask else dict(allow_is_causal_skip=False)
        fn = None if causal else __import__("transformers").masking_utils.bidirectional_mask_function
        mask = make(batch_size=2, q_length=6, kv_length=6, attention_mask=pad,
                    **({"mask_function": fn} if fn else {}), **kw)
        assert torch.equal(key_padding_mask(mask, 2, 6, 6, causal), pad)
    assert key_padding_mask(None, 2, 6, 6, causal) is None


@torch.no_grad()
def test_sliding_window_shorter_than_the_sequence_warns():
    model = MistralForCausalLM(MistralConfig(**{**_DECODER, "sliding_window": 4})).eval()
    patch(model, k=2, estimate_width=8)
    with pytest.warns(UserWarning, match="sliding window"):
        model(**batch("mistral"))


@torch.no_grad()
def test_left_padding_with_rank_position_ids_gives_the_unpadded_logits():
    """RoPE rotates q and k by their position ids; dense attention only sees differences of
    positions, SEA's estimator sees the rotated vectors themselves. With position ids that
    count real tokens (what generate passes), a left-padded prompt is exact."""
    model = patch(tiny_model("llama"), k=3, estimate_width=8)
    ids = torch.randint(1, VOCAB, (1, 16), generator=torch.Generator().manual_seed(3))
    pad = 5
    padded = torch.cat([torch.zeros(1, pad, dtype=torch.long), ids], 1)
    mask = torch.ones(1, 16 + pad, dtype=torch.long)
    mask[:, :pad] = 0
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    got = model(padded, attention_mask=mask, position_ids=positions).logits[:, pad:]
    torch.testing.assert_close(got, model(ids).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["llama", "mistral", "qwen2"])
@torch.no_grad()
def test_left_padding_without_position_ids_gives_the_unpadded_logits(name):
    """A direct forward of a left-padded prompt without position_ids: the patched RoPE model
    derives them from the mask (as generate does), so SEA sees the prompt alone's q and k;
    the same holds for a decoding step with a cache and the grown mask."""
    model = patch(tiny_model(name), k=3, estimate_width=8)
    ids = torch.randint(1, VOCAB, (1, 16), generator=torch.Generator().manual_seed(3))
    pad = 5
    padded = torch.cat([torch.zeros(1, pad, dtype=torch.long), ids], 1)
    mask = torch.ones(1, 16 + pad, dtype=torch.long)
    mask[:, :pad] = 0
    alone = model(ids).logits
    torch.testing.assert_close(model(padded, attention_mask=mask).logits[:, pad:], alone, atol=1e-5, rtol=1e-5)
    cache = cache_kwargs(DynamicCache())  # the cache a prefill makes itself
    model(padded[:, :-1], attention_mask=mask[:, :-1], use_cache=True, **cache)
    step = model(padded[:, -1:], attention_mask=mask, use_cache=True, **cache).logits
    torch.testing.assert_close(step[:, -1], alone[:, -1], atol=1e-5, rtol=1e-5)
    unpatch(model)
    assert not model.model._forward_pre_hooks  # unpatching removes the hook
