"""The kernel's binned attention against a dense reference: phi(q) phi(k)^T summed into the bins."""

import pytest
import torch

from sea_attention.core.cells import compress_attention, query_lengths
from sea_attention.core.estimator.features import RandomFeatures
from sea_attention.core.cells import cell_edges
from sea_attention.core.estimator.kernel_bins import LOG_FLOOR, binned_key_logits, binned_log_mass, prefix_sums

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
    sums, counts = prefix_sums(phi_k, key_valid)
    got = binned_log_mass(phi_q, sums, counts, lengths, width, chunk=7)
    expected = dense_reference(phi_q, phi_k, key_valid, lengths, width, causal)
    rows = (lengths > 0)[:, None, None, :, None].expand_as(got)
    torch.testing.assert_close(got[rows], expected[rows].float(), atol=1e-4, rtol=1e-4)


def test_prefix_sums_continue_across_calls():
    phi_k, key_valid = torch.rand(2, 3, 20, 5), padding_mask(2, 20, 3)
    whole = prefix_sums(phi_k, key_valid)
    first = prefix_sums(phi_k[:, :, :12], key_valid[:, :12])
    rest = prefix_sums(phi_k[:, :, 12:], key_valid[:, 12:], start=(first[0][:, :, -1], first[1][:, -1]))
    torch.testing.assert_close(torch.cat([first[0], rest[0]], 2), whole[0])
    assert torch.equal(torch.cat([first[1], rest[1]], 1), whole[1])


def test_padding_keys_are_never_read():
    phi_k, key_valid = torch.rand(1, 1, 10, 4), padding_mask(2, 10, 3)[1:]
    phi_k[0, 0, 0] = float("nan")  # a padding key
    sums, _ = prefix_sums(phi_k, key_valid)
    assert sums.isfinite().all()


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
    sums, counts = prefix_sums(k, key_valid)
    got = binned_key_logits(q, sums, counts, lengths, width, scale=0.3, chunk=5)
    expected = mean_key_reference(q, k, key_valid, lengths, width, 0.3)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_one_call_for_both_signals_equals_each_alone():
    """The estimator reads phi(q) and q against their prefix sums in one call: the same numbers."""
    from sea_attention.core.estimator.kernel_bins import edge_dots, key_logits, log_mass

    phi_q, q = torch.rand(2, 2, 3, 30, 5), torch.randn(2, 2, 3, 30, 8)
    phi_k, k = torch.rand(2, 2, 30, 5), torch.randn(2, 2, 30, 8)
    key_valid = padding_mask(2, 30, 4)
    lengths = query_lengths(key_valid, key_valid, True)
    alone_sums, counts = prefix_sums(phi_k, key_valid)
    (kernel, keys), sizes = edge_dots([phi_q, q], [alone_sums, prefix_sums(k, key_valid)[0]], counts, lengths, 8,
                                      chunk=7)
    torch.testing.assert_close(log_mass(kernel), binned_log_mass(phi_q, alone_sums, counts, lengths, 8))
    key_sums, _ = prefix_sums(k, key_valid)
    torch.testing.assert_close(key_logits(keys, sizes, 0.3), binned_key_logits(q, key_sums, counts, lengths, 8, 0.3))


@pytest.mark.parametrize("chunk", [1, 4, 30, None])
def test_edge_dots_do_not_depend_on_the_chunk(chunk):
    """Rows read one at a time, a few at a time, all at once or by the default
    (``rows_per_chunk``) give the same dots."""
    from sea_attention.core.estimator.kernel_bins import edge_dots, rows_per_chunk

    phi_q, phi_k = torch.rand(2, 2, 3, 30, 5), torch.rand(2, 2, 30, 5)
    key_valid = padding_mask(2, 30, 4)
    lengths = query_lengths(key_valid, key_valid, True)
    sums, counts = prefix_sums(phi_k, key_valid)
    (expected,), _ = edge_dots([phi_q], [sums], counts, lengths, 8, chunk=30)
    (got,), _ = edge_dots([phi_q], [sums], counts, lengths, 8, chunk=chunk)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert rows_per_chunk(sums, 8) >= 1 and rows_per_chunk(torch.empty(1, 2**20, 1, 1), 8) == 1


@pytest.mark.parametrize("pad, chunk", [(0, None), (4, 3), (7, 11)])
def test_edge_dots_equal_their_gathering_reference(pad, chunk):
    """The sampled product reads the same prefix-sum rows as the gather (also from a decoding
    state's non-contiguous rows): the same float64 dots."""
    from sea_attention.core.decoding import GrowingRows
    from sea_attention.core.estimator.kernel_bins import edge_dots, naive_edge_dots

    phi_q, q = torch.rand(2, 2, 3, 30, 5), torch.randn(2, 2, 3, 30, 8)
    key_valid = padding_mask(2, 30, pad)
    lengths = query_lengths(key_valid, key_valid, True)
    kernel_sums, counts = prefix_sums(torch.rand(2, 2, 30, 5), key_valid)
    key_sums, _ = prefix_sums(torch.randn(2, 2, 30, 8), key_valid)
    grown = GrowingRows.of(key_sums[:, :, :20], 2)
    grown.append(key_sums[:, :, 20:])  # the same rows, inside spare capacity
    expected, expected_sizes = naive_edge_dots([phi_q, q], [kernel_sums, key_sums], counts, lengths, 8, chunk=4)
    for table in (key_sums, grown.rows):
        got, sizes = edge_dots([phi_q, q], [kernel_sums, table], counts, lengths, 8, chunk=chunk)
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        assert torch.equal(sizes, expected_sizes)


@pytest.mark.parametrize("length", [1, 2, 5])
def test_edge_dots_of_tables_shorter_than_the_edges_equal_the_reference(length):
    """A table with fewer rows than K + 1 edges (a few tokens) takes the gathering path."""
    from sea_attention.core.estimator.kernel_bins import edge_dots, naive_edge_dots

    q = torch.randn(1, 1, 2, length, 4)
    key_valid = torch.ones(1, length, dtype=torch.bool)
    sums, counts = prefix_sums(torch.randn(1, 1, length, 4), key_valid)
    lengths = query_lengths(key_valid, key_valid, True)
    (got,), _ = edge_dots([q], [sums], counts, lengths, 8)
    (expected,), _ = naive_edge_dots([q], [sums], counts, lengths, 8)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_a_decoding_row_gathers_its_edges_instead_of_walking_the_whole_table(monkeypatch):
    """One row's K + 1 edges against a long context: the gather (O(K f)), not the sampled product,
    whose cost grows with the table; the same dots as the reference."""
    from sea_attention.core.estimator.kernel_bins import edge_dots, naive_edge_dots

    key_valid = torch.ones(1, 200, dtype=torch.bool)
    sums, counts = prefix_sums(torch.randn(1, 2, 200, 4), key_valid)
    q, lengths = torch.randn(1, 2, 3, 1, 4), torch.tensor([[200]])
    (expected,), _ = naive_edge_dots([q], [sums], counts, lengths, 8)

    def refuse(*args, **kwargs):
        raise AssertionError("a decoding row must not walk the whole table")

    monkeypatch.setattr(torch.sparse, "sampled_addmm", refuse)
    (got,), _ = edge_dots([q], [sums], counts, lengths, 8)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
