"""Dense layers (``SEAConfig.dense_layers``): a listed layer outputs the dense model's attention on
every row, the other layers run SEA unchanged; decoding equals the full forward; bad lists are
refused, by the config and by the patch (a layer the model does not have)."""

import json

import pytest
import torch
from transformers import DynamicCache

from conftest import exact_attention, make_qkv, padding_mask
from sea_attention import DecodeState, SEAAttention, SEAConfig
from sea_attention.app.cli import main
from sea_attention.app.cli_args import layer_list
from sea_attention.core.ops.reference import exact_attention as reference_exact
from sea_attention.core.dense_rows import EVERY_ROW
from sea_attention.hf import cache_kwargs, dense_attention, from_pretrained, save_pretrained, sea_layers, set_runtime
from sea_attention.hf.decoding import STATE_ATTR
from test_generation import VOCAB, build


def layer(layer_idx: int, **options) -> SEAAttention:
    settings = dict(num_heads=4, num_kv_heads=2, head_dim=16, k=3, estimate_width=8, max_positions=256,
                    query_chunk=7) | options
    torch.manual_seed(0)
    module = SEAAttention(SEAConfig(**settings), layer_idx).eval()
    for p in module.parameters():  # every part must matter (the CNN residual starts at zero)
        p.data.add_(0.05 * torch.randn_like(p))
    return module


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("grouping", ["query", "block"])
def test_a_dense_layer_is_exact_on_every_row_and_the_others_are_seas(causal, grouping):
    q, k, v = make_qkv(2, 4, 2, 30, 30, 16)
    mask = padding_mask(2, 30, 5, left=causal)
    options = dict(causal=causal, grouping=grouping, query_block=4, dense_layers=(1, 3))
    with torch.no_grad():
        dense = layer(3, **options)(q, k, v, attention_mask=mask, return_attention=True)
        other = layer(2, **options)(q, k, v, attention_mask=mask)
        plain = layer(2, causal=causal, grouping=grouping, query_block=4)(q, k, v, attention_mask=mask)
    exact, probs = reference_exact(q, k, v, mask, 16 ** -0.5, causal)
    valid = mask[:, None, :, None]
    torch.testing.assert_close(dense.context * valid, exact * valid)
    torch.testing.assert_close(dense.attention * valid, probs * valid)
    keys = mask.long().cumsum(-1) if causal else mask.long().sum(-1, keepdim=True).expand(-1, 30)
    assert torch.equal(dense.nnz * mask[:, None], (keys * mask)[:, None].expand(-1, 4, -1).to(dense.nnz.dtype))
    assert torch.equal(other.context, plain.context)


@pytest.mark.parametrize("causal", [True, False])
def test_a_dense_layers_context_only_is_exact(causal):
    q, k, v = make_qkv(2, 4, 2, 33, 33, 16)
    mask = padding_mask(2, 33, 4, left=causal)
    with torch.no_grad():
        got = layer(0, causal=causal, dense_layers=(0,)).context_only(q, k, v, attention_mask=mask)
    valid = mask[:, None, :, None]
    torch.testing.assert_close(got * valid, exact_attention(q, k, v, mask, causal) * valid)


@pytest.mark.parametrize("schedule", [[6, 1, 1, 1, 1, 10, 1, 1], [1] * 20])
@pytest.mark.parametrize("runner", ["context_only", "forward"])
def test_decoding_a_dense_layer_equals_its_full_forward_and_never_builds_seas_state(schedule, runner):
    module = layer(1, dense_layers=(1,), dense_until=9)
    t = sum(schedule)
    q, k, v = make_qkv(2, 4, 2, t, t, 16)
    mask = padding_mask(2, t, 3)
    state, start, steps = DecodeState(), 0, []
    run = module.context_only if runner == "context_only" else lambda *a, **o: module(*a, **o).context
    with torch.no_grad():
        full = module(q, k, v, attention_mask=mask).context
        for size in schedule:
            steps.append(run(q[:, :, start:start + size], k[:, :, :start + size], v[:, :, :start + size],
                             attention_mask=mask[:, :start + size], state=state))
            start += size
    torch.testing.assert_close(torch.cat(steps, 2), full, atol=2e-5, rtol=1e-5)
    valid = mask[:, None, :, None]
    torch.testing.assert_close(full * valid, exact_attention(q, k, v, mask, True) * valid)
    if runner == "context_only":
        assert state.seen == t and not state.holds_sea  # past dense_until too: the layer stays dense


@pytest.mark.parametrize("value, message", [
    ((-1,), "dense_layers must be a list of layer indices"),
    ((0, 2, 0), "dense_layers lists a layer twice"),
    ("0,1", "dense_layers must be a list or tuple of layer indices"),
    (3, "dense_layers must be a list or tuple of layer indices"),
    ((1.5,), "dense_layers must be a list of layer indices"),
])
def test_dense_layers_are_validated(value, message):
    with pytest.raises(ValueError, match=message):
        SEAConfig(num_heads=4, head_dim=16, dense_layers=value)


def test_a_saved_config_keeps_its_dense_layers():
    config = SEAConfig(num_heads=4, head_dim=16, dense_layers=[5, 0])
    assert config.dense_layers == (0, 5)
    assert SEAConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_the_patch_and_set_runtime_refuse_a_layer_the_model_lacks():
    with pytest.raises(ValueError, match=r"dense_layers \[2\] name layers the model does not have: .* 0-1"):
        build("llama", dense_layers=(0, 2))
    model = build("llama")
    with pytest.raises(ValueError, match=r"dense_layers \[7\]"):
        set_runtime(model, dense_layers=(7,), dense_until=4)
    assert all(sea.config.dense_layers == () and sea.config.dense_until == 0 for _, _, sea in sea_layers(model))
    set_runtime(model, dense_layers=[1])
    assert [sea.dense_until for _, _, sea in sea_layers(model)] == [0, EVERY_ROW]
    assert model.config.sea_config["dense_layers"] == (1,)
    assert all(sea.config.dense_layers == (1,) for _, _, sea in sea_layers(model))


@pytest.mark.parametrize("family", ["llama", "opt", "gpt2"])
def test_a_model_with_every_layer_dense_gives_the_dense_logits(family):
    model = build(family, dense_layers=(0, 1))
    ids = torch.randint(1, VOCAB, (2, 40))
    mask = torch.ones_like(ids)
    mask[1, :6] = 0
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        with dense_attention(model):
            want = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        set_runtime(model, dense_layers=(0,))
        half = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-4, rtol=0)
    assert (half[real] - want[real]).abs().max() > 1e-3  # layer 1 runs SEA again


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_generation_with_a_dense_layer_equals_its_full_forward(family):
    model = build(family, dense_layers=(0,))
    ids = torch.randint(1, VOCAB, (2, 12))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=20, min_new_tokens=20, pad_token_id=0,
                  do_sample=False)
    cached = model.generate(**kwargs, use_cache=True)
    assert torch.equal(cached, model.generate(**kwargs, use_cache=False))
    full_mask = torch.cat([mask, torch.ones(2, 20, dtype=mask.dtype)], 1)
    with torch.no_grad():
        full = model(input_ids=cached, attention_mask=full_mask, use_cache=False).logits
        cache = DynamicCache()
        logits = [model(input_ids=cached[:, :12], attention_mask=full_mask[:, :12], **cache_kwargs(cache),
                        use_cache=True).logits]
        for end in range(13, 33):
            logits.append(model(input_ids=cached[:, end - 1:end], attention_mask=full_mask[:, :end],
                                **cache_kwargs(cache), use_cache=True).logits)
    states = [getattr(cache_layer, STATE_ATTR) for cache_layer in cache.layers]
    assert not states[0].holds_sea and states[1].holds_sea  # the dense layer never built SEA's state
    real = full_mask.bool()
    torch.testing.assert_close(torch.cat(logits, 1)[real], full[real], atol=1e-4, rtol=0)


def test_the_cli_reads_a_layer_list():
    assert layer_list("3,0, 1") == (3, 0, 1) and layer_list("none") == ()
    for bad, message in (("a,b", "such as 0,1"), ("-1", "layer indices >= 0"), ("", "layer indices >= 0")):
        with pytest.raises(Exception, match=message):
            layer_list(bad)


def test_patch_normalises_the_list():
    model = build("opt", dense_layers=[1])
    assert [sea.config.dense_layers for _, _, sea in sea_layers(model)] == [(1,), (1,)]
    assert list(model.config.sea_config["dense_layers"]) == [1]


def test_a_saved_model_keeps_its_dense_layers(tmp_path):
    model = build("llama", dense_layers=(1,))
    save_pretrained(model, tmp_path / "sea", include_base_weights=True)
    loaded, _ = from_pretrained(tmp_path / "sea")
    assert [sea.dense_until for _, _, sea in sea_layers(loaded)] == [0, EVERY_ROW]


def test_block_decoding_of_a_dense_layer_equals_its_full_forward():
    module = layer(0, dense_layers=(0,), grouping="block", query_block=4)
    q, k, v = make_qkv(1, 4, 2, 20, 20, 16)
    state = DecodeState()
    with torch.no_grad():
        full = module(q, k, v).context
        steps = [module.context_only(q[:, :, :9], k[:, :, :9], v[:, :, :9], state=state)]
        steps += [module.context_only(q[:, :, t - 1:t], k[:, :, :t], v[:, :, :t], state=state) for t in range(10, 21)]
    torch.testing.assert_close(torch.cat(steps, 2), full, atol=2e-5, rtol=1e-5)
    assert not state.holds_sea


def test_a_layer_turned_back_to_sea_mid_generation_starts_seas_state():
    """Cleared after a dense prompt, the layer builds SEA's state from the kept queries: its steps equal
    SEA's full forward."""
    module = layer(0, dense_layers=(0,))
    q, k, v = make_qkv(2, 4, 2, 24, 24, 16)
    state = DecodeState()
    with torch.no_grad():
        module.context_only(q[:, :, :12], k[:, :, :12], v[:, :, :12], state=state)
        module.config = module.config.replace(dense_layers=())
        steps = [module.context_only(q[:, :, t - 1:t], k[:, :, :t], v[:, :, :t], state=state) for t in range(13, 25)]
        full = module(q, k, v).context
    torch.testing.assert_close(torch.cat(steps, 2), full[:, :, 12:], atol=2e-5, rtol=1e-5)
    assert state.holds_sea


def test_the_cli_runs_dense_layers_and_distillation_refuses_them(tiny_model_dir, tmp_path, capsys):
    model, text = str(tiny_model_dir / "model"), str(tiny_model_dir / "text.txt")
    report = tmp_path / "eval.json"
    assert main(["eval", "--model", model, "--data", text, "--split", "test", "--seq-len", "32", "--k", "4",
                 "--dense-layers", "1", "--json", str(report), "--quiet"]) == 0
    assert json.loads(report.read_text())["sea_config"]["dense_layers"] == [1]
    assert main(["eval", "--model", model, "--data", text, "--split", "test", "--seq-len", "32", "--k", "4",
                 "--dense-layers", "2", "--quiet"]) == 2
    assert "dense_layers [2] name layers the model does not have" in capsys.readouterr().err
    assert main(["distill", "--model", model, "--data", text, "--steps", "1", "--seq-len", "32", "--k", "4",
                 "--dense-layers", "0", "--out", str(tmp_path / "sea"), "--quiet"]) == 2
    assert "sea distill trains every SEA layer and refuses --dense-layers (0,)" in capsys.readouterr().err
