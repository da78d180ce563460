"""The kernel's own compressed attention: FAVOR+ attention mass summed into each row's K bins.

For query i the softmax kernel estimate of its attention on key j is phi(q_i) . phi(k_j).
Summed over the keys of bin b (the ranks ``cells.cell_edges`` gives) and divided by the
row's total, it is an estimate of exactly what the estimator predicts, in its own
coordinates, for every row length: no positional table, nothing to extrapolate.

With prefix sums P[p] = sum of phi(k) over the valid keys before position p, bin b of row i
holds phi(q_i) . (P[p(e_{b+1})] - P[p(e_b)]), where p(e) is the position after the key of
rank e - 1: O(T K m) time, linear in T. Prefix sums over positions (padding adds zero) grow
key by key, so a decoding state continues them at its bin edges (below).

A bin's sum is a difference of two running sums that grow with the position, and a model's keys
share a large common part (so do the positive kernel features), so rounding noise the size of
the whole prefix enters every bin. The sums are therefore *centred*: they sum x - c, where c
(``center``) is the elementwise median of a sample's first ``CENTER_KEYS`` valid keys (of the
first call: a decoding state keeps it, so a first call with fewer keys centres on those), so most
of the common part is not summed; a bin's sum is
q . (S'[e1] - S'[e0]) + size * (q . c), each part rounded at its own size. They are accumulated
in float64 and stored in ``SEAConfig.bin_sums_dtype`` (float64 by default; float32 halves the
tables and the bytes every dot reads, but its rounding can decide near-ties).

A decoding state does not keep the table (on SmolLM2 at 8k tokens it was 1.5 times the KV cache's
bytes): it keeps the unrounded running sums at its last row's K + 1 bin edges (``BinSums``), a
constant K + 1 rows per kv head, and phi(k) of every key (m numbers per key, float32; the keys
themselves are the KV cache's). A row's edges lie at or after the previous row's, so a decoding call
moves each edge forward by adding the keys it passes, in the order one scan adds them, and reads the
rows there (``StateSums``): bitwise the rows a full forward reads from the same per-key rows. A call
that would move an edge back or far rebuilds the whole table over every key instead.

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
MOVES_PER_CALL = 16  # a decoding call moves its state's edges by at most this many positions, else rebuilds


class PrefixSums(NamedTuple):
    """``prefix_sums``' result: what ``edge_dots`` reads."""

    rows: Tensor  # (B, H_kv, n + 1, f): sums of x - center over the valid keys before each position
    center: Tensor  # (B, H_kv, f), in the rows' dtype
    counts: Tensor  # (B, n + 1) the valid keys before each position
    kept: Tensor | None = None  # (B, H_kv, E, f) float64: the unrounded running sums at ``prefix_sums``' ``keep``


@dataclass
class BinSums:
    """kernel_bins / key_bins: what a decoding state keeps of the prefix sums: the unrounded running sums
    at the last row's K + 1 bin edges, one tensor per signal (``edges``, a constant size), those edges'
    positions, each signal's center, the valid-key counts before every position, and the per-key rows of
    the signals the KV cache does not hold (``stored``: phi(k); the keys' own rows are the cached keys)."""

    edges: list[Tensor]  # (B, H_kv, K + 1, f) float64: the running sum of x before each edge, unrounded
    positions: Tensor  # (B, K + 1) the edges' positions (``_edge_positions`` of the last row)
    counts: GrowingRows  # the valid keys before each position, (B, seen + 1)
    centers: list[Tensor]  # (B, H_kv, f) what the sums are centred on
    stored: list[GrowingRows | None]  # per signal: its per-key rows (B, H_kv, seen, f), or None: the cached keys

    @classmethod
    def of(cls, sums: list[PrefixSums], positions: Tensor, stored: list[Tensor | None]) -> "BinSums":
        """A first call's sums, whose ``kept`` rows are the running sums at ``positions``, and the per-key rows
        to keep (``stored``)."""
        return cls([x.kept for x in sums], positions.clone(), GrowingRows.of(sums[0].counts, 1),  # positions: its own
                   [x.center for x in sums], [None if x is None else GrowingRows.of(x, 2) for x in stored])

    def append(self, new_valid: Tensor, new_rows: list[Tensor | None]) -> None:
        """A later call's keys: count them (``new_valid`` (B, n)) and keep their stored signals' rows."""
        self.counts.append(new_valid.long().cumsum(-1).add_(self.counts.rows[:, -1:]))
        for stored, rows in zip(self.stored, new_rows):
            if stored is not None:
                stored.append(rows)

    def sources(self, keys: Tensor) -> list[Tensor]:
        """Each signal's per-key rows over every key so far (B, H_kv, seen, f): its stored rows, or ``keys``
        (the cached keys, in their own dtype)."""
        return [keys if stored is None else stored.rows for stored in self.stored]

    def step(self, moving: Tensor, valid: Tensor, added: list[Tensor]) -> None:
        """Move the ``moving`` edges (B, K + 1) one position on, adding ``added[i]`` (B, H_kv, K + 1, f_i), the
        key each passes, to each signal's running sums in float64 where that key is ``valid`` (B, K + 1) (an
        edge that stays adds 0.0: its sums keep their bits)."""
        self.positions.add_(moving)
        adds = (moving & valid)[:, None, :, None].double()  # x * 1.0 and x * 0.0 are exact
        for edges, x in zip(self.edges, added):
            edges.addcmul_(x, adds)  # the scan's next sums

    def rows(self) -> list[Tensor]:
        """Each signal's table rows at the edges (centred, rounded as the table is): (B, H_kv, K + 1, f)."""
        counts = self.counts.rows.gather(1, self.positions).double()[:, None, :, None]  # (B, 1, K + 1, 1)
        return [edges.addcmul(counts, center.double()[:, :, None], value=-1.0).to(center.dtype)
                for edges, center in zip(self.edges, self.centers)]

    def map_batch(self, fn: Callable[[Tensor], Tensor]) -> "BinSums":
        """An independent copy with ``fn`` (a new batch dimension 0) applied to every tensor."""
        return BinSums([fn(x) for x in self.edges], fn(self.positions), self.counts.map_batch(fn),
                       [fn(x) for x in self.centers], [None if x is None else x.map_batch(fn) for x in self.stored])


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


def prefix_sums(x: Tensor, key_valid: Tensor, dtype: torch.dtype = torch.float64, center: Tensor | None = None,
                keep: Tensor | None = None) -> PrefixSums:
    """The centred sums of ``x`` (B, H_kv, n, f) over the valid keys (key_valid (B, n)) before each
    position 0..n, accumulated in float64 (one scan) and stored in ``dtype``.

    ``center``: centre on it instead of the first valid keys' median (a decoding state's table rebuilt
    over every key). ``keep``: positions (B, E) whose unrounded running sums it also returns as ``kept``
    (a decoding state's edges, ``BinSums``).
    """
    bsz, heads, n, f = x.shape
    running = x.new_empty(bsz, heads, n + 1, f, dtype=torch.float64)  # the one float64 buffer
    running[:, :, 0] = 0.0
    values = running[:, :, 1:]
    values.copy_(x).masked_fill_(~key_valid[:, None, :, None], 0.0)  # padding never read
    counts = torch.nn.functional.pad(key_valid.long().cumsum(-1), (1, 0))  # (B, n + 1)
    center = _center(values, key_valid).to(dtype) if center is None else center
    running.cumsum_(2)  # one scan: what a decoding state's edges continue, key by key
    kept = None if keep is None else running.gather(2, keep[:, None, :, None].expand(-1, heads, -1, f))
    running.addcmul_(counts[:, None, :, None].double(), center.double()[:, :, None], value=-1.0)
    return PrefixSums(running.to(center.dtype), center, counts, kept)


def decoding_sums(per_key: list[Tensor], key_valid: Tensor, dtype: torch.dtype, width: int,
                  stored: list[bool]) -> tuple[list[PrefixSums], BinSums]:
    """A decoding state's first call: each signal's table (what the call reads) and the state, which keeps
    the running sums at its last row's edges and the per-key rows of the ``stored`` signals. ``per_key``
    (B, H_kv, n, f_i) each, key_valid (B, n)."""
    counts = torch.nn.functional.pad(key_valid.long().cumsum(-1), (1, 0))
    last = _edge_positions(counts, counts[:, -1:], width)[0][:, 0]  # (B, K + 1): the last row's edges
    sums = [prefix_sums(x, key_valid, dtype=dtype, keep=last) for x in per_key]
    return sums, BinSums.of(sums, last, [x if keep else None for x, keep in zip(per_key, stored)])


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
def edge_dots(queries: list[Tensor], sums: "list[PrefixSums] | StateSums", lengths: Tensor, width: int,
              chunk: int | None = None) -> tuple[list[EdgeDots], Tensor]:
    """Each query against its prefix sums at every bin edge of each row, and the bins' key counts.

    queries[i]: (B, H_kv, G, Tq, f_i) against sums[i] (rows (B, H_kv, Tk + 1, f_i), all with the
    same counts); lengths (B, Tq). Returns one ``EdgeDots`` per query and the sizes (B, 1, 1, Tq, K)
    long: ``dots.bins(sizes)`` is q . each bin's sum. Each dot reads its prefix-sum row where it
    lies (``shared_row_dots``: the signals read the same rows); ``chunk``: query rows per call.
    ``naive_edge_dots`` gathers the rows first.
    """
    if isinstance(sums, StateSums):
        return sums.edge_dots(queries, lengths, width, chunk)
    positions, sizes = _edge_positions(sums[0].counts, lengths, width)  # (B, Tq, K + 1)
    dots = shared_row_dots(queries, [table.rows for table in sums], positions, chunk)
    return [EdgeDots(edges, _offset(query, table.center)) for edges, query, table in zip(dots, queries, sums)], sizes


class _Plan(NamedTuple):
    """``StateSums._plan``: the bins' sizes (B, 1, 1, Tq, K), which rows hold a key (B, Tq, 1), where the edges
    stand before the call and at each row (B, Tq + 1, K + 1) and by how many positions each row moves them
    at most; or the whole table (``tables``), rebuilt instead."""

    sizes: Tensor
    alive: Tensor
    path: Tensor
    steps: list[int]
    tables: list[PrefixSums] | None = None


@dataclass
class StateSums:
    """A decoding call's prefix sums: its state's ``BinSums`` (which already holds the call's keys) and
    each signal's per-key rows over every key so far (``sources``, ``BinSums.sources``; key_valid (B, Tk))."""

    state: BinSums
    sources: list[Tensor]
    key_valid: Tensor
    followed: Tensor | None = None  # the bins' sizes (B, 1, 1, 1, K) of the call's only row, whose edges
    # ``follow`` moved the state's to

    def edge_dots(self, queries: list[Tensor], lengths: Tensor, width: int,
                  chunk: int | None = None) -> tuple[list[EdgeDots], Tensor]:
        """``edge_dots`` of the call's rows, in order: each row moves the state's edges to its own and reads
        the rows there. A call whose rows would move an edge back or by more than MOVES_PER_CALL positions
        in all rebuilds the whole table over every key instead (and leaves the edges at its last row)."""
        if self.followed is not None and lengths.shape[1] == 1:  # a decoding step: the edges stand at its row
            dots, sizes = self._row_dots(queries, lengths > 0, width), self.followed
        else:
            plan = self._plan(lengths, width)
            if plan.tables is not None:
                return edge_dots(queries, plan.tables, lengths, width, chunk)
            per_row = []
            for row, moves in enumerate(plan.steps):
                self._move(plan.path[:, row + 1], moves)
                per_row.append(self._row_dots([query[:, :, :, row:row + 1] for query in queries], plan.alive[:, row],
                                              width))
            dots = [parts[0] if len(parts) == 1 else torch.cat(parts, dim=3) for parts in zip(*per_row)]
            sizes = plan.sizes
        return [EdgeDots(edges, _offset(query, center))  # (B, H_kv, G, Tq, K + 1) each
                for edges, query, center in zip(dots, queries, self.state.centers)], sizes

    def follow(self, lengths: Tensor, width: int) -> None:
        """Move the state's edges to a row of ``lengths`` (B, 1) keys (a decoding step's, whether or not its
        row is estimated: the block grouping estimates one step in ``query_block``), so that the edges never
        fall more than a step behind."""
        plan = self._plan(lengths, width)
        if plan.tables is None:
            self._move(plan.path[:, 1], plan.steps[0])
        self.followed = plan.sizes

    def _row_dots(self, queries: list[Tensor], alive: Tensor, width: int) -> list[Tensor]:
        """One row's queries (B, H_kv, G, 1, f_i) against the table rows at the state's edges: (B, H_kv, G, 1,
        K + 1) each; a padding row (``alive`` (B, 1) False) reads the zero row at position 0, as a full forward."""
        tables = self.state.rows()
        if not bool(alive.all()):
            tables = [torch.where(alive[:, :, None, None], x, 0) for x in tables]
        return shared_row_dots(queries, tables, torch.arange(width + 1).expand(alive.shape[0], 1, -1))

    def _move(self, target: Tensor, moves: int) -> None:
        """Move the state's edges to ``target`` (B, K + 1), at most ``moves`` positions each, adding the keys
        they pass one at a time."""
        tables = [row_table(x) for x in self.sources]  # read where they lie
        bsz, kv_heads, keys = self.sources[0].shape[:3]
        batch = torch.arange(bsz, device=target.device)[:, None, None]
        head = torch.arange(kv_heads, device=target.device)[None, :, None]
        for _ in range(moves):
            moving = self.state.positions < target
            at = self.state.positions.clamp_max(keys - 1)  # the key each edge would pass
            added = [table.rows.index_select(0, table.row(batch, head, at[:, None]).flatten()).view(
                bsz, kv_heads, at.shape[1], -1).float() for table in tables]  # (B, H_kv, K + 1, f) each
            self.state.step(moving, self.key_valid.gather(1, at), added)

    def _plan(self, lengths: Tensor, width: int) -> "_Plan":
        """Where the state's edges go for rows of ``lengths`` (B, Tq), in order (one synchronisation): a
        padding row (no key) leaves them and reads the zero row at position 0. When a row lies before
        them, or they would move by more than MOVES_PER_CALL positions, the plan is the whole table over
        every key instead, and the edges are set at the call's last row (or stay, for a row before them)."""
        positions, sizes = _edge_positions(self.state.counts.rows, lengths, width)  # (B, Tq, K + 1)
        alive, start = (lengths > 0)[..., None], self.state.positions[:, None]  # (B, Tq, 1), (B, 1, K + 1)
        reached = torch.where(alive, positions, 0)
        reached = reached.cummax(1).values.maximum(start)
        path = torch.cat([start, reached], 1)  # the edges before the call and at each row: (B, Tq + 1, K + 1)
        behind = ((positions < path[:, :-1]) & alive).any()
        far = (reached[:, -1] - path[:, 0]).max()  # the longest move of an edge over the call
        behind, far, *steps = torch.cat([behind[None], far[None], (reached - path[:, :-1]).amax((0, 2))]).tolist()
        if not behind and far <= MOVES_PER_CALL:
            return _Plan(sizes, alive, path, steps)
        last = self.state.positions if behind else path[:, -1]
        tables = self._tables(last)
        self.state.edges, self.state.positions = [x.kept for x in tables], last.clone()
        return _Plan(sizes, alive, path, steps, tables)

    def _tables(self, keep: Tensor) -> list[PrefixSums]:
        """Each signal's whole table over every key, as a full forward computes it (on the state's centers),
        with the running sums at ``keep`` (B, K + 1)."""
        return [prefix_sums(x.float(), self.key_valid, dtype=center.dtype, center=center, keep=keep)
                for x, center in zip(self.sources, self.state.centers)]


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
