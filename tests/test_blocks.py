"""The query-block grouping: selection semantics, the block op against the reference, decoding."""

from contextlib import nullcontext

import pytest
import torch

from conftest import exact_attention, make_qkv, padding_mask
from naive import naive_cells_to_keys
from sea_attention import DecodeState, SEAAttention, SEAConfig
from sea_attention.core.blocks import (
    EXCLUDED, BlockKeys, BlockRequest, block_dense_mask, select_blocks,
)
from sea_attention.core.cells import cell_starts, live_cells, query_lengths
from sea_attention.core.ops.block_sparse import BlockSparseAttention, few_rows_attention, head_lists
from sea_attention.core.ops.reference import reference_attention
from sea_attention.core.selection import select_cells


def block_layer(causal=True, heads=4, kv_heads=2, dim=16, **kw):
    defaults = dict(k=4, estimate_width=8, max_positions=256, grouping="block", query_block=8)
    return SEAAttention(SEAConfig(num_heads=heads, num_kv_heads=kv_heads, head_dim=dim, causal=causal,
                                  **{**defaults, **kw}))


def random_estimate(bsz, heads, tq, width, lengths):
    live = live_cells(lengths, width).unsqueeze(1)
    logits = torch.randn(bsz, heads, tq, width).masked_fill(~live, float("-inf"))
    return torch.softmax(logits, -1).nan_to_num(0.0)


def random_selection(bsz, heads, tq, tk, k, pad, causal, width=8, block=16):
    """A block selection from a random estimate: (key_valid, query_valid, selection)."""
    key_valid = padding_mask(bsz, tk, pad, left=causal)
    query_valid = key_valid[:, tk - tq:]
    lengths = query_lengths(key_valid, query_valid, causal)
    estimate = random_estimate(bsz, heads, tq, width, lengths)
    return key_valid, query_valid, select_blocks(estimate, BlockRequest(lengths, query_valid, tk - tq, k, block, causal))


def naive_block_keys(estimate, lengths, key_valid, first, k, block, causal):
    """Loop version of the block rule: the set of (b, h, i, key) every query attends."""
    bsz, heads, tq, width = estimate.shape
    out = set()
    for i in range(tq):
        pos = first + i
        start = pos // block * block
        for b in range(bsz):
            if causal:
                row = max(start - first, 0)  # the block's first row (or the call's first query)
                row_len = int(lengths[b, row])
                scores = estimate[b:b + 1, :, row:row + 1].clone()
                own = cell_starts(lengths[b:b + 1, row:row + 1], width) >= row_len - 1
                scores = scores.masked_fill(own.unsqueeze(1), EXCLUDED)
                cells = select_cells(scores, lengths[b:b + 1, row:row + 1], k, "query")
                positions = [p for p in range(key_valid.shape[1]) if key_valid[b, p]]
                for (_, h, _, key) in naive_cells_to_keys(cells, lengths[b:b + 1, row:row + 1], key_valid[b:b + 1], k):
                    if positions.index(key) < row_len - 1:
                        out.add((b, h, i, key))
                tile_from = first + row
                for key in range(tile_from, pos + 1):
                    if key_valid[b, key]:
                        for h in range(heads):
                            out.add((b, h, i, key))
            else:
                rows = range(start - first, min(start - first + block, tq))
                valid = [r for r in rows if lengths[b, r] > 0]
                if not valid or lengths[b, i] == 0:
                    continue
                mean = estimate[b:b + 1, :, valid].sum(2, keepdim=True) / len(valid)
                row_len = lengths[b:b + 1, valid[:1]]
                cells = select_cells(mean, row_len, k, "query")
                for (_, h, _, key) in naive_cells_to_keys(cells, row_len, key_valid[b:b + 1], k):
                    out.add((b, h, i, key))
    return out


@pytest.mark.parametrize("causal, tq, tk, pad", [(True, 30, 30, 3), (True, 11, 37, 2), (True, 1, 20, 0),
                                                (False, 26, 26, 4)])
def test_block_selection_matches_the_loop(causal, tq, tk, pad):
    torch.manual_seed(0)
    bsz, heads, width, k, block = 2, 3, 8, 2, 8
    key_valid = padding_mask(bsz, tk, pad, left=causal)
    query_valid = key_valid[:, tk - tq:]
    lengths = query_lengths(key_valid, query_valid, causal)
    estimate = random_estimate(bsz, heads, tq, width, lengths)
    selection = select_blocks(estimate, BlockRequest(lengths, query_valid, tk - tq, k, block, causal))
    mask = block_dense_mask(selection, key_valid, k, heads, tq)
    got = {(b, h, i, j) for b, h, i, j in torch.nonzero(mask).tolist() if query_valid[b, i]}
    assert got == naive_block_keys(estimate, lengths, key_valid, tk - tq, k, block, causal)


def suffix_call(module, q, k, v, mask):
    """module(q, k, v); a causal query suffix first prefills a DecodeState with the earlier keys."""
    tq, tk = q.shape[2], k.shape[2]
    state = None
    if module.config.causal and tq < tk:
        state, past = DecodeState(), tk - tq
        prefix_q = torch.randn(q.shape[0], q.shape[1], past, q.shape[3], dtype=q.dtype,
                               generator=torch.Generator().manual_seed(5))
        module(prefix_q, k[:, :, :past], v[:, :, :past], attention_mask=mask[:, :past], state=state)
    return module(q, k, v, attention_mask=mask, state=state)


BLOCK_GRID = [  # batch, heads, kv_heads, tq, tk, pad, causal
    (2, 4, 2, 40, 40, 5, True),
    (1, 4, 4, 19, 19, 0, True),
    (2, 4, 1, 9, 50, 3, True),  # a query suffix that starts mid-block
    (2, 4, 2, 30, 30, 4, False),
]


@pytest.mark.parametrize("batch, heads, kv_heads, tq, tk, pad, causal", BLOCK_GRID)
def test_block_op_matches_reference_with_gradients(batch, heads, kv_heads, tq, tk, pad, causal):
    torch.manual_seed(1)
    module = block_layer(causal, heads, kv_heads).double()
    q, k, v = make_qkv(batch, heads, kv_heads, tq, tk, 16, dtype=torch.float64, requires_grad=True)
    mask = padding_mask(batch, tk, pad, left=causal)
    fast = suffix_call(module, q, k, v, mask)
    grads = torch.autograd.grad(fast.context.square().sum(), (q, k, v))
    module.config = module.config.replace(attention_path="reference")
    slow = suffix_call(module, q, k, v, mask)
    expected = torch.autograd.grad(slow.context.square().sum(), (q, k, v))
    torch.testing.assert_close(fast.context, slow.context, atol=1e-10, rtol=1e-10)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
    assert torch.equal(fast.nnz, slow.nnz)
    assert fast.slots is None and fast.cells.shape == (batch, heads, tq, 8)


def test_wide_forced_bins_attend_only_their_sink_and_window_keys():
    """``forced_keys``, bins of ~25 keys, k = 8: each block's forced cells emit the 2 sink and 2 window
    keys of its selecting row (``cells.cell_range``), the op matches the reference on that mask."""
    heads, k, tq = 4, 8, 200
    key_valid, query_valid = torch.ones(1, tq, dtype=torch.bool), torch.ones(1, tq, dtype=torch.bool)
    lengths = query_lengths(key_valid, query_valid, True)
    estimate = random_estimate(1, heads, tq, 8, lengths)
    selection = select_blocks(estimate, BlockRequest(lengths, query_valid, 0, k, 16, True, sinks=4, window=16,
                                                     forced_keys=True))
    assert selection.forced == (2, 2)
    mask = block_dense_mask(selection, key_valid, k, heads, tq)  # (1, H, Tq, Tk)
    for i in range(64, tq):  # rows whose block starts past 2 bins: the selecting row's window is before the tile
        row_len = i // 16 * 16 + 1  # the selecting row's keys
        assert bool(mask[0, :, i, :2].all())  # the sinks
        assert bool(mask[0, :, i, row_len - 2:row_len].all())  # its window (its own key is the tile's)
        assert not bool(mask[0, :, i, 2:8].any())  # the sink bin's other keys: not forced, and taken
    q, k_, v = make_qkv(1, heads, 2, tq, tq, 8, dtype=torch.float64)
    out, _ = BlockSparseAttention(chunk_blocks=2)(q, k_, v, selection, key_valid, 0.3, k)
    expected, _ = reference_attention(q, k_, v, mask, 0.3)
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("mode", ["lists", "dense", "auto"])
@pytest.mark.parametrize("causal, kv_heads, tq, tk", [(True, 2, 70, 70), (True, 1, 21, 90), (False, 4, 60, 60)])
def test_both_strategies_match_the_reference(mode, causal, kv_heads, tq, tk):
    torch.manual_seed(2)
    bsz, heads, k = 2, 4, 3
    key_valid, query_valid, selection = random_selection(bsz, heads, tq, tk, k, pad=7, causal=causal)
    q, k_, v = make_qkv(bsz, heads, kv_heads, tq, tk, 8, dtype=torch.float64, requires_grad=True)
    out, nnz = BlockSparseAttention(chunk_blocks=2, mode=mode)(q, k_, v, selection, key_valid, 0.3, k)
    mask = block_dense_mask(selection, key_valid, k, heads, tq)
    expected, _ = reference_attention(q, k_, v, mask, 0.3)
    rows = query_valid[:, None, :, None]
    torch.testing.assert_close(out * rows, expected * rows, atol=1e-10, rtol=1e-10)
    assert torch.equal(nnz * query_valid[:, None], mask.sum(-1) * query_valid[:, None])
    grads = torch.autograd.grad((out * rows).square().sum(), (q, k_, v))
    wanted = torch.autograd.grad((expected * rows).square().sum(), (q, k_, v))
    for got, want in zip(grads, wanted):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("causal", [True, False])
def test_full_budget_without_gating_is_exact_attention(causal):
    module = block_layer(causal, gating=False)
    q, k, v = make_qkv(2, 4, 2, 40, 40, 16)
    mask = padding_mask(2, 40, 6, left=causal)
    out = module(q, k, v, attention_mask=mask, k_budget=40)
    rows = mask
    expected = exact_attention(q, k, v, mask, causal)
    torch.testing.assert_close(out.context.transpose(1, 2)[rows], expected.transpose(1, 2)[rows], atol=1e-5, rtol=1e-5)


def test_causality_canary():
    module = block_layer()
    q, k, v = make_qkv(1, 4, 2, 40, 40, 16)
    before = module(q, k, v).context
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    for x in (q2, k2, v2):
        x[:, :, 21:] += torch.randn_like(x[:, :, 21:])  # change the future, mid-block
    after = module(q2, k2, v2).context
    torch.testing.assert_close(after[:, :, :21], before[:, :, :21])


def test_keys_per_query_are_about_k_plus_the_tile():
    module = block_layer(k=4, estimate_width=8, query_block=8)
    q, k, v = make_qkv(1, 4, 2, 200, 200, 16)
    out = module(q, k, v)
    mean_cells = out.nnz[:, :, 100:].float().mean()
    assert 4 <= mean_cells <= 4 + 8 + 4  # k selected keys (a few more by rounding) and half a tile on average


@pytest.mark.parametrize("schedule", [[40], [1] * 30, [13, 1, 9, 7], [8, 8, 3]])
@pytest.mark.parametrize("inference", [False, True])
@pytest.mark.parametrize("key_bounds, options", [(False, {}), (True, {}),
                                                  (False, dict(k=8, estimate_width=4, forced_keys=True))])
def test_decoding_steps_equal_full_forward(schedule, inference, key_bounds, options):
    """Also in inference, where a call estimates only the rows that select: a step inside a block
    that a carried selection covers estimates none (but its state still takes its keys and CNN row,
    and its key bounds). The last case's forced keys (2, 2) lie inside wider bins."""
    module = block_layer(key_bounds=key_bounds, **options).eval()
    t = sum(schedule)
    q, k, v = make_qkv(2, 4, 2, t, t, 16)
    mask = padding_mask(2, t, 5, left=True)
    full = module(q, k, v, attention_mask=mask)
    state, start, contexts = DecodeState(), 0, []
    with torch.no_grad() if inference else nullcontext():
        for size in schedule:
            end = start + size
            out = module(q[:, :, start:end], k[:, :, :end], v[:, :, :end], attention_mask=mask[:, :end], state=state)
            contexts.append(out.context)
            if inference:  # block starts only, and row 0 when no carried selection covers it
                starts = [r for r in range(size) if (start + r) % 8 == 0 or (r == 0 and start == 0)]
                assert out.estimate_rows.tolist() == starts
            start = end
    torch.testing.assert_close(torch.cat(contexts, 2), full.context, atol=1e-5, rtol=1e-5)


def test_decoding_state_follows_beam_reordering():
    module = block_layer().eval()
    q, k, v = make_qkv(3, 4, 2, 12, 12, 16)
    state = DecodeState()
    module(q[:, :, :10], k[:, :, :10], v[:, :, :10], state=state)
    order = torch.tensor([2, 0, 2])
    state.select(order)
    step = module(q[order, :, 10:11], k[order, :, :11], v[order, :, :11], state=state)
    full = module(q[order, :, :11], k[order, :, :11], v[order, :, :11])
    torch.testing.assert_close(step.context, full.context[:, :, 10:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("options", [dict(), dict(candidates=2)])
def test_an_open_blocks_gathered_lists_serve_its_steps_and_follow_beams(options):
    """A decoding step inside an open block reads the head lists' key and value vectors that the block's
    first step gathered (kept on the carried selection; only the tile's new keys are written), a beam
    reordering reorders them, and every step still equals the full forward."""
    module = block_layer(**options).eval()
    q, k, v = make_qkv(3, 4, 2, 14, 14, 16)
    order = torch.tensor([2, 0, 2])
    state, kept = DecodeState(), []
    with torch.no_grad():
        module(q[:, :, :10], k[:, :, :10], v[:, :, :10], state=state)
        module(q[:, :, 10:11], k[:, :, :11], v[:, :, :11], state=state)
        first = state.block.vectors
        state.select(order)
        q, k, v = q[order], k[order], v[order]
        steps = []
        for t in (11, 12, 13):
            steps.append(module(q[:, :, t:t + 1], k[:, :, :t + 1], v[:, :, :t + 1], state=state).context)
            kept.append(state.block.vectors)
        full = module(q, k, v).context
    assert first is not None and kept[0] is not first and kept[0] is kept[1] is kept[2]
    torch.testing.assert_close(torch.cat(steps, 2), full[:, :, 11:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("candidates", [1, 3])
def test_calls_of_a_few_rows_across_blocks_beams_and_gradients_equal_the_full_forward(candidates):
    """Decoding calls of 1-4 rows (the few-rows op with query_block=16), some across a block's end, a beam
    reordering every third call and gradients on in every third: the open block's kept vectors and its
    tile slots, written a few keys at a time (``ListVectors.tiled``), give the full forward's context."""
    module = block_layer(candidates=candidates, query_block=16).eval()
    schedule = [20, 1, 1, 2, 3, 4, 1, 1, 4, 2, 1, 3, 4, 4, 1, 2, 3, 4, 2, 1, 4, 3]
    t = sum(schedule)
    q, k, v = make_qkv(3, 4, 2, t, t, 16)
    mask = padding_mask(3, t, 5, left=True)
    state, start, contexts = DecodeState(), 0, []
    for i, size in enumerate(schedule):
        if i % 3 == 2:  # beams: the state and everything before follow the new order
            order = torch.tensor([2, 0, 0]) if i % 2 else torch.tensor([1, 2, 1])
            state.select(order)
            q, k, v, mask = q[order], k[order], v[order], mask[order]
            contexts = [c[order] for c in contexts]
        end = start + size
        with torch.enable_grad() if i % 3 == 1 else torch.no_grad():
            out = module(q[:, :, start:end], k[:, :, :end], v[:, :, :end], attention_mask=mask[:, :end], state=state)
        contexts.append(out.context.detach())
        start = end
    with torch.no_grad():
        full = module(q, k, v, attention_mask=mask).context
    torch.testing.assert_close(torch.cat(contexts, 2), full, atol=1e-5, rtol=1e-5)


def test_decoding_steps_with_gradients_keep_no_vectors_and_backpropagate():
    """With gradients on (here for the queries only) every step gathers fresh list vectors: a kept buffer
    whose tile the next step rewrites would break the earlier step's backward."""
    module = block_layer().eval()
    q, k, v = make_qkv(1, 4, 2, 12, 12, 16)
    q.requires_grad_(True)
    state = DecodeState()
    module(q[:, :, :9].detach(), k[:, :, :9], v[:, :, :9], state=state)
    steps = [module(q[:, :, t:t + 1], k[:, :, :t + 1], v[:, :, :t + 1], state=state).context for t in (9, 10)]
    assert state.block.vectors is None
    torch.cat(steps, 2).sum().backward()
    full = module(q.detach().requires_grad_(True), k, v)
    torch.testing.assert_close(torch.cat(steps, 2), full.context[:, :, 9:11], atol=1e-5, rtol=1e-5)
    assert q.grad[:, :, 9:11].abs().sum() > 0 and q.grad[:, :, 11:].abs().sum() == 0


def test_bad_query_block_is_rejected():
    with pytest.raises(ValueError, match="query_block must be a positive integer"):
        SEAConfig(num_heads=2, head_dim=8, grouping="block", query_block=0)


@pytest.mark.parametrize("kernel_bins", [False, True])
@pytest.mark.parametrize("tq, tk", [(45, 45), (64, 64)])
def test_inference_estimates_only_the_selecting_rows(tq, tk, kernel_bins):
    module = block_layer(kernel_bins=kernel_bins).eval()
    q, k, v = make_qkv(2, 4, 2, tq, tk, 16)
    mask = padding_mask(2, tk, 9, left=True)
    full = module(q, k, v, attention_mask=mask)  # autograd on: every row is estimated (training needs them)
    with torch.no_grad():
        fast = module(q, k, v, attention_mask=mask)
    assert full.estimate_rows is None and fast.estimate_rows is not None
    rows = fast.estimate_rows
    first = tk - tq
    assert rows.tolist() == sorted({max(0, p // 8 * 8 - first) for p in range(first, tk)})
    torch.testing.assert_close(fast.estimate[:, :, rows], full.estimate[:, :, rows])
    others = torch.ones(tq, dtype=torch.bool)
    others[rows] = False
    assert bool(fast.estimate[:, :, others].isnan().all())  # rows not estimated fail loudly
    torch.testing.assert_close(fast.context, full.context)
    assert torch.equal(fast.nnz, full.nnz)


@pytest.mark.parametrize("tq, tk, kv_heads", [(1, 37, 2), (3, 70, 4), (2, 2, 1), (9, 40, 2)])
def test_a_few_queries_attend_the_masks_keys(tq, tk, kv_heads):
    """The decoding-sized path (each row's head lists and tile) equals reference attention on the
    block rule's dense mask: outputs, gradients and the keys per row."""
    torch.manual_seed(3)
    heads, k = 4, 3
    key_valid, _, selection = random_selection(2, heads, tq, tk, k, pad=5, causal=True)
    q, keys, values = (x.double().requires_grad_() for x in make_qkv(2, heads, kv_heads, tq, tk, 16))
    mask = block_dense_mask(selection, key_valid, k, heads, tq)
    out, nnz = few_rows_attention(q, keys, values, selection, key_valid, 0.25, k)
    want, _ = reference_attention(q, keys, values, mask, 0.25)
    torch.testing.assert_close(out, want)
    assert torch.equal(nnz, mask.sum(-1))  # no key twice
    grads = torch.autograd.grad(out.sum(), (q, keys, values))
    for got, expected in zip(grads, torch.autograd.grad(want.sum(), (q, keys, values))):
        torch.testing.assert_close(got, expected)


def test_head_lists_hold_each_heads_keys_in_cell_order():
    torch.manual_seed(4)
    bsz, n, cells, emitted, heads = 2, 3, 5, 4, 3
    keys = BlockKeys(torch.randint(0, heads, (bsz, n, cells)), torch.randint(0, 50, (bsz, n, cells, emitted)),
                     torch.rand(bsz, n, cells, emitted) < 0.6)
    keys.key = torch.where(keys.valid, keys.key, 0)
    lists = head_lists(keys, heads)
    for b in range(bsz):
        for i in range(n):
            for h in range(heads):
                want = [int(keys.key[b, i, c, e]) for c in range(cells) for e in range(emitted)
                        if keys.head[b, i, c] == h and keys.valid[b, i, c, e]]
                got = lists.key[b, h, i][lists.valid[b, h, i]].tolist()
                assert got == want
    assert lists.key.shape[-1] == int(lists.valid.sum(-1).max())


def test_a_run_without_selected_keys_attends_its_tile_only():
    """Every block's first row: no cell before it, so each head's list is empty."""
    torch.manual_seed(6)
    bsz, heads, tq, k = 1, 2, 32, 4
    key_valid, query_valid, selection = random_selection(bsz, heads, tq, tq, k, pad=0, causal=True)
    selection.cells.zero_()
    q, k_, v = make_qkv(bsz, heads, heads, tq, tq, 8, dtype=torch.float64)
    out, nnz = BlockSparseAttention(chunk_blocks=1, mode="lists")(q, k_, v, selection, key_valid, 0.3, k)
    expected, _ = reference_attention(q, k_, v, block_dense_mask(selection, key_valid, k, heads, tq), 0.3)
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=1e-10)
    assert torch.equal(nnz, (torch.arange(tq) % 16 + 1).expand(bsz, heads, -1))


def test_steps_inside_the_open_block_reuse_its_keys_also_after_a_beam_reorder():
    module = block_layer().eval()
    q, k, v = make_qkv(3, 4, 2, 13, 13, 16)
    state = DecodeState()
    with torch.no_grad():
        module(q[:, :, :9], k[:, :, :9], v[:, :, :9], state=state)  # block 8..15 opens at row 8
        module(q[:, :, 9:10], k[:, :, :10], v[:, :, :10], state=state)  # a step with few queries: keys cached
        cached = state.block.keys
        assert cached is not None
        module(q[:, :, 10:11], k[:, :, :11], v[:, :, :11], state=state)
        assert state.block.keys is cached  # read, not recomputed
        order = torch.tensor([2, 0, 2])
        state.select(order)
        steps = [module(q[order, :, t:t + 1], k[order, :, :t + 1], v[order, :, :t + 1], state=state).context
                 for t in (11, 12)]
        full = module(q[order], k[order], v[order]).context
    torch.testing.assert_close(torch.cat(steps, 2), full[:, :, 11:], atol=1e-5, rtol=1e-5)
