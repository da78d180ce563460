"""Key bounds (``estimator/key_bounds.py``): the fast table equals its one-bin-at-a-time reference,
bounds every logit of its bin, and grows by decoding exactly as a table built at once."""

import math

import pytest
import torch

from sea_attention.core.cells import cell_edges
from sea_attention.core.estimator.kernel_bins import prefix_sums
from sea_attention.core.estimator.key_bounds import (
    bin_bound_logits, bound_levels, bound_table, naive_bin_bound_logits)


def _inputs(length=70, pad=9, seed=0):
    torch.manual_seed(seed)
    q, keys = torch.randn(2, 2, 3, length, 8), torch.randn(2, 2, length, 8)
    valid = torch.ones(2, length, dtype=torch.bool)
    valid[1, :pad] = False  # left padding
    counts = prefix_sums(keys, valid).counts
    return q, keys, valid, counts, counts[:, 1:]  # causal rows: the keys up to each query


@pytest.mark.parametrize("block", [1, 2, 4, 8])
@pytest.mark.parametrize("width", [4, 8, 16])
def test_bounds_equal_the_reference(block, width):
    q, keys, valid, counts, lengths = _inputs()
    table = bound_table(keys, valid, width, block=block)
    got = bin_bound_logits(q, table, lengths, width, 0.3)
    expected = naive_bin_bound_logits(q, keys, valid, lengths, width, 0.3, block)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("block", [1, 4])
def test_the_bound_is_above_every_logit_of_its_bin(block):
    q, keys, valid, counts, lengths = _inputs(length=90)
    width, scale = 8, 0.3
    got = bin_bound_logits(q, bound_table(keys, valid, width, block=block), lengths, width, scale)
    logits = scale * torch.einsum("bhgtd,bhsd->bhgts", q, keys)
    for b in range(2):
        ranks = torch.nonzero(valid[b]).flatten()  # position of each rank
        for i in range(0, 90, 7):
            edges = cell_edges(lengths[b, i], width).tolist()
            for bin_, (lo, hi) in enumerate(zip(edges[:-1], edges[1:])):
                if hi > lo:
                    top = logits[b, :, :, i, ranks[lo:hi]].amax(-1) + math.log(hi - lo)  # (H_kv, G)
                    assert bool((got[b, :, :, i, bin_] >= top - 1e-5).all())
                else:
                    assert bool((got[b, :, :, i, bin_] == 0).all())  # a dead bin


@pytest.mark.parametrize("block", [1, 4])
@pytest.mark.parametrize("schedule", [[20] + [1] * 50, [3, 30, 1, 36]])
def test_a_table_grown_by_decoding_equals_one_built_at_once(block, schedule):
    _, keys, valid, _, _ = _inputs()
    table, seen = None, 0
    for size in schedule:  # levels grow on the way (a rebuild) with block 1
        table = bound_table(keys[:, :, seen:seen + size], valid[:, seen:seen + size], 8, table, block)
        seen += size
    whole = bound_table(keys, valid, 8, block=block)
    assert table.levels == whole.levels == bound_levels(70, 8, block)
    assert torch.equal(table.ranks, whole.ranks)
    for b, rank in enumerate(whole.ranks.tolist()):  # the rows each sample uses
        assert torch.equal(table.within.rows[b, :, :rank], whole.within.rows[b, :, :rank])
        blocks = rank // block
        assert torch.equal(table.windows.rows[b, :, :blocks], whole.windows.rows[b, :, :blocks])


def test_levels_cover_the_widest_bin():
    assert bound_levels(1024, 256, 4) == 1  # bins of 4 keys: at most 1 complete block before the last
    for length in (100, 1000, 8192, 32768):
        for block in (1, 4, 8):
            widest = -(-length // 256)
            before_last = -(-(widest - 1) // block)  # complete blocks before the last key's
            assert 2 ** bound_levels(length, 256, block) > before_last


@pytest.mark.parametrize("causal", [True, False])
def test_a_padded_sample_gets_the_bounds_it_gets_alone(causal):
    """Blocks are counted in valid keys, so padding (left or right) moves no block edge."""
    from sea_attention import SEAAttention, SEAConfig

    torch.manual_seed(0)
    layer = SEAAttention(SEAConfig(num_heads=4, num_kv_heads=2, head_dim=16, k=3, estimate_width=8, causal=causal,
                                   key_bounds=True)).eval()
    q, k, v = torch.randn(1, 4, 30, 16), torch.randn(1, 2, 30, 16), torch.randn(1, 2, 30, 16)
    alone = layer(q, k, v).context
    for left in (True, False):
        noise = lambda x: torch.randn(*x.shape[:2], 7, 16)
        pad = lambda x: torch.cat([noise(x), x] if left else [x, noise(x)], 2)
        mask = torch.ones(1, 37, dtype=torch.bool)
        mask[:, (slice(0, 7) if left else slice(30, 37))] = False
        padded = layer(pad(q), pad(k), pad(v), attention_mask=mask).context
        rows = padded[:, :, 7:] if left else padded[:, :, :30]
        torch.testing.assert_close(rows, alone, atol=1e-5, rtol=1e-5)
