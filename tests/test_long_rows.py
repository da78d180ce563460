"""The long-rows policy (``SEAConfig.block_from``): rows before the position run the per-query grouping,
the rest the block grouping with ``block_candidates``; every path, decoding and the reference agree."""

import pytest
import torch

from conftest import make_qkv, padding_mask
from sea_attention import DecodeState, SEAAttention, SEAConfig
from sea_attention.core.call import SEACall
from sea_attention.core.grouping import BlockGrouping, LongRowsGrouping, PerQueryGrouping, grouping_for

HEADS, KV_HEADS, DIM = 4, 2, 16


def _layer(**options) -> SEAAttention:
    settings = dict(k=6, estimate_width=16, query_block=8, query_chunk=7, block_from=24) | options
    torch.manual_seed(0)
    layer = SEAAttention(SEAConfig(num_heads=HEADS, num_kv_heads=KV_HEADS, head_dim=DIM, **settings))
    for p in layer.parameters():  # leave the zero-initialised CNN residual: every part must matter
        p.data.add_(0.05 * torch.randn_like(p))
    return layer


def _twin(layer: SEAAttention, **changes) -> SEAAttention:
    """The same weights under another config."""
    twin = SEAAttention(layer.config.replace(**changes))
    twin.load_state_dict(layer.state_dict())
    return twin


def _inputs(tokens=61, batch=2, pad=0, left=True, seed=1):
    torch.manual_seed(seed)
    q, k, v = make_qkv(batch, HEADS, KV_HEADS, tokens, tokens, DIM)
    return q, k, v, padding_mask(batch, tokens, pad, left=left)


@pytest.mark.parametrize("options", [dict(), dict(grouping="query_head", candidates=2), dict(block_candidates=1),
                                     dict(block_from=8, key_bounds=True), dict(block_from=64)])
def test_short_rows_are_the_per_query_groupings_and_long_rows_the_block_groupings(options):
    layer = _layer(**options).eval()
    cfg = layer.config
    per_query = _twin(layer, block_from=0, block_candidates=4).eval()
    block = _twin(layer, block_from=0, block_candidates=4, grouping="block", candidates=cfg.block_candidates).eval()
    q, k, v, _ = _inputs()
    cut = min(cfg.block_from, q.shape[2])
    with torch.no_grad():
        out = layer(q, k, v)
        torch.testing.assert_close(out.context[:, :, :cut], per_query(q, k, v).context[:, :, :cut], atol=1e-6, rtol=0)
        torch.testing.assert_close(out.context[:, :, cut:], block(q, k, v).context[:, :, cut:], atol=1e-6, rtol=0)
        torch.testing.assert_close(layer.context_only(q, k, v), out.context, atol=1e-6, rtol=0)


@pytest.mark.parametrize("pad, left", [(0, True), (5, True), (6, False)])
def test_decoding_across_block_from_equals_the_full_forward(pad, left):
    layer = _layer().eval()
    q, k, v, mask = _inputs(pad=pad, left=left)
    with torch.no_grad():
        full = layer(q, k, v, attention_mask=mask).context
        for prefill, chunk in ((10, 1), (20, 7), (30, 1), (3, 11)):  # before, across and after block_from
            state = DecodeState()
            parts = [layer.context_only(q[:, :, :prefill], k[:, :, :prefill], v[:, :, :prefill],
                                        attention_mask=mask[:, :prefill], state=state)]
            for lo in range(prefill, q.shape[2], chunk):
                hi = min(lo + chunk, q.shape[2])
                parts.append(layer(q[:, :, lo:hi], k[:, :, :hi], v[:, :, :hi], attention_mask=mask[:, :hi],
                                   state=state).context)
            torch.testing.assert_close(torch.cat(parts, 2), full, atol=2e-6, rtol=0, msg=f"prefill {prefill}")


def test_the_reference_path_gives_the_sparse_outputs_and_gradients():
    layer = _layer()
    reference = _twin(layer, attention_path="reference")
    q, k, v, mask = _inputs(pad=5)
    grads = []
    for module in (layer, reference):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        out = module(*leaves, attention_mask=mask)
        out.context.square().sum().backward()
        grads.append((out.context.detach(), *(x.grad for x in leaves)))
    for sparse, dense in zip(*grads):
        torch.testing.assert_close(sparse, dense, atol=2e-5, rtol=1e-5)


def test_the_attention_view_covers_both_parts():
    layer = _layer().eval()
    q, k, v, mask = _inputs(pad=5)
    with torch.no_grad():
        out = layer(q, k, v, attention_mask=mask, return_attention=True)
        plain = layer(q, k, v, attention_mask=mask)
    torch.testing.assert_close(out.context, plain.context, atol=1e-6, rtol=0)
    real = mask[:, None, :, None].expand(-1, HEADS, -1, 1).squeeze(-1)  # (B, H, Tq)
    torch.testing.assert_close(out.attention.sum(-1)[real], torch.ones(int(real.sum())))
    assert torch.equal((out.attention > 0).sum(-1), out.nnz)  # the view shows the keys each row attended


def test_only_the_short_rows_and_the_blocks_selecting_rows_are_estimated():
    layer = _layer().eval()
    q, k, v, _ = _inputs()
    with torch.no_grad():
        out = layer(q, k, v)
    assert out.estimate_rows.tolist() == list(range(24)) + [24, 32, 40, 48, 56]


def test_query_rows_are_refused_past_block_from_and_computed_before_it():
    layer = _layer().eval()
    q, k, v, _ = _inputs()
    with torch.no_grad():
        rows = torch.tensor([3, 17, 23])
        torch.testing.assert_close(layer(q, k, v, query_rows=rows).context, layer(q, k, v).context[:, :, rows],
                                   atol=1e-6, rtol=0)
        with pytest.raises(ValueError, match="below block_from=24"):
            layer(q, k, v, query_rows=torch.tensor([3, 24]))


@pytest.mark.parametrize("first, tq", [(0, 61), (0, 20), (5, 40), (30, 25)])
def test_spans_break_at_block_from_and_the_blocks_start_aligned(first, tq):
    grouping = grouping_for(_layer().config)
    starts = grouping.span_starts(first, tq)
    assert starts[0] == 0 and starts == sorted(set(starts)) and starts[-1] < tq
    cut = min(max(24 - first, 0), tq)
    if 0 < cut < tq:
        assert cut in starts
    assert all((first + lo) % 8 == 0 for lo in starts[1:] if first + lo >= 24)  # the first may start mid-block
    assert all(lo - prev <= 7 for prev, lo in zip(starts, starts[1:] + [tq]) if first + lo <= 24)  # query_chunk


def test_the_config_hands_long_rows_to_the_block_grouping():
    grouping = grouping_for(_layer().config)
    assert isinstance(grouping, LongRowsGrouping)
    assert isinstance(grouping.at(0, 24), PerQueryGrouping) and isinstance(grouping.at(24, 60), BlockGrouping)
    assert grouping.long.config.candidates == 16 and grouping.short.config.candidates == 1  # block_candidates' default
    assert grouping.at(20, 30) is grouping
    with pytest.raises(ValueError, match="offers per part"):
        grouping.offered(6, 30)
    with pytest.raises(ValueError, match="straddles block_from=24"):
        grouping.span_estimate_rows(0, 20, 30, torch.device("cpu"))
    assert grouping.span_estimate_rows(0, 24, 40, torch.device("cpu")).tolist() == [24, 32]
    positions = torch.tensor([5, 23, 24, 30, 47])
    assert grouping.selecting_positions(positions).tolist() == [5, 23, 24, 24, 40]
    assert grouping.tile_starts(positions).tolist() == [6, 24, 24, 24, 40]
    call = SEACall.build(grouping.config, _inputs(tokens=30)[:3], {})
    assert grouping.split(call) == 24


@pytest.mark.parametrize("changes, message", [
    (dict(block_from=20), "multiple of query_block=8"),
    (dict(grouping="block"), "grouping 'query' or 'query_head'"),
    (dict(causal=False, sinks=0, local_window=0), "causal=True"),
    (dict(attention_path="flex"), "attention_path='sparse'"),
    (dict(block_from=-8), "non-negative integer"),
    (dict(block_candidates=0), "positive integer"),
    (dict(block_from=0, block_candidates=8), "block_from=0 hands it none"),  # asked for, would change nothing
])
def test_bad_settings_are_refused_with_the_accepted_values(changes, message):
    with pytest.raises(ValueError, match=message):
        SEAConfig(**(dict(num_heads=HEADS, head_dim=DIM, query_block=8, block_from=24) | changes))


@pytest.mark.parametrize("dense_until", [30, 10])  # SEA starts past block_from, or before it
def test_a_dense_state_becomes_seas_past_block_from(dense_until):
    layer = _layer(dense_until=dense_until).eval()  # rows up to dense_until keys dense: the state keeps queries
    q, k, v, mask = _inputs(pad=3)
    with torch.no_grad():
        full = layer.context_only(q, k, v, attention_mask=mask)
        state = DecodeState()
        parts = [layer.context_only(q[:, :, :8], k[:, :, :8], v[:, :, :8], attention_mask=mask[:, :8], state=state)]
        for end in range(9, q.shape[2] + 1):
            parts.append(layer.context_only(q[:, :, end - 1:end], k[:, :, :end], v[:, :, :end],
                                            attention_mask=mask[:, :end], state=state))
    torch.testing.assert_close(torch.cat(parts, 2), full, atol=2e-6, rtol=0)


def test_on_by_default_where_it_applies_and_resolved_again_by_replace():
    config = SEAConfig(num_heads=HEADS, head_dim=DIM)
    assert (config.block_from, config.block_candidates) == (1024, 16)
    assert isinstance(grouping_for(config), LongRowsGrouping)
    assert config.to_dict()["block_from"] is None and config.to_dict()["block_candidates"] is None
    for changes in (dict(grouping="block"), dict(attention_path="flex"), dict(causal=False, sinks=0, local_window=0),
                    dict(block_from=0)):  # where the policy cannot run, or turned off: off, with 4 candidates
        changed = config.replace(**changes)
        assert (changed.block_from, changed.block_candidates) == (0, 4), changes
    assert config.replace(query_block=48).block_from == 1056  # rounded up: the first long row opens a block
    assert config.replace(grouping="block").replace(grouping="query").block_from == 1024
    assert config.replace(block_from=2048).block_candidates == 16
    assert SEAConfig.from_dict(config.to_dict()).block_from == 1024
    edited = SEAConfig(num_heads=HEADS, head_dim=DIM)
    edited.block_from = 0  # edited in place: validated at the next call, its candidates' default follows
    edited.validate()
    assert (edited.block_from, edited.block_candidates) == (0, 4)
    assert (edited.to_dict()["block_from"], edited.to_dict()["block_candidates"]) == (0, None)  # saved as edited
    regrouped = SEAConfig(num_heads=HEADS, head_dim=DIM)
    regrouped.grouping = "block"  # the policy's default follows the new grouping instead of refusing it
    regrouped.validate()
    assert (regrouped.block_from, regrouped.block_candidates) == (0, 4)
    unpickled = SEAConfig(num_heads=HEADS, head_dim=DIM)
    del unpickled._auto  # as a config pickled before the fields existed
    assert unpickled.to_dict()["block_from"] == 1024 and unpickled.replace(k=8).block_from == 1024


def test_a_saved_config_keeps_its_setting():
    config = SEAConfig(num_heads=HEADS, head_dim=DIM)
    saved = config.replace(block_from=1024, block_candidates=2).to_dict()
    assert isinstance(grouping_for(SEAConfig.from_dict(saved)), LongRowsGrouping)
    assert SEAConfig.from_dict(saved).block_candidates == 2
    # saved with the policy turned off, before such candidates were refused: it loads, unchanged in effect
    off = {**saved, "block_from": 0, "block_candidates": 16}
    assert SEAConfig.from_dict(off).block_from == 0 and SEAConfig.from_dict(off).block_candidates == 4
    # saved before the policy existed: off, as it ran then
    old = {name: value for name, value in saved.items() if name not in ("block_from", "block_candidates")}
    assert isinstance(grouping_for(SEAConfig.from_dict(old)), PerQueryGrouping)


def test_a_layer_builds_its_grouping_again_only_when_its_config_changes():
    layer = _layer().eval()
    q, k, v, mask = _inputs()
    with torch.no_grad():
        first = layer.context_only(q, k, v, attention_mask=mask)
        assert layer.grouping is layer.grouping and isinstance(layer.grouping, LongRowsGrouping)
        layer.config = layer.config.replace(block_from=0, block_candidates=4)  # as set_runtime assigns it
        assert isinstance(layer.grouping, PerQueryGrouping)
        per_query = layer.context_only(q, k, v, attention_mask=mask)
        layer.config.grouping = "block"  # edited in place: validated at the call, and the grouping follows
        assert isinstance(layer.grouping, BlockGrouping)
        layer.config.grouping = "query"
    torch.testing.assert_close(per_query, _twin(layer).eval().context_only(q, k, v, attention_mask=mask))
    assert not torch.equal(first[..., 24:, :], per_query[..., 24:, :])  # the long rows ran the other grouping
