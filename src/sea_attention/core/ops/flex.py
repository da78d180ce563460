"""SEA attention on PyTorch's FlexAttention: a block-sparse kernel with an exact per-key mask.

FlexAttention visits, for every (batch, head, query block), only the key blocks listed in
a ``BlockMask`` and evaluates ``mask_mod(b, h, q_idx, kv_idx)`` on each visited score.
SEA's selection gives both without any Tq x Tk tensor:

* **Blocks.** A selected cell's emitted keys lie between two key positions (its first and
  last emitted rank, turned into positions through the padding mask). Marking the key
  blocks first..last of every cell with a difference array and a cumsum gives the touched
  key blocks of each query block, a (B, H, nQB, nKB) tensor, fed to
  ``BlockMask.from_kv_blocks``.
* **Mask.** ``mask_mod`` redoes the mapping of ``cells.py`` for one (query, key): the
  key's rank, its bin, the range that bin's cell stands for (``cells.cell_range``: the bin, or
  a forced cell's sink and window keys), and whether the key lies in it at one of the evenly
  spread offsets that ``cells_to_keys`` emits.

The result equals ``reference_attention`` on ``cells_to_keys(...).dense_mask(...)``.

On CPU FlexAttention is forward only and must be compiled (eager builds the dense score
matrix); it needs AVX2 and fp32 / bf16 / fp16. Tq and Tk need not be multiples of the
block size. The compiled function is created once and has dynamic q/k/v shapes, but
what mask_mod reads must have *static* sizes: torch 2.13's CPU kernel renames symbolic
sizes in the mask code by plain text replacement and emits C++ that does not build when
the mask reads tensors of symbolic size. So mask_mod reads one flat table, padded to a
power of two and marked static: a new size class recompiles (log2 many), a new T does not
(sizes of 1, such as a single query or a batch of one, still specialise as usual).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Callable

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from ..cells import (cell_key_counts, cell_range, even_pick, is_even_pick, key_bins, key_ranks,
                     valid_key_positions)

_FLEX_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MIN_TABLE = 1 << 16  # smallest table length (256 KiB): small calls share one compiled kernel


@cache
def _compiled_flex() -> Callable[..., Tensor]:
    """flex_attention compiled once per process, dynamic in batch and sequence lengths."""
    return torch.compile(flex_attention, dynamic=True)


def _static_table(parts: list[Tensor]) -> tuple[Tensor, list[int]]:
    """Concatenate flat parts into one zero-padded, power-of-two, static-size int32 table.

    Returns the table and the offset of every part. Entries are lengths, ranks and
    counts (all < Tk), so int32 holds them.
    """
    offsets, total = [], 0
    for part in parts:
        offsets.append(total)
        total += part.numel()
    table = parts[0].new_zeros(max(_MIN_TABLE, 1 << (total - 1).bit_length()), dtype=torch.int32)
    torch.cat([p.flatten().int() for p in parts], out=table[:total])
    torch._dynamo.mark_static(table)  # see the module docstring
    return table, offsets


@dataclass(frozen=True)
class CellMap:
    """What turns a row's selected cells into keys (``cells.py``)."""

    lengths: Tensor  # (B, Tq) long, each row's valid key count
    key_valid: Tensor  # (B, Tk) bool, the key padding mask
    cap: int  # the keys per query per head the cells stand for (the budget)
    forced: tuple[int, int] = (0, 0)  # the sink and window keys of a forced cell (``cells.forced_counts``)

    def ranges(self, width: int) -> tuple[Tensor, Tensor, Tensor]:
        """(B, Tq, K) each cell's first key rank, its number of keys and how many it emits (``cell_range``)."""
        bins = torch.arange(width, device=self.lengths.device)
        return cell_range(bins, self.lengths.unsqueeze(-1), width, self.cap, self.forced)


def _validate_block_mask(cells: Tensor, cell_map: CellMap, block_size: int) -> None:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
    cap = cell_map.cap
    if isinstance(cap, bool) or not isinstance(cap, int) or cap < 1:
        raise ValueError(f"cap must be a positive integer, got {cap!r}")
    bsz, _, tq, _ = cells.shape
    lengths, key_valid = cell_map.lengths, cell_map.key_valid
    if lengths.shape != (bsz, tq) or key_valid.dim() != 2 or key_valid.shape[0] != bsz \
            or key_valid.dtype != torch.bool:
        raise ValueError(f"lengths must be (B, Tq) = {(bsz, tq)} and key_valid a (B, Tk) bool mask, got "
                         f"{tuple(lengths.shape)} and {tuple(key_valid.shape)} {key_valid.dtype}")


def _touched_blocks(counts: Tensor, starts: Tensor, sizes: Tensor, cell_map: CellMap,
                    block_size: int) -> tuple[Tensor, Tensor]:
    """Key blocks each (batch, head, query block) visits: kv_num_blocks (B, H, nQB), kv_indices (B, H, nQB, nKB).

    Only the selected cells (a few percent of all) are visited: the key blocks of a cell's
    first and last emitted key bound its keys, marked with a difference array and a cumsum.
    """
    bsz, heads, tq, width = counts.shape
    tk = cell_map.key_valid.shape[-1]
    sel_b, sel_h, sel_q, sel_bin = torch.nonzero(counts, as_tuple=True)  # (N,) each
    emit = counts[sel_b, sel_h, sel_q, sel_bin]
    start, size = starts[sel_b, sel_q, sel_bin], sizes[sel_b, sel_q, sel_bin]
    rank_block = valid_key_positions(cell_map.key_valid) // block_size  # (B, Tk) key block of each rank
    first_block = rank_block[sel_b, start + even_pick(torch.zeros_like(emit), size, emit)]  # (N,)
    last_block = rank_block[sel_b, start + even_pick(emit - 1, size, emit)]
    nqb, nkb = -(-tq // block_size), -(-tk // block_size)
    row = ((sel_b * heads + sel_h) * nqb + sel_q // block_size) * (nkb + 1)  # the cell's (b, h, q block) row
    diff = torch.zeros(bsz * heads * nqb * (nkb + 1), dtype=torch.int32, device=counts.device)
    ones = torch.ones_like(row, dtype=torch.int32)  # +1 at a cell's first block, -1 after its last one
    diff.index_add_(0, row + first_block, ones).index_add_(0, row + last_block + 1, -ones)
    touched = diff.view(bsz, heads, nqb, nkb + 1).cumsum(-1)[..., :nkb] > 0  # (B, H, nQB, nKB)
    # touched blocks first, in increasing order (stable sort)
    kv_indices = torch.sort((~touched).to(torch.uint8), dim=-1, stable=True).indices.to(torch.int32)
    return touched.sum(-1, dtype=torch.int32), kv_indices


def _exact_mask_mod(counts: Tensor, starts: Tensor, sizes: Tensor, cell_map: CellMap) -> Callable[..., Tensor]:
    """``mask_mod(b, h, q_idx, kv_idx)``: the mapping of ``cells.py`` for one (query, key), read
    from one static flat table (see the module docstring)."""
    bsz, heads, tq, width = counts.shape
    lengths, key_valid = cell_map.lengths, cell_map.key_valid
    tk = key_valid.shape[-1]
    key_rank = torch.where(key_valid, key_ranks(key_valid), -1)  # (B, Tk), -1 for padding keys
    table, (_, at_rank, at_count, at_start, at_size) = _static_table([lengths, key_rank, counts, starts, sizes])
    # sizes and offsets as data, not Python ints: ints would become symbolic sizes
    dims = torch.tensor([tq, tk, heads, width, at_rank, at_count, at_start, at_size], device=counts.device)
    torch._dynamo.mark_static(dims)

    def read(index: Tensor) -> Tensor:
        # float64 holds these integers exactly and its division vectorizes (int64's does not)
        return table[index].double()

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        n_q, n_k, n_h, n_w, at_rank, at_count, at_start, at_size = (dims[i] for i in range(8))
        row = b * n_q + q_idx  # (b, q_idx) in (B, Tq)
        length = read(row)
        rank = read(at_rank + b * n_k + kv_idx)  # -1 for padding keys
        bin_ = torch.minimum(key_bins(rank.clamp_min(0), length, n_w), n_w - 1).long()
        emitted = read(at_count + ((b * n_h + h) * n_q + q_idx) * n_w + bin_)  # 0 unless selected
        start = read(at_start + row * n_w + bin_)
        size = read(at_size + row * n_w + bin_).clamp_min(1)
        hit = is_even_pick(rank - start, size, emitted) & (rank >= start) & (rank < start + size)
        return (rank >= 0) & (rank < length) & (emitted > 0) & hit

    return mask_mod


def sea_block_mask(cells: Tensor, cell_map: CellMap, block_size: int = 128, *, backward: bool = False) -> BlockMask:
    """The selection as a BlockMask: touched key blocks per query block plus the exact mask_mod.

    cells (B, H, Tq, K) bool. Memory is O(B H Tq K + B H (Tq/block) (Tk/block)); no Tq x Tk
    tensor is built. The transposed (query-major) block lists that only the backward pass
    reads are built with ``backward``.
    """
    _validate_block_mask(cells, cell_map, block_size)
    cell_map = CellMap(cell_map.lengths.long(), cell_map.key_valid, cell_map.cap, cell_map.forced)
    starts, sizes, emitted = cell_map.ranges(cells.shape[-1])  # (B, Tq, K) each
    counts = emitted.unsqueeze(1) * cells  # (B, H, Tq, K) keys per cell, 0 if unselected (cell_key_counts)
    kv_num_blocks, kv_indices = _touched_blocks(counts, starts, sizes, cell_map, block_size)
    return BlockMask.from_kv_blocks(kv_num_blocks, kv_indices, BLOCK_SIZE=block_size,
                                    mask_mod=_exact_mask_mod(counts, starts, sizes, cell_map),
                                    seq_lengths=(cells.shape[2], cell_map.key_valid.shape[-1]),
                                    compute_q_blocks=backward)


def _two_key_blocks(k: Tensor, v: Tensor, key_valid: Tensor, block_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """k, v and key_valid with padding keys appended up to ``block_size + 1`` keys.

    torch 2.13's CPU kernel specialised for a single key block returns wrong rows on AVX2
    CPUs (correct with AVX-512); two blocks take the general kernel. Padding keys have no
    rank, so ``mask_mod`` never admits them and the result is unchanged.
    """
    extra = block_size + 1 - k.shape[2]
    k, v = (torch.nn.functional.pad(x, (0, 0, 0, extra)) for x in (k, v))
    return k, v, torch.nn.functional.pad(key_valid, (0, extra), value=False)


def flex_sea_attention(q: Tensor, k: Tensor, v: Tensor, cells: Tensor, cell_map: CellMap, *, scale: float,
                       block_size: int = 128) -> Tensor:
    """Attention of q (B, H, Tq, d) on the keys selected by ``cells`` (B, H, Tq, K), via FlexAttention.

    k, v (B, H_kv, Tk, d) with H a multiple of H_kv; queries are the last Tq keys.
    ``cell_map`` holds the rows' valid key counts, the key padding mask and the most keys
    one cell emits. Returns the context (B, H, Tq, d) in q's dtype; rows with no selected key are 0.
    """
    _validate_flex_inputs(q, k, v, cells)
    needs_grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    if k.shape[2] <= block_size:
        k, v, key_valid = _two_key_blocks(k, v, cell_map.key_valid, block_size)
        cell_map = CellMap(cell_map.lengths, key_valid, cell_map.cap, cell_map.forced)
    block_mask = sea_block_mask(cells, cell_map, block_size, backward=needs_grad)
    # grad mode is part of the compiled graph's guards: running inference as no_grad lets
    # calls with and without torch.no_grad() share one kernel
    with torch.set_grad_enabled(needs_grad):
        out = _compiled_flex()(q.contiguous(), k.contiguous(), v.contiguous(), block_mask=block_mask,
                               scale=float(scale), enable_gqa=k.shape[1] != q.shape[1])
    # rows without any selected key: what flex leaves there is kernel-dependent (0 or NaN)
    has_keys = cell_key_counts(cells, cell_map.lengths.long(), cell_map.cap, cell_map.forced).sum(-1) > 0  # (B, H, Tq)
    return torch.where(has_keys.unsqueeze(-1), out, 0.0).to(q.dtype)


def _validate_flex_inputs(q: Tensor, k: Tensor, v: Tensor, cells: Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be 4-D (B, heads, T, d), got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    bsz, heads, tq, _ = q.shape
    if k.shape != v.shape or k.shape[0] != bsz or heads % k.shape[1] or tq > k.shape[2]:
        raise ValueError(f"k and v must be (B, H_kv, Tk, d) with H % H_kv == 0 and Tk >= Tq, got q "
                         f"{tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if cells.dim() != 4 or cells.shape[:3] != (bsz, heads, tq) or cells.dtype != torch.bool:
        raise ValueError(f"cells must be a (B, H, Tq, K) bool tensor with (B, H, Tq) = {(bsz, heads, tq)}, "
                         f"got {tuple(cells.shape)} {cells.dtype}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in _FLEX_DTYPES:
        raise ValueError(f"FlexAttention needs q, k, v of one dtype among {_FLEX_DTYPES}, got "
                         f"{q.dtype}, {k.dtype}, {v.dtype}")
