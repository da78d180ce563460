"""FlexAttention path: same keys and same context as the dense reference on the selection.

Compilation is slow on CPU, so every compiled case uses the same batch (2), heads (4 query,
2 kv), head_dim (16), dtype and block size, and stays in the smallest table size class:
they share one compiled kernel. Block-mask checks run without compiling.
"""

import pytest
import torch

from conftest import make_qkv, padding_mask
from sea_attention import SEAAttention, SEAConfig
from sea_attention.core.cells import cells_to_keys, live_cells, query_lengths
from sea_attention.core.ops.flex import CellMap, flex_sea_attention, sea_block_mask
from sea_attention.core.ops.reference import reference_attention
from sea_attention.core.selection import select_cells

BATCH, HEADS, KV_HEADS, DIM = 2, 4, 2, 16


def random_selection(tq, tk, width, cap, pad, causal):
    """Random estimate -> grouped top-k cells, with left padding of ``pad`` keys in sample 1."""
    key_valid = padding_mask(BATCH, tk, pad, left=True)
    lengths = query_lengths(key_valid, key_valid[:, tk - tq:], causal)
    estimate = torch.rand(BATCH, HEADS, tq, width) * live_cells(lengths, width).unsqueeze(1)
    cells = select_cells(estimate.softmax(-1), lengths, cap, "query")
    return cells, lengths, key_valid


def reference(q, k, v, cells, lengths, key_valid, cap):
    slots = cells_to_keys(cells, lengths, key_valid, cap)
    return reference_attention(q, k, v, slots.dense_mask(HEADS, k.shape[2]), q.shape[-1] ** -0.5)[0]


# The first case has all sizes distinct and no query/key block count of 1, so the kernel
# compiled for it (dynamic shapes) serves the others without recompiling.
CASES = [  # causal, tq, tk, K, cap, pad
    (True, 300, 1000, 8, 16, 0),  # a query suffix; bins of ~125 keys, 16 emitted: strided picks
    (True, 200, 200, 8, 4, 37),  # causal prefixes, left padding, padding queries, L < K in the first rows
    (False, 150, 300, 8, 4, 37),  # bidirectional, a query suffix (Tq < Tk)
    (False, 200, 200, 16, 3, 190),  # sample 1 has 10 valid keys: dead bins in every row
    (True, 40, 40, 8, 6, 3),  # one key block: wrong rows on AVX2 CPUs unless padded to two (_two_key_blocks)
]


@pytest.mark.parametrize("causal, tq, tk, width, cap, pad", CASES)
def test_flex_matches_reference(causal, tq, tk, width, cap, pad):
    q, k, v = make_qkv(BATCH, HEADS, KV_HEADS, tq, tk, DIM)
    cells, lengths, key_valid = random_selection(tq, tk, width, cap, pad, causal)
    out = flex_sea_attention(q, k, v, cells, CellMap(lengths, key_valid, cap), scale=DIM ** -0.5)
    expected = reference(q, k, v, cells, lengths, key_valid, cap)
    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    empty = (cells_to_keys(cells, lengths, key_valid, cap).nnz(HEADS) == 0)  # (B, H, Tq)
    assert bool((out[empty] == 0).all())
    padded = (lengths == 0).unsqueeze(1).expand(-1, HEADS, -1)  # padding queries (the first case has some)
    assert bool((out[padded] == 0).all())


@pytest.mark.parametrize("forced", [(4, 4), (1, 3)])
def test_flex_matches_reference_with_forced_keys(forced):
    """Bins of ~125 keys emitting 16: the forced cells emit only their sink and window keys."""
    causal, tq, tk, width, cap, pad = CASES[0]
    q, k, v = make_qkv(BATCH, HEADS, KV_HEADS, tq, tk, DIM)
    key_valid = padding_mask(BATCH, tk, pad, left=True)
    lengths = query_lengths(key_valid, key_valid[:, tk - tq:], causal)
    estimate = torch.rand(BATCH, HEADS, tq, width).softmax(-1)
    cells = select_cells(estimate, lengths, cap, "query", sinks=forced[0], window=forced[1], forced_keys=True)
    out = flex_sea_attention(q, k, v, cells, CellMap(lengths, key_valid, cap, forced), scale=DIM ** -0.5)
    slots = cells_to_keys(cells, lengths, key_valid, cap, forced=forced)
    expected = reference_attention(q, k, v, slots.dense_mask(HEADS, tk), DIM ** -0.5)[0]
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_sea_attention_flex_path_matches_reference_path():
    config = dict(num_heads=HEADS, num_kv_heads=KV_HEADS, head_dim=DIM, k=4, estimate_width=8, max_positions=256)
    flex = SEAAttention(SEAConfig(**config, attention_path="flex"))
    ref = SEAAttention(SEAConfig(**config, attention_path="reference"))
    ref.load_state_dict(flex.state_dict())
    q, k, v = make_qkv(BATCH, HEADS, KV_HEADS, 150, 150, DIM)
    mask = padding_mask(BATCH, 150, 20, left=True)
    with torch.no_grad():
        a = flex(q, k, v, attention_mask=mask)
        b = ref(q, k, v, attention_mask=mask)
    assert torch.equal(a.cells, b.cells)
    torch.testing.assert_close(a.context, b.context, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("block_size", [16, 128])
def test_block_mask_is_sparse_and_covers_every_selected_key(block_size):
    tq = tk = 2048
    cells, lengths, key_valid = random_selection(tq, tk, 32, 4, 300, causal=True)
    block_mask = sea_block_mask(cells, CellMap(lengths, key_valid, 4), block_size=block_size)
    nqb, nkb = -(-tq // block_size), -(-tk // block_size)
    counts, indices = block_mask.kv_num_blocks, block_mask.kv_indices  # (B, H, nQB), (B, H, nQB, nKB)
    assert counts.shape == (BATCH, HEADS, nqb) and indices.shape == (BATCH, HEADS, nqb, nkb)
    causal_blocks = BATCH * HEADS * nqb * (nqb + 1) // 2  # what dense causal attention visits
    assert int(counts.sum()) < causal_blocks < BATCH * HEADS * nqb * nkb
    listed = torch.zeros(BATCH, HEADS, nqb, nkb + 1, dtype=torch.bool)
    used = torch.arange(nkb) < counts.unsqueeze(-1).long()
    listed.scatter_(-1, torch.where(used, indices.long(), nkb), True)  # unused entries land in column nkb
    slots = cells_to_keys(cells, lengths, key_valid, cap=4)  # (B, Tq, S)
    batch = torch.arange(BATCH).view(-1, 1, 1).expand_as(slots.key)
    q_block = (torch.arange(tq) // block_size).view(1, -1, 1).expand_as(slots.key)
    hit = listed[batch, slots.head, q_block, slots.key // block_size]
    assert bool(hit[slots.valid].all())


def test_bad_inputs_raise():
    q, k, v = make_qkv(BATCH, HEADS, KV_HEADS, 8, 8, DIM)
    cells, lengths, key_valid = random_selection(8, 8, 8, 4, 0, causal=True)
    with pytest.raises(ValueError, match="block_size"):
        flex_sea_attention(q, k, v, cells, CellMap(lengths, key_valid, 4), scale=0.25, block_size=0)
    with pytest.raises(ValueError, match="cap"):
        flex_sea_attention(q, k, v, cells, CellMap(lengths, key_valid, 0), scale=0.25)
    with pytest.raises(ValueError, match="dtype"):
        flex_sea_attention(q.double(), k.double(), v.double(), cells, CellMap(lengths, key_valid, 4), scale=0.25)
    with pytest.raises(ValueError, match="cells"):
        flex_sea_attention(q, k, v, cells[:, :2], CellMap(lengths, key_valid, 4), scale=0.25)
