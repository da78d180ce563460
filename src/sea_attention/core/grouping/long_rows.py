"""The long-rows policy (``SEAConfig.block_from = N``): the query rows at key positions from N on run the
``block`` grouping (with ``block_candidates``), the earlier ones the config's per-query grouping.

The per-query grouping is the closer to dense on short rows at equal keys; on long ones the block
grouping with exact refinement is both the faster and the closer to dense in perplexity. With 4
candidates per block it finds a needle less often (docs/results.md, "The long-rows policy"); with 16 it
finds it as often as the per-query rows, still faster from 4k tokens ("Sixteen candidates per block"),
which is the default (N = 1,024, ``SEAConfig``: "The long-rows policy becomes the default"). The rule is per
row, by key position, so a decoding step and a full forward run a row alike; N is a multiple of
``query_block``, so the first long row opens a block and no block mixes the two. One estimate serves
both parts: the per-query rows are estimated, and of the long rows those the block grouping asks for
(``BlockGrouping.estimate_rows``: in causal inference only the rows it selects with; with autograd or
an attention view every row).

A call's rows are cut in two parts, each run by its own grouping as a call on a subset of rows
(``query_rows``, as the row-chunked prefill runs a span), and the parts' results are joined.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..config import BLOCK_CANDIDATES, SEAConfig
from .base import Attended, Grouping, Step, span_starts
from .block import BlockGrouping
from .per_query import PerQueryGrouping

if TYPE_CHECKING:
    from ..call import SEACall
    from ..estimator import Estimate


class LongRowsGrouping(Grouping):
    """Stages: ``query_rows`` (the per-query grouping on the short rows) and ``block_rows`` (the
    block grouping on the long ones)."""

    stages = ("query_rows", "block_rows")
    computes_row_subsets = True  # of the short rows (``inputs.py`` refuses long ones)
    keeps_open_block = True

    def __init__(self, config: SEAConfig) -> None:
        super().__init__(config)
        self.start = config.block_from
        self.short = PerQueryGrouping(config, config.grouping)
        self.long = BlockGrouping(config.replace(grouping="block", candidates=config.block_candidates, block_from=0,
                                                  block_candidates=BLOCK_CANDIDATES))
        self.span_rows = config.query_block

    def at(self, lo: int, hi: int) -> Grouping:
        """The part's grouping that runs the rows at key positions [lo, hi); this one when they straddle the start."""
        if lo < self.start < hi:
            return self
        return self.long if lo >= self.start else self.short

    def offered(self, budget: int, keys: int) -> int:
        """Each part offers its own (``at`` tells which part runs a row)."""
        raise ValueError(f"the long-rows policy offers per part (rows before key position {self.start} run the "
                         "per-query grouping, the rest the block grouping): ask the part, LongRowsGrouping.at(lo, hi)")

    def split(self, call: "SEACall") -> int:
        """The first of the call's Tq query rows that is long (Tq when none is)."""
        return self._cut(call.first, call.q.shape[2])

    def _cut(self, first: int, tq: int) -> int:
        """The first long row of ``tq`` queries from key position ``first`` (``tq`` when none is)."""
        return min(max(self.start - first, 0), tq)

    def selecting_positions(self, positions: Tensor) -> Tensor:
        return torch.where(positions >= self.start, self.long.selecting_positions(positions),
                           self.short.selecting_positions(positions))

    def tile_starts(self, positions: Tensor) -> Tensor:
        return torch.where(positions >= self.start, self.long.tile_starts(positions), self.short.tile_starts(positions))

    def span_starts(self, first: int, tq: int) -> list[int]:
        """The per-query grouping's spans up to the first long row, then the block grouping's."""
        cut = self._cut(first, tq)
        short = span_starts(first, cut, self.short.span_size(), 1)
        return short + [cut + lo for lo in span_starts(first + cut, tq - cut, self.long.span_size(), self.span_rows)]

    def span_estimate_rows(self, first: int, lo: int, hi: int, device: torch.device) -> Tensor | None:
        part = self.at(first + lo, first + hi)
        if part is self:  # span_starts never cuts such a span
            raise ValueError(f"a span of rows [{lo}, {hi}) straddles block_from={self.start}")
        return part.span_estimate_rows(first, lo, hi, device)

    def estimate_rows(self, call: "SEACall") -> Tensor | None:
        """Every short row (or the asked ones) and the rows the block grouping selects with."""
        cut, tq = self.split(call), call.q.shape[2]
        if call.query_rows is not None or cut == tq:
            return call.query_rows
        tail = self.long.estimate_rows(replace(call, q=call.q[:, :, cut:]))  # rows of the long queries
        if tail is None:
            return None
        rows = torch.cat([torch.arange(cut, device=tail.device), tail + cut])
        return None if rows.numel() == tq else rows

    def steps(self) -> tuple[Step, ...]:
        return tuple(zip(self.stages, (self._short_rows, self._long_rows)))

    def _short_rows(self, estimate: "Estimate", call: "SEACall") -> tuple["Estimate", Attended | None]:
        part = self._part(call, short=True)
        return estimate, None if part is None else self.short.run(_rows_of(estimate, part, call), part)

    def _long_rows(self, done: tuple["Estimate", Attended | None], call: "SEACall") -> Attended:
        estimate, short = done
        part = self._part(call, short=False)
        if part is None:
            return short
        long = self.long.run(_rows_of(estimate, part, call), part)
        return long if short is None else _joined(short, long)

    def _part(self, call: "SEACall", short: bool) -> "SEACall | None":
        """The call on the short (or long) computed rows only; the call itself when it has only those."""
        cut, tq = self.split(call), call.q.shape[2]
        if call.query_rows is None:
            lo, hi = (0, cut) if short else (cut, tq)
            if lo == hi:
                return None
            return call if hi - lo == tq else replace(call, query_rows=torch.arange(lo, hi, device=call.q.device))
        rows = call.query_rows  # sorted: rows[:at] are short
        at = int(torch.searchsorted(rows, torch.tensor(cut, device=rows.device)))
        own = rows[:at] if short else rows[at:]
        if not own.numel():
            return None
        return call if own.numel() == rows.numel() else replace(call, query_rows=own)


def _rows_of(estimate: "Estimate", part: "SEACall", call: "SEACall") -> "Estimate":
    """The estimate of ``part``'s rows: every asked row it holds (the block grouping finds its selecting
    rows among them); the estimate itself when the part is the whole call."""
    if part is call:
        return estimate
    held = estimate.rows if estimate.rows is not None else torch.arange(call.q.shape[2], device=part.query_rows.device)
    lo, hi = int(part.query_rows[0]), int(part.query_rows[-1])
    inside = (held >= lo) & (held <= hi)
    rows = held[inside]
    at = inside.nonzero().squeeze(-1)  # where those rows sit in the estimate
    return replace(estimate, logits=estimate.logits.index_select(2, at), probs=estimate.probs.index_select(2, at),
                   rows=rows)


def _joined(short: Attended, long: Attended) -> Attended:
    """The two parts' results, the short rows first (they are the earlier ones)."""
    attention = None if short.attention is None else torch.cat([short.attention, long.attention], 2)
    return Attended(torch.cat([short.context, long.context], 2), torch.cat([short.cells, long.cells], 2),
                    torch.cat([short.nnz, long.nnz], 2), attention)
