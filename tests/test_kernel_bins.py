"""The kernel's binned attention against a dense reference: phi(q) phi(k)^T summed into the bins."""

import pytest
import torch

from sea_attention.core.cells import compress_attention, query_lengths
from sea_attention.core.estimator.features import RandomFeatures
from sea_attention.core.cells import cell_edges
from sea_attention.core.estimator.kernel_bins import (LOG_FLOOR, PrefixSums, binned_key_logits, binned_log_mass,
                                                     prefix_sums)

from conftest import padding_mask


def dense_reference(phi_q, phi_k, key_valid, lengths, width, causal):
    """The kernel's attention as a dense (B, H, Tq, Tk) map, normalised per row, then binned."""
    bsz, kv_heads, groups, tq, m = phi_q.shape
    tk = phi_k.shape[2]
    scores = phi_q.double() @ phi_k.double().unsqueeze(2).transpose(-1, -2)  # (B, H_kv, G, Tq, Tk)
    allowed = key_valid[:, None, None, None, :].expand_as(scores)
    if causal:
        allowed = allowed & torch.ones(tq, tk, dtype=torch.bool).tril(tk - tq)
    scores = torch.where(allowed, scores, 0.0)
    probs = scores / scores.sum(-1, keepdim=True).clamp_min(1e-300)
    binned = compress_attention(probs.flatten(1, 2), key_valid, lengths, width)
    return binned.clamp_min(LOG_FLOOR).log().view(bsz, kv_heads, groups, tq, width)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("pad, left", [(0, True), (3, True), (5, True), (4, False)])
@pytest.mark.parametrize("tk, width", [(40, 8), (6, 8), (33, 16)])
def test_binned_mass_equals_the_dense_kernel_attention(causal, pad, left, tk, width):
    bsz, kv_heads, groups, d = 3, 2, 2, 16
    features = RandomFeatures(d, 24, "favor", seed=0)
    q, k = torch.randn(bsz, kv_heads, groups, tk, d), torch.randn(bsz, kv_heads, tk, d)
    key_valid = padding_mask(bsz, tk, pad, left)
    lengths = query_lengths(key_valid, key_valid, causal)
    phi_q, phi_k = features(q, is_query=True, root=0.5), features(k, is_query=False, root=0.5)
    got = binned_log_mass(phi_q, prefix_sums(phi_k, key_valid), lengths, width, chunk=7)
    expected = dense_reference(phi_q, phi_k, key_valid, lengths, width, causal)
    rows = (lengths > 0)[:, None, None, :, None].expand_as(got)
    # float32 sums (accumulated in float64): each bin's share of its row's mass is off by a few 1e-7
    torch.testing.assert_close(got[rows].double().exp(), expected[rows].exp(), atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_a_sink_holding_most_of_the_mass_leaves_the_other_bins_shares_precise(dtype):
    """Stored in float32 or float64 after a float64 scan: with a key holding 99.9 % of the kernel
    mass, every bin's share is still within 1e-6 of the dense float64 reference's."""
    torch.manual_seed(0)
    features = RandomFeatures(8, 16, "favor", seed=0)
    q, k = torch.randn(1, 1, 1, 3000, 8), torch.randn(1, 1, 3000, 8)
    phi_q, phi_k = features(q, is_query=True, root=0.5), features(k, is_query=False, root=0.5)
    phi_k[:, :, 0] *= 1e3 * phi_k.sum(2) / phi_k[:, :, 0]  # the sink: 1e3 times all other keys together
    key_valid, lengths = torch.ones(1, 3000, dtype=torch.bool), torch.full((1, 1), 3000)
    got = binned_log_mass(phi_q[:, :, :, -1:], prefix_sums(phi_k, key_valid, dtype=dtype), lengths, 64).double().exp()
    expected = dense_reference(phi_q[:, :, :, -1:], phi_k, key_valid, lengths, 64, False).exp()
    assert expected[..., 1:].min() > 5e-6  # every other bin holds a share this test can tell apart
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_the_center_is_the_median_of_the_first_valid_keys_whatever_the_padding():
    from sea_attention.core.estimator.kernel_bins import CENTER_KEYS

    keys = torch.randn(1, 2, 40, 3)
    keys[:, :, 0] = 1e4  # a sink among them does not move a median
    alone = prefix_sums(keys, torch.ones(1, 40, dtype=torch.bool))
    expected = keys[:, :, :CENTER_KEYS].double().median(2).values
    torch.testing.assert_close(alone.center, expected, atol=0, rtol=0)
    padded = torch.cat([torch.full((1, 2, 5, 3), float("nan")), keys], 2)
    valid = torch.cat([torch.zeros(1, 5, dtype=torch.bool), torch.ones(1, 40, dtype=torch.bool)], 1)
    assert torch.equal(prefix_sums(padded, valid).center, alone.center)


def test_padding_keys_are_never_read():
    phi_k, key_valid = torch.rand(1, 1, 10, 4), padding_mask(2, 10, 3)[1:]
    phi_k[0, 0, 0] = float("nan")  # a padding key
    sums = prefix_sums(phi_k, key_valid)
    assert sums.rows.isfinite().all() and sums.center.isfinite().all()


def mean_key_reference(q, k, key_valid, lengths, width, scale):
    """scale * q . mean(k over the bin) + log(size), row by row and bin by bin."""
    bsz, kv_heads, groups, tq, _ = q.shape
    out = torch.zeros(bsz, kv_heads, groups, tq, width)
    edges = cell_edges(lengths, width)
    for b in range(bsz):
        keys = k[b][:, key_valid[b]]  # (H_kv, valid keys, d) in rank order
        for i in range(tq):
            for c in range(width):
                lo, hi = int(edges[b, i, c]), int(edges[b, i, c + 1])
                if hi > lo:
                    mean = keys[:, lo:hi].double().mean(1)  # (H_kv, d)
                    dots = (q[b, :, :, i].double() * mean[:, None]).sum(-1)  # (H_kv, G)
                    out[b, :, :, i, c] = (scale * dots + torch.tensor(hi - lo).double().log()).float()
    return out


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("pad, left", [(0, True), (3, True), (4, False)])
@pytest.mark.parametrize("tk, width", [(40, 8), (6, 8)])
def test_mean_key_logits_equal_a_bin_by_bin_reference(causal, pad, left, tk, width):
    bsz, kv_heads, groups, d = 2, 2, 2, 8
    q, k = torch.randn(bsz, kv_heads, groups, tk, d), torch.randn(bsz, kv_heads, tk, d)
    key_valid = padding_mask(bsz, tk, pad, left)
    lengths = query_lengths(key_valid, key_valid, causal)
    got = binned_key_logits(q, prefix_sums(k, key_valid), lengths, width, scale=0.3, chunk=5)
    expected = mean_key_reference(q, k, key_valid, lengths, width, 0.3)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_one_call_for_both_signals_equals_each_alone():
    """The estimator reads phi(q) and q against their prefix sums in one call: the same numbers."""
    from sea_attention.core.estimator.kernel_bins import edge_dots, key_logits, log_mass

    phi_q, q = torch.rand(2, 2, 3, 30, 5), torch.randn(2, 2, 3, 30, 8)
    phi_k, k = torch.rand(2, 2, 30, 5), torch.randn(2, 2, 30, 8)
    key_valid = padding_mask(2, 30, 4)
    lengths = query_lengths(key_valid, key_valid, True)
    alone_sums, key_sums = prefix_sums(phi_k, key_valid), prefix_sums(k, key_valid)
    (kernel, keys), sizes = edge_dots([phi_q, q], [alone_sums, key_sums], lengths, 8,
                                      chunk=7)
    torch.testing.assert_close(log_mass(kernel, sizes), binned_log_mass(phi_q, alone_sums, lengths, 8))
    torch.testing.assert_close(key_logits(keys, sizes, 0.3), binned_key_logits(q, key_sums, lengths, 8, 0.3))


@pytest.mark.parametrize("chunk", [1, 4, 30, None])
def test_edge_dots_do_not_depend_on_the_chunk(chunk):
    """Rows read one at a time, a few at a time, all at once or by the default
    (``rows_per_chunk``) give the same dots."""
    from sea_attention.core.estimator.kernel_bins import edge_dots, rows_per_chunk

    phi_q, phi_k = torch.rand(2, 2, 3, 30, 5), torch.rand(2, 2, 30, 5)
    key_valid = padding_mask(2, 30, 4)
    lengths = query_lengths(key_valid, key_valid, True)
    sums = prefix_sums(phi_k, key_valid)
    (expected,), _ = edge_dots([phi_q], [sums], lengths, 8, chunk=30)
    (got,), _ = edge_dots([phi_q], [sums], lengths, 8, chunk=chunk)
    assert torch.equal(got.edges, expected.edges) and torch.equal(got.offset, expected.offset)
    assert rows_per_chunk(sums.rows, 8) >= 1 and rows_per_chunk(torch.empty(1, 2**20, 1, 1), 8) == 1


@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("pad, chunk", [(0, None), (4, 3), (7, 11)])
def test_edge_dots_equal_their_gathering_reference(pad, chunk, dtype, tolerance):
    """The sampled product reads the same prefix-sum rows as the gather (also from a decoding
    state's non-contiguous rows): the same dots, to the sums' rounding."""
    from sea_attention.core.decoding import GrowingRows
    from sea_attention.core.estimator.kernel_bins import edge_dots, naive_edge_dots

    phi_q, q = torch.rand(2, 2, 3, 30, 5), torch.randn(2, 2, 3, 30, 8)
    key_valid = padding_mask(2, 30, pad)
    lengths = query_lengths(key_valid, key_valid, True)
    kernel_sums = prefix_sums(torch.rand(2, 2, 30, 5), key_valid, dtype=dtype)
    key_sums = prefix_sums(torch.randn(2, 2, 30, 8) + 3, key_valid, dtype=dtype)
    grown = GrowingRows.of(key_sums.rows[:, :, :20], 2)
    grown.append(key_sums.rows[:, :, 20:])  # the same rows, inside spare capacity
    expected, expected_sizes = naive_edge_dots([phi_q, q], [kernel_sums, key_sums], lengths, 8, chunk=4)
    for table in (key_sums, key_sums._replace(rows=grown.rows)):
        got, sizes = edge_dots([phi_q, q], [kernel_sums, table], lengths, 8, chunk=chunk)
        for a, b in zip(got, expected):  # the sums' dtype against float64 dots rounded to it
            torch.testing.assert_close(a.edges, b.edges, rtol=tolerance, atol=tolerance)
            assert torch.equal(a.offset, b.offset)
        assert torch.equal(sizes, expected_sizes)


@pytest.mark.parametrize("length", [1, 2, 5])
def test_edge_dots_of_tables_shorter_than_the_edges_equal_the_reference(length):
    """A table with fewer rows than K + 1 edges (a few tokens) takes the gathering path."""
    from sea_attention.core.estimator.kernel_bins import edge_dots, naive_edge_dots

    q = torch.randn(1, 1, 2, length, 4)
    key_valid = torch.ones(1, length, dtype=torch.bool)
    sums = prefix_sums(torch.randn(1, 1, length, 4), key_valid)
    lengths = query_lengths(key_valid, key_valid, True)
    (got,), _ = edge_dots([q], [sums], lengths, 8)
    (expected,), _ = naive_edge_dots([q], [sums], lengths, 8)
    torch.testing.assert_close(got.edges, expected.edges, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("length", [20, 200])  # a first call of at least CENTER_KEYS keys
def test_a_rows_dots_are_bitwise_alike_alone_in_any_batch_and_after_decoding(length, dtype):
    """Each dot rounds alike whatever rows come with it: one row alone (a decoding step), all rows
    (a full forward), a sample inside a batch (a decoding state's sums: ``tests/test_decoding.py``)."""
    from sea_attention.core.estimator.kernel_bins import edge_dots

    torch.manual_seed(length)
    keys, key_valid = torch.randn(3, 2, length, 4) * 30 + 50, torch.ones(3, length, dtype=torch.bool)
    q, lengths = torch.randn(3, 2, 3, length, 4), torch.arange(1, length + 1).expand(3, -1)
    sums = prefix_sums(keys, key_valid, dtype=dtype)
    (whole,), _ = edge_dots([q], [sums], lengths, 8)
    (last,), _ = edge_dots([q[:, :, :, -1:]], [sums], lengths[:, -1:], 8)
    assert all(torch.equal(a, b[:, :, :, -1:]) for a, b in zip(last, whole))
    alone_sums = PrefixSums(*(x[1:2] for x in sums[:3]))
    (alone,), _ = edge_dots([q[1:2]], [alone_sums], lengths[1:2], 8)
    assert all(torch.equal(a, b[1:2]) for a, b in zip(alone, whole))


@pytest.mark.parametrize("pad", [0, 3])
def test_edge_positions_are_the_first_position_holding_each_edge_rank(pad):
    """Without padding a row's edges are read at their own positions (no search); with it, at the
    first position that many valid keys precede: both the searched answer."""
    from sea_attention.core.estimator.kernel_bins import _edge_positions

    key_valid = padding_mask(2, 30, pad)
    lengths = query_lengths(key_valid, key_valid, True)
    counts = torch.nn.functional.pad(key_valid.long().cumsum(-1), (1, 0))  # (B, 31)
    positions, sizes = _edge_positions(counts, lengths, 8)
    edges = cell_edges(lengths, 8)
    searched = torch.searchsorted(counts, edges.flatten(1)).view_as(edges)
    assert torch.equal(positions, searched) and torch.equal(sizes, (edges[..., 1:] - edges[..., :-1])[:, None, None])
