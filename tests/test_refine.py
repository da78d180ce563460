"""Exact refinement (SEAConfig.candidates): the fast slot version and the block op's in-product
version against the dense reference, and the layer with it (per-query and block groupings) against
its own reference path, decoding and row chunks."""

import pytest
import torch

from conftest import make_qkv, padding_mask
from sea_attention import DecodeState, SEAAttention, SEAConfig
from sea_attention.core.cells import cells_to_keys, query_lengths
from sea_attention.core.blocks import block_dense_mask
from sea_attention.core.ops.block_sparse import BlockSparseAttention, few_rows_attention
from sea_attention.core.ops.reference import reference_attention
from sea_attention.core.refine import Refinement, keep_best, naive_block_refine, naive_refine, refine_slots
from test_blocks import random_selection


def _random_slots(bsz, heads, tq, tk, width, mask):
    """Slots of a random cell selection, as the per-query groupings build them."""
    lengths = query_lengths(mask, mask[:, tk - tq:], causal=True)
    cells = torch.rand(bsz, heads, tq, width) < 0.4
    return cells_to_keys(cells, lengths, mask, cap=tk), lengths


@pytest.mark.parametrize("heads, kv_heads", [(4, 2), (3, 3)])
@pytest.mark.parametrize("candidates", [2, 3, 5])
@pytest.mark.parametrize("pad", [0, 4])
def test_refined_slots_equal_the_dense_reference(heads, kv_heads, candidates, pad):
    q, k, _ = make_qkv(2, heads, kv_heads, 30, 30, 8)
    mask = padding_mask(2, 30, pad)
    slots, lengths = _random_slots(2, heads, 30, 30, 8, mask)
    refinement = Refinement(candidates, budget=4)  # rows shorter than 4 * candidates keep the budget's share
    refined = refine_slots(q, k, slots, lengths, refinement, scale=0.3, chunk=7)
    expected = naive_refine(q, k, slots.dense_mask(heads, 30), lengths, refinement, scale=0.3)
    assert torch.equal(refined.dense_mask(heads, 30), expected)
    assert torch.equal(refined.dense_mask(heads, 30) & ~slots.dense_mask(heads, 30), torch.zeros_like(expected))
    head_order = torch.where(refined.valid, refined.head, heads)
    assert bool((head_order[..., 1:] >= head_order[..., :-1]).all())  # still ordered by head, used slots first


def test_all_keys_as_candidates_is_the_per_head_exact_top_k():
    q, k, _ = make_qkv(1, 2, 2, 1, 24, 8)
    every = torch.ones(1, 2, 1, 24, dtype=torch.bool)  # every key of both heads is a candidate
    slots = cells_to_keys(every, torch.tensor([[24]]), torch.ones(1, 24, dtype=torch.bool), cap=24)
    refined = refine_slots(q, k, slots, torch.tensor([[24]]), Refinement(4, budget=6), scale=1.0)  # 6 per head
    top = (q @ k.transpose(-1, -2)).topk(6, dim=-1).indices  # (1, 2, 1, 6)
    expected = torch.zeros(1, 2, 1, 24, dtype=torch.bool).scatter_(-1, top, True)
    assert torch.equal(refined.dense_mask(2, 24), expected)


def _layer(**kw):
    defaults = dict(num_heads=4, num_kv_heads=2, head_dim=16, k=4, estimate_width=8, candidates=3)
    return SEAAttention(SEAConfig(**{**defaults, **kw}))


@pytest.mark.parametrize("grouping", ["query", "query_head", "block"])
def test_the_sparse_path_equals_the_reference_path_outputs_and_gradients(grouping):
    sparse = _layer(grouping=grouping, query_block=8)  # several blocks: the lists path runs
    reference = _layer(grouping=grouping, query_block=8, attention_path="reference")
    reference.load_state_dict(sparse.state_dict())
    mask = padding_mask(2, 40, 5)
    results = []
    for module in (sparse, reference):
        torch.manual_seed(1)
        q, k, v = make_qkv(2, 4, 2, 40, 40, 16, requires_grad=True)
        out = module(q, k, v, attention_mask=mask)
        out.context.sum().backward()
        results.append((out.context, out.nnz, q.grad, k.grad, v.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("grouping", ["query", "block"])
def test_refinement_keeps_about_the_budget_and_changes_the_keys(grouping):
    plain, refined = (_layer(candidates=c, grouping=grouping, query_block=8).eval() for c in (1, 4))
    refined.load_state_dict(plain.state_dict())
    q, k, v = make_qkv(1, 4, 2, 64, 64, 16)
    a, b = plain(q, k, v), refined(q, k, v)
    assert float(b.nnz.float().mean()) <= float(a.nnz.float().mean()) + 1  # ceil(n / c) per head
    assert not torch.equal(a.context, b.context)


@pytest.mark.parametrize("grouping", ["query", "block"])
@pytest.mark.parametrize("schedule", [[30], [20, 1, 1, 8]])
def test_decoding_and_row_chunks_equal_the_full_forward(schedule, grouping):
    module = _layer(query_chunk=8, grouping=grouping, query_block=8).eval()
    q, k, v = make_qkv(2, 4, 2, 30, 30, 16)
    mask = padding_mask(2, 30, 3)
    full = module(q, k, v, attention_mask=mask).context
    with torch.no_grad():
        torch.testing.assert_close(module.context_only(q, k, v, attention_mask=mask), full, atol=1e-5, rtol=1e-5)
        state, start, parts = DecodeState(), 0, []
        for size in schedule:
            end = start + size
            parts.append(module(q[:, :, start:end], k[:, :, :end], v[:, :, :end], attention_mask=mask[:, :end],
                                state=state).context)
            start = end
    torch.testing.assert_close(torch.cat(parts, 2), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bad", [dict(candidates=0), dict(candidates=2.5), dict(candidates=2, attention_path="flex")])
def test_the_config_refuses_what_cannot_run(bad):
    with pytest.raises(ValueError, match="candidates"):
        SEAConfig(num_heads=4, head_dim=16, **bad)


def test_candidate_scores_are_the_dense_scores_at_the_slots():
    from sea_attention.core.ops.sparse import candidate_scores

    q, k, _ = make_qkv(2, 4, 2, 12, 12, 8)
    slots, _ = _random_slots(2, 4, 12, 12, 4, padding_mask(2, 12, 3))
    dense = q @ k.repeat_interleave(2, dim=1).transpose(-1, -2) * 0.7  # (B, H, Tq, Tk)
    expected = dense.transpose(1, 2)[torch.arange(2)[:, None, None], torch.arange(12)[None, :, None],
                                     slots.head, slots.key]  # (B, Tq, S)
    expected = expected.masked_fill(~slots.valid, float("-inf"))
    torch.testing.assert_close(candidate_scores(q, k, slots, 0.7, chunk=5), expected, atol=1e-5, rtol=1e-5)


def test_the_kept_share_is_the_ceiling_of_a_candidates_fraction():
    long_row = torch.tensor(100)  # at least candidates x budget keys: ceil(count / candidates)
    assert Refinement(3, budget=4).kept(torch.tensor([0, 1, 2, 3, 4, 5, 6]), long_row).tolist() == [0, 1, 1, 1, 2, 2, 2]


def test_a_row_too_short_for_every_candidate_keeps_its_budgets_share():
    share = Refinement(4, budget=8)  # offers 32 keys per head
    lengths = torch.tensor([0, 5, 8, 16, 20, 32, 40])
    assert share.kept(lengths, lengths).tolist() == [0, 5, 8, 8, 8, 8, 10]  # every key offered: min(L, 8) kept
    assert share.kept(torch.tensor(10), torch.tensor(16)).tolist() == 5  # half the keys offered are the budget


@pytest.mark.parametrize("grouping", ["query", "query_head", "block"])
def test_rows_of_at_most_k_keys_attend_every_key_with_refinement(grouping):
    """As without refinement (selection.py: rows with L <= k are exact), a row that has no more keys than
    the budget keeps every one, and a longer row keeps about the budget."""
    module = _layer(grouping=grouping, k=6, candidates=4, query_block=4).eval()
    q, k, v = make_qkv(1, 4, 2, 40, 40, 16)
    nnz = module(q, k, v).nnz.float()  # (B, H, T)
    assert torch.equal(nnz[..., :6], torch.arange(1.0, 7.0).expand_as(nnz[..., :6]))
    assert float(nnz[..., 6:24].mean()) >= 6 - 1


def test_keep_best_keeps_exactly_the_highest_finite_scores():
    scores = torch.tensor([[3.0, float("-inf"), 1.0, 2.0], [0.5, float("-inf"), float("-inf"), 0.1]])
    kept = keep_best(scores, torch.tensor([[2], [3]]))  # the second row has two finite scores
    assert kept.tolist() == [[True, False, False, True], [True, False, False, True]]
    assert not bool(keep_best(scores, torch.zeros(2, 1, dtype=torch.long)).any())


@pytest.mark.parametrize("mode", ["lists", "dense"])
@pytest.mark.parametrize("causal, kv_heads, tq, tk, pad", [(True, 2, 70, 70, 7), (True, 1, 21, 90, 7),
                                                          (False, 4, 60, 60, 7), (False, 2, 60, 60, 24)])
@pytest.mark.parametrize("candidates", [2, 3])
@pytest.mark.parametrize("budget", [None, 8])  # None: cap // candidates; 8: most selecting rows shorter than cap
def test_the_block_op_refines_like_the_dense_reference(mode, causal, kv_heads, tq, tk, pad, candidates, budget):
    """Outputs, gradients and keys per row of the block op (both strategies) with refinement equal
    reference attention on the refined mask; each row keeps its share of its list (Refinement.kept),
    also where its block's selecting row is shorter than candidates x the budget."""
    torch.manual_seed(2)
    bsz, heads = 2, 4
    cap = 6 if budget is None else candidates * budget
    key_valid, query_valid, selection = random_selection(bsz, heads, tq, tk, cap, pad=pad, causal=causal)
    q, k, v = make_qkv(bsz, heads, kv_heads, tq, tk, 8, dtype=torch.float64, requires_grad=True)
    refinement = Refinement(candidates, budget=cap // candidates)
    out, nnz = BlockSparseAttention(chunk_blocks=2, mode=mode)(q, k, v, selection, key_valid, 0.3, cap, refinement)
    mask = naive_block_refine(q, k, selection, key_valid, cap, refinement, 0.3)
    expected, _ = reference_attention(q, k, v, mask, 0.3)
    rows = query_valid[:, None, :, None]
    torch.testing.assert_close(out * rows, expected * rows, atol=1e-10, rtol=1e-10)
    assert torch.equal(nnz * query_valid[:, None], mask.sum(-1) * query_valid[:, None])
    grads = torch.autograd.grad((out * rows).square().sum(), (q, k, v))
    wanted = torch.autograd.grad((expected * rows).square().sum(), (q, k, v))
    for got, want in zip(grads, wanted):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
    plain = block_dense_mask(selection, key_valid, cap, heads, tq)
    assert bool((mask <= plain).all()) and int(mask.sum()) < int(plain.sum())  # a subset, and a strict one
    if budget is not None:  # the short rows' share differs from ceil(n / c): exercised
        long_rows = naive_block_refine(q, k, selection, key_valid, cap, Refinement(candidates, 10**6), 0.3)
        assert not torch.equal(long_rows, mask)


@pytest.mark.parametrize("tq, tk, kv_heads", [(1, 37, 2), (3, 70, 4), (9, 40, 2)])
def test_a_few_refined_queries_attend_the_reference_keys(tq, tk, kv_heads):
    torch.manual_seed(3)
    heads, cap, candidates = 4, 6, 3
    key_valid, _, selection = random_selection(2, heads, tq, tk, cap, pad=5, causal=True)
    q, k, v = (x.double().requires_grad_() for x in make_qkv(2, heads, kv_heads, tq, tk, 16))
    refinement = Refinement(candidates, budget=cap // candidates)
    out, nnz = few_rows_attention(q, k, v, selection, key_valid, 0.25, cap, refinement)
    mask = naive_block_refine(q, k, selection, key_valid, cap, refinement, 0.25)
    want, _ = reference_attention(q, k, v, mask, 0.25)
    torch.testing.assert_close(out, want)
    assert torch.equal(nnz, mask.sum(-1))
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    for got, expected in zip(grads, torch.autograd.grad(want.sum(), (q, k, v))):
        torch.testing.assert_close(got, expected)


def test_auto_refines_on_the_lists():
    """A refined dense run ranks every key of its span, so ``auto`` keeps the lists with refinement
    (the mode only decides the cost: the grid tests above run both)."""
    from sea_attention.core.ops.block_sparse import _use_dense

    assert _use_dense("auto", 100, 1000, refined=False)
    assert not _use_dense("auto", 100, 1000, refined=True)
    assert _use_dense("dense", 100, 1000, refined=True) and not _use_dense("lists", 100, 1000, refined=False)


@pytest.mark.parametrize("tq, tk, kv_heads, cap, bsz", [(1, 37, 2, 6, 2), (9, 40, 2, 6, 3), (4, 47, 2, 24, 3),
                                                       (16, 64, 2, 6, 2)])
def test_a_few_refined_queries_in_inference_resume_the_kept_vectors(tq, tk, kv_heads, cap, bsz):
    """Without gradients the selection keeps its lists' vectors and the tile slots are written in place
    (``ListVectors.tiled``): a first call and a second one that resumes them both give the reference, also
    for calls whose rows span two blocks."""
    torch.manual_seed(4)
    heads, candidates = 4, 3
    key_valid, _, selection = random_selection(bsz, heads, tq, tk, cap, pad=5, causal=True)
    q, k, v = (x.double() for x in make_qkv(bsz, heads, kv_heads, tq, tk, 16))
    refinement = Refinement(candidates, budget=max(cap // candidates, 1))
    with torch.no_grad():
        first, nnz = few_rows_attention(q, k, v, selection, key_valid, 0.25, cap, refinement)
        assert selection.vectors is not None  # kept for the next call
        again, _ = few_rows_attention(q, k, v, selection, key_valid, 0.25, cap, refinement)
    mask = naive_block_refine(q, k, selection, key_valid, cap, refinement, 0.25)
    want, _ = reference_attention(q, k, v, mask, 0.25)
    torch.testing.assert_close(first, want)
    torch.testing.assert_close(again, want)
    assert torch.equal(nnz, mask.sum(-1))


@pytest.mark.parametrize("tq, tk", [(1, 20), (3, 22), (2, 37)])
def test_a_few_queries_of_short_selecting_rows_attend_the_reference_keys(tq, tk):
    torch.manual_seed(3)
    heads, cap, refinement = 4, 24, Refinement(3, budget=8)
    key_valid, _, selection = random_selection(2, heads, tq, tk, cap, pad=5, causal=True)
    q, k, v = (x.double() for x in make_qkv(2, heads, 2, tq, tk, 16))
    out, nnz = few_rows_attention(q, k, v, selection, key_valid, 0.25, cap, refinement)
    mask = naive_block_refine(q, k, selection, key_valid, cap, refinement, 0.25)
    want, _ = reference_attention(q, k, v, mask, 0.25)
    torch.testing.assert_close(out, want)
    assert torch.equal(nnz, mask.sum(-1))
