"""The sparse op against the dense reference and the plain-autograd version: outputs and gradients."""

import pytest
import torch

from conftest import make_qkv
from sea_attention.core.cells import cells_to_keys, live_cells, query_lengths
from sea_attention.core.ops import naive_sparse_attention, reference_attention, sparse_attention


def random_slots(batch, heads, tq, tk, width, causal, cap, density=0.3, pad=0):
    key_valid = torch.ones(batch, tk, dtype=torch.bool)
    if pad:
        key_valid[-1, :pad] = False
    query_valid = key_valid[:, tk - tq:]
    lengths = query_lengths(key_valid, query_valid, causal)
    cells = (torch.rand(batch, heads, tq, width) < density) & live_cells(lengths, width).unsqueeze(1)
    return cells_to_keys(cells, lengths, key_valid, cap=cap, chunk=5)


GRID = [  # batch, heads, kv_heads, tq, tk, dim, width, causal, cap, pad
    (1, 1, 1, 7, 7, 4, 4, True, 2, 0),
    (2, 4, 2, 16, 16, 8, 8, True, 3, 3),
    (2, 4, 4, 9, 20, 8, 4, True, 4, 0),
    (2, 6, 2, 12, 12, 16, 8, False, 2, 4),
    (1, 3, 1, 33, 33, 8, 16, False, 100, 0),
]


@pytest.mark.parametrize("batch, heads, kv_heads, tq, tk, dim, width, causal, cap, pad", GRID)
@pytest.mark.parametrize("chunk", [1, 4, 64])
@pytest.mark.parametrize("mode", ["auto", "slots", "dense"])
def test_sparse_matches_reference_and_naive(batch, heads, kv_heads, tq, tk, dim, width, causal, cap, pad, chunk, mode):
    slots = random_slots(batch, heads, tq, tk, width, causal, cap, pad=pad)
    scale = dim ** -0.5
    results = []
    for fn in ("sparse", "naive", "reference"):
        q, k, v = make_qkv(batch, heads, kv_heads, tq, tk, dim, requires_grad=True) if not results else \
            [x.detach().clone().requires_grad_() for x in results[0][1]]
        if fn == "sparse":
            out, _ = sparse_attention(q, k, v, slots, scale, chunk=chunk, mode=mode)
        elif fn == "naive":
            out, _ = naive_sparse_attention(q, k, v, slots, scale)
        else:
            out, _ = reference_attention(q, k, v, slots.dense_mask(heads, tk), scale)
        grad = torch.randn_like(out) if not results else results[0][3]
        out.backward(grad)
        results.append((out.detach(), (q, k, v), [x.grad for x in (q, k, v)], grad))
    for out, _, grads, _ in results[1:]:
        torch.testing.assert_close(out, results[0][0], atol=1e-5, rtol=1e-5)
        for g, g0 in zip(grads, results[0][2]):
            torch.testing.assert_close(g, g0, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["slots", "dense"])
def test_slot_probabilities_match_reference(mode):
    slots = random_slots(2, 4, 10, 10, 4, True, 3)
    q, k, v = make_qkv(2, 4, 2, 10, 10, 8)
    _, slot_probs = sparse_attention(q, k, v, slots, 0.3, mode=mode)
    _, dense = reference_attention(q, k, v, slots.dense_mask(4, 10), 0.3)
    torch.testing.assert_close(slots.to_dense(slot_probs, 4, 10), dense)


@pytest.mark.parametrize("causal, kv_heads", [(True, 1), (False, 2)])
@pytest.mark.parametrize("mode", ["slots", "dense"])
def test_gradcheck_float64(causal, kv_heads, mode):
    slots = random_slots(2, 2, 6, 8, 4, causal, 2, pad=2)
    q, k, v = make_qkv(2, 2, kv_heads, 6, 8, 3, dtype=torch.float64, requires_grad=True)
    fn = lambda q, k, v: sparse_attention(q, k, v, slots, 0.7, chunk=4, mode=mode)[0]
    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode", ["slots", "dense"])
def test_empty_rows_give_zero_and_finite_grads(mode):
    slots = random_slots(1, 2, 5, 5, 4, True, 2, density=0.0)
    q, k, v = make_qkv(1, 2, 2, 5, 5, 4, requires_grad=True)
    out, _ = sparse_attention(q, k, v, slots, 0.5, mode=mode)
    out.sum().backward()
    assert bool((out == 0).all()) and all(bool(torch.isfinite(x.grad).all()) for x in (q, k, v))


def test_bfloat16_close_to_float32():
    slots = random_slots(1, 4, 16, 16, 8, True, 4)
    q, k, v = make_qkv(1, 4, 2, 16, 16, 16)
    ref, _ = sparse_attention(q, k, v, slots, 0.25)
    low, _ = sparse_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), slots, 0.25)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), ref, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("causal", [True, False])
def test_exact_attention_matches_sdpa(causal):
    from conftest import exact_attention as sdpa_attention, padding_mask
    from sea_attention.core.ops import exact_attention
    q, k, v = make_qkv(2, 4, 2, 6, 11, 8)
    mask = padding_mask(2, 11, 3, left=causal)
    context, probs = exact_attention(q, k, v, mask, 8 ** -0.5, causal)
    rows = mask[:, -6:]
    torch.testing.assert_close(context.transpose(1, 2)[rows], sdpa_attention(q, k, v, mask, causal).transpose(1, 2)[rows])
    torch.testing.assert_close(probs.sum(-1).transpose(1, 2)[rows], torch.ones(int(rows.sum()), 4))


def test_unknown_mode_is_rejected():
    slots = random_slots(1, 2, 5, 5, 4, True, 2)
    q, k, v = make_qkv(1, 2, 2, 5, 5, 4)
    with pytest.raises(ValueError, match="mode must be one of"):
        sparse_attention(q, k, v, slots, 0.5, mode="fast")


def test_non_contiguous_inputs_like_transformers_gives():
    slots = random_slots(2, 4, 9, 9, 4, True, 3)
    q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
               for x in make_qkv(2, 4, 2, 9, 9, 8))  # (B, T, H, d) memory seen as (B, H, T, d)
    out, _ = sparse_attention(q, k, v, slots, 0.3)
    out.sum().backward()
    ref_in = [x.detach().contiguous().requires_grad_() for x in (q, k, v)]
    ref, _ = reference_attention(*ref_in, slots.dense_mask(4, 9), 0.3)
    ref.sum().backward()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip((q, k, v), ref_in):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["slots", "auto"])
def test_slots_in_any_order(mode):
    """KeySlots from elsewhere may interleave unused slots and heads: same attention, same
    probabilities per slot, same gradients."""
    from sea_attention.core.cells import KeySlots
    slots = random_slots(2, 4, 12, 12, 4, True, 3, pad=2)
    order = torch.rand(slots.head.shape).argsort(-1)
    shuffled = KeySlots(*(x.gather(-1, order) for x in (slots.head, slots.key, slots.valid)))
    results = []
    for s in (slots, shuffled):
        torch.manual_seed(0)
        q, k, v = make_qkv(2, 4, 2, 12, 12, 8, requires_grad=True)
        out, probs = sparse_attention(q, k, v, s, 0.3, chunk=5, mode=mode)
        out.backward(torch.ones_like(out))
        results.append((out.detach(), probs, [x.grad for x in (q, k, v)]))
    (out0, probs0, grads0), (out1, probs1, grads1) = results
    torch.testing.assert_close(out1, out0)
    torch.testing.assert_close(probs1, probs0.gather(-1, order))
    for g1, g0 in zip(grads1, grads0):
        torch.testing.assert_close(g1, g0)


@pytest.mark.parametrize("mode, tq", [("auto", 1), ("auto", 3), ("slots", 9), ("dense", 9)])
@pytest.mark.parametrize("batch", [1, 2])
def test_keys_in_a_cache_with_spare_rows_are_read_in_place(mode, tq, batch):
    """K/V as views of storage with room to grow (hf.GrowingCache): the same attention as on
    contiguous copies, and the key table is the storage itself, not a copy."""
    from sea_attention.core.rows import row_table, same_layout

    slots = random_slots(batch, 4, tq, 9, 4, True, 3)
    q, k, v = make_qkv(batch, 4, 2, tq, 9, 8)
    spare_k, spare_v = torch.randn(batch, 2, 20, 8), torch.randn(batch, 2, 20, 8)
    spare_k[:, :, :9], spare_v[:, :, :9] = k, v
    view_k, view_v = spare_k[:, :, :9], spare_v[:, :, :9]
    assert row_table(view_k).rows.data_ptr() == spare_k.data_ptr()
    out, probs = sparse_attention(q, view_k, view_v, slots, 0.3, mode=mode)
    ref, ref_probs = sparse_attention(q, k, v, slots, 0.3, mode=mode)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(probs, ref_probs, atol=1e-6, rtol=0)
    # keys and values laid out differently: both are read through one layout
    k_table, v_table = same_layout(view_k, v)
    assert (k_table.batch, k_table.head) == (v_table.batch, v_table.head)
    mixed, _ = sparse_attention(q, view_k, v, slots, 0.3, mode=mode)
    torch.testing.assert_close(mixed, ref, atol=1e-6, rtol=0)
