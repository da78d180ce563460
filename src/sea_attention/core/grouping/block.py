"""The ``block`` grouping: a block of ``query_block`` consecutive positions shares one
selection (``blocks.py``), and attention runs as dense block products (``ops/block_sparse``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..blocks import (
    BlockRequest, BlockSelection, block_dense_mask, carry, reuses_carried, select_blocks, selecting_rows,
)
from ..ops.block_sparse import block_sparse_attention, few_rows_attention
from ..ops.reference import reference_attention
from ..refine import naive_block_refine
from .base import Attended, Grouping, Step

if TYPE_CHECKING:
    from ..call import SEACall
    from ..estimator import Estimate


class BlockGrouping(Grouping):
    """Stages: ``selection`` (per block) and ``sparse_attention`` (which maps cells to keys itself)."""

    stages = ("selection", "sparse_attention")
    keeps_open_block = True

    def __init__(self, config) -> None:
        super().__init__(config)
        self.span_rows = config.query_block  # a row-chunked prefill's spans start at a block's first row

    def selecting_positions(self, positions: Tensor) -> Tensor:
        """Each row's block's first position: the row that selects for the block (``blocks.py``)."""
        return positions // self.config.query_block * self.config.query_block

    def tile_starts(self, positions: Tensor) -> Tensor:
        """The block's own keys, from its first position on, are the tile every row attends."""
        return self.selecting_positions(positions)

    def span_size(self) -> int:
        """One run of the block op (``chunk_blocks`` blocks, 1,024 rows by default): a span holds
        what the op's run holds anyway, and each span pays a fixed cost, so fewer spans are faster
        (``docs/results.md``, the block grouping's fifth round)."""
        return block_sparse_attention.chunk_blocks * self.config.query_block

    def span_estimate_rows(self, first: int, lo: int, hi: int, device: torch.device) -> Tensor:
        """Each block's first row in the span (spans start at a block's first row), on ``device``."""
        return lo + selecting_rows(first + lo, hi - lo, self.config.query_block, device)

    def steps(self) -> tuple[Step, ...]:
        return tuple(zip(self.stages, (self.select, self.attend)))

    def estimate_rows(self, call: "SEACall") -> Tensor | None:
        """Causal inference (no autograd, no attention view): only the rows that select need an
        estimate, which saves most of the CNN, and a decoding step inside an open block (63 of 64
        steps) needs none: its state still takes the step's keys and CNN row."""
        cfg = self.config
        if not cfg.causal or call.return_attention or torch.is_grad_enabled():
            return None
        state = call.state
        reuse = reuses_carried(state.block if state is not None and state.seen else None, call.first, cfg.query_block)
        return selecting_rows(call.first, call.q.shape[2], cfg.query_block, call.q.device, reuse)

    def select(self, estimate: "Estimate", call: "SEACall") -> BlockSelection:
        """The blocks' cells. A call with ``query_rows`` (a span of a row-chunked prefill, from a
        block's first row on) selects as a call whose queries start at the span's first row."""
        cfg = self.config
        state = call.state
        carried = state.block if state is not None and state.seen else None
        lo = int(call.query_rows[0]) if call.query_rows is not None and call.query_rows.numel() else 0
        rows = estimate.rows - lo if estimate.rows is not None else None
        request = BlockRequest(call.asked_lengths, call.asked(call.query_valid, 1), call.first + lo,
                               self.candidate_budget(call), cfg.query_block, cfg.causal, cfg.sinks, cfg.local_window,
                               cfg.forced_keys)
        selection = select_blocks(estimate.probs, request, carried, rows)
        if state is not None:
            state.block = carry(selection)
        return selection

    def attend(self, selection: BlockSelection, call: "SEACall") -> Attended:
        """Dense block products; the reference path (or an attention view) on the dense mask, and
        per-row lists for a few queries (decoding), where a block of rows would be mostly padding.
        With ``candidates`` > 1 each row keeps its exactly best share of its block's keys (``refine.py``)."""
        cfg, q = self.config, call.asked(call.q, 2)
        tq, cap = q.shape[2], self.candidate_budget(call)
        attention = None
        if cfg.attention_path == "reference" or call.return_attention:
            mask = self._dense_mask(q, selection, call, cap)
            context, probs = reference_attention(q, call.k, call.v, mask, call.scale)
            attention = probs if call.return_attention else None
            nnz = mask.sum(-1)
        elif cfg.causal and tq * 4 <= cfg.query_block:
            context, nnz = few_rows_attention(q, call.k, call.v, selection, call.key_valid, call.scale, cap,
                                              self.refinement(call))
        else:
            context, nnz = block_sparse_attention(q, call.k, call.v, selection, call.key_valid, call.scale, cap,
                                                  self.refinement(call))
        valid = call.asked(call.query_valid, 1)[:, None, :]  # padding queries report no keys, as elsewhere
        cells = selection.per_query_cells(tq)
        if not bool(valid.all()):  # a (B, H, Tq, K) pass saved when no row is padding
            cells = cells & valid.unsqueeze(-1)
        return Attended(context, cells, nnz * valid, attention)

    def _dense_mask(self, q: Tensor, selection: BlockSelection, call: "SEACall", cap: int) -> Tensor:
        """(B, H, Tq, Tk) bool: the keys each row attends, refined from the dense scores (the reference)."""
        refinement = self.refinement(call)
        if refinement is None:
            return block_dense_mask(selection, call.key_valid, cap, self.config.num_heads, q.shape[2])
        return naive_block_refine(q, call.k, selection, call.key_valid, cap, refinement, call.scale)
