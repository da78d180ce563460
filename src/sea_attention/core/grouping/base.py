"""The grouping protocol: how one SEA layer turns an estimate into attention.

A grouping decides which cells compete for one top-k budget, which keys the selected cells
stand for, and how attention runs on them. ``SEAAttention.forward`` only calls the protocol:

    estimate = estimator(call, rows=grouping.estimate_rows(call))
    attended = grouping.run(estimate, call)      # = its steps, in order

``steps()`` names each stage, so ``sea bench attention --breakdown`` times exactly the
calls the forward makes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..cells import KeySlots
from ..config import SEAConfig
from ..refine import Refinement

if TYPE_CHECKING:
    from ..call import SEACall
    from ..estimator import Estimate

Step = tuple[str, Callable[[Any, "SEACall"], Any]]  # (stage name, fn(previous result, call) -> result)


@dataclass
class Attended:
    """What a grouping's attention produces for the computed rows."""

    context: Tensor  # (B, H, n, d) before gating
    cells: Tensor  # (B, H, n, K) bool, the selected cells
    nnz: Tensor  # (B, H, n) keys each query attended to, per head
    attention: Tensor | None = None  # (B, H, n, Tk) sparse probabilities, with return_attention
    slots: KeySlots | None = None  # the selected keys, flattened over heads (per-query groupings)


def span_starts(first: int, tq: int, chunk: int, align: int) -> list[int]:
    """The first rows of spans of about ``chunk`` rows over ``tq`` queries from key position ``first``,
    every one after the first starting at a key position that is a multiple of ``align``."""
    size = max(align, chunk // align * align)
    head = (-first) % align  # rows up to the first aligned position
    return [0] + list(range(head if head else size, tq, size)) if tq else []


class Grouping(ABC):
    """One value of ``SEAConfig.grouping``: selection, key mapping and attention kernel."""

    stages: tuple[str, ...] = ()  # the names of steps(), for the benchmark
    computes_row_subsets: bool = False  # whether query_rows (training on some rows) is defined
    span_rows: int = 1  # the row-chunked prefill starts its spans at key positions that are multiples of this
    reports_slots: bool = False  # whether Attended.slots lists the selected keys
    keeps_open_block: bool = False  # whether a decoding state holds an open block's selection (``DecodeState.block``)

    def __init__(self, config: SEAConfig) -> None:
        self.config = config

    def estimate_rows(self, call: "SEACall") -> Tensor | None:
        """The query rows the estimator must produce (sorted), or None for all of them."""
        return call.query_rows

    def candidate_budget(self, call: "SEACall") -> int:
        """Keys per query per head the selected cells stand for: the budget, times ``candidates``
        (exact refinement, ``refine.py``), at most every key."""
        return self.offered(call.budget, call.k.shape[2])

    def offered(self, budget: int, keys: int) -> int:
        """``candidate_budget`` of a call with this budget and this many keys."""
        return min(budget * self.config.candidates, keys)

    def selecting_positions(self, positions: Tensor) -> Tensor:
        """The key position of the row whose estimate selects the cells of the causal rows at
        ``positions`` in a call from position 0: each row its own (per query)."""
        return positions

    def tile_starts(self, positions: Tensor) -> Tensor:
        """The first key the rows at ``positions`` attend whatever the estimate (their block's tile, as
        ``selecting_positions``): none per query, where the estimate chooses among all the row's keys."""
        return positions + 1

    def refinement(self, call: "SEACall") -> Refinement | None:
        """The call's exact refinement (``refine.py``), None when ``candidates`` is 1 (off)."""
        return Refinement(self.config.candidates, call.budget) if self.config.candidates > 1 else None

    def span_size(self) -> int:
        """Rows per span of the row-chunked prefill (``chunked.py``): ``config.query_chunk``."""
        return self.config.query_chunk

    def span_starts(self, first: int, tq: int) -> list[int]:
        """The first rows of a row-chunked prefill's spans (``chunked.py``) of ``tq`` queries from key
        position ``first``: about ``span_size`` rows each, every one after the first starting at a key
        position that is a multiple of ``span_rows``."""
        return span_starts(first, tq, self.span_size(), self.span_rows)

    def at(self, lo: int, hi: int) -> "Grouping":
        """The grouping that runs the rows at key positions [lo, hi): this one (``long_rows.py`` splits)."""
        return self

    def span_estimate_rows(self, first: int, lo: int, hi: int, device: torch.device) -> Tensor | None:
        """The rows of the span [lo, hi) of a row-chunked prefill whose queries start at key position
        ``first`` that need an estimate (sorted, absolute rows, on ``device``), or None for all of them."""
        return None

    @abstractmethod
    def steps(self) -> tuple[Step, ...]:
        """The stages from the estimate to an ``Attended``, in order."""

    def run(self, estimate: "Estimate", call: "SEACall") -> Attended:
        """Run every stage on the previous one's result."""
        result: Any = estimate
        for _, step in self.steps():
            result = step(result, call)
        return result
