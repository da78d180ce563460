"""The kernel's own compressed attention: FAVOR+ attention mass summed into each row's K bins.

For query i the softmax kernel estimate of its attention on key j is phi(q_i) . phi(k_j).
Summed over the keys of bin b (the ranks ``cells.cell_edges`` gives) and divided by the
row's total, it is an estimate of exactly what the estimator predicts, in its own
coordinates, for every row length: no positional table, nothing to extrapolate.

With prefix sums P[p] = sum of phi(k) over the valid keys before position p, bin b of row i
holds phi(q_i) . (P[p(e_{b+1})] - P[p(e_b)]), where p(e) is the position after the key of
rank e - 1: O(T K m) time, linear in T. Prefix sums over positions (padding adds zero) grow
by appending, so decoding keeps them in its state. They are float64 because a bin's mass is
a difference of two large running sums (a sink key can hold most of a row's kernel mass).
No gradient flows through it: the features are a fixed random projection and the result is
an input of the estimator, like the teacher's q and k in distillation.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from ..cells import cell_edges
from ..rows import row_table

LOG_FLOOR = 1e-6  # log(mass fraction) of an empty bin
# edge_dots reads each row's K + 1 prefix sums in place (``torch.sparse.sampled_addmm``: one dot per
# (row, edge), no gathered copy); a call covers rows for at most this many (row, edge) entries, which
# bounds its index and output memory. The gathering version, ``naive_edge_dots``, wrote a (rows, K + 1, f)
# float64 copy first: 4.8x slower for one 4,096-row kv head (K = 256, f = 97, 1 thread).
ENTRIES_PER_CALL = 2**21


def rows_per_chunk(sums: Tensor, width: int) -> int:
    """Query rows per call whose K + 1 entries for every (sample, kv head) fit in
    ``ENTRIES_PER_CALL``: at least one. ``sums`` (B, H_kv, ...) is the table they read."""
    return max(1, ENTRIES_PER_CALL // (sums.shape[0] * sums.shape[1] * (width + 1)))


def prefix_sums(phi_k: Tensor, key_valid: Tensor, start: tuple[Tensor, Tensor] | None = None
                ) -> tuple[Tensor, Tensor]:
    """Sums over the keys before each position: features (B, H_kv, n + 1, m) float64 and
    valid-key counts (B, n + 1).

    phi_k (B, H_kv, n, m), key_valid (B, n). ``start`` = the last rows of an earlier call's
    sums (decoding), which the new ones continue: the result then holds the n rows after
    ``start`` only, (B, H_kv, n, m) and (B, n), ready to append.
    """
    features = torch.where(key_valid[:, None, :, None], phi_k.double(), 0.0).cumsum(2)  # padding never read
    counts = key_valid.long().cumsum(-1)
    if start is None:
        return torch.nn.functional.pad(features, (0, 0, 1, 0)), torch.nn.functional.pad(counts, (1, 0))
    first_features, first_count = start  # (B, H_kv, m), (B,)
    return features.add_(first_features.unsqueeze(2)), counts.add_(first_count.unsqueeze(1))


@torch.no_grad()  # the signals are inputs of the estimator, like the teacher's q and k
def edge_dots(queries: list[Tensor], sums: list[Tensor], counts: Tensor, lengths: Tensor, width: int,
              chunk: int | None = None) -> tuple[list[Tensor], Tensor]:
    """Each query . its prefix sums at every bin edge of each row, and the bins' key counts.

    queries[i]: (B, H_kv, G, Tq, f_i) against sums[i] (B, H_kv, Tk + 1, f_i), both from
    ``prefix_sums`` with the valid-key ``counts`` (B, Tk + 1); lengths (B, Tq). Returns one
    (B, H_kv, G, Tq, K + 1) float64 tensor per query and (B, 1, 1, Tq, K) long: bin b of row i
    sums to dots[..., b + 1] - dots[..., b]. Each dot reads its prefix-sum row where it lies
    (``row_dots``); ``chunk``: query rows per call. ``naive_edge_dots`` gathers the rows first.
    """
    positions, sizes = _edge_positions(counts, lengths, width)  # (B, Tq, K + 1)
    return [row_dots(query, table, positions, chunk) for query, table in zip(queries, sums)], sizes


@torch.no_grad()
def row_dots(query: Tensor, sums: Tensor, rows: Tensor, chunk: int | None = None) -> Tensor:
    """query . sums[b, h, rows[b, i, e]] for every entry, in the table's dtype: (B, H_kv, G, Tq, E).

    query (B, H_kv, G, Tq, f); sums (B, H_kv, N, f), read in place (a decoding state's growing
    rows too); rows (B, Tq, E) row indices shared by the heads. ``chunk``: query rows per call
    (default ``rows_per_chunk``), which bounds the index and output memory.
    """
    groups, tq, entries = query.shape[2], query.shape[3], rows.shape[-1]
    chunk = chunk or rows_per_chunk(sums, entries - 1)  # entries = K + 1 edges or 2K windows
    table, first_row = _row_table(sums)  # (N, f), (B, H_kv, 1)
    out = []
    for c0 in range(0, tq, chunk):
        part = query[:, :, :, c0:c0 + chunk].to(table.dtype)  # (B, H_kv, G, c, f)
        columns = (first_row[:, :, None, :, None] + rows[:, None, None, c0:c0 + chunk]).expand(-1, -1, groups, -1, -1)
        dots = _sampled_dots(part.reshape(-1, part.shape[-1]), table, columns.reshape(-1, entries))
        out.append(dots.view(*part.shape[:-1], entries))
    return torch.cat(out, dim=3)


def _sampled_dots(rows: Tensor, table: Tensor, columns: Tensor) -> Tensor:
    """rows (R, f) . table[columns[r, e]] (table (N, f)) for every entry: (R, E).

    The sampled product reads the entries in place but costs O(N) besides (it walks the whole
    table): it pays when the entries outnumber the table's rows (a prefill). Fewer entries (a
    decoding step: one row's K + 1 edges against the whole context) are gathered, O(R E f).
    The sampled product also refuses more entries per row than table rows (tiny inputs).
    """
    count, entries = columns.shape
    if count * entries <= table.shape[0] or entries > table.shape[0]:
        picked = table.index_select(0, columns.flatten()).view(count, entries, -1)  # (R, E, f)
        return torch.bmm(picked, rows.unsqueeze(-1)).view(count, entries)
    crow = torch.arange(0, count * entries + 1, entries, device=rows.device)
    with warnings.catch_warnings():  # "sparse CSR support is in beta": sampled_addmm is stable
        warnings.simplefilter("ignore", UserWarning)
        pattern = torch.sparse_csr_tensor(crow, columns.flatten(), rows.new_zeros(count * entries),
                                          (count, table.shape[0]), check_invariants=False)
        return torch.sparse.sampled_addmm(pattern, rows, table.t(), beta=0.0).values().view(count, entries)


def _edge_positions(counts: Tensor, lengths: Tensor, width: int) -> tuple[Tensor, Tensor]:
    """The prefix-sum row of each bin edge of each row (B, Tq, K + 1), and the bins' sizes (B, 1, 1, Tq, K)."""
    edges = cell_edges(lengths, width)  # (B, Tq, K + 1) ranks
    positions = torch.searchsorted(counts.contiguous(), edges.flatten(1)).view_as(edges)  # first with that count
    return positions, (edges[..., 1:] - edges[..., :-1])[:, None, None]


@torch.no_grad()
def naive_edge_dots(queries: list[Tensor], sums: list[Tensor], counts: Tensor, lengths: Tensor, width: int,
                    chunk: int = 64) -> tuple[list[Tensor], Tensor]:
    """``edge_dots`` by gathering each row's K + 1 prefix-sum rows into a (B, H_kv, c, K + 1, f) copy
    and contracting it: the reference it is tested against."""
    bsz, kv_heads, _, tq, _ = queries[0].shape
    positions, sizes = _edge_positions(counts, lengths, width)
    out: list[list[Tensor]] = [[] for _ in queries]
    for i, (query, table) in enumerate(zip(queries, sums)):
        flat, first_row = _row_table(table)
        for c0 in range(0, tq, chunk):
            rows = positions[:, c0:c0 + chunk]  # (B, c, K + 1)
            picked = flat.index_select(0, (first_row + rows.flatten(1)[:, None, :]).flatten())
            picked = picked.view(bsz, kv_heads, rows.shape[1], width + 1, -1)  # (B, H_kv, c, K + 1, f)
            out[i].append(torch.einsum("bhckf,bhgcf->bhgck", picked, query[:, :, :, c0:c0 + chunk].double()))
    return [torch.cat(parts, dim=3) for parts in out], sizes


def _row_table(sums: Tensor) -> tuple[Tensor, Tensor]:
    """The rows of ``sums`` (B, H_kv, n, f) as a (N, f) table and the table row of each (b, h)'s
    position 0, (B, H_kv, 1). A decoding state's sums are a view into spare capacity
    (``GrowingRows``): their rows are read where they lie (``rows.row_table``)."""
    table = row_table(sums)
    return table.rows, table.starts(sums.shape[0], sums.shape[1], sums.device)


def log_mass(cumulative: Tensor) -> Tensor:
    """log of each bin's share of the kernel mass from the kernel's ``edge_dots``: (..., K) float32.

    Dead bins and padding rows get log(LOG_FLOOR); the estimator masks them anyway.
    """
    mass = (cumulative[..., 1:] - cumulative[..., :-1]).clamp_min(0)
    share = mass / (cumulative[..., -1:] - cumulative[..., :1]).clamp_min(1e-300)
    return share.clamp_min(LOG_FLOOR).log().float()


def key_logits(cumulative: Tensor, sizes: Tensor, scale: float) -> Tensor:
    """scale * q . mean(k over the bin) + log(size) from the keys' ``edge_dots``: (..., K) float32.

    The log of the bin's softmax mass if its keys were all equal to their mean (a lower bound of
    the true log-mass, Jensen). Dead bins and padding rows get 0.
    """
    totals = cumulative[..., 1:] - cumulative[..., :-1]  # q . sum of the bin's keys
    logits = scale * totals / sizes.clamp_min(1) + sizes.clamp_min(1).log()
    return torch.where(sizes > 0, logits, 0.0).float()


@torch.no_grad()
def binned_log_mass(phi_q: Tensor, sums: Tensor, counts: Tensor, lengths: Tensor, width: int,
                    chunk: int | None = None) -> Tensor:
    """log of each bin's share of the kernel mass: (B, H_kv, G, Tq, K) float32.

    phi_q (B, H_kv, G, Tq, m); ``sums``, ``counts`` from ``prefix_sums`` of phi(k) over every
    key up to the last query (positions 0..Tk); lengths (B, Tq) valid keys of each row.
    """
    (cumulative,), _ = edge_dots([phi_q], [sums], counts, lengths, width, chunk)
    return log_mass(cumulative)


@torch.no_grad()
def binned_key_logits(q: Tensor, sums: Tensor, counts: Tensor, lengths: Tensor, width: int, scale: float,
                      chunk: int | None = None) -> Tensor:
    """Each bin's attention logit through its mean key (``key_logits``): (B, H_kv, G, Tq, K) float32.

    Exact and linear in T through prefix sums of the raw keys. q (B, H_kv, G, Tq, d);
    ``sums``, ``counts`` from ``prefix_sums`` of k.
    """
    (cumulative,), sizes = edge_dots([q], [sums], counts, lengths, width, chunk)
    return key_logits(cumulative, sizes, scale)
