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


def _cells_chunk(q_chunk: Tensor, k_flat: Tensor, v_flat: Tensor, keys: BlockKeys, selection: BlockSelection,
                 key_valid: Tensor, lo: int, hi: int, tiles: tuple[Tensor, Tensor] | None, tk: int,
                 lowest: float) -> tuple[Tensor, Tensor]:
    """Blocks lo:hi scored against their cells' keys (and their tiles): (B, n, H, Bq, d), (B, n, H, Bq).

    q_chunk (B, H, n, Bq, d) is already scaled. Scores become weights in place (masked,
    shifted by the per-head maximum, exponentiated): every extra pass over them and every
    fresh allocation costs as much as the products.
    """
    bsz, heads, n, block, dim = q_chunk.shape
    kv_heads = k_flat.shape[0] // (bsz * tk)
    groups = heads // kv_heads
    batch = torch.arange(bsz, device=q_chunk.device).view(-1, 1, 1)
    rows = ((batch * kv_heads + keys.head // groups) * tk).unsqueeze(-1) + keys.key  # (B, n, C, E)
    k_cells = k_flat.index_select(0, rows.flatten()).view(*rows.shape, dim)  # (B, n, C, E, d)
    v_cells = v_flat.index_select(0, rows.flatten()).view(*rows.shape, dim)
    head_of = keys.head[..., None, None].expand(-1, -1, -1, block, dim)
    q_cells = q_chunk.transpose(1, 2).gather(2, head_of)  # (B, n, C, Bq, d): each cell's own head
    # masked scores are -inf (exp() is slow on huge finite negatives); the shift below stays finite
    w_cells = (q_cells @ k_cells.transpose(-1, -2)).masked_fill_(~keys.valid.unsqueeze(-2), float("-inf"))
    head_rows = keys.head.unsqueeze(-1).expand(-1, -1, -1, block)  # (B, n, C, Bq)
    if selection.causal:
        allowed = tile_mask(selection, key_valid, lo, hi).unsqueeze(1)  # (B, 1, n, Bq, Bq)
        q_grouped = q_chunk.reshape(bsz, kv_heads, groups, n, block, dim)
        k_tiles, v_tiles = tiles  # (B, H_kv, n, Bq, d): each block's own keys
        w_tile = (q_grouped @ k_tiles.unsqueeze(2).transpose(-1, -2)).view(bsz, heads, n, block, block)
        w_tile = w_tile.masked_fill_(~allowed, float("-inf"))
    with torch.no_grad():  # softmax is shift-invariant: the per-head maximum needs no gradient
        peak = torch.full((bsz, n, heads, block), lowest, dtype=q_chunk.dtype, device=q_chunk.device)
        peak = peak.scatter_reduce_(2, head_rows, w_cells.amax(-1), "amax")  # (B, n, H, Bq)
        if selection.causal:
            peak = torch.maximum(peak, w_tile.amax(-1).transpose(1, 2))
    # exp(-inf - peak) = 0 exactly; a row of one head with no key at all keeps peak = lowest
    # (finite, so no NaN) and is zeroed at the end
    w_cells = w_cells.sub_(peak.gather(2, head_rows).unsqueeze(-1)).exp_()
    numerator = torch.zeros(bsz, n, heads, block, dim, dtype=q_chunk.dtype, device=q_chunk.device)
    numerator = numerator.scatter_add_(2, head_of, w_cells @ v_cells)
    denominator = torch.zeros(bsz, n, heads, block, dtype=q_chunk.dtype, device=q_chunk.device)
    denominator = denominator.scatter_add_(2, head_rows, w_cells.sum(-1))
    count = torch.zeros(bsz, n, heads, dtype=torch.long, device=q_chunk.device)
    count = count.scatter_add_(2, keys.head, keys.valid.sum(-1)).unsqueeze(-1).expand(-1, -1, -1, block)
    if selection.causal:
        w_tile = w_tile.sub_(peak.transpose(1, 2).unsqueeze(-1)).exp_()
        tile_out = (w_tile.view(bsz, kv_heads, groups, n, block, block) @ v_tiles.unsqueeze(2))
        numerator = numerator + tile_out.view(bsz, heads, n, block, dim).transpose(1, 2)
        denominator = denominator + w_tile.sum(-1).transpose(1, 2)
        count = count + allowed.sum(-1).transpose(1, 2)
    out = numerator / denominator.clamp_min(torch.finfo(q_chunk.dtype).tiny).unsqueeze(-1)
    return torch.where((peak > lowest).unsqueeze(-1), out, 0.0), count


def block_sparse_attention(q: Tensor, k: Tensor, v: Tensor, selection: BlockSelection, key_valid: Tensor,
                           scale: float, cap: int, chunk_blocks: int = 8, mode: str = "auto") -> tuple[Tensor, Tensor]:
    """Softmax attention of each query over its block's selected keys (plus its tile).

    q (B, H, Tq, d); k, v (B, H_kv, Tk, d); ``key_valid`` (B, Tk). Returns the context
    (B, H, Tq, d) in q's dtype and the keys each query attended per head (B, H, Tq).
    ``mode``: per run of blocks, ``cells`` scores each selected cell's keys; ``dense``
    scores every key before the run's end and masks (cheaper while the prefix is short);
    ``auto`` picks the one with fewer scores (all give the same result).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    bsz, heads, tq, dim = q.shape
    kv_heads, tk = k.shape[1], k.shape[2]
    groups, block, num_blocks = heads // kv_heads, selection.block, selection.num_blocks
    compute = torch.promote_types(q.dtype, torch.float32)
    lowest = torch.finfo(compute).min  # the softmax shift's floor: finite, so rows without keys stay NaN-free
    start = selection.first_block * block  # key position of row 0 of block 0
    front = selection.front
    back = num_blocks * block - tq - front
    q_scaled = q.to(compute) * scale  # the scale folded into q once, not into every score
    q_blocks = _pad_rows(q_scaled, front, back).view(bsz, heads, num_blocks, block, dim)
    k_c, v_c = k.to(compute), v.to(compute)
    k_flat, v_flat = k_c.reshape(-1, dim), v_c.reshape(-1, dim)
    if selection.causal:  # each block's own keys, padded past the end
        pad = start + num_blocks * block - tk
        k_tiles, v_tiles = (_pad_rows(x[:, :, start:], 0, pad).view(bsz, kv_heads, num_blocks, block, dim)
                            for x in (k_c, v_c))
    positions = valid_key_positions(key_valid)

    context = q_blocks.new_empty(bsz, num_blocks, heads, block, dim)  # chunks write into it
    counts = []
    for lo in range(0, num_blocks, chunk_blocks):
        hi = min(lo + chunk_blocks, num_blocks)
        n = hi - lo
        keys = block_keys(selection, key_valid, cap, lo, hi, positions)  # cells (B, n, C), keys (B, n, C, E)
        # keys these blocks can reach: causal ones end at the run's last position
        span = min(tk, (selection.first_block + hi) * block) if selection.causal else tk
        cells, emitted = keys.key.shape[-2:]
        if _use_dense(mode, heads * span, cells * (emitted + dim)):
            allowed = span_mask(selection, keys, key_valid, lo, hi, span, heads)  # (B, H, n, Bq, span)
            out, count = _dense_chunk(q_blocks[:, :, lo:hi], k_c[:, :, :span], v_c[:, :, :span], allowed)
        else:
            tiles = (k_tiles[:, :, lo:hi], v_tiles[:, :, lo:hi]) if selection.causal else None
            out, count = _cells_chunk(q_blocks[:, :, lo:hi], k_flat, v_flat, keys, selection, key_valid, lo, hi,
                                      tiles, tk, lowest)
        context[:, lo:hi] = out
        counts.append(count)

    rows = slice(front, front + tq)
    context = context.permute(0, 2, 1, 3, 4).reshape(bsz, heads, -1, dim)[:, :, rows]
    nnz = torch.cat(counts, 1).permute(0, 2, 1, 3).reshape(bsz, heads, -1)[:, :, rows]
    return context.to(q.dtype), nnz
