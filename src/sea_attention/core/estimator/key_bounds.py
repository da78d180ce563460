"""Key bounds: an upper bound of each bin's largest attention logit, linear in T.

For any key k of a set whose elementwise max and min are M and m,
q . k <= q+ . M + q- . m (q+ = max(q, 0), q- = min(q, 0)): the bound Quest and SeerAttention use
to score a page of keys. A mean key washes out one outstanding key among many ordinary ones
(``key_bins``); the bound does not, which is what retrieval needs (issue 25).

SEA's bins are ranges of key ranks that depend on each row's length, so their extremes cannot be
stored per bin. The valid keys are grouped by rank (padding is skipped, so a padded sample gets the
bounds it gets alone) into blocks of ``BLOCK``. Two tables, by rank:

* ``within``: for every rank r, the [max, min] of the keys from the start of r's block to r;
* ``windows``: for every complete block j and level l, the [max, min] of the blocks (j - 2^l, j]
  (a sparse table whose windows end at j, so decoding only adds rows as blocks complete).

A bin whose first key lies in block a and last key (rank r) in block c reads ``within[r]`` and,
when c > a, the two windows of level l = floor(log2(c - a)) ending at c - 1 and at a + 2^l - 1,
which cover the complete blocks a..c-1. Each read bounds every key it covers, so the largest of the
three bounds every key of the bin. Block a may start before the bin: the bound only gets looser,
never wrong; no key after r is ever read, so a causal row sees no later key.

The signal is scale * bound + log(size), an upper bound of the bin's log softmax mass (the mean-key
logit of ``key_bins`` is a lower bound). Cost per query: 3K dots of width 2d, read in place like
the prefix sums. Memory per kv head: T rows of 2d (``within``, twice the keys in float32) and
levels x T / BLOCK rows of 2d, levels = bit length of the widest bin's complete blocks (3 at 8k
tokens with K = 256).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..cells import cell_edges, valid_key_positions
from ..decoding import GrowingRows
from .kernel_bins import row_dots

BLOCK = 4  # keys per block; at K = 256 a bin holds 4 keys at 1k tokens and 32 at 8k


def bound_levels(length: int, width: int, block: int = BLOCK) -> int:
    """Window levels for rows of at most ``length`` keys in ``width`` bins (at least 1): a bin of S
    consecutive keys spans at most ceil((S - 1) / block) complete blocks before its last one."""
    widest = -(-max(length, 1) // width)
    return max(1, (-(-(widest - 1) // block)).bit_length())


def _combine(a: Tensor, b: Tensor) -> Tensor:
    """[max, min] rows of two sets -> those of their union."""
    half = a.shape[-1] // 2
    return torch.cat([torch.maximum(a[..., :half], b[..., :half]), torch.minimum(a[..., half:], b[..., half:])], -1)


def running_extremes(rows: Tensor, offsets: Tensor, block: int = BLOCK) -> Tensor:
    """Each row combined with the rows before it in its block: a segmented scan (Hillis-Steele).

    rows (B, H, n, 2d) [max, min] of consecutive ranks; offsets (B, n) each rank's place in its
    block (rank % block). The first row may stand for the ranks before it in its block.
    """
    out, step = rows, 1
    index = torch.arange(rows.shape[2], device=rows.device)
    while step < block:
        earlier = torch.nn.functional.pad(out, (0, 0, step, 0))[:, :, :out.shape[2]]  # row i - step (0 before)
        same_block = (offsets >= step) & (index >= step)  # (B, n): row i - step exists and is in i's block
        out = torch.where(same_block[:, None, :, None], _combine(out, earlier), out)
        step *= 2
    return out


def window_levels(ends: Tensor, levels: int) -> Tensor:
    """(B, H, n, 2d) [max, min] per block -> (B, H, n, levels, 2d): level l of row j covers the
    blocks (j - 2^l, j] of the run, clipped at its first block."""
    out = [ends]
    for level in range(1, levels):
        prev, shift = out[-1], 2 ** (level - 1)
        earlier = torch.cat([prev[:, :, :shift], prev[:, :, :-shift]], 2) if prev.shape[2] > shift else prev
        out.append(_combine(prev, earlier))
    return torch.stack(out, 3)


@dataclass
class BoundTable:
    """Both tables of a layer's valid keys, by rank, growing with them (decoding). Sample b uses
    ranks [0, ranks[b]) of ``within`` and its complete blocks of ``windows``; the rows past those
    (the ragged end of a padded batch) are not read until they are written."""

    within: GrowingRows  # (B, H_kv, max rank, 2d) float32 along the ranks
    windows: GrowingRows  # (B, H_kv, max complete blocks, levels, 2d) float32 along the blocks
    ranks: Tensor  # (B,) valid keys so far
    block: int = BLOCK

    @property
    def levels(self) -> int:
        return self.windows.data.shape[3]

    @property
    def window_rows(self) -> Tensor:
        """(B, H_kv, blocks * levels, 2d): the row of (block j, level l) is j * levels + l (a view)."""
        return self.windows.rows.flatten(2, 3)

    def map_batch(self, fn) -> "BoundTable":
        return BoundTable(self.within.map_batch(fn), self.windows.map_batch(fn), fn(self.ranks), self.block)


def bound_table(keys: Tensor, key_valid: Tensor, width: int, past: BoundTable | None = None,
                block: int = BLOCK) -> BoundTable:
    """The tables of the valid ``keys`` (B, H_kv, n, d), key_valid (B, n), after those of ``past``
    (decoding: the keys added since, extended in place). A step costs O(levels 2^levels d) whatever
    T, plus the blocks that samples of a ragged batch complete apart, and a rebuild when T needs
    one level more (once per doubling of T)."""
    order = valid_key_positions(key_valid)  # (B, n): valid keys first, by rank
    count = key_valid.sum(-1)  # (B,)
    compact = keys.gather(2, order[:, None, :, None].expand(-1, keys.shape[1], -1, keys.shape[-1])).float()
    inside = (torch.arange(keys.shape[2], device=keys.device) < count[:, None])[:, None, :, None]
    rows = torch.cat([compact.masked_fill(~inside, -math.inf), compact.masked_fill(~inside, math.inf)], -1)
    start = past.ranks if past is not None else torch.zeros_like(count)  # (B,) rank of each sample's first new key
    ranks = start[:, None] + torch.arange(keys.shape[2], device=keys.device)  # (B, n)
    if past is None:
        within = GrowingRows.of(running_extremes(rows, ranks % block, block), 2)
        return _with_windows(within, None, count, 0, block, width)
    previous = (start - 1).clamp_min(0)[:, None, None, None].expand(*rows.shape[:2], 1, rows.shape[-1])
    before = past.within.rows.gather(2, previous)  # (B, H, 1, 2d): each sample's open block so far
    scanned = running_extremes(torch.cat([before, rows], 2), torch.cat([(start - 1)[:, None], ranks], 1) % block, block)
    past.within.grow_to(int(ranks[:, -1].max()) + 1)  # each sample's rows land at its own ranks
    past.within.data.scatter_(2, ranks[:, None, :, None].expand_as(rows), scanned[:, :, 1:])
    return _with_windows(past.within, past, start + count, int((start // block).min()), block, width)


def _with_windows(within: GrowingRows, past: BoundTable | None, ranks: Tensor, first: int, block: int,
                  width: int) -> BoundTable:
    """The table with ``windows`` (re)computed from block ``first`` on, from the blocks' last ``within`` rows."""
    complete = int(ranks.max()) // block
    levels = bound_levels(int(ranks.max()), width, block)
    if past is None or levels > past.levels:  # all of it (a first call, or one level more)
        first, windows = 0, None
    else:
        windows = past.windows
    start = max(0, first - 2 ** (levels - 1))  # level-0 history the new rows need
    ends = within.rows[:, :, start * block + block - 1:complete * block:block]  # (B, H, blocks, 2d)
    rows = window_levels(ends, levels)[:, :, first - start:]
    if windows is None:
        windows = GrowingRows.of(rows, 2)
    else:
        windows.length = first
        windows.append(rows)
    return BoundTable(within, windows, ranks, block)
@torch.no_grad()
def bin_bound_logits(q: Tensor, table: BoundTable, lengths: Tensor, width: int, scale: float) -> Tensor:
    """scale * (the bound of each bin's largest q . k) + log(size): (B, H_kv, G, Tq, K) float32.

    q (B, H_kv, G, Tq, d); lengths (B, Tq) valid keys of each row, at most the table's ranks.
    Dead bins and padding rows get 0. ``naive_bin_bound_logits`` is the reference.
    """
    last, columns, spans, sizes = _bin_reads(lengths, width, table)
    signed = torch.cat([q.float().clamp_min(0), q.float().clamp_max(0)], -1)  # (B, H_kv, G, Tq, 2d)
    windows = table.window_rows if table.windows.length else None
    bound = _bounds(signed, table.within.rows, windows, last, columns, spans)
    logits = scale * bound + sizes.clamp_min(1).log()[:, None, None]
    return torch.where((sizes > 0)[:, None, None], logits, 0.0).float()


def _bounds(signed: Tensor, within: Tensor, windows: Tensor | None, last: Tensor, columns: Tensor,
            spans: Tensor) -> Tensor:
    """The largest of each bin's three bounds (B, H_kv, G, Tq, K) from ``_bin_reads``' rows."""
    bound = row_dots(signed, within, last)  # (B, H_kv, G, Tq, K)
    if windows is None:  # no complete block yet
        return bound
    dots = row_dots(signed, windows, columns)  # (B, H_kv, G, Tq, 2K)
    width = last.shape[-1]
    return torch.where((spans > 0)[:, None, None], torch.maximum(bound, dots[..., :width].maximum(dots[..., width:])),
                       bound)


def _bin_reads(lengths: Tensor, width: int, table: BoundTable) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """What each bin reads, (B, Tq, ...): the rank of its last key (K), the window rows covering
    its complete blocks before the last one (2K; row 0 where it has none), the number of those
    blocks (K) and the bin's size (K). Dead bins read clamped rows (masked by the caller)."""
    levels, block = table.levels, table.block
    edges = cell_edges(lengths, width)  # (B, Tq, K + 1) ranks
    sizes = edges[..., 1:] - edges[..., :-1]
    last = (edges[..., 1:] - 1).clamp(0, table.within.length - 1)
    a, c = edges[..., :-1] // block, last // block
    spans = torch.where(sizes > 0, c - a, 0)  # complete blocks a..c-1
    level = (torch.frexp(spans.clamp_min(1).float())[1] - 1).clamp_max(levels - 1)  # floor(log2 span)
    ends = torch.stack([c - 1, a + (1 << level) - 1], -2).clamp(0, max(table.windows.length - 1, 0))
    return last, (ends * levels + level.unsqueeze(-2)).flatten(-2), spans, sizes  # ends: (B, Tq, 2, K)


@torch.no_grad()
def naive_bin_bound_logits(q: Tensor, keys: Tensor, key_valid: Tensor, lengths: Tensor, width: int,
                           scale: float, block: int = BLOCK) -> Tensor:
    """``bin_bound_logits`` from the keys, one (row, bin) at a time: the bound over the keys of the
    last key's block up to it, and over each of the two windows of complete blocks before it (blocks
    of ``block`` valid keys by rank), the [max, min] of each taken over its keys; the largest. The
    plain reference (small inputs only)."""
    bsz, kv_heads, groups, tq, _ = q.shape
    out = torch.zeros(bsz, kv_heads, groups, tq, width)
    for b in range(bsz):
        ranked = keys[b][:, key_valid[b]].float()  # (H_kv, L, d): the valid keys by rank
        for i in range(tq):
            qi = q[b, :, :, i].float()  # (H_kv, G, d)
            edges = cell_edges(lengths[b, i], width).tolist()
            for bin_, (lo, hi) in enumerate(zip(edges[:-1], edges[1:])):
                if hi == lo:
                    continue
                a, c = lo // block, (hi - 1) // block
                reads = [(c * block, hi)]
                if c > a:
                    span = 2 ** int(math.log2(c - a))
                    reads += [((c - span) * block, c * block), (a * block, (a + span) * block)]
                bounds = [_naive_bound(qi, ranked[:, lo_:hi_]) for lo_, hi_ in reads]
                out[b, :, :, i, bin_] = scale * torch.stack(bounds).amax(0) + math.log(hi - lo)
    return out


def _naive_bound(q: Tensor, keys: Tensor) -> Tensor:
    """q+ . max(k) + q- . min(k) over keys (H_kv, n, d): (H_kv, G)."""
    return (q.clamp_min(0) * keys.amax(1)[:, None] + q.clamp_max(0) * keys.amin(1)[:, None]).sum(-1)
