"""Per-query groupings (``query``, ``query_head``, ``sample``, ``head``): every query row
selects its own cells; the cells stretch to keys (``cells.cells_to_keys``) and attention
runs on exactly those keys, on the path the config names."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..cells import KeySlots, cells_to_keys, forced_ranges
from ..config import SEAConfig
from ..ops.reference import reference_attention
from ..ops.sparse import sparse_attention
from ..refine import refine_slots
from ..selection import select_cells
from .base import Attended, Grouping, Step

if TYPE_CHECKING:
    from ..call import SEACall
    from ..estimator import Estimate


class PerQueryGrouping(Grouping):
    """Stages: ``selection`` (grouped top-k), ``cell_to_key`` and ``sparse_attention``."""

    stages = ("selection", "cell_to_key", "sparse_attention")

    computes_row_subsets = True
    reports_slots = True

    def __init__(self, config: SEAConfig, kind: str) -> None:
        super().__init__(config)
        self.kind = kind  # which cells share a budget: query, query_head, sample or head
        if config.candidates > 1:  # the exact refinement (refine.py) between the keys and the attention
            self.stages = ("selection", "cell_to_key", "refine", "sparse_attention")

    def steps(self) -> tuple[Step, ...]:
        refine = (self.refine,) if "refine" in self.stages else ()
        return tuple(zip(self.stages, (self.select, self.keys, *refine, self.attend)))

    def select(self, estimate: "Estimate", call: "SEACall") -> Tensor:
        """(B, H, n, K) bool: the cells each computed row selects (for ``candidates`` times the budget)."""
        cfg = self.config
        return select_cells(estimate.probs, call.asked_lengths, self.candidate_budget(call), self.kind,
                            cfg.query_chunk, cfg.sinks, cfg.local_window, cfg.forced_keys)

    def keys(self, cells: Tensor, call: "SEACall") -> tuple[Tensor, KeySlots]:
        """The selected cells and their keys (``cells_to_keys``)."""
        cap = self.candidate_budget(call)
        slots = cells_to_keys(cells, call.asked_lengths, call.key_valid, cap=cap, chunk=self.config.query_chunk,
                              forced=self._forced(cap))
        return cells, slots

    def refine(self, selected: tuple[Tensor, KeySlots], call: "SEACall") -> tuple[Tensor, KeySlots]:
        """The candidates' exactly best keys, each head keeping its share (``refine.refine_slots``)."""
        cells, slots = selected
        q = call.asked(call.q, 2)
        return cells, refine_slots(q, call.k, slots, call.asked_lengths, self.refinement(call), call.scale,
                                   self.config.query_chunk)

    def _forced(self, cap: int) -> tuple[int, int]:
        """What a forced cell stands for at ``cap`` keys per head (``cells.forced_ranges``); the
        budget-wide groupings force no cells."""
        cfg = self.config
        return forced_ranges(cap, cfg.sinks, cfg.local_window, cfg.forced_keys and self.kind in ("query", "query_head"))

    def attend(self, selected: tuple[Tensor, KeySlots], call: "SEACall") -> Attended:
        """Attention of the computed rows on their keys, on the config's ``attention_path``."""
        cells, slots = selected
        q = call.asked(call.q, 2)
        path = self.config.attention_path
        if path == "flex" and _flex_runs(q, call):
            context, attention = self._flex(q, cells, call), None
        elif path == "reference":
            mask = slots.dense_mask(self.config.num_heads, call.k.shape[2])
            context, probs = reference_attention(q, call.k, call.v, mask, call.scale)
            attention = probs if call.return_attention else None
        else:  # sparse; flex where it cannot run (documented on SEAConfig.attention_path)
            context, slot_probs = sparse_attention(q, call.k, call.v, slots, call.scale, self.config.query_chunk)
            heads, keys = self.config.num_heads, call.k.shape[2]
            attention = slots.to_dense(slot_probs, heads, keys) if call.return_attention else None
        return Attended(context, cells, slots.nnz(self.config.num_heads), attention, slots)

    def _flex(self, q: Tensor, cells: Tensor, call: "SEACall") -> Tensor:
        from ..ops.flex import CellMap, flex_sea_attention  # imported on use: it pulls in torch.compile

        cell_map = CellMap(call.asked_lengths, call.key_valid, call.budget, self._forced(call.budget))
        return flex_sea_attention(q, call.k, call.v, cells, cell_map, scale=call.scale)


def _flex_runs(q: Tensor, call: "SEACall") -> bool:
    """FlexAttention runs where it can: no dense attention view asked for, and no backward on
    CPU (PyTorch's CPU FlexAttention is forward only)."""
    if call.return_attention:
        return False
    needs_grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, call.k, call.v))
    return not (needs_grad and q.device.type == "cpu")
