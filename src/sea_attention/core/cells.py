"""The one mapping between compressed cells and keys, shared by every path.

A query row i has L_i valid keys (its causal prefix, or all non-padding keys). Its
compressed estimate has K bins; bin b covers the keys whose rank r among the valid keys
satisfies ``floor(b L / K) <= r < floor((b + 1) L / K)``. When L >= K every bin holds
floor(L/K) or ceil(L/K) keys; when L < K exactly L bins hold one key each and the others
are *dead* (empty): they get no probability and can never be selected.

A selected cell emits at most ``cap`` keys, spread evenly over its range, which keeps
keys per query bounded when rows are longer than ``cap * K``. A *forced* cell (a bin holding
any of the row's first ``sinks`` or last ``window`` keys, ``forced_counts``) covers only those
keys (``cell_range``): the sinks and the local window are attended key by key, at every
length, and the rest of the budget goes to the estimate.

Training (KD targets), the reference path, the sparse path and decoding all call these
functions, so what is trained is what runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def cell_edges(lengths: Tensor, width: int) -> Tensor:
    """Key ranks where the bins start, and the row's end: (...,) lengths -> (..., K + 1).

    Bin b covers ranks [edges[b], edges[b + 1]): the one definition of a bin.
    """
    bins = torch.arange(width + 1, device=lengths.device)
    return bin_start(bins, lengths.unsqueeze(-1), width)


def bin_start(bins: Tensor, lengths: Tensor, width: int) -> Tensor:
    """First key rank of bin ``bins`` in rows of ``lengths`` valid keys (broadcast): floor(b L / K).

    The one definition of the bins; bin b ends where bin b + 1 starts.
    """
    return bins * lengths // width


def cell_starts(lengths: Tensor, width: int) -> Tensor:
    """First key rank of every bin: (...,) lengths -> (..., K)."""
    return cell_edges(lengths, width)[..., :-1]


def cell_lengths(lengths: Tensor, width: int) -> Tensor:
    """Number of keys in every bin: (...,) -> (..., K); 0 marks a dead bin."""
    edges = cell_edges(lengths, width)
    return edges[..., 1:] - edges[..., :-1]


def live_cells(lengths: Tensor, width: int) -> Tensor:
    """Bins that hold at least one key: (...,) -> (..., K) bool."""
    return cell_lengths(lengths, width) > 0


def every_cell_live(lengths: Tensor, width: int) -> bool:
    """Whether every bin of every row holds a key (``live_cells`` all True): rows of at least K keys
    (a padding row, 0 keys, has none live)."""
    return bool((lengths >= width).all())


def forced_counts(k: int, sinks: int, window: int) -> tuple[int, int]:
    """The sink and window keys every head of a row attends at a budget of ``k`` keys per head:
    ``sinks`` and ``window``, each capped at k // 4 so that small budgets stay sparse."""
    return min(sinks, k // 4), min(window, k // 4)


def forced_ranges(k: int, sinks: int, window: int, forced_keys: bool) -> tuple[int, int]:
    """The ``forced`` argument of ``cell_range`` (and of what calls it): the forced counts when forced
    cells stand for their keys only (``SEAConfig.forced_keys``), else (0, 0), whole bins."""
    return forced_counts(k, sinks, window) if forced_keys else (0, 0)


def forced_cells(lengths: Tensor, width: int, sinks: int, window: int) -> Tensor:
    """Bins every head of a row always selects: (...,) lengths -> (..., K) bool.

    The live bins holding any of the first ``sinks`` keys (attention sinks) or any of the
    last ``window`` keys (the local window) of the row's L valid keys. Such a bin emits only
    those keys (``cell_range``); the estimator's budget goes to the keys they cannot reach.
    """
    edges = cell_edges(lengths, width)  # (..., K + 1)
    start, end = edges[..., :-1], edges[..., 1:]
    live = end > start
    return live & ((start < sinks) | (end > (lengths.unsqueeze(-1) - window)))


def cell_range(bins: Tensor, lengths: Tensor, width: int, cap: int,
               forced: tuple[int, int] = (0, 0)) -> tuple[Tensor, Tensor, Tensor]:
    """What selected cell ``bins`` stands for in rows of ``lengths`` valid keys (broadcast): the first
    key rank and the number of keys of its range, and how many of them it emits.

    The one rule of what a selected cell stands for (``cells_to_keys``, the block grouping and the
    FlexAttention mask all call it). ``forced`` = ``forced_counts(cap, sinks, window)``. A cell covers its
    bin and emits ``min(size, cap)`` keys spread evenly (``even_pick``). In a row of more than ``cap``
    keys it emits at most ``cap - sinks - window``, and a forced cell (its bin holds any of the row's first ``sinks`` or last
    ``window`` keys) covers only those keys and
    emits them all: its sink part [start, sinks), its window part [L - window, end), or, in a bin
    holding both (with K >= 2, rows of fewer than 2 (sinks + window + 1) keys), the whole bin (at
    most ``cap`` keys, evenly spread). So a head attends its forced keys plus about
    ``cap - sinks - window`` the estimate chose. The other keys of a forced bin are attended by no
    head: the estimate cannot select a forced bin again (at k=64, K=256 and 8,192 keys, ranks 4-31
    after the sinks and the 16 keys before the window).
    """
    start = bin_start(bins, lengths, width)
    end = bin_start(bins + 1, lengths, width)
    sinks, window = forced
    if sinks + window > cap // 2:  # forced_counts caps each at cap // 4
        raise ValueError(f"forced sink and window keys must be forced_counts(cap, ...), each at most cap // 4; "
                         f"got forced={forced} with cap={cap}")
    if not (sinks or window):
        return start, end - start, (end - start).clamp_max(cap)
    tail = lengths - window  # first rank of the window
    in_sinks, in_window = (start < sinks) & (end > start), end > torch.maximum(start, tail)
    long = lengths > cap  # rows of at most cap keys attend every key
    is_forced = (in_sinks | in_window) & long
    first = torch.where(in_sinks, start, torch.maximum(start, tail))
    last = torch.where(in_window, end, end.clamp_max(sinks))
    size = torch.where(is_forced, last - first, end - start)
    rest = torch.where(long, cap - sinks - window, cap)  # what the estimate's cells emit at most
    emitted = torch.where(is_forced, size.clamp_max(cap), torch.minimum(size, rest))
    return torch.where(is_forced, first, start), size, emitted


def key_bins(ranks: Tensor, lengths: Tensor, width: int) -> Tensor:
    """Bin that a key of a given rank falls into, for a row of ``lengths`` valid keys.

    ``ranks`` and ``lengths`` broadcast; the result is meaningful where rank < length.
    """
    lengths = lengths.clamp_min(1)
    return ((ranks + 1) * width - 1) // lengths


def key_ranks(key_valid: Tensor) -> Tensor:
    """Rank of every key among the valid keys of its row: (B, Tk) bool -> (B, Tk) long."""
    return key_valid.long().cumsum(-1) - 1


def row_keys(key_valid: Tensor, lengths: Tensor) -> Tensor:
    """(B, Tq, Tk) bool: the keys each row attends to, for rows of ``lengths`` (B, Tq) valid keys.

    A causal row's L valid keys are exactly the valid keys of rank < L (a bidirectional row's
    length is the sample's whole count), so this holds for any set of rows, in any order.
    """
    return key_valid[:, None, :] & (key_ranks(key_valid)[:, None, :] < lengths[:, :, None])


def valid_key_positions(key_valid: Tensor) -> Tensor:
    """Positions of the valid keys in order, valid ones first: (B, Tk) bool -> (B, Tk) long.

    ``valid_key_positions(m)[b, r]`` is the index of the key of rank r.
    """
    return torch.sort((~key_valid).to(torch.uint8), dim=-1, stable=True).indices


def query_lengths(key_valid: Tensor, query_valid: Tensor, causal: bool) -> Tensor:
    """L_i, valid keys each query may attend to: (B, Tq) long, 0 for padding queries.

    Queries are the last Tq positions of the keys (Tq < Tk while decoding).
    """
    tq, tk = query_valid.shape[-1], key_valid.shape[-1]
    if causal:
        lengths = key_valid.long().cumsum(-1)[:, tk - tq:]
    else:
        lengths = key_valid.long().sum(-1, keepdim=True).expand(-1, tq)
    return lengths * query_valid


@dataclass
class KeySlots:
    """Selected (head, key) pairs per query, flattened over heads: each (B, Tq, S).

    Slots of one query are ordered by head; ``valid`` marks the used ones (unused slots
    point at key 0 of head 0 and must be ignored).
    """

    head: Tensor
    key: Tensor
    valid: Tensor

    @property
    def width(self) -> int:
        return self.head.shape[-1]

    def nnz(self, num_heads: int) -> Tensor:
        """Keys per query per head: (B, H, Tq)."""
        b, tq, _ = self.head.shape
        counts = torch.zeros(b, tq, num_heads, dtype=torch.long, device=self.head.device)
        counts.scatter_add_(-1, self.head, self.valid.long())
        return counts.transpose(1, 2)

    def to_dense(self, values: Tensor, num_heads: int, num_keys: int) -> Tensor:
        """Scatter per-slot values (B, Tq, S) into a dense (B, H, Tq, Tk) tensor (0 elsewhere)."""
        b, tq, _ = self.head.shape
        dump = num_heads * num_keys  # unused slots land in one extra column, dropped below
        flat = torch.where(self.valid, self.head * num_keys + self.key, dump)
        dense = values.new_zeros(b, tq, dump + 1).scatter_add_(-1, flat, values * self.valid)
        return dense[..., :dump].view(b, tq, num_heads, num_keys).transpose(1, 2)

    def dense_mask(self, num_heads: int, num_keys: int) -> Tensor:
        """The selection as a (B, H, Tq, Tk) bool mask (for the reference path)."""
        return self.to_dense(self.valid.float(), num_heads, num_keys) > 0


def cell_key_counts(cells: Tensor, lengths: Tensor, cap: int, forced: tuple[int, int] = (0, 0)) -> Tensor:
    """Keys each selected cell emits (``cell_range``): cells (B, H, Tq, K) bool -> (B, H, Tq, K) long."""
    bins = torch.arange(cells.shape[-1], device=cells.device)
    per_cell = cell_range(bins, lengths.unsqueeze(-1), cells.shape[-1], cap, forced)[2]  # (B, Tq, K)
    return per_cell.unsqueeze(1) * cells


def _selected_cells(cells: Tensor) -> tuple[Tensor, Tensor]:
    """(row, column) of the True (non-zero) entries of an (R, C) tensor, in row-major order.

    Selections are sparse, so 8 entries are first tested at once as one int64 word.
    """
    rows, cols = cells.shape
    cells = (cells if cells.dtype == torch.bool else cells != 0).contiguous()
    if cols % 8 or cells.storage_offset() % 8:
        row, col = cells.nonzero(as_tuple=True)
        return row, col
    row, word = cells.view(torch.uint8).view(rows, cols // 8, 8).view(torch.int64).squeeze(-1).nonzero(as_tuple=True)
    bits = cells.view(-1, 8).index_select(0, row * (cols // 8) + word).nonzero()  # (n, 2): word, bit
    pick = bits[:, 0]
    return row.index_select(0, pick), word.index_select(0, pick) * 8 + bits[:, 1]


def even_pick(offset: Tensor, size: Tensor, emitted: Tensor, largest: int | None = None) -> Tensor:
    """Where in its bin the ``offset``-th key a selected bin emits lies: floor((2 o + 1) s / 2 n).

    The one emission rule: a bin of ``s`` keys emits ``n = min(s, cap)`` of them, spread
    evenly (``cells_to_keys``, the block grouping and the FlexAttention mask all call it).
    With ``largest``, a bound on (2 o + 1) s + 2 n, integer inputs are evaluated in floating
    point, which vectorises and is exact: for integers a, b > 0 with a + b <= 2^p (p = 24 in
    float32, 53 in float64) the operands and the product are exact, and the correctly rounded
    quotient a / b never reaches the next integer (it is at least 1/b below it).
    Floating inputs (FlexAttention's mask) are floor-divided as they are.
    """
    if largest is None or largest >= 2 ** 51:
        return ((2 * offset + 1) * size) // (2 * emitted)
    dtype = torch.float32 if largest < 2 ** 22 else torch.float64
    numerator = (2 * offset + 1).to(dtype).mul_(size.to(dtype))
    return numerator.div_((2 * emitted).to(dtype)).floor_().long()


def is_even_pick(offset: Tensor, size: Tensor, emitted: Tensor) -> Tensor:
    """Whether a bin of ``size`` (>= 1) keys emitting ``emitted`` of them emits the key at ``offset``
    inside it: the inverse of ``even_pick`` (the only pick that can land there, then a check)."""
    n = emitted.clamp_min(1)
    pick = (2 * n * offset + size - 1) // (2 * size)
    return (pick < emitted) & (even_pick(pick, size, n) == offset)


def cells_to_keys(cells: Tensor, lengths: Tensor, key_valid: Tensor, cap: int, chunk: int = 256,
                  forced: tuple[int, int] = (0, 0)) -> KeySlots:
    """Stretch selected cells (B, H, Tq, K) into key slots without any Tq x Tk tensor.

    ``lengths`` (B, Tq) are the rows' valid key counts, ``key_valid`` (B, Tk) the key
    padding mask. Each selected cell (h, b) emits ``min(len, cap)`` keys spread evenly
    over its rank range (``cell_range``: a forced cell's range holds only its ``forced`` sink
    and window keys); ranks are turned into key positions through the padding mask.
    A query's slots hold its cells' keys in (head, bin) order, then the unused slots.

    Only the selected cells are visited: their list (row-major, so already in slot order)
    gives each cell its first slot, and each chunk of queries writes a (cells, keys per
    cell) grid of ranks straight into the slots.
    """
    bsz, heads, tq, width = cells.shape
    listed = _list_cells(cells, lengths, cap, forced)
    totals = torch.zeros(bsz * tq, dtype=torch.long, device=cells.device).index_add_(0, listed.row, listed.emitted)
    slots = max(int(totals.max()) if totals.numel() else 0, 1)
    # flat position in (B, Tq, S) of each cell's first key: its row, plus the keys of the
    # row's earlier cells (a global running count minus the count before the row)
    before_row = totals.cumsum(0) - totals
    first_slot = listed.row * slots + listed.emitted.cumsum(0) - listed.emitted - before_row.index_select(0, listed.row)
    first_cell = torch.zeros(bsz * tq + 1, dtype=torch.long, device=cells.device)
    torch.cumsum(torch.bincount(listed.row, minlength=bsz * tq), 0, out=first_cell[1:])
    out = KeySlots(torch.zeros(bsz, tq, slots, dtype=torch.long, device=cells.device),
                   torch.zeros(bsz, tq, slots, dtype=torch.long, device=cells.device),
                   torch.arange(slots, device=cells.device) < totals.view(bsz, tq, 1))
    positions = None if bool(key_valid.all()) else valid_key_positions(key_valid).reshape(-1)  # None: rank r is key r
    bounds = first_cell.tolist()
    for lo in range(0, bsz * tq, chunk):
        c0, c1 = bounds[lo], bounds[min(lo + chunk, bsz * tq)]
        if c0 != c1:
            _write_keys(out, listed.part(c0, c1), first_slot[c0:c1], positions, key_valid.shape[-1])
    return out


@dataclass
class _ListedCells:
    """The selected live cells of a (B, H, Tq, K) selection, row-major: row = b * Tq + i."""

    row: Tensor  # (N,)
    head: Tensor
    start: Tensor  # first key rank of the cell
    size: Tensor  # keys in the cell
    emitted: Tensor  # keys it emits (``cell_range``)
    tq: int

    def part(self, c0: int, c1: int) -> "_ListedCells":
        return _ListedCells(*(x[c0:c1] for x in (self.row, self.head, self.start, self.size, self.emitted)), self.tq)


def _list_cells(cells: Tensor, lengths: Tensor, cap: int, forced: tuple[int, int]) -> _ListedCells:
    bsz, heads, tq, width = cells.shape
    row, cell = _selected_cells(cells.permute(0, 2, 1, 3).reshape(bsz * tq, heads * width))  # row = b * Tq + i
    head, bin_ = torch.div(cell, width, rounding_mode="floor"), cell % width
    length = lengths.reshape(-1).index_select(0, row)
    start, size, emitted = cell_range(bin_, length, width, cap, forced)  # the selected cells only; 0: dead
    live = emitted > 0
    if not bool(live.all()):
        row, head, start, size, emitted = (x[live] for x in (row, head, start, size, emitted))
    return _ListedCells(row, head, start, size, emitted, tq)


def _write_keys(out: KeySlots, listed: _ListedCells, first_slot: Tensor, positions: Tensor | None,
                keys: int) -> None:
    """Write a run of cells' keys into their slots; ``positions`` (B * Tk,) maps ranks to keys."""
    n, sz = listed.emitted[:, None], listed.size[:, None]
    most = int(n.max())
    # (cells, most) grid; a cell's extra columns repeat its last key (same slot, same value)
    offset = torch.arange(most, device=n.device).minimum(n - 1)
    rank = even_pick(offset, sz, n, (2 * most - 1) * int(sz.max()) + 2 * most).add_(listed.start[:, None])
    if positions is not None:
        key_row = (listed.row // listed.tq) * keys  # each cell's batch row in the flat positions
        rank = positions.gather(0, (rank + key_row[:, None]).flatten()).view_as(rank)
    target = offset.add_(first_slot[:, None]).flatten()
    out.key.view(-1).scatter_(0, target, rank.flatten())
    out.head.view(-1).scatter_(0, target, listed.head[:, None].expand_as(rank).flatten())


def compress_attention(attention: Tensor, key_valid: Tensor, lengths: Tensor, width: int) -> Tensor:
    """Sum dense attention probabilities (B, H, Tq, Tk) into the K bins of each row.

    The distillation target for the estimate. Keys outside a row's valid range must carry
    zero probability (true for a causal / padded teacher).
    """
    ranks = key_ranks(key_valid).clamp_min(0)  # (B, Tk)
    bins = key_bins(ranks[:, None, :], lengths[:, :, None], width)  # (B, Tq, Tk)
    bins = bins.clamp(0, width - 1).unsqueeze(1).expand_as(attention)
    out = attention.new_zeros(*attention.shape[:-1], width)
    return out.scatter_add_(-1, bins, attention)


def stretch_estimate(estimate: Tensor, key_valid: Tensor, lengths: Tensor) -> Tensor:
    """Spread a compressed estimate (B, H, Tq, K) over the keys: (B, H, Tq, Tk).

    Each key gets its bin's probability divided by the bin's size, so rows still sum to 1.
    Meant for plots and comparisons; it builds a Tq x Tk tensor.
    """
    width = estimate.shape[-1]
    ranks = key_ranks(key_valid)  # (B, Tk)
    bins = key_bins(ranks.clamp_min(0)[:, None, :], lengths[:, :, None], width).clamp(0, width - 1)
    sizes = cell_lengths(lengths, width).clamp_min(1).gather(-1, bins)  # (B, Tq, Tk)
    inside = row_keys(key_valid, lengths)
    picked = estimate.gather(-1, bins.unsqueeze(1).expand(-1, estimate.shape[1], -1, -1))
    return torch.where(inside.unsqueeze(1), picked / sizes.unsqueeze(1), 0.0)
