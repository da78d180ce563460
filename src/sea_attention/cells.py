"""The one mapping between compressed cells and keys, shared by every path.

A query row i has L_i valid keys (its causal prefix, or all non-padding keys). Its
compressed estimate has K bins; bin b covers the keys whose rank r among the valid keys
satisfies ``floor(b L / K) <= r < floor((b + 1) L / K)``. When L >= K every bin holds
floor(L/K) or ceil(L/K) keys; when L < K exactly L bins hold one key each and the others
are *dead* (empty): they get no probability and can never be selected.

A selected cell emits at most ``cap`` keys, spread evenly over its range, which keeps
keys per query bounded when rows are longer than ``cap * K``.

Training (KD targets), the reference path, the sparse path and decoding all call these
functions, so what is trained is what runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def cell_starts(lengths: Tensor, width: int) -> Tensor:
    """First key rank of every bin: (...,) lengths -> (..., K)."""
    bins = torch.arange(width, device=lengths.device)
    return (bins * lengths.unsqueeze(-1)) // width


def cell_lengths(lengths: Tensor, width: int) -> Tensor:
    """Number of keys in every bin: (...,) -> (..., K); 0 marks a dead bin."""
    bins = torch.arange(width + 1, device=lengths.device)
    edges = (bins * lengths.unsqueeze(-1)) // width
    return edges[..., 1:] - edges[..., :-1]


def live_cells(lengths: Tensor, width: int) -> Tensor:
    """Bins that hold at least one key: (...,) -> (..., K) bool."""
    return cell_lengths(lengths, width) > 0


def key_bins(ranks: Tensor, lengths: Tensor, width: int) -> Tensor:
    """Bin that a key of a given rank falls into, for a row of ``lengths`` valid keys.

    ``ranks`` and ``lengths`` broadcast; the result is meaningful where rank < length.
    """
    lengths = lengths.clamp_min(1)
    return ((ranks + 1) * width - 1) // lengths


def key_ranks(key_valid: Tensor) -> Tensor:
    """Rank of every key among the valid keys of its row: (B, Tk) bool -> (B, Tk) long."""
    return key_valid.long().cumsum(-1) - 1


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


def cell_key_counts(cells: Tensor, lengths: Tensor, cap: int) -> Tensor:
    """Keys each selected cell emits: cells (B, H, Tq, K) bool -> (B, H, Tq, K) long."""
    per_cell = cell_lengths(lengths, cells.shape[-1]).clamp_max(cap)  # (B, Tq, K)
    return per_cell.unsqueeze(1) * cells


def cells_to_keys(cells: Tensor, lengths: Tensor, key_valid: Tensor, cap: int, chunk: int = 256) -> KeySlots:
    """Stretch selected cells (B, H, Tq, K) into key slots without any Tq x Tk tensor.

    ``lengths`` (B, Tq) are the rows' valid key counts, ``key_valid`` (B, Tk) the key
    padding mask. Each selected cell (h, b) emits ``min(len, cap)`` keys spread evenly
    over its rank range; ranks are turned into key positions through the padding mask.
    """
    bsz, heads, tq, width = cells.shape
    counts = cell_key_counts(cells, lengths, cap)  # (B, H, Tq, K)
    counts = counts.permute(0, 2, 1, 3).reshape(bsz, tq, heads * width)  # head-major per query
    totals = counts.sum(-1)  # (B, Tq)
    slots = max(int(totals.max()) if totals.numel() else 0, 1)
    positions = valid_key_positions(key_valid)  # (B, Tk)
    starts = cell_starts(lengths, width)  # (B, Tq, K)
    sizes = cell_lengths(lengths, width)  # (B, Tq, K)

    head_out, key_out, valid_out = [], [], []
    arange = torch.arange(slots, device=cells.device)
    for lo in range(0, tq, chunk):
        hi = min(lo + chunk, tq)
        ends = counts[:, lo:hi].cumsum(-1)  # (B, c, H*K) inclusive prefix sums
        slot = arange.expand(bsz, hi - lo, slots).contiguous()
        cell = torch.searchsorted(ends, slot, right=True).clamp_max(heads * width - 1)
        used = slot < totals[:, lo:hi, None]
        head, bin_ = cell // width, cell % width
        emitted = counts[:, lo:hi].gather(-1, cell)
        offset = slot - (ends.gather(-1, cell) - emitted)  # index of this key inside its cell
        size = sizes[:, lo:hi].gather(-1, bin_)
        start = starts[:, lo:hi].gather(-1, bin_)
        # evenly spaced picks: the centre of each of `emitted` equal sub-ranges
        rank = start + ((2 * offset + 1) * size) // (2 * emitted.clamp_min(1))
        key = positions.gather(-1, rank.clamp(0, positions.shape[-1] - 1).flatten(1)).view_as(rank)
        head_out.append(torch.where(used, head, 0))
        key_out.append(torch.where(used, key, 0))
        valid_out.append(used)
    return KeySlots(torch.cat(head_out, 1), torch.cat(key_out, 1), torch.cat(valid_out, 1))


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
    # a causal row's L valid keys are exactly the valid keys of rank < L
    inside = key_valid[:, None, :] & (ranks[:, None, :] < lengths[:, :, None])
    picked = estimate.gather(-1, bins.unsqueeze(1).expand(-1, estimate.shape[1], -1, -1))
    return torch.where(inside.unsqueeze(1), picked / sizes.unsqueeze(1), 0.0)
