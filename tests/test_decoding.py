"""Incremental decoding with a DecodeState equals one full forward (core level)."""

import pytest
import torch

from conftest import make_qkv, padding_mask
from sea_attention import DecodeState, SEAAttention, SEAConfig


def layer(**kw):
    defaults = dict(num_heads=4, num_kv_heads=2, head_dim=16, k=3, estimate_width=8, max_positions=256)
    return SEAAttention(SEAConfig(**{**defaults, **kw})).eval()


@pytest.mark.parametrize("schedule", [[40], [1] * 40, [25, 7, 7, 1], [1, 1, 30, 8]])
@pytest.mark.parametrize("pad", [0, 5])
@pytest.mark.parametrize("output_mode, estimator", [
    ("mix", {}), ("norm", {}), ("mix", dict(kernel_bins=False)), ("mix", dict(key_bins=False, sinks=0)),
    ("mix", dict(kernel_bins=True, key_bins=False, feature_kind="relu", position_code="learned")),
    ("mix", dict(kernel_bins=False, key_bins=False, sinks=0, local_window=0)),  # the paper's estimator
    ("mix", dict(key_bounds=True)), ("mix", dict(bin_sums_dtype="float32")),
    ("mix", dict(k=8, estimate_width=4)),  # forced bins of up to 10 keys, wider than k / 4
    ("mix", dict(k=8, estimate_width=4, forced_keys=True)),  # forced keys (2, 2) inside those bins
])
def test_steps_equal_full_forward(schedule, pad, output_mode, estimator):
    module = layer(output_mode=output_mode, **estimator)
    t = sum(schedule)
    q, k, v = make_qkv(2, 4, 2, t, t, 16)
    mask = padding_mask(2, t, pad, left=True)
    full = module(q, k, v, attention_mask=mask)
    state, start = DecodeState(), 0
    contexts, cells = [], []
    for size in schedule:
        end = start + size
        out = module(q[:, :, start:end], k[:, :, :end], v[:, :, :end], attention_mask=mask[:, :end], state=state)
        contexts.append(out.context)
        cells.append(out.cells)
        start = end
    torch.testing.assert_close(torch.cat(contexts, 2), full.context, atol=1e-5, rtol=1e-5)
    assert torch.equal(torch.cat(cells, 2), full.cells)  # the same keys are selected
    assert state.seen == t


def test_state_rejects_mismatched_calls():
    module = layer()
    q, k, v = make_qkv(1, 4, 2, 10, 10, 16)
    state = DecodeState()
    module(q[:, :, :6], k[:, :, :6], v[:, :, :6], state=state)
    with pytest.raises(ValueError, match="has seen 6 keys"):
        module(q[:, :, 6:8], k[:, :, :9], v[:, :, :9], state=state)
    with pytest.raises(ValueError, match="needs a causal SEA layer"):
        layer(causal=False)(q, k, v, state=DecodeState())


def test_state_reorders_like_the_batch():
    module = layer()
    q, k, v = make_qkv(3, 4, 2, 12, 12, 16)
    state = DecodeState()
    module(q[:, :, :10], k[:, :, :10], v[:, :, :10], state=state)
    order = torch.tensor([2, 0, 0])
    state.select(order)
    step = module(q[order, :, 10:11], k[order, :, :11], v[order, :, :11], state=state)
    full = module(q[order, :, :11], k[order, :, :11], v[order, :, :11])
    torch.testing.assert_close(step.context, full.context[:, :, 10:], atol=1e-5, rtol=1e-5)


def test_growing_rows_equal_concatenation_and_keep_their_storage_between_growths():
    from sea_attention.core.decoding import GrowingRows

    first = torch.randn(2, 3, 5, 4)
    rows, expected = GrowingRows.of(first, 2), first
    storages = set()
    for size in [1, 1, 3, 300, 1, 1]:
        new = torch.randn(2, 3, size, 4)
        rows.append(new)
        expected = torch.cat([expected, new], 2)
        torch.testing.assert_close(rows.rows, expected, atol=0, rtol=0)
        storages.add(rows.data.data_ptr())
    assert len(storages) < 6  # appends into spare capacity reuse the storage
    picked = rows.map_batch(lambda t: t.index_select(0, torch.tensor([1, 1, 0])))
    torch.testing.assert_close(picked.rows, expected[[1, 1, 0]], atol=0, rtol=0)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_a_decoding_state_keeps_the_running_sums_at_its_last_rows_edges_and_reads_the_full_tables_rows(dtype):
    from sea_attention.core.estimator.kernel_bins import _edge_positions, prefix_sums

    module = layer(bin_sums_dtype=dtype)
    q, k, v = make_qkv(2, 4, 2, 300, 300, 16)
    mask = padding_mask(2, 300, 5, left=True)
    state = DecodeState()
    module(q[:, :, :24], k[:, :, :24], v[:, :, :24], attention_mask=mask[:, :24], state=state)  # >= CENTER_KEYS valid
    for end in range(25, 301):
        module(q[:, :, end - 1:end], k[:, :, :end], v[:, :, :end], attention_mask=mask[:, :end], state=state)
        assert [tuple(x.shape) for x in state.bin_sums.edges] == [(2, 2, 9, 5), (2, 2, 9, 16)]  # K + 1 rows, always
    phi_k = state.bin_sums.stored[0].rows  # phi(k) of every key, as the calls computed it
    whole = [prefix_sums(x, mask, dtype=getattr(torch, dtype)) for x in (phi_k, k)]
    edges = _edge_positions(whole[0].counts, mask.sum(-1, keepdim=True), 8)[0][:, 0]  # (B, K + 1): the last row's
    assert torch.equal(state.bin_sums.positions, edges)
    for rows, table in zip(state.bin_sums.rows(), whole, strict=True):  # the full table's rows, bit for bit
        assert torch.equal(rows, table.rows.gather(2, edges[:, None, :, None].expand(-1, 2, -1, rows.shape[-1])))


@pytest.mark.parametrize("pad", [0, 7])
@pytest.mark.parametrize("grouping", ["query", "block"])
def test_long_decoding_moves_the_states_edges_and_equals_the_full_forward(pad, grouping, monkeypatch):
    """A long context: each step moves the state's edges (``kernel_bins.StateSums``; the block grouping's
    steps that estimate nothing too), never rebuilding the table, and selects what the full forward does."""
    module = layer(estimate_width=4, k=4, grouping=grouping, query_block=8)
    q, k, v = make_qkv(2, 4, 2, 160, 160, 16)
    mask = padding_mask(2, 160, pad, left=True)
    full = module(q, k, v, attention_mask=mask)
    state = DecodeState()
    out = [module(q[:, :, :120], k[:, :, :120], v[:, :, :120], attention_mask=mask[:, :120], state=state)]
    from sea_attention.core.estimator.kernel_bins import StateSums

    monkeypatch.setattr(StateSums, "_tables", lambda *args: pytest.fail("a decoding step rebuilt the table"))
    for end in range(121, 161):
        out.append(module(q[:, :, end - 1:end], k[:, :, :end], v[:, :, :end], attention_mask=mask[:, :end], state=state))
    torch.testing.assert_close(torch.cat([o.context for o in out], 2), full.context, atol=1e-5, rtol=1e-5)
    assert torch.equal(torch.cat([o.cells for o in out], 2), full.cells)


@pytest.mark.parametrize("rows", [1, 3, 12])
def test_the_decoders_tail_equals_the_rows_of_its_full_forward(rows):
    from sea_attention.core.estimator.decoder import CausalDecoder

    torch.manual_seed(rows)
    decoder = CausalDecoder(heads=3, channels=2, width=32)
    torch.nn.init.normal_(decoder.norm_out.weight)  # not the zero start: every term counts
    history = CausalDecoder.HISTORY_ROWS
    image = torch.randn(2, 6, history + rows, 8)
    mask = (torch.rand(2, 1, history + rows, 1) > 0.3).float()
    full = decoder(image, mask)[:, :, history:]
    torch.testing.assert_close(decoder.tail(image, mask), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("grouping", ["query", "block"])
@pytest.mark.parametrize("inference", [True, False])
def test_a_prefills_state_keeps_no_view_of_its_whole_image(grouping, inference):
    """The CNN history is the last 8 rows: a view of the prefill's (B, H*c, T, w) image would keep
    every row alive as long as the state (a 30-layer model's 8k prefill: over 1 GB)."""
    module = SEAAttention(SEAConfig(num_heads=4, num_kv_heads=2, head_dim=16, k=4, estimate_width=8,
                                    grouping=grouping, query_block=8)).eval()
    q, k, v = make_qkv(1, 4, 2, 64, 64, 16)
    state = DecodeState()
    with torch.no_grad():
        (module.context_only if inference else module)(q, k, v, state=state)
    for rows in (state.cnn_rows, state.cnn_mask):
        assert rows.untyped_storage().nbytes() == rows.numel() * rows.element_size()
