"""Attention for the query-block grouping (``blocks.py``): dense block products.

All queries of a block attend the same selected cells, so each head's selected keys are
gathered once per block into one list (``head_lists``) and scored with one
(block x d) @ (d x keys) product; causal blocks append their own keys to the list, a tile
masked causally. One softmax per query and head runs over the list (``_attend_lists``; a few rows
of a decoding step take the same lists: ``few_rows_attention``). With ``candidates`` > 1 (exact
refinement, ``refine.py``) a head's list holds candidates: each row keeps its exactly best
share of them (``refine.Refinement.kept``: ``ceil(n / candidates)`` once the block's selecting
row holds candidates x the budget; ``_Refine``), from the scores the product computed anyway;
only the kept candidates' scores and the tile's are exponentiated (``_attend_kept``).
Plain autograd: the products are dense, so there is no per-query gather to avoid in backward.
Blocks are processed a few at a time, so memory is linear in T.

The reference is ``reference.reference_attention`` on ``blocks.block_dense_mask`` (with candidates,
on ``refine.naive_block_refine``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from ..blocks import (
    BlockKeys, BlockSelection, ListVectors, block_keys, cached_keys, span_cell_mask, span_tile_mask, tile_mask,
    tile_positions,
)
from ..cells import valid_key_positions
from ..refine import Refinement, best_scores, keep_best
from ..rows import row_table, same_layout

MODES = ("auto", "lists", "dense")
LIST_BUCKETS = 4  # buckets of similar list length per run of blocks (``_BlockRun.lists``)


def _use_dense(mode: str, dense_work: int, cell_work: int, refined: bool) -> bool:
    """Work per query row: dense scores every key of the span for every head; the list path
    gathers each selected key once per block and scores it, at several times the cost per
    element of a dense product. A refined dense run also ranks every key of the span (a top-k
    over the span, not over the list), so ``auto`` refines on the lists: 1.9x faster at 1,024
    tokens, 1.2x at 4,096 (docs/results.md, "A short row keeps its budget's share")."""
    return mode == "dense" or (mode == "auto" and not refined and dense_work <= 2 * cell_work)


def _pad_rows(x: Tensor, front: int, back: int) -> Tensor:
    """Zero rows before and after the T axis of (..., T, d); no copy when there are none."""
    return F.pad(x, (0, 0, front, back)) if front or back else x


@dataclass(frozen=True)
class _Refine:
    """Exact refinement inside one product: each row keeps its exactly best ``keep`` of its list's
    ``count`` candidates (``refine.best_scores``): the first ``listed`` columns of the scores (head
    lists, a tile may follow: ``_attend_kept``) or the columns ``candidate_mask`` marks (the dense
    path: ``drop``)."""

    count: Tensor  # (..., 1, 1) candidates of each list
    keep: Tensor  # (..., 1, 1) Refinement.kept(count, the selecting row's length)
    listed: int = 0
    candidate_mask: Tensor | None = None  # bool, broadcast against the scores

    @classmethod
    def of(cls, refinement: Refinement | None, count: Tensor, lengths: Tensor, listed: int = 0,
           candidate_mask: Tensor | None = None) -> "_Refine | None":
        """``refinement`` of lists of ``count`` candidates whose block selected on ``lengths`` keys (both
        (..., 1, 1)); None without one (off)."""
        if refinement is None:
            return None
        return cls(count, refinement.kept(count, lengths), listed, candidate_mask)

    def drop(self, scores: Tensor) -> None:
        """The dense path's refinement: mask (-inf), in place, the ``candidate_mask`` columns a row does not
        keep; ``scores`` (..., R, L) are already -inf where a row may not attend. (The lists' candidates,
        the first ``listed`` columns, are kept by ``_attend_kept``.)"""
        kept = keep_best(scores.masked_fill(~self.candidate_mask, float("-inf")), self.keep)
        scores.masked_fill_(self.candidate_mask & ~kept, float("-inf"))

    def attended(self, allowed: Tensor) -> Tensor:
        """(..., R) the keys each row attends, from the keys it may attend (..., R): every kept
        candidate is one of them (an attended score is finite)."""
        return allowed - (self.count - self.keep).squeeze(-1)


def _dense_chunk(q_chunk: Tensor, k_span: Tensor, v_span: Tensor, allowed: Tensor,
                 refine: _Refine | None = None) -> tuple[Tensor, Tensor]:
    """Blocks scored against every key of the span, then masked (and refined by ``refine``): the
    context (B, n, H, Bq, d) and the keys each row attends (B, n, H, Bq).

    q_chunk (B, H, n, Bq, d) already scaled; k_span, v_span (B, H_kv, span, d); allowed (B, H, n, Bq, span).
    """
    bsz, heads, n, block, dim = q_chunk.shape
    kv_heads, span = k_span.shape[1], k_span.shape[2]
    q_grouped = q_chunk.reshape(bsz, kv_heads, -1, dim)  # the heads of one kv head share its keys
    scores = (q_grouped @ k_span.transpose(-1, -2)).view(bsz, heads, n, block, span)
    # -inf, not the lowest float: exp() takes a slow path on huge finite negatives
    scores = scores.masked_fill_(~allowed, float("-inf"))
    count = allowed.sum(-1)
    if refine is not None:
        refine.drop(scores)
        count = refine.attended(count)
    probs = torch.softmax(scores, dim=-1)
    probs = probs.masked_fill(~allowed, 0.0)  # rows with no key at all are NaN until here
    out = (probs.reshape(bsz, kv_heads, -1, span) @ v_span).view(bsz, heads, n, block, dim)
    return out.transpose(1, 2), count.transpose(1, 2)


@dataclass
class _BlockRun:
    """One call's block-sparse attention, prepared once and computed a run of blocks at a time."""

    q_blocks: Tensor  # (B, H, nb, Bq, d) scaled queries, padded to whole blocks
    k: Tensor  # (B, H_kv, Tk, d) in the compute dtype
    v: Tensor
    selection: BlockSelection
    key_valid: Tensor  # (B, Tk)
    refinement: Refinement | None = None  # exact refinement of each head's list (``refine.py``)

    @classmethod
    def prepare(cls, q: Tensor, k: Tensor, v: Tensor, selection: BlockSelection, key_valid: Tensor,
                scale: float, refinement: Refinement | None = None) -> "_BlockRun":
        bsz, heads, tq, dim = q.shape
        compute = torch.promote_types(q.dtype, torch.float32)
        block, num_blocks, front = selection.block, selection.num_blocks, selection.front
        q_scaled = q.to(compute) * scale  # the scale folded into q once, not into every score
        q_blocks = _pad_rows(q_scaled, front, num_blocks * block - tq - front).view(bsz, heads, num_blocks, block, dim)
        return cls(q_blocks, k.to(compute), v.to(compute), selection, key_valid, refinement)

    def dense(self, lo: int, hi: int, keys: BlockKeys, span: int) -> tuple[Tensor, Tensor]:
        """Blocks lo:hi scored against every key before ``span``, masked to their keys."""
        heads, block = self.q_blocks.shape[1], self.selection.block
        cells = span_cell_mask(keys, self.key_valid.shape[0], lo, hi, span, heads)  # (B, H, n, 1, span)
        allowed = cells.expand(-1, -1, -1, block, -1)
        if self.selection.causal:
            allowed = allowed | span_tile_mask(self.selection, self.key_valid, lo, hi, span)
        lengths = self.selection.lengths[:, None, lo:hi, None, None]  # (B, 1, n, 1, 1)
        refine = _Refine.of(self.refinement, cells.sum(-1, keepdim=True), lengths, candidate_mask=cells)
        return _dense_chunk(self.q_blocks[:, :, lo:hi], self.k[:, :, :span], self.v[:, :, :span], allowed, refine)

    def lists(self, lo: int, hi: int, keys: BlockKeys) -> tuple[Tensor, Tensor]:
        """Blocks lo:hi scored against each head's list of selected keys, followed (causal) by the
        block's own keys, its tile: (B, n, H, Bq, d), (B, n, H, Bq).

        One (block x d) @ (d x keys) product per block and head, however many cells the head picked
        (``_attend_lists``). The lists run in ``LIST_BUCKETS`` buckets of similar length, each padded
        to its own longest list rather than all to the longest (the grouped top-k gives some heads
        twice the mean).
        """
        q_chunk = self.q_blocks[:, :, lo:hi]  # (B, H, n, Bq, d)
        bsz, heads, n, block, dim = q_chunk.shape
        lists = head_lists(keys, heads)
        lengths = self.selection.lengths[:, None, lo:hi].expand(-1, heads, -1)  # (B, H, n) of the selecting rows
        flat = _FlatLists(lists.key.flatten(0, 2), lists.valid.flatten(0, 2), q_chunk.reshape(-1, block, dim),
                          lengths.flatten())
        tile = own = None
        if self.selection.causal:  # the tile: key positions tile_start.. of each block, masked causally
            tile = tile_positions(self.selection, torch.arange(lo, hi, device=flat.key.device))
            tile = tile.clamp_max(self.k.shape[2] - 1)  # (n, Bq); keys past the end are masked
            own = tile_mask(self.selection, self.key_valid, lo, hi)  # (B, n, Bq, Bq)
        order = flat.listed.argsort()  # lists by length
        buckets = order.tensor_split(min(LIST_BUCKETS, len(order)))
        parts = [self._bucket(flat, part, (heads, n), tile, own) for part in buckets]
        back = order.argsort()
        out = torch.cat([out for out, _ in parts]).index_select(0, back).view(bsz, heads, n, block, dim)
        count = torch.cat([count for _, count in parts]).index_select(0, back).view(bsz, heads, n, block)
        return out.transpose(1, 2), count.transpose(1, 2)

    def _bucket(self, flat: "_FlatLists", part: Tensor, shape: tuple[int, int], tile: Tensor | None,
                own: Tensor | None) -> tuple[Tensor, Tensor]:
        """The lists ``part`` (m,) of a run (``flat``; ``shape`` its heads and blocks), padded to their
        longest: the context (m, Bq, d) and the keys each row attends (m, Bq)."""
        heads, n = shape
        block = flat.q.shape[1]
        batch, head, blk = part // (heads * n), part // n % heads, part % n  # each list's sample, head, block
        listed = flat.listed[part][:, None, None]  # (m, 1, 1)
        width = int(listed.max())
        key = flat.key.index_select(0, part)[:, :width]  # (m, w)
        allowed = flat.valid.index_select(0, part)[:, :width].unsqueeze(1).expand(-1, block, -1)  # (m, Bq, w)
        refine = _Refine.of(self.refinement, listed, flat.lengths[part][:, None, None], listed=width)
        count = listed.squeeze(-1) if refine is None else refine.attended(listed.squeeze(-1))  # (m, 1) per row
        if tile is not None:
            mine = own[batch, blk]  # (m, Bq, Bq)
            key = torch.cat([key, tile.index_select(0, blk)], dim=-1)  # (m, w + Bq)
            allowed = torch.cat([allowed, mine], dim=-1)  # (m, Bq, w + Bq)
            count = count + mine.sum(-1)  # (m, Bq)
        k_sel, v_sel = _gather_lists(self.k, self.v, key, batch[:, None], head[:, None], heads)  # (m, w + Bq, d)
        out = _attend_lists(flat.q.index_select(0, part), k_sel, v_sel, allowed, refine)  # (m, Bq, d)
        return out, count.expand(-1, block)


@dataclass
class _FlatLists:
    """A run's (block, head) lists flattened to N = B * H * n rows (sample-major, then head, then block)."""

    key: Tensor  # (N, L) key positions
    valid: Tensor  # (N, L)
    q: Tensor  # (N, Bq, d) the scaled queries of each list's block and head
    lengths: Tensor  # (N,) the keys of each list's selecting row (the refinement's share)
    listed: Tensor = field(init=False)  # (N,) keys of each list, counted once

    def __post_init__(self) -> None:
        self.listed = self.valid.sum(-1)


def _gather_lists(k: Tensor, v: Tensor, key: Tensor, batch: Tensor, head: Tensor,
                  heads: int) -> tuple[Tensor, Tensor]:
    """The keys and values (B, H_kv, Tk, d) at positions ``key`` (..., L) of sample ``batch`` and query
    head ``head`` of ``heads`` (both broadcast against ``key``; a head reads its kv head): (..., L, d) each."""
    tables = same_layout(k, v)  # in place: a KV cache's view with spare rows is not copied
    rows = tables[0].row(batch, head // (heads // k.shape[1]), key).flatten()
    return tuple(t.rows.index_select(0, rows).view(*key.shape, k.shape[-1]) for t in tables)


def _attend_lists(q: Tensor, k_sel: Tensor, v_sel: Tensor, allowed: Tensor,
                  refine: _Refine | None = None) -> Tensor:
    """Softmax attention of scaled queries q (..., R, d) over their list k_sel, v_sel (..., L, d), masked
    by ``allowed`` (..., R, L) and refined by ``refine``: (..., R, d), zero for a row without keys.

    Scores become weights in place (masked, shifted by the row maximum, exponentiated): every
    extra pass over them costs as much as the products.
    """
    lowest = torch.finfo(q.dtype).min  # the shift's floor: finite, so rows without keys stay NaN-free
    # masked scores are -inf (exp() is slow on huge finite negatives); the shift stays finite
    w = (q @ k_sel.transpose(-1, -2)).masked_fill_(~allowed, float("-inf"))
    if refine is not None:
        return _attend_kept(w, v_sel, refine, lowest)
    with torch.no_grad():  # softmax is shift-invariant: the maximum needs no gradient
        peak = w.amax(-1, keepdim=True) if w.shape[-1] else w.new_full((*w.shape[:-1], 1), lowest)
        peak = peak.clamp_min(lowest)  # (..., R, 1); lowest: no key at all
    w = w.sub_(peak).exp_()  # exp(-inf - peak) = 0 exactly
    out = (w @ v_sel) / w.sum(-1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)
    return torch.where(peak > lowest, out, 0.0)


def _attend_kept(w: Tensor, v_sel: Tensor, refine: _Refine, lowest: float) -> Tensor:
    """``_attend_lists`` of masked scores ``w`` (..., R, L) whose first ``refine.listed`` columns are
    candidates: each row's softmax over its kept candidates (``refine.best_scores``) and its tile (the
    columns after them). Only those scores are exponentiated (a quarter of the list with 4 candidates
    per key, a sixteenth with 16); the kept weights go back to their columns for one product with the
    values, or, where the rows' kept values together are no more than the list's (a few rows: decoding),
    meet their own kept values alone (a row reads 64 values, not its list's 1,024). The same weights as
    dropping the others and exponentiating the whole row."""
    listed = refine.listed
    tile = w[..., listed:]  # (..., R, Bq)
    kept, columns = best_scores(w[..., :listed], refine.keep)  # (..., R, M) highest first
    with torch.no_grad():  # softmax is shift-invariant: the maximum needs no gradient
        peak = tile.amax(-1, keepdim=True) if tile.shape[-1] else w.new_full((*w.shape[:-1], 1), lowest)
        if kept.shape[-1]:
            peak = torch.maximum(peak, kept[..., :1])
        peak = peak.clamp_min(lowest)  # (..., R, 1); lowest: no key at all
    kept, tile = kept.sub(peak).exp_(), tile.sub(peak).exp_()  # exp(-inf - peak) = 0 exactly
    if 0 < kept.shape[-2] * kept.shape[-1] <= listed:  # (..., R, 1, M) @ (..., R, M, d): the kept values alone
        out = (kept.unsqueeze(-2) @ _rows_at(v_sel, columns)).squeeze(-2)  # columns < listed
    else:  # the kept weights back in their columns, one product with the list's values
        out = w.new_zeros(*w.shape[:-1], listed).scatter(-1, columns, kept) @ v_sel[..., :listed, :]
    out = out + tile @ v_sel[..., listed:, :]
    total = kept.sum(-1, keepdim=True) + tile.sum(-1, keepdim=True)
    return torch.where(peak > lowest, out / total.clamp_min(torch.finfo(w.dtype).tiny), 0.0)


def _rows_at(x: Tensor, columns: Tensor) -> Tensor:
    """(..., R, M, d): the rows ``columns`` (..., R, M) of x (..., L, d), each list's own, read in place
    where the lists lie evenly in memory (``rows.row_table``)."""
    lists = x.reshape(1, x.shape[:-2].numel(), *x.shape[-2:])  # (1, lists, L, d): a view of evenly laid lists
    table = row_table(lists)
    head = torch.arange(lists.shape[1], device=x.device).view(-1, 1, 1)
    rows = table.row(0, head, columns.reshape(lists.shape[1], *columns.shape[-2:]))  # (lists, R, M)
    return table.rows.index_select(0, rows.flatten()).view(*columns.shape, x.shape[-1])


def few_rows_attention(q: Tensor, k: Tensor, v: Tensor, selection: BlockSelection, key_valid: Tensor,
                       scale: float, cap: int, refinement: Refinement | None = None) -> tuple[Tensor, Tensor]:
    """A causal call of a few query rows (decoding), where a block of rows would be mostly padding:
    the rows of each block they lie in score its head lists (``head_lists`` of the cached cell keys,
    their vectors gathered once per open block: ``_list_vectors``) and its tile up to themselves;
    with refinement each row reads only its kept candidates' values.
    q (B, H, Tq, d); k, v (B, H_kv, Tk, d). Returns the context (B, H, Tq, d) in q's dtype and the
    keys each row attended per head (B, H, Tq)."""
    tq, compute = q.shape[2], torch.promote_types(q.dtype, torch.float32)
    lists = _list_vectors(selection, k, v, key_valid, cap, q.shape[1], compute)
    inside = tile_mask(selection, key_valid, 0, selection.num_blocks)  # (B, nb, block, block)
    outs, counts = [], []
    for blk, lo, hi in _rows_by_block(selection, tq):
        k_sel, v_sel = _with_tile(lists, blk, k, v, selection)  # (B, H, L + block, d) each
        start = selection.front - blk * selection.block  # the call's row 0's place in block blk
        mine = inside[:, blk, start + lo:start + hi]  # (B, r, block): its tile up to itself
        allowed = torch.cat([lists.valid[:, :, blk, None].expand(-1, -1, hi - lo, -1),
                             mine.unsqueeze(1).expand(-1, q.shape[1], -1, -1)], dim=-1)  # (B, H, r, L + block)
        refine = _Refine.of(refinement, lists.valid[:, :, blk].sum(-1)[..., None, None],
                            selection.lengths[:, blk, None, None, None], listed=lists.valid.shape[-1])
        outs.append(_attend_lists(q[:, :, lo:hi].to(compute) * scale, k_sel, v_sel, allowed, refine))
        count = allowed.sum(-1)  # (B, H, r)
        counts.append(count if refine is None else refine.attended(count))
    return torch.cat(outs, 2).to(q.dtype), torch.cat(counts, 2)


def _rows_by_block(selection: BlockSelection, tq: int) -> list[tuple[int, int, int]]:
    """(block, first row, end row) of each block the call's ``tq`` rows lie in, in order
    (``BlockSelection.query_blocks``; a few rows: one synchronisation)."""
    blocks = selection.query_blocks(tq).tolist()
    starts = [row for row in range(tq) if row == 0 or blocks[row] != blocks[row - 1]]
    return [(blocks[lo], lo, hi) for lo, hi in zip(starts, starts[1:] + [tq])]


def _list_vectors(selection: BlockSelection, k: Tensor, v: Tensor, key_valid: Tensor, cap: int, heads: int,
                  compute: torch.dtype) -> ListVectors:
    """The selection's head lists with their keys' and values' vectors (``ListVectors``), gathered once
    per selection, ``cap`` and dtype and kept on it, in inference only (``_records``)."""
    kept = selection.vectors
    if kept is not None and not _records() and kept.cap == cap and kept.k.dtype == compute:
        return kept
    lists = head_lists(cached_keys(selection, key_valid, cap), heads)  # (B, H, nb, L)
    bsz, _, nb, _ = lists.key.shape
    tile = torch.zeros(bsz, heads, nb, selection.block, dtype=lists.key.dtype, device=lists.key.device)
    key = torch.cat([lists.key, tile], dim=-1)  # tile slots: filled by each call (``_with_tile``)
    batch, head = torch.arange(bsz, device=k.device)[:, None, None, None], torch.arange(heads, device=k.device)
    k_sel, v_sel = (x.to(compute) for x in _gather_lists(k, v, key, batch, head[None, :, None, None], heads))
    vectors = ListVectors(lists.valid, k_sel, v_sel, cap)
    if not _records():
        selection.vectors = vectors
    return vectors


def _records() -> bool:
    """Whether autograd may record the call (gradients on): the gathered vectors are then fresh, never kept
    or written in place (a later step's tile would overwrite what an earlier step's graph saved, for a
    query's gradient too)."""
    return torch.is_grad_enabled()


def _with_tile(lists: ListVectors, blk: int, k: Tensor, v: Tensor, selection: BlockSelection) -> tuple[Tensor, Tensor]:
    """Block ``blk``'s list vectors with its tile's keys and values in the tile slots: (B, H, L + block, d)
    each. In inference the slots are written in place, only the keys that arrived since the last call
    (``ListVectors.tiled``); slots past the last key are masked. With gradients, a fresh tensor of the
    whole tile (positions past the last key read the last key)."""
    listed, block, keys = lists.valid.shape[-1], selection.block, k.shape[2]
    base = (selection.first_block + blk) * block  # the tile's first position
    done, end = (0, block) if _records() else (lists.tiled[blk], min(block, keys - base))
    k_sel, v_sel = lists.k[:, :, blk], lists.v[:, :, blk]
    if end <= done:
        return k_sel, v_sel
    k_tile, v_tile = _gather_tile(lists, k, v, (base + torch.arange(done, end, device=k.device)).clamp_max(keys - 1))
    if _records():  # a fresh tensor: autograd sees the tile
        return torch.cat([k_sel[:, :, :listed], k_tile], 2), torch.cat([v_sel[:, :, :listed], v_tile], 2)
    k_sel[:, :, listed + done:listed + end], v_sel[:, :, listed + done:listed + end] = k_tile, v_tile
    lists.tiled[blk] = end
    return k_sel, v_sel


def _gather_tile(lists: ListVectors, k: Tensor, v: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
    """The keys and values at ``positions`` (n,) for every sample and query head, in the lists' dtype:
    (B, H, n, d) each (only they convert)."""
    heads = lists.k.shape[1]
    batch = torch.arange(k.shape[0], device=k.device)[:, None, None]
    head = torch.arange(heads, device=k.device)[None, :, None]
    pair = _gather_lists(k, v, positions.expand(k.shape[0], heads, -1), batch, head, heads)
    return tuple(x.to(lists.k.dtype) for x in pair)


@dataclass
class HeadLists:
    """Each head's selected keys in a run of blocks, compacted to the front: head ``h`` of block
    ``i`` attends the key positions ``key[b, h, i, valid[b, h, i]]``."""

    key: Tensor  # (B, H, n, L) key positions (0 where not valid)
    valid: Tensor  # (B, H, n, L)


def head_lists(keys: BlockKeys, heads: int) -> HeadLists:
    """Regroup a run's cell keys (cells of any head, ``BlockKeys``) into one list per head, as long
    as the longest head's; keys keep their cell order within a head."""
    bsz, n = keys.head.shape[:2]
    emitted = keys.valid.sum(-1)  # (B, n, C) keys of each cell
    per_head = (keys.head.unsqueeze(-1) == torch.arange(heads, device=keys.head.device)) * emitted.unsqueeze(-1)
    before = (per_head.cumsum(2) - per_head).gather(-1, keys.head.unsqueeze(-1))  # (B, n, C, 1): its head's keys
    rank = (before + keys.valid.long().cumsum(-1) - 1).reshape(bsz, n, -1)  # (B, n, C*E) place in its list
    head = keys.head.unsqueeze(-1).expand_as(keys.key).reshape(bsz, n, -1)  # (B, n, C*E)
    valid = keys.valid.reshape(bsz, n, -1)
    count = per_head.sum(2)  # (B, n, H)
    length = int(count.max()) if count.numel() else 0
    slot = torch.where(valid, head * length + rank, heads * length)  # invalid keys land in a dump column
    key = keys.key.new_zeros(bsz, n, heads * length + 1).scatter_(-1, slot, keys.key.reshape(bsz, n, -1))
    key = key[..., :-1].view(bsz, n, heads, length).transpose(1, 2)
    valid = torch.arange(length, device=head.device) < count.transpose(1, 2).unsqueeze(-1)
    return HeadLists(key.contiguous(), valid)


@dataclass(frozen=True)
class BlockSparseAttention:
    """Softmax attention of each query over its block's selected keys (plus its tile).

    ``mode``: per run of ``chunk_blocks`` blocks, ``lists`` scores each head's list of selected keys;
    ``dense`` scores every key before the run's end and masks (cheaper while the prefix is
    short); ``auto`` picks the one with fewer scores, and the lists with refinement (all give the
    same result; ``_use_dense``).
    """

    chunk_blocks: int = 16
    mode: str = "auto"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, selection: BlockSelection, key_valid: Tensor,
                 scale: float, cap: int, refinement: Refinement | None = None) -> tuple[Tensor, Tensor]:
        """q (B, H, Tq, d); k, v (B, H_kv, Tk, d); ``key_valid`` (B, Tk); ``cap`` the keys a cell stands
        for, ``refinement`` the exact refinement (None: off). Returns the context (B, H, Tq, d) in q's
        dtype and the keys each query attended per head (B, H, Tq)."""
        bsz, heads, tq, dim = q.shape
        run = _BlockRun.prepare(q, k, v, selection, key_valid, scale, refinement)
        positions = valid_key_positions(key_valid)
        context = run.q_blocks.new_empty(bsz, selection.num_blocks, heads, selection.block, dim)
        counts = []
        for lo in range(0, selection.num_blocks, self.chunk_blocks):
            hi = min(lo + self.chunk_blocks, selection.num_blocks)
            keys = block_keys(selection, key_valid, cap, lo, hi, positions)  # cells (B, n, C), keys (B, n, C, E)
            # keys these blocks can reach: causal ones end at the run's last position
            span = min(k.shape[2], (selection.first_block + hi) * selection.block) if selection.causal else k.shape[2]
            cells, emitted = keys.key.shape[-2:]
            if _use_dense(self.mode, heads * span, cells * emitted, refinement is not None):
                context[:, lo:hi], count = run.dense(lo, hi, keys, span)
            else:
                context[:, lo:hi], count = run.lists(lo, hi, keys)
            counts.append(count)
        rows = slice(selection.front, selection.front + tq)
        context = context.permute(0, 2, 1, 3, 4).reshape(bsz, heads, -1, dim)[:, :, rows]
        nnz = torch.cat(counts, 1).permute(0, 2, 1, 3).reshape(bsz, heads, -1)[:, :, rows]
        return context.to(q.dtype), nnz


block_sparse_attention = BlockSparseAttention()  # the default chunking; the class tunes it
