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

from ..blocks import BlockSelection, block_keys, span_mask, tile_mask
from ..cells import valid_key_positions

MODES = ("auto", "cells", "dense")


def _use_dense(mode: str, dense_work: int, cell_work: int) -> bool:
    """Work per query row: dense scores every key of the span for every head; the cell
    path copies each cell's query (d) and scores its keys, at several times the cost per
    element of a dense product."""
    return mode == "dense" or (mode == "auto" and dense_work <= 2 * cell_work)


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
    lowest = torch.finfo(compute).min  # finite: rows without keys stay NaN-free
    start = selection.first_block * block  # key position of row 0 of block 0
    front, back = selection.first - start, num_blocks * block - tq - (selection.first - start)
    q_blocks = F.pad(q.to(compute), (0, 0, front, back)).view(bsz, heads, num_blocks, block, dim)
    k_c, v_c = k.to(compute), v.to(compute)
    k_flat, v_flat = k_c.reshape(-1, dim), v_c.reshape(-1, dim)
    if selection.causal:  # each block's own keys, padded past the end
        pad = start + num_blocks * block - tk
        k_tiles, v_tiles = (F.pad(x[:, :, start:], (0, 0, 0, pad)).view(bsz, kv_heads, num_blocks, block, dim)
                            for x in (k_c, v_c))
    positions = valid_key_positions(key_valid)
    batch = torch.arange(bsz, device=q.device).view(-1, 1, 1)

    outputs, counts = [], []
    for lo in range(0, num_blocks, chunk_blocks):
        hi = min(lo + chunk_blocks, num_blocks)
        n = hi - lo
        keys = block_keys(selection, key_valid, cap, lo, hi, positions)  # cells (B, n, C), keys (B, n, C, E)
        span = min(tk, (selection.first_block + hi) * block)  # keys these blocks can reach
        cells, emitted = keys.key.shape[-2:]
        if _use_dense(mode, heads * span, cells * (emitted + dim)):
            allowed = span_mask(selection, keys, key_valid, lo, hi, span, heads)  # (B, H, n, Bq, span)
            q_grouped = q_blocks[:, :, lo:hi].reshape(bsz, kv_heads, groups * n * block, dim)
            scores = (q_grouped @ k_c[:, :, :span].transpose(-1, -2)).view(bsz, heads, n, block, span) * scale
            probs = torch.softmax(scores.masked_fill(~allowed, lowest), dim=-1) * allowed
            out = (probs.view(bsz, kv_heads, -1, span) @ v_c[:, :, :span]).view(bsz, heads, n, block, dim)
            outputs.append(out.transpose(1, 2))
            counts.append(allowed.sum(-1).transpose(1, 2))
            continue
        rows = ((batch * kv_heads + keys.head // groups) * tk).unsqueeze(-1) + keys.key
        k_cells = k_flat.index_select(0, rows.flatten()).view(*rows.shape, dim)  # (B, n, C, E, d)
        v_cells = v_flat.index_select(0, rows.flatten()).view(*rows.shape, dim)
        q_chunk = q_blocks[:, :, lo:hi]  # (B, H, n, Bq, d)
        head_of = keys.head[..., None, None].expand(-1, -1, -1, block, dim)
        q_cells = q_chunk.transpose(1, 2).gather(2, head_of)  # (B, n, C, Bq, d): each cell's own head
        s_cells = (q_cells @ k_cells.transpose(-1, -2)) * scale  # (B, n, C, Bq, E)
        s_cells = s_cells.masked_fill(~keys.valid.unsqueeze(-2), lowest)
        head_rows = keys.head.unsqueeze(-1).expand(-1, -1, -1, block)  # (B, n, C, Bq)
        peak = torch.full((bsz, n, heads, block), lowest, dtype=compute, device=q.device)
        peak = peak.scatter_reduce(2, head_rows, s_cells.amax(-1), "amax")  # (B, n, H, Bq)
        if selection.causal:
            allowed = tile_mask(selection, key_valid, lo, hi).unsqueeze(1)  # (B, 1, n, Bq, Bq)
            q_grouped = q_chunk.view(bsz, kv_heads, groups, n, block, dim)
            s_tile = (q_grouped @ k_tiles[:, :, None, lo:hi].transpose(-1, -2)).view(bsz, heads, n, block, block)
            s_tile = (s_tile * scale).masked_fill(~allowed, lowest)
            peak = torch.maximum(peak, s_tile.amax(-1).transpose(1, 2))
        peak = peak.detach()  # softmax is shift-invariant: the shift needs no gradient

        w_cells = torch.exp(s_cells - peak.gather(2, head_rows).unsqueeze(-1)) * keys.valid.unsqueeze(-2)
        numerator = torch.zeros(bsz, n, heads, block, dim, dtype=compute, device=q.device)
        numerator = numerator.scatter_add(2, head_of, w_cells @ v_cells)
        denominator = torch.zeros(bsz, n, heads, block, dtype=compute, device=q.device)
        denominator = denominator.scatter_add(2, head_rows, w_cells.sum(-1))
        count = torch.zeros(bsz, n, heads, dtype=torch.long, device=q.device)
        count = count.scatter_add(2, keys.head, keys.valid.sum(-1)).unsqueeze(-1).expand(-1, -1, -1, block)
        if selection.causal:
            w_tile = torch.exp(s_tile - peak.transpose(1, 2).unsqueeze(-1)) * allowed
            w_grouped = w_tile.view(bsz, kv_heads, groups, n, block, block)
            tile_out = (w_grouped @ v_tiles[:, :, None, lo:hi]).view(bsz, heads, n, block, dim)
            numerator = numerator + tile_out.transpose(1, 2)
            denominator = denominator + w_tile.sum(-1).transpose(1, 2)
            count = count + allowed.sum(-1).transpose(1, 2)
        outputs.append(numerator / denominator.clamp_min(torch.finfo(compute).tiny).unsqueeze(-1))
        counts.append(count)

    rows = slice(front, front + tq)
    context = torch.cat(outputs, 1).permute(0, 2, 1, 3, 4).reshape(bsz, heads, -1, dim)[:, :, rows]
    nnz = torch.cat(counts, 1).permute(0, 2, 1, 3).reshape(bsz, heads, -1)[:, :, rows]
    return context.to(q.dtype), nnz
