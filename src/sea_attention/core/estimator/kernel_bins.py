"""The kernel's own compressed attention: FAVOR+ attention mass summed into each row's K bins.

For query i the softmax kernel estimate of its attention on key j is phi(q_i) . phi(k_j).
Summed over the keys of bin b (the ranks ``cells.cell_edges`` gives) and divided by the
row's total, it is an estimate of exactly what the estimator predicts, in its own
coordinates, for every row length: no positional table, nothing to extrapolate.

With prefix sums P[p] = sum of phi(k) over the valid keys before position p, bin b of row i
holds phi(q_i) . (P[p(e_{b+1})] - P[p(e_b)]), where p(e) is the position after the key of
rank e - 1: O(T K m) time, linear in T. Prefix sums over positions (padding adds zero) grow
by appending, so decoding keeps them in its state.

A bin's sum is a difference of two running sums that grow with the position, and a model's keys
share a large common part (so do the positive kernel features), so rounding noise the size of
the whole prefix enters every bin. The sums are therefore *centred*: they sum x - c, where c
(``center``) is the elementwise median of a sample's first ``CENTER_KEYS`` valid keys (of the
first call: a decoding state keeps it, so a first call with fewer keys centres on those), so most
of the common part is not summed; a bin's sum is
q . (S'[e1] - S'[e0]) + size * (q . c), each part rounded at its own size. They are accumulated
in float64 and stored in ``SEAConfig.bin_sums_dtype`` (float64 by default; float32 halves the
tables and the bytes every dot reads, but its rounding can decide near-ties), and a decoding
state continues the unrounded running sum in the order one scan adds, so a decoding step reads
bitwise the table a full forward reads (when its first call held at least ``CENTER_KEYS`` keys).
No gradient flows through it: the features are a fixed random projection and the result is
an input of the estimator, like the teacher's q and k in distillation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from ..cells import cell_edges, valid_key_positions
from ..decoding import GrowingRows
from ..rows import row_table, sampled_dots

LOG_FLOOR = 1e-6  # log(mass fraction) of an empty bin
CENTER_KEYS = 16  # the sums are centred on the median of a sample's first this many valid keys


class PrefixSums(NamedTuple):
    """``prefix_sums``' result: what ``edge_dots`` reads, and what a later call continues from."""

    rows: Tensor  # (B, H_kv, n + 1, f) (a continuation: n): sums of x - center over the valid keys before each position
    center: Tensor  # (B, H_kv, f), in the rows' dtype
    counts: Tensor  # (B, n + 1) (a continuation: n) the valid keys before each position
    last: Tensor  # (B, H_kv, f) float64: the uncentred running sum at the last position, unrounded


@dataclass
class BinSums:
    """kernel_bins / key_bins: the prefix sums a decoding state keeps (``kernel_bins.prefix_sums``), one
    entry per signal: rows that grow in spare capacity, each signal's center and its unrounded last sum."""

    sums: list[GrowingRows]  # centred sums of phi(k) and/or k before each position 0..seen, (B, H_kv, seen + 1, f)
    counts: GrowingRows  # the valid keys before each position, (B, seen + 1)
    centers: list[Tensor]  # (B, H_kv, f) what the sums are centred on
    last: list[Tensor]  # (B, H_kv, f) float64: the uncentred running sums at position seen, unrounded

    @classmethod
    def of(cls, sums: list[PrefixSums]) -> "BinSums":
        """A first call's sums, kept to be continued."""
        return cls([GrowingRows.of(x.rows, 2) for x in sums], GrowingRows.of(sums[0].counts, 1),
                   [x.center for x in sums], [x.last for x in sums])

    def tables(self) -> list[PrefixSums]:
        """Each signal's sums over positions 0..seen, read where they lie (what ``edge_dots`` reads and
        a later call's ``prefix_sums`` continues)."""
        return [PrefixSums(rows.rows, center, self.counts.rows, last)
                for rows, center, last in zip(self.sums, self.centers, self.last)]

    def append(self, new: list[PrefixSums]) -> None:
        """Take a later call's sums (``prefix_sums`` started from ``tables()``)."""
        for rows, x in zip(self.sums, new):
            rows.append(x.rows)
        self.counts.append(new[0].counts)
        self.last = [x.last for x in new]

    def map_batch(self, fn: Callable[[Tensor], Tensor]) -> "BinSums":
        """An independent copy with ``fn`` (a new batch dimension 0) applied to every tensor."""
        return BinSums([x.map_batch(fn) for x in self.sums], self.counts.map_batch(fn),
                       [fn(x) for x in self.centers], [fn(x) for x in self.last])


class EdgeDots(NamedTuple):
    """``edge_dots``' result for one query: its dots with the centred sums at every bin edge."""

    edges: Tensor  # (B, H_kv, G, Tq, K + 1) query . centred prefix sum at each edge
    offset: Tensor  # (B, H_kv, G, Tq, 1) query . center

    def bins(self, sizes: Tensor) -> Tensor:
        """(..., K) query . the sum of x over each bin of ``sizes`` keys (B, 1, 1, Tq, K)."""
        return self.span(self.edges[..., :-1], self.edges[..., 1:], sizes)

    def total(self, sizes: Tensor) -> Tensor:
        """(..., 1) query . the sum of x over all the row's bins."""
        return self.span(self.edges[..., :1], self.edges[..., -1:], sizes.sum(-1, keepdim=True))

    def span(self, first: Tensor, last: Tensor, sizes: Tensor) -> Tensor:
        """query . the sum of x between two edges holding ``sizes`` keys: the centred difference plus
        what the center adds, each rounded at its own size (a new tensor)."""
        return (last - first).add_(sizes.to(self.offset.dtype) * self.offset)  # one dtype: a faster product


# edge_dots reads each row's K + 1 prefix sums in place (``torch.sparse.sampled_addmm``: one dot per
# (row, edge), no gathered copy); a call covers rows for at most this many (row, edge) entries, which
# bounds its index and output memory. The gathering version, ``naive_edge_dots``, wrote a (rows, K + 1, f)
# float64 copy first: 4.8x slower for one 4,096-row kv head (K = 256, f = 97, 1 thread, float64 sums).
ENTRIES_PER_CALL = 2**21


def rows_per_chunk(sums: Tensor, width: int) -> int:
    """Query rows per call whose K + 1 entries for every (sample, kv head) fit in
    ``ENTRIES_PER_CALL``: at least one. ``sums`` (B, H_kv, ...) is the table they read."""
    return max(1, ENTRIES_PER_CALL // (sums.shape[0] * sums.shape[1] * (width + 1)))


def prefix_sums(x: Tensor, key_valid: Tensor, start: PrefixSums | None = None,
                dtype: torch.dtype = torch.float64) -> PrefixSums:
    """The centred sums of ``x`` (B, H_kv, n, f) over the valid keys (key_valid (B, n)) before each
    position 0..n, accumulated in float64 and stored in ``dtype``.

    ``start``: an earlier call's result (decoding): the scan continues its unrounded last sum in the
    order one scan over both calls adds, with its center and dtype, and the result holds the n rows
    after it only, (B, H_kv, n, f) and (B, n), ready to append.
    """
    bsz, heads, n, f = x.shape
    running = x.new_empty(bsz, heads, n + 1, f, dtype=torch.float64)  # the one float64 buffer
    values = running[:, :, 1:]
    values.copy_(x).masked_fill_(~key_valid[:, None, :, None], 0.0)  # padding never read
    counts = key_valid.long().cumsum(-1)  # (B, n)
    if start is None:
        running[:, :, 0] = 0.0
        counts = torch.nn.functional.pad(counts, (1, 0))
        center = _center(values, key_valid).to(dtype)
    else:
        running[:, :, 0] = start.last
        counts, center = counts.add_(start.counts[:, -1:]), start.center
    running.cumsum_(2)  # one scan, in the order one scan over all calls adds
    last = running[:, :, -1].clone()
    rows = running if start is None else running[:, :, 1:]  # a continuation holds the rows after start
    rows.addcmul_(counts[:, None, :, None].double(), center.double()[:, :, None], value=-1.0)
    return PrefixSums(rows.to(center.dtype), center, counts, last)


def _center(x: Tensor, key_valid: Tensor) -> Tensor:
    """(B, H_kv, f) float64: the elementwise median of each sample's first ``CENTER_KEYS`` valid keys
    of ``x`` (B, H_kv, n, f) (0 without any); a median, so that a sink key among them does not move it."""
    positions = valid_key_positions(key_valid)[:, :CENTER_KEYS]  # (B, C): the key of each rank
    picked = x.gather(2, positions[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[-1]))  # (B, H_kv, C, f)
    ranks = torch.arange(positions.shape[1], device=x.device)
    present = (ranks < key_valid.sum(-1, keepdim=True))[:, None, :, None]  # (B, 1, C, 1)
    center = torch.where(present, picked, float("nan")).nanmedian(2).values  # (B, H_kv, f)
    return center.nan_to_num(0.0)


@torch.no_grad()  # the signals are inputs of the estimator, like the teacher's q and k
def edge_dots(queries: list[Tensor], sums: list[PrefixSums], lengths: Tensor, width: int,
              chunk: int | None = None) -> tuple[list[EdgeDots], Tensor]:
    """Each query against its prefix sums at every bin edge of each row, and the bins' key counts.

    queries[i]: (B, H_kv, G, Tq, f_i) against sums[i] (rows (B, H_kv, Tk + 1, f_i), all with the
    same counts); lengths (B, Tq). Returns one ``EdgeDots`` per query and the sizes (B, 1, 1, Tq, K)
    long: ``dots.bins(sizes)`` is q . each bin's sum. Each dot reads its prefix-sum row where it
    lies (``shared_row_dots``: the signals read the same rows); ``chunk``: query rows per call.
    ``naive_edge_dots`` gathers the rows first.
    """
    positions, sizes = _edge_positions(sums[0].counts, lengths, width)  # (B, Tq, K + 1)
    dots = shared_row_dots(queries, [table.rows for table in sums], positions, chunk)
    return [EdgeDots(edges, _offset(query, table.center)) for edges, query, table in zip(dots, queries, sums)], sizes


def _offset(query: Tensor, center: Tensor) -> Tensor:
    """query (B, H_kv, G, Tq, f) . center (B, H_kv, f): (B, H_kv, G, Tq, 1) in the center's dtype,
    summed in float64 row by row (no batched product, whose rounding follows the batch's shape)."""
    products = query.double() * center.double()[:, :, None, None]
    return products.sum(-1, keepdim=True).to(center.dtype)


@torch.no_grad()
def row_dots(query: Tensor, sums: Tensor, rows: Tensor, chunk: int | None = None) -> Tensor:
    """query . sums[b, h, rows[b, i, e]] for every entry, in the table's dtype: (B, H_kv, G, Tq, E).

    query (B, H_kv, G, Tq, f); sums (B, H_kv, N, f), read in place (a decoding state's growing
    rows too); rows (B, Tq, E) row indices shared by the heads. ``chunk``: query rows per call
    (default ``rows_per_chunk``), which bounds the index and output memory.
    """
    return shared_row_dots([query], [sums], rows, chunk)[0]


@torch.no_grad()
def shared_row_dots(queries: list[Tensor], tables: list[Tensor], rows: Tensor, chunk: int | None = None) -> list[Tensor]:
    """``row_dots`` of each query against its table (B, H_kv, N, f_i) at the same ``rows``: tables whose
    rows lie alike in memory (a prefill's, or a decoding state's grown together) share the entries'
    table rows, built once."""
    groups, tq, entries = queries[0].shape[2], queries[0].shape[3], rows.shape[-1]
    chunk = chunk or rows_per_chunk(tables[0], entries - 1)  # entries = K + 1 edges or 2K windows
    reads = [_row_table(sums) for sums in tables]  # (N, f), (B, H_kv, 1) each
    out = [[] for _ in queries]
    for c0 in range(0, tq, chunk):
        part, columns, layout = rows[:, c0:c0 + chunk], None, None  # (B, c, E)
        for i, (query, (table, first_row)) in enumerate(zip(queries, reads)):
            if layout is None or not torch.equal(first_row, layout):
                layout, columns = first_row, _entry_rows(first_row, part, groups, table.shape[0])
            own = query[:, :, :, c0:c0 + chunk].to(table.dtype)  # (B, H_kv, G, c, f)
            dots = _sampled_dots(own.reshape(-1, own.shape[-1]), table, columns)
            out[i].append(dots.view(*own.shape[:-1], entries))
    return [parts[0] if len(parts) == 1 else torch.cat(parts, dim=3) for parts in out]


def _entry_rows(first_row: Tensor, rows: Tensor, groups: int, table_rows: int) -> Tensor:
    """The table row of every entry, (B * H_kv * G * c, E): each (sample, kv head)'s row 0
    ``first_row`` (B, H_kv, 1) plus ``rows`` (B, c, E), the same for the G query heads of a kv head.
    One broadcast sum, in int32 where int32 numbers every table row and entry (7x faster than int64)."""
    largest = max(table_rows, first_row.numel() * groups * rows[0].numel())
    index = torch.int32 if largest < 2**31 else torch.int64
    starts = first_row.to(index)[:, :, None, :, None].expand(-1, -1, groups, -1, -1)  # (B, H_kv, G, 1, 1)
    return torch.add(starts, rows.to(index)[:, None, None]).view(-1, rows.shape[-1])


def _sampled_dots(rows: Tensor, table: Tensor, columns: Tensor) -> Tensor:
    """rows (R, f) . table[columns[r, e]] (table (N, f)) for every entry: (R, E).

    One sampled product (``rows.sampled_dots``) reads the entries in place, for a prefill's rows and
    a decoding step's alike: each entry is one dot whose rounding depends on neither the other entries nor the
    rows given with it (measured, 1 and 2 threads), so a row's dots are bitwise the same in a
    full forward, a decoding step and any batch. (A gather and ``bmm``, which the decoding step
    used, round by the batch's shape.) The product refuses more entries per row than table rows:
    a table shorter than that (a few tokens) gets zero rows appended, which no entry reads.
    """
    count, entries = columns.shape
    if entries > table.shape[0]:
        table = torch.cat([table, table.new_zeros(entries - table.shape[0], table.shape[1])])
    crow = torch.arange(0, count * entries + 1, entries, device=rows.device, dtype=columns.dtype)
    return sampled_dots(crow, columns.flatten(), rows, table).view(count, entries)


def _edge_positions(counts: Tensor, lengths: Tensor, width: int) -> tuple[Tensor, Tensor]:
    """The prefix-sum row of each bin edge of each row (B, Tq, K + 1), and the bins' sizes (B, 1, 1, Tq, K)."""
    edges = cell_edges(lengths, width)  # (B, Tq, K + 1) ranks
    sizes = (edges[..., 1:] - edges[..., :-1])[:, None, None]
    if bool((counts[:, -1] == counts.shape[-1] - 1).all()):  # no padding key: position p has p keys before it
        return edges, sizes
    positions = torch.searchsorted(counts.contiguous(), edges.flatten(1)).view_as(edges)  # first with that count
    return positions, sizes


@torch.no_grad()
def naive_edge_dots(queries: list[Tensor], sums: list[PrefixSums], lengths: Tensor, width: int,
                    chunk: int = 64) -> tuple[list[EdgeDots], Tensor]:
    """``edge_dots`` by gathering each row's K + 1 prefix-sum rows into a (B, H_kv, c, K + 1, f) copy
    and contracting it in float64 (rounded to the sums' dtype at the end): the reference it is tested against."""
    bsz, kv_heads, _, tq, _ = queries[0].shape
    positions, sizes = _edge_positions(sums[0].counts, lengths, width)
    out = []
    for query, table in zip(queries, sums):
        flat, first_row = _row_table(table.rows)
        parts = []
        for c0 in range(0, tq, chunk):
            rows = positions[:, c0:c0 + chunk]  # (B, c, K + 1)
            picked = flat.index_select(0, (first_row + rows.flatten(1)[:, None, :]).flatten())
            picked = picked.view(bsz, kv_heads, rows.shape[1], width + 1, -1)  # (B, H_kv, c, K + 1, f)
            parts.append(torch.einsum("bhckf,bhgcf->bhgck", picked.double(), query[:, :, :, c0:c0 + chunk].double()))
        out.append(EdgeDots(torch.cat(parts, dim=3).to(table.rows.dtype), _offset(query, table.center)))
    return out, sizes


def _row_table(sums: Tensor) -> tuple[Tensor, Tensor]:
    """The rows of ``sums`` (B, H_kv, n, f) as a (N, f) table and the table row of each (b, h)'s
    position 0, (B, H_kv, 1). A decoding state's sums are a view into spare capacity
    (``GrowingRows``): their rows are read where they lie (``rows.row_table``)."""
    table = row_table(sums)
    return table.rows, table.starts(sums.shape[0], sums.shape[1], sums.device)


def log_mass(dots: EdgeDots, sizes: Tensor) -> Tensor:
    """log of each bin's share of the kernel mass from the kernel's ``edge_dots``: (..., K) float32.

    Dead bins and padding rows get log(LOG_FLOOR); the estimator masks them anyway.
    """
    masses = dots.bins(sizes)  # a new tensor: the share is computed in place on it
    share = masses.clamp_min_(0).div_(dots.total(sizes).clamp_min(torch.finfo(masses.dtype).tiny))
    return share.clamp_min_(LOG_FLOOR).log_().float()


def key_logits(dots: EdgeDots, sizes: Tensor, scale: float) -> Tensor:
    """scale * q . mean(k over the bin) + log(size) from the keys' ``edge_dots``: (..., K) float32.

    The log of the bin's softmax mass if its keys were all equal to their mean (a lower bound of
    the true log-mass, Jensen). Dead bins and padding rows get 0.
    """
    counted = sizes.clamp_min(1)
    logits = dots.bins(sizes).mul_(scale).div_(counted).add_(counted.log())  # in place on a new tensor
    return logits.masked_fill_(sizes == 0, 0.0).float()


@torch.no_grad()
def binned_log_mass(phi_q: Tensor, sums: PrefixSums, lengths: Tensor, width: int, chunk: int | None = None) -> Tensor:
    """log of each bin's share of the kernel mass: (B, H_kv, G, Tq, K) float32.

    phi_q (B, H_kv, G, Tq, m); ``sums`` = ``prefix_sums`` of phi(k) over every key up to the last
    query (positions 0..Tk); lengths (B, Tq) valid keys of each row.
    """
    (dots,), sizes = edge_dots([phi_q], [sums], lengths, width, chunk)
    return log_mass(dots, sizes)


@torch.no_grad()
def binned_key_logits(q: Tensor, sums: PrefixSums, lengths: Tensor, width: int, scale: float,
                      chunk: int | None = None) -> Tensor:
    """Each bin's attention logit through its mean key (``key_logits``): (B, H_kv, G, Tq, K) float32.

    Exact and linear in T through prefix sums of the raw keys. q (B, H_kv, G, Tq, d); ``sums`` =
    ``prefix_sums`` of k.
    """
    (dots,), sizes = edge_dots([q], [sums], lengths, width, chunk)
    return key_logits(dots, sizes, scale)
