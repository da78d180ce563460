"""Query-block grouping: a block of consecutive queries shares one selection.

Blocks are fixed windows of ``block`` key positions (block ``a`` holds positions
``[a * block, (a + 1) * block)``), so the blocks do not depend on how a sequence is cut
into calls: a prefill followed by decoding steps sees the same blocks as one forward.

* **Causal.** A block's selection is the ``query`` grouping's selection for the block's
  *first* query (the only row that every query of the block may depend on), restricted
  to keys before that query. Every query also attends the keys of its own block up to
  itself (a small dense causal tile): the most recent context is always exact and no
  query is left without keys.
* **Bidirectional.** All rows of a sample share their bins, so a block selects with the
  mean of its rows' estimates; there is no tile.

The payoff is in ``ops/block_sparse.py``: each selected cell's keys are gathered once per
block and scored with one dense (block x keys) product, instead of once per query.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .cells import cell_range, cell_starts, even_pick, forced_ranges, valid_key_positions
from .selection import select_cells

EXCLUDED = -0.5  # score of a live cell whose keys are all in the tile: below every real cell


@dataclass
class BlockSelection:
    """The cells each query block attends to (see the module docstring).

    Block ``i`` of a call is absolute block ``first_block + i``; query row ``j`` of the
    call (key position ``first + j``) belongs to block ``(first + j) // block - first_block``.
    """

    cells: Tensor  # (B, H, nb, K) bool, in the bins of each block's selecting row
    lengths: Tensor  # (B, nb) valid keys of the selecting row: its bins are defined on them
    limit: Tensor  # (B, nb) cells emit only keys of rank < limit
    tile_start: Tensor  # (nb,) first key position of each block's tile (causal)
    first: int  # key position of the call's first query (Tk - Tq)
    block: int
    causal: bool
    keys: "BlockKeys | None" = None  # decoding: the blocks' cell keys once computed (``cached_keys``)
    forced: tuple[int, int] = (0, 0)  # the sink and window keys of a forced cell (``cells.cell_range``)
    vectors: "ListVectors | None" = None  # decoding: the head lists' keys and values once gathered

    @property
    def first_block(self) -> int:
        return self.first // self.block

    @property
    def front(self) -> int:
        """Rows of the first block that lie before the call's first query."""
        return self.first - self.first_block * self.block

    @property
    def num_blocks(self) -> int:
        return self.cells.shape[2]

    def query_blocks(self, tq: int) -> Tensor:
        """(Tq,) block index of every query row."""
        positions = torch.arange(self.first, self.first + tq, device=self.cells.device)
        return positions // self.block - self.first_block

    def map_batch(self, fn) -> "BlockSelection":
        """The same selection with ``fn`` applied to every per-sample tensor (beam search)."""
        keys = None if self.keys is None else self.keys.map_batch(fn)
        vectors = None if self.vectors is None else self.vectors.map_batch(fn)
        return BlockSelection(fn(self.cells), fn(self.lengths), fn(self.limit), self.tile_start, self.first,
                              self.block, self.causal, keys, self.forced, vectors)

    def per_query_cells(self, tq: int) -> Tensor:
        """(B, H, Tq, K) each query's block cells (for ``SEAOutput.cells``)."""
        return self.cells.index_select(2, self.query_blocks(tq))


def reuses_carried(carried: "BlockSelection | None", first: int, block: int) -> bool:
    """Whether a causal call whose first query is at key position ``first`` starts inside the block
    that ``carried`` (the previous decoding call's open block, ``carry``) selected for: it then
    reuses that selection instead of selecting from its own first query."""
    return carried is not None and first % block != 0 and int(carried.tile_start[0]) // block == first // block


def selecting_rows(first: int, tq: int, block: int, device: torch.device | None = None,
                   reuse: bool = False) -> Tensor:
    """(n,) the query rows a causal call selects with: each block's first row in the call, and row 0
    when the call starts mid-block, unless it ``reuse``s a carried selection (``reuses_carried``)."""
    starts = torch.arange(-(first % block), tq, block, device=device)
    return starts[starts >= 0] if reuse else starts.clamp_min(0)


@dataclass(frozen=True)
class BlockRequest:
    """What one call asks of the block selection (see ``select_blocks``)."""

    lengths: Tensor  # (B, Tq) valid keys of each query's row
    query_valid: Tensor  # (B, Tq) bool
    first: int  # key position of the first query (Tk - Tq)
    k: int  # keys per query per head
    block: int  # positions per block
    causal: bool
    sinks: int = 0  # forced sink and window bins, as in ``selection.select_cells``
    window: int = 0
    forced_keys: bool = False  # they stand for their forced keys only (``cells.cell_range``)


def select_blocks(estimate: Tensor, request: BlockRequest, carried: BlockSelection | None = None,
                  estimate_rows: Tensor | None = None) -> BlockSelection:
    """Select cells per query block from the estimate (B, H, Tq, K).

    ``carried`` (decoding) is the selection of the block that was open when the previous call
    ended (``carry``): a call that starts inside that block reuses it. Without it, a call that
    starts mid-block selects that block from its own first query. ``estimate_rows`` (causal):
    the query rows ``estimate`` holds when it does not hold them all (``selecting_rows``).
    """
    block, first = request.block, request.first
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"query_block must be a positive integer, got {block!r}")
    tq = request.lengths.shape[1]
    first_block = first // block
    num_blocks = (first + tq - 1) // block - first_block + 1
    block_pos = (first_block + torch.arange(num_blocks, device=estimate.device)) * block  # (nb,) absolute starts
    if not request.causal:
        return _select_bidirectional(estimate, request, block_pos)
    rows = block_pos - first  # each block's selecting row; negative: it started before this call
    tile_start = block_pos.clone()
    reuse = reuses_carried(carried, first, block)
    if rows[0] < 0 and not reuse:  # a mid-block start without the past: select from the first query
        rows[0], tile_start[0] = 0, first
    own = rows[1:] if reuse else rows
    cells, row_lengths = _select_rows(estimate, request, own, estimate_rows)
    limit = (row_lengths - 1).clamp_min(0)
    keys = vectors = None
    if reuse and not own.numel():  # a step inside the open block: its keys (and their vectors) as they were
        keys, vectors = carried.keys, carried.vectors
    if reuse:
        cells = torch.cat([carried.cells, cells], dim=2)
        row_lengths = torch.cat([carried.lengths, row_lengths], dim=1)
        limit = torch.cat([carried.limit, limit], dim=1)
        tile_start[0] = carried.tile_start[0]
    forced = forced_ranges(request.k, request.sinks, request.window, request.forced_keys)
    return BlockSelection(cells, row_lengths, limit, tile_start, first, block, causal=True, keys=keys, forced=forced,
                          vectors=vectors)


def _select_rows(estimate: Tensor, request: BlockRequest, own: Tensor,
                 estimate_rows: Tensor | None) -> tuple[Tensor, Tensor]:
    """The ``query`` selection of the selecting rows ``own`` (causal): cells (B, H, n, K), lengths (B, n)."""
    row_lengths = request.lengths.index_select(1, own)  # (B, n)
    if not own.numel():  # a decoding step inside the open block
        bsz, heads, _, width = estimate.shape
        return estimate.new_zeros(bsz, heads, 0, width, dtype=torch.bool), row_lengths
    at = own if estimate_rows is None else torch.searchsorted(estimate_rows, own)
    picked = estimate.index_select(2, at)  # (B, H, n, K)
    # cells that hold only the selecting row's own key (or later) are the tile's business
    excluded = cell_starts(row_lengths, estimate.shape[-1]) >= (row_lengths - 1).unsqueeze(-1)  # (B, n, K)
    cells = select_cells(picked.masked_fill(excluded.unsqueeze(1), EXCLUDED), row_lengths, request.k, "query",
                         sinks=request.sinks, window=request.window, forced_keys=request.forced_keys)
    return cells, row_lengths


def _select_bidirectional(estimate: Tensor, request: BlockRequest, block_pos: Tensor) -> BlockSelection:
    """Rows of a bidirectional sample share their bins: select with the block's mean estimate."""
    bsz, heads, tq, width = estimate.shape
    lengths, query_valid, first, block = request.lengths, request.query_valid, request.first, request.block
    num_blocks = block_pos.shape[0]
    front = first - int(block_pos[0])
    back = num_blocks * block - tq - front
    weights = query_valid.to(estimate.dtype)
    rows = torch.nn.functional.pad(estimate * weights[:, None, :, None], (0, 0, front, back))
    total = rows.view(bsz, heads, num_blocks, block, width).sum(3)  # (B, H, nb, K)
    count = torch.nn.functional.pad(weights, (front, back)).view(bsz, num_blocks, block).sum(-1)
    mean = total / count.clamp_min(1)[:, None, :, None]
    row_lengths = torch.nn.functional.pad(lengths, (front, back)).view(bsz, num_blocks, block).amax(-1)
    cells = select_cells(mean, row_lengths, request.k, "query")
    return BlockSelection(cells, row_lengths, row_lengths, block_pos, first, block, causal=False)


def carry(selection: BlockSelection) -> BlockSelection:
    """The last block's selection, for the next decoding call: the selection itself when it is the
    only block (so the keys its attention caches later are shared), else a copy without keys."""
    if selection.num_blocks == 1:
        return selection
    last = slice(selection.num_blocks - 1, selection.num_blocks)
    return BlockSelection(selection.cells[:, :, last], selection.lengths[:, last], selection.limit[:, last],
                          selection.tile_start[last], selection.first, selection.block, selection.causal,
                          forced=selection.forced)


@dataclass
class BlockKeys:
    """The keys of a run of blocks' selected cells: cell ``c`` of block ``i`` belongs to
    head ``head[b, i, c]`` and emits the keys ``key[b, i, c, valid[b, i, c]]``."""

    head: Tensor  # (B, n, C)
    key: Tensor  # (B, n, C, E) key positions
    valid: Tensor  # (B, n, C, E)
    cap: int = 0  # the most keys a cell emits (``block_keys``' cap)

    def map_batch(self, fn) -> "BlockKeys":
        return BlockKeys(fn(self.head), fn(self.key), fn(self.valid), self.cap)


@dataclass
class ListVectors:
    """Decoding: each head's list of a selection's blocks (``ops.block_sparse.head_lists`` of its
    ``cached_keys``) with the keys' and values' vectors, gathered once while the block is open (the
    list's keys are earlier cached keys: they do not change), and ``block`` slots after each list
    for its tile, into which each call writes the tile's keys that arrived since the last one (the
    tile grows by a key per decoding step; slots past the last key are masked)."""

    valid: Tensor  # (B, H, nb, L) which of each list's L places hold a key
    k: Tensor  # (B, H, nb, L + block, d) the lists' keys, then the tile's, in the compute dtype
    v: Tensor  # (B, H, nb, L + block, d)
    cap: int
    tiled: list[int] | None = None  # per block: tile slots already written, from its first (None: none yet)

    def __post_init__(self) -> None:
        if self.tiled is None:
            self.tiled = [0] * self.valid.shape[2]

    def map_batch(self, fn) -> "ListVectors":
        return ListVectors(fn(self.valid), fn(self.k), fn(self.v), self.cap, list(self.tiled))


def block_keys(selection: BlockSelection, key_valid: Tensor, cap: int, lo: int, hi: int,
               positions: Tensor | None = None) -> BlockKeys:
    """Keys of the selected cells of blocks ``lo:hi`` (the cell -> key rule of ``cells.py``,
    ``cell_range``: a cell emits evenly spread keys of its range; here also only ranks < limit).

    ``positions`` is ``valid_key_positions(key_valid)``, passed in when called in a loop.
    """
    cells = selection.cells[:, :, lo:hi]  # (B, H, n, K)
    bsz, heads, n, width = cells.shape
    lengths, limit = selection.lengths[:, lo:hi], selection.limit[:, lo:hi]
    positions = valid_key_positions(key_valid) if positions is None else positions

    flat = cells.permute(0, 2, 1, 3).reshape(bsz, n, heads * width)  # head-major cell ids
    count = flat.sum(-1)  # (B, n)
    most = max(int(count.max()) if count.numel() else 0, 1)
    # compact each block's selected cell ids to the front (slot = running count); others land in a dump column
    slot = torch.where(flat, flat.long().cumsum(-1) - 1, most)
    ids = torch.zeros(bsz, n, most + 1, dtype=torch.long, device=cells.device)
    ids.scatter_(-1, slot, torch.arange(heads * width, device=cells.device).expand(bsz, n, -1))
    ids = ids[..., :most]  # (B, n, C)
    used = torch.arange(most, device=cells.device) < count.unsqueeze(-1)
    start, size, emitted = cell_range(ids % width, lengths.unsqueeze(-1), width, cap, selection.forced)  # (B, n, C)
    offsets = torch.arange(max(int(emitted.max()) if emitted.numel() else 0, 1), device=cells.device)
    rank = start.unsqueeze(-1) + even_pick(offsets, size.unsqueeze(-1), emitted.clamp_min(1).unsqueeze(-1))
    valid = (offsets < emitted.unsqueeze(-1)) & used.unsqueeze(-1) & (rank < limit[:, :, None, None])
    key = positions.gather(-1, rank.clamp(0, positions.shape[-1] - 1).flatten(1)).view_as(rank)
    return BlockKeys(torch.where(used, ids // width, 0), torch.where(valid, key, 0), valid, cap)


def cached_keys(selection: BlockSelection, key_valid: Tensor, cap: int) -> BlockKeys:
    """``block_keys`` of all the selection's blocks, computed once per selection and ``cap``: a decoding
    step inside the open block reads the keys its first step found (its cells and their keys do not
    change while the block is open; only the tile grows)."""
    if selection.keys is None or selection.keys.cap != cap:
        selection.keys = block_keys(selection, key_valid, cap, 0, selection.num_blocks)
    return selection.keys


def tile_positions(selection: BlockSelection, blocks: Tensor) -> Tensor:
    """(n, block) the key positions of the rows (and tile columns) of the call's blocks ``blocks`` (n,):
    row or column c of block i is position ``(first_block + i) * block + c``."""
    offsets = torch.arange(selection.block, device=blocks.device)
    return (selection.first_block + blocks)[:, None] * selection.block + offsets


def tile_mask(selection: BlockSelection, key_valid: Tensor, lo: int, hi: int) -> Tensor:
    """(B, n, block, block) bool: which keys of its own block each query row of blocks ``lo:hi``
    attends (causal; rows and columns at ``tile_positions``)."""
    block, tk = selection.block, key_valid.shape[-1]
    offsets = torch.arange(block, device=key_valid.device)
    key_pos = tile_positions(selection, torch.arange(lo, hi, device=key_valid.device))  # (n, block)
    valid = torch.nn.functional.pad(key_valid, (0, max(0, int(key_pos.max()) + 1 - tk)))[:, key_pos]  # (B, n, block)
    causal = offsets[:, None] >= offsets[None, :]  # (block, block): key <= query
    after_start = key_pos >= selection.tile_start[lo:hi, None]  # (n, block)
    return valid[:, :, None, :] & causal & after_start[None, :, None, :]


def span_mask(selection: BlockSelection, keys: BlockKeys, key_valid: Tensor, lo: int, hi: int, span: int,
              num_heads: int) -> Tensor:
    """(B, H, n, block, span) bool: the keys < ``span`` that each row of blocks ``lo:hi`` attends
    (its block's cells, and its tile when causal). ``keys`` = ``block_keys(..., lo, hi)``."""
    cells = span_cell_mask(keys, key_valid.shape[0], lo, hi, span, num_heads)
    mask = cells.expand(-1, -1, -1, selection.block, -1)
    return mask | span_tile_mask(selection, key_valid, lo, hi, span) if selection.causal else mask


def span_cell_mask(keys: BlockKeys, bsz: int, lo: int, hi: int, span: int, num_heads: int) -> Tensor:
    """(B, H, n, 1, span) bool: the keys < ``span`` of each block's selected cells (blocks ``lo:hi``)."""
    n = hi - lo
    dump = num_heads * span
    flat = torch.where(keys.valid & (keys.key < span), keys.head.unsqueeze(-1) * span + keys.key, dump)
    cells = torch.zeros(bsz, n, dump + 1, dtype=torch.bool, device=keys.key.device)
    cells = cells.scatter_(-1, flat.flatten(2), True)[..., :dump].view(bsz, n, num_heads, 1, span)
    return cells.transpose(1, 2)


def span_tile_mask(selection: BlockSelection, key_valid: Tensor, lo: int, hi: int, span: int) -> Tensor:
    """(B, 1, n, block, span) bool: the keys < ``span`` of each row's tile (causal; blocks ``lo:hi``)."""
    key_pos = torch.arange(span, device=key_valid.device)
    row_pos = tile_positions(selection, torch.arange(lo, hi, device=key_valid.device))  # (n, block)
    tile = (key_pos >= selection.tile_start[lo:hi, None, None]) & (key_pos <= row_pos[..., None])  # (n, block, span)
    return (tile & key_valid[:, None, None, :span]).unsqueeze(1)


def block_dense_mask(selection: BlockSelection, key_valid: Tensor, cap: int, num_heads: int, tq: int) -> Tensor:
    """The selection as a (B, H, Tq, Tk) bool mask: for the reference path, tests and plots."""
    cells, tile = block_dense_parts(selection, key_valid, cap, num_heads, tq)
    return cells if tile is None else cells | tile


def block_dense_parts(selection: BlockSelection, key_valid: Tensor, cap: int, num_heads: int,
                      tq: int) -> tuple[Tensor, Tensor | None]:
    """The selection's two parts as (B, H, Tq, Tk) bool masks (broadcast over heads for the tile): each
    row's block cell keys (the candidates an exact refinement chooses among) and its tile (None when
    bidirectional). The cells' keys lie before the tile, so the two never overlap."""
    bsz, tk = key_valid.shape
    rows = slice(selection.front, selection.front + tq)
    keys = block_keys(selection, key_valid, cap, 0, selection.num_blocks)
    cells = span_cell_mask(keys, bsz, 0, selection.num_blocks, tk, num_heads)  # (B, H, nb, 1, Tk)
    cells = cells.expand(-1, -1, -1, selection.block, -1).flatten(2, 3)[:, :, rows]
    if not selection.causal:
        return cells, None
    tile = span_tile_mask(selection, key_valid, 0, selection.num_blocks, tk)  # (B, 1, nb, Bq, Tk)
    return cells, tile.flatten(2, 3)[:, :, rows]
