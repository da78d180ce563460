"""Plugging a method into a patched model: a ``layer_override`` per method, and what it measures.

Each override computes the layer's attention on the keys its method selects and, when given a
:class:`SelectionStats`, records per layer the keys each (query, head) used and the teacher's
attention mass on them (coverage: 1 for dense, the fraction of the softmax the selection keeps).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ...core.cells import KeySlots
from ...hf import LayerCall
from ...core.ops.reference import allowed_keys, reference_attention
from .chunks import Selector, query_chunks


@dataclass
class LayerStats:
    pairs: int = 0  # (valid query row, head) pairs counted
    keys: float = 0.0  # sum over those pairs of the keys selected
    covered_pairs: int = 0  # pairs counted for coverage (rows past ``skip``)
    coverage: float = 0.0  # sum over those pairs of the teacher's probability on the selected keys
    head_coverage: Tensor | None = None  # (H,) float64: the same sum, per head

    @property
    def keys_per_query(self) -> float:
        return self.keys / max(self.pairs, 1)

    @property
    def mean_coverage(self) -> float:
        return self.coverage / max(self.covered_pairs, 1)

    @property
    def mean_head_coverage(self) -> list[float]:
        """Per head, the mean teacher mass on the selected keys (every head counts the same rows)."""
        if self.head_coverage is None:
            return []
        rows = max(self.covered_pairs // self.head_coverage.numel(), 1)
        return (self.head_coverage / rows).tolist()


def late_rows(positions: Tensor, num_keys: int, skip: float) -> Tensor:
    """(C,) bool: the rows counted for coverage, those at positions >= skip * num_keys."""
    return positions >= skip * num_keys


@dataclass
class SelectionStats:
    """Keys per query per head and coverage, accumulated per layer over every call of a run.

    ``skip``: coverage counts only rows at positions >= skip * Tk (0: every row).
    """

    skip: float = 0.0
    layers: dict[int, LayerStats] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0.0 <= self.skip < 1.0:
            raise ValueError(f"coverage skip must be a fraction in [0, 1), got {self.skip!r}")

    def record(self, layer: int, selected: Tensor, probs: Tensor, query_valid: Tensor, positions: Tensor,
               num_keys: int) -> None:
        """selected, probs (B, H, C, Tk); query_valid (B, C); positions (C,) of the rows."""
        stats = self.layers.setdefault(layer, LayerStats())
        heads = selected.shape[1]
        rows = query_valid[:, None, :].expand(-1, heads, -1)  # (B, H, C)
        stats.pairs += int(rows.sum())
        stats.keys += float((selected.sum(-1) * rows).sum())
        late = rows & late_rows(positions, num_keys, self.skip)
        stats.covered_pairs += int(late.sum())
        per_head = ((probs * selected).sum(-1) * late).sum((0, 2)).double().cpu()  # (H,)
        stats.coverage += float(per_head.sum())
        stats.head_coverage = per_head if stats.head_coverage is None else stats.head_coverage + per_head

    def keys_per_query(self) -> float:
        """Mean over layers of the keys each (query, head) used."""
        return sum(s.keys_per_query for s in self.layers.values()) / max(len(self.layers), 1)

    def coverage(self) -> float:
        """Mean over layers of the teacher mass on the selected keys."""
        return sum(s.mean_coverage for s in self.layers.values()) / max(len(self.layers), 1)

    def per_layer(self) -> list[tuple[float, float]]:
        """(keys per query, coverage) of each layer, in layer order."""
        return [(self.layers[i].keys_per_query, self.layers[i].mean_coverage) for i in sorted(self.layers)]


@dataclass
class SelectorOverride:
    """``layer_override`` function: attention on the keys ``selector`` picks, chunk by chunk."""

    selector: Selector
    k: int
    stats: SelectionStats | None = None
    chunk_size: int = 256

    def __call__(self, call: LayerCall) -> tuple[Tensor, None]:
        pieces = []
        for chunk in query_chunks(call.query, call.key, call.value, call.key_valid, call.scaling, call.causal,
                                  self.chunk_size):
            selected = self.selector(chunk, self.k)
            context, _ = reference_attention(chunk.query, chunk.key, chunk.value, selected, chunk.scaling)
            pieces.append(context)
            if self.stats is not None:
                self.stats.record(call.layer_idx, selected, chunk.teacher[1], chunk.query_valid, chunk.positions,
                                  call.key.shape[2])
        return torch.cat(pieces, dim=2), None


def sea_selection(call: LayerCall, slots: KeySlots | None, attention: Tensor | None) -> Tensor:
    """(B, H, Tq, Tk) bool: the keys SEA attended to, from its key slots (per-query grouping) or,
    with the block grouping, from its sparse attention view (a key whose probability underflows
    to 0 is missed there)."""
    heads, tk = call.query.shape[1], call.key.shape[2]
    if slots is not None:
        return slots.dense_mask(heads, tk)
    if attention is None:
        raise ValueError("SEA returned neither key slots nor an attention view to measure its selection")
    return attention > 0


@dataclass
class SEAOverride:
    """``layer_override`` function: the layer's own SEA attention (active budget), measured."""

    stats: SelectionStats | None = None

    def __call__(self, call: LayerCall) -> tuple[Tensor, None]:
        out = call.run_sea(return_attention=self.stats is not None and not call.grouping.reports_slots)
        if self.stats is not None:
            tq, tk = call.query.shape[2], call.key.shape[2]
            mask = allowed_keys(call.key_valid, tq, call.causal).expand(-1, call.query.shape[1], -1, -1)
            _, probs = reference_attention(call.query, call.key, call.value, mask, call.scaling)
            positions = torch.arange(tk - tq, tk, device=call.key.device)
            self.stats.record(call.layer_idx, sea_selection(call, out.slots, out.attention) & mask, probs,
                              call.key_valid[:, tk - tq:], positions, tk)
        return out.context, None
