"""Attention for the query-block grouping (``blocks.py``): dense block products.

All queries of a block attend the same selected cells, so each cell's keys are gathered
once per block and scored with one (block x d) @ (d x keys) product; causal blocks add
their own keys as a dense (block x block) tile. One softmax per query and head runs over
the tile and that head's cells together (max and sum combined across them with
scatter-reduce). Plain autograd: the products are dense, so there is no per-query gather
to avoid in backward. Blocks are processed a few at a time, so memory is linear in T.

The reference is ``reference.reference_attention`` on ``blocks.block_dense_mask``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..blocks import BlockKeys, BlockSelection, block_keys, span_mask, tile_mask
from ..cells import valid_key_positions

MODES = ("auto", "cells", "dense")


def _use_dense(mode: str, dense_work: int, cell_work: int) -> bool:
    """Work per query row: dense scores every key of the span for every head; the cell
    path copies each cell's query (d) and scores its keys, at several times the cost per
    element of a dense product."""
    return mode == "dense" or (mode == "auto" and dense_work <= 2 * cell_work)


def _pad_rows(x: Tensor, front: int, back: int) -> Tensor:
    """Zero rows before and after the T axis of (..., T, d); no copy when there are none."""
    return F.pad(x, (0, 0, front, back)) if front or back else x


def _dense_chunk(q_chunk: Tensor, k_span: Tensor, v_span: Tensor, allowed: Tensor) -> tuple[Tensor, Tensor]:
    """Blocks scored against every key of the span, then masked: (B, n, H, Bq, d), (B, n, H, Bq).

    q_chunk (B, H, n, Bq, d) already scaled; k_span, v_span (B, H_kv, span, d); allowed (B, H, n, Bq, span).
    """
    bsz, heads, n, block, dim = q_chunk.shape
    kv_heads, span = k_span.shape[1], k_span.shape[2]
    q_grouped = q_chunk.reshape(bsz, kv_heads, -1, dim)  # the heads of one kv head share its keys
    scores = (q_grouped @ k_span.transpose(-1, -2)).view(bsz, heads, n, block, span)
    # -inf, not the lowest float: exp() takes a slow path on huge finite negatives
    probs = torch.softmax(scores.masked_fill_(~allowed, float("-inf")), dim=-1)
    probs = probs.masked_fill(~allowed, 0.0)  # rows with no key at all are NaN until here
    out = (probs.reshape(bsz, kv_heads, -1, span) @ v_span).view(bsz, heads, n, block, dim)
    return out.transpose(1, 2), allowed.sum(-1).transpose(1, 2)


@dataclass
class _BlockRun:
    """One call's block-sparse attention, prepared once and computed a run of blocks at a time."""

    q_blocks: Tensor  # (B, H, nb, Bq, d) scaled queries, padded to whole blocks
    k: Tensor  # (B, H_kv, Tk, d) in the compute dtype
    v: Tensor
    tiles: tuple[Tensor, Tensor] | None  # causal: each block's own keys and values (B, H_kv, nb, Bq, d)
    selection: BlockSelection
    key_valid: Tensor  # (B, Tk)
    lowest: float  # the softmax shift's floor: finite, so rows without keys stay NaN-free

    @classmethod
    def prepare(cls, q: Tensor, k: Tensor, v: Tensor, selection: BlockSelection, key_valid: Tensor,
                scale: float) -> "_BlockRun":
        bsz, heads, tq, dim = q.shape
        kv_heads, tk = k.shape[1], k.shape[2]
        compute = torch.promote_types(q.dtype, torch.float32)
        block, num_blocks, front = selection.block, selection.num_blocks, selection.front
        q_scaled = q.to(compute) * scale  # the scale folded into q once, not into every score
        q_blocks = _pad_rows(q_scaled, front, num_blocks * block - tq - front).view(bsz, heads, num_blocks, block, dim)
        k_c, v_c = k.to(compute), v.to(compute)
        tiles = None
        if selection.causal:  # each block's own keys, padded past the end
            start = selection.first_block * block
            pad = start + num_blocks * block - tk
            tiles = tuple(_pad_rows(x[:, :, start:], 0, pad).view(bsz, kv_heads, num_blocks, block, dim)
                          for x in (k_c, v_c))
        return cls(q_blocks, k_c, v_c, tiles, selection, key_valid, torch.finfo(compute).min)

    def dense(self, lo: int, hi: int, keys: BlockKeys, span: int) -> tuple[Tensor, Tensor]:
        """Blocks lo:hi scored against every key before ``span``, masked to their keys."""
        allowed = span_mask(self.selection, keys, self.key_valid, lo, hi, span, self.q_blocks.shape[1])
        return _dense_chunk(self.q_blocks[:, :, lo:hi], self.k[:, :, :span], self.v[:, :, :span], allowed)

    def cells(self, lo: int, hi: int, keys: BlockKeys) -> tuple[Tensor, Tensor]:
        """Blocks lo:hi scored against their cells' keys (and their tiles): (B, n, H, Bq, d), (B, n, H, Bq).

        Scores become weights in place (masked, shifted by the per-head maximum,
        exponentiated): every extra pass over them and every fresh allocation costs as much
        as the products.
        """
        q_chunk = self.q_blocks[:, :, lo:hi]
        w_cells, v_cells = self._cell_scores(q_chunk, keys)  # (B, n, C, Bq, E), (B, n, C, E, d)
        w_tile, allowed = self._tile_scores(q_chunk, lo, hi) if self.selection.causal else (None, None)
        parts = _CellParts(keys, q_chunk.shape[1], q_chunk.shape[3])
        peak = parts.peak(w_cells, w_tile, self.lowest)  # (B, n, H, Bq)
        numerator, denominator, count = parts.sums(w_cells, v_cells, peak)
        if w_tile is not None:
            numerator, denominator, count = self._add_tile(w_tile, allowed, peak, (numerator, denominator, count),
                                                           self.tiles[1][:, :, lo:hi])
        out = numerator / denominator.clamp_min(torch.finfo(q_chunk.dtype).tiny).unsqueeze(-1)
        return torch.where((peak > self.lowest).unsqueeze(-1), out, 0.0), count

    def _cell_scores(self, q_chunk: Tensor, keys: BlockKeys) -> tuple[Tensor, Tensor]:
        """Each cell's query block against its keys, -inf where a key is unused; and the cells' values."""
        bsz, heads, n, block, dim = q_chunk.shape
        kv_heads, tk = self.k.shape[1], self.k.shape[2]
        batch = torch.arange(bsz, device=q_chunk.device).view(-1, 1, 1)
        rows = ((batch * kv_heads + keys.head // (heads // kv_heads)) * tk).unsqueeze(-1) + keys.key  # (B, n, C, E)
        k_cells = self.k.reshape(-1, dim).index_select(0, rows.flatten()).view(*rows.shape, dim)
        v_cells = self.v.reshape(-1, dim).index_select(0, rows.flatten()).view(*rows.shape, dim)
        head_of = keys.head[..., None, None].expand(-1, -1, -1, block, dim)
        q_cells = q_chunk.transpose(1, 2).gather(2, head_of)  # (B, n, C, Bq, d): each cell's own head
        # masked scores are -inf (exp() is slow on huge finite negatives); the shift stays finite
        w_cells = (q_cells @ k_cells.transpose(-1, -2)).masked_fill_(~keys.valid.unsqueeze(-2), float("-inf"))
        return w_cells, v_cells

    def _tile_scores(self, q_chunk: Tensor, lo: int, hi: int) -> tuple[Tensor, Tensor]:
        """(B, H, n, Bq, Bq) each causal block's queries against its own keys, -inf where not allowed;
        and that mask (B, 1, n, Bq, Bq)."""
        bsz, heads, n, block, dim = q_chunk.shape
        kv_heads = self.k.shape[1]
        allowed = tile_mask(self.selection, self.key_valid, lo, hi).unsqueeze(1)  # (B, 1, n, Bq, Bq)
        q_grouped = q_chunk.reshape(bsz, kv_heads, heads // kv_heads, n, block, dim)
        w_tile = (q_grouped @ self.tiles[0][:, :, lo:hi].unsqueeze(2).transpose(-1, -2))
        return w_tile.view(bsz, heads, n, block, block).masked_fill_(~allowed, float("-inf")), allowed

    def _add_tile(self, w_tile: Tensor, allowed: Tensor, peak: Tensor,
                  sums: tuple[Tensor, Tensor, Tensor], v_tiles: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The tile's share of the softmax sums (numerator, denominator, key count); v_tiles (B, H_kv, n, Bq, d)."""
        numerator, denominator, count = sums
        bsz, heads, n, block, _ = w_tile.shape
        kv_heads = self.k.shape[1]
        w_tile = w_tile.sub_(peak.transpose(1, 2).unsqueeze(-1)).exp_()
        tile_out = w_tile.view(bsz, kv_heads, heads // kv_heads, n, block, block) @ v_tiles.unsqueeze(2)
        numerator = numerator + tile_out.view(bsz, heads, n, block, -1).transpose(1, 2)
        denominator = denominator + w_tile.sum(-1).transpose(1, 2)
        return numerator, denominator, count + allowed.sum(-1).transpose(1, 2)


@dataclass
class _CellParts:
    """Per-head reductions over a run's cells (each cell belongs to one head)."""

    keys: BlockKeys
    heads: int
    block: int

    def peak(self, w_cells: Tensor, w_tile: Tensor | None, lowest: float) -> Tensor:
        """(B, n, H, Bq) the per-head maximum score; ``lowest`` where a head has no key."""
        bsz, n = self.keys.head.shape[:2]
        with torch.no_grad():  # softmax is shift-invariant: the maximum needs no gradient
            peak = torch.full((bsz, n, self.heads, self.block), lowest, dtype=w_cells.dtype, device=w_cells.device)
            peak = peak.scatter_reduce_(2, self._head_rows(), w_cells.amax(-1), "amax")
            if w_tile is not None:
                peak = torch.maximum(peak, w_tile.amax(-1).transpose(1, 2))
        return peak

    def sums(self, w_cells: Tensor, v_cells: Tensor, peak: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Exponentiated cell weights summed per head: numerator (B, n, H, Bq, d), denominator, key count."""
        head_rows = self._head_rows()
        bsz, n, _, _, dim = v_cells.shape
        # exp(-inf - peak) = 0 exactly; a head with no key keeps peak = lowest and is zeroed at the end
        w_cells = w_cells.sub_(peak.gather(2, head_rows).unsqueeze(-1)).exp_()
        head_of = self.keys.head[..., None, None].expand(-1, -1, -1, self.block, dim)
        numerator = w_cells.new_zeros(bsz, n, self.heads, self.block, dim).scatter_add_(2, head_of, w_cells @ v_cells)
        denominator = w_cells.new_zeros(bsz, n, self.heads, self.block).scatter_add_(2, head_rows, w_cells.sum(-1))
        count = torch.zeros(bsz, n, self.heads, dtype=torch.long, device=w_cells.device)
        count = count.scatter_add_(2, self.keys.head, self.keys.valid.sum(-1)).unsqueeze(-1)
        return numerator, denominator, count.expand(-1, -1, -1, self.block)

    def _head_rows(self) -> Tensor:
        return self.keys.head.unsqueeze(-1).expand(-1, -1, -1, self.block)  # (B, n, C, Bq)


@dataclass(frozen=True)
class BlockSparseAttention:
    """Softmax attention of each query over its block's selected keys (plus its tile).

    ``mode``: per run of ``chunk_blocks`` blocks, ``cells`` scores each selected cell's keys;
    ``dense`` scores every key before the run's end and masks (cheaper while the prefix is
    short); ``auto`` picks the one with fewer scores (all give the same result).
    """

    chunk_blocks: int = 8
    mode: str = "auto"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, selection: BlockSelection, key_valid: Tensor,
                 scale: float, cap: int) -> tuple[Tensor, Tensor]:
        """q (B, H, Tq, d); k, v (B, H_kv, Tk, d); ``key_valid`` (B, Tk). Returns the context
        (B, H, Tq, d) in q's dtype and the keys each query attended per head (B, H, Tq)."""
        bsz, heads, tq, dim = q.shape
        run = _BlockRun.prepare(q, k, v, selection, key_valid, scale)
        positions = valid_key_positions(key_valid)
        context = run.q_blocks.new_empty(bsz, selection.num_blocks, heads, selection.block, dim)
        counts = []
        for lo in range(0, selection.num_blocks, self.chunk_blocks):
            hi = min(lo + self.chunk_blocks, selection.num_blocks)
            keys = block_keys(selection, key_valid, cap, lo, hi, positions)  # cells (B, n, C), keys (B, n, C, E)
            # keys these blocks can reach: causal ones end at the run's last position
            span = min(k.shape[2], (selection.first_block + hi) * selection.block) if selection.causal else k.shape[2]
            cells, emitted = keys.key.shape[-2:]
            if _use_dense(self.mode, heads * span, cells * (emitted + dim)):
                context[:, lo:hi], count = run.dense(lo, hi, keys, span)
            else:
                context[:, lo:hi], count = run.cells(lo, hi, keys)
            counts.append(count)
        rows = slice(selection.front, selection.front + tq)
        context = context.permute(0, 2, 1, 3, 4).reshape(bsz, heads, -1, dim)[:, :, rows]
        nnz = torch.cat(counts, 1).permute(0, 2, 1, 3).reshape(bsz, heads, -1)[:, :, rows]
        return context.to(q.dtype), nnz


block_sparse_attention = BlockSparseAttention()  # the default chunking; the class tunes it
