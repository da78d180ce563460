"""Exact refinement (SEAConfig.candidates): the fast slot version against the dense reference,
and the layer with it against its own reference path, decoding and row chunks."""

import pytest
import torch

from conftest import make_qkv, padding_mask
from sea_attention import DecodeState, SEAAttention, SEAConfig
from sea_attention.core.cells import cells_to_keys, query_lengths
from sea_attention.core.refine import naive_refine, refine_slots


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
    slots, _ = _random_slots(2, heads, 30, 30, 8, mask)
    refined = refine_slots(q, k, slots, candidates, scale=0.3, chunk=7)
    expected = naive_refine(q, k, slots, candidates, scale=0.3)
    assert torch.equal(refined.dense_mask(heads, 30), expected)
    assert torch.equal(refined.dense_mask(heads, 30) & ~slots.dense_mask(heads, 30), torch.zeros_like(expected))
    head_order = torch.where(refined.valid, refined.head, heads)
    assert bool((head_order[..., 1:] >= head_order[..., :-1]).all())  # still ordered by head, used slots first


def test_all_keys_as_candidates_is_the_per_head_exact_top_k():
    q, k, _ = make_qkv(1, 2, 2, 1, 24, 8)
    every = torch.ones(1, 2, 1, 24, dtype=torch.bool)  # every key of both heads is a candidate
    slots = cells_to_keys(every, torch.tensor([[24]]), torch.ones(1, 24, dtype=torch.bool), cap=24)
    refined = refine_slots(q, k, slots, candidates=4, scale=1.0)  # keeps 24 / 4 = 6 per head
    top = (q @ k.transpose(-1, -2)).topk(6, dim=-1).indices  # (1, 2, 1, 6)
    expected = torch.zeros(1, 2, 1, 24, dtype=torch.bool).scatter_(-1, top, True)
    assert torch.equal(refined.dense_mask(2, 24), expected)


def _layer(**kw):
    defaults = dict(num_heads=4, num_kv_heads=2, head_dim=16, k=4, estimate_width=8, candidates=3)
    return SEAAttention(SEAConfig(**{**defaults, **kw}))


@pytest.mark.parametrize("grouping", ["query", "query_head"])
def test_the_sparse_path_equals_the_reference_path_outputs_and_gradients(grouping):
    sparse = _layer(grouping=grouping)
    reference = _layer(grouping=grouping, attention_path="reference")
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


def test_refinement_keeps_about_the_budget_and_changes_the_keys():
    plain, refined = _layer(candidates=1).eval(), _layer(candidates=4).eval()
    refined.load_state_dict(plain.state_dict())
    q, k, v = make_qkv(1, 4, 2, 64, 64, 16)
    a, b = plain(q, k, v), refined(q, k, v)
    assert float(b.nnz.float().mean()) <= float(a.nnz.float().mean()) + 1  # ceil(n / c) per head
    assert not torch.equal(a.context, b.context)


@pytest.mark.parametrize("schedule", [[30], [20, 1, 1, 8]])
def test_decoding_and_row_chunks_equal_the_full_forward(schedule):
    module = _layer(query_chunk=8).eval()
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


@pytest.mark.parametrize("bad", [dict(candidates=0), dict(candidates=2.5), dict(candidates=2, grouping="block"),
                                 dict(candidates=2, attention_path="flex")])
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
