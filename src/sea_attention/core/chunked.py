"""Row-chunked inference: a causal SEA layer's context (per-query or block grouping) without any
Tq x K tensor.

The full forward (``SEAAttention.forward``) estimates every row at once: the CNN's image and
logits, the binned signals' Tq x (K + 1) dots per kv head and signal, the probabilities and
the selected cells are all Tq x K (x channels) wide, so its peak memory grows by hundreds of
kilobytes per token. ``SEAAttention.context_only`` runs this path instead where it is defined
(``chunked_runs``):

1. once over all positions, O(Tq) memory: the Performer features and causal linear attention
   and the binned signals' prefix sums (``AttentionEstimator.per_position``);
2. then a span of query rows at a time (``Grouping.span_size``: ``config.query_chunk`` rows per
   query, one run of the block op for the block grouping), end to end: the encoder and CNN on the
   span and its ``HISTORY_ROWS`` rows of history (the block grouping: only its selecting rows),
   the span's binned signals, softmax, the grouping's selection and attention (per query:
   ``select_cells``, ``cells_to_keys``, ``sparse_attention``; block: ``select_blocks`` and the
   block op), gating with a running mean of V carried from span to span, the output norm and
   masks; each span's context is written into one (B, H, Tq, d) output.

Every row equals the full forward's row up to float rounding (the encoder and the CNN run on
fewer rows, which oneDNN may block differently): ``tests/test_chunked.py``. A prefill's empty
``DecodeState`` is filled as the full forward fills it, so decoding continues from it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .attention import running_sum
from .call import SEACall
from .dense_rows import all_dense
from .estimator.estimator import BinInputs
from .gates import gate_values
from .grouping import Grouping, grouping_for
from .ops.reference import repeat_kv

if TYPE_CHECKING:
    from .attention import SEAAttention


def chunked_runs(sea: "SEAAttention", call: SEACall) -> bool:
    """Whether ``call`` runs the row-chunked path: a causal layer (every causal grouping defines
    spans) on the ``sparse`` path, no attention view or row subset asked for, no state or an empty
    one (a prefill), and no autograd graph to build (grad disabled, or nothing requires it)."""
    config = sea.config
    if not (config.causal and config.attention_path == "sparse"):
        return False
    if call.return_attention or call.query_rows is not None or (call.state is not None and call.state.seen):
        return False
    tensors = (call.q, call.k, call.v, *sea.parameters())
    return not (torch.is_grad_enabled() and any(x.requires_grad for x in tensors))


class RunningMean:
    """The average branch (running mean of V over each row's valid keys), one span of rows at a
    time: the sum up to the span's start is carried, so the scan adds in the full forward's order."""

    def __init__(self, call: SEACall, groups: int) -> None:
        self.call, self.groups = call, groups
        self.carry = call.v.new_zeros(*call.v.shape[:2], 1, call.v.shape[-1], dtype=torch.float32)  # (B, H_kv, 1, d)

    def span(self, lo: int, hi: int) -> Tensor:
        """(B, H, hi - lo, d) the mean of V over the valid keys up to each row of [lo, hi)."""
        masked = self.call.v[:, :, lo:hi].float()  # queries are the keys here (no past)
        valid = self.call.key_valid[:, lo:hi]
        if not bool(valid.all()):
            masked = masked * valid[:, None, :, None]
        sums = running_sum(torch.cat([self.carry, masked], dim=2))[:, :, 1:]  # (B, H_kv, n, d)
        self.carry = sums[:, :, -1:]
        return repeat_kv(sums / self.call.lengths[:, None, lo:hi, None].clamp_min(1), self.groups)


@dataclass
class PerPosition:
    """What every span reads: ``per_position``'s results and the grouping."""

    performer: Tensor  # (B, H, Tq, p) the Performer output, in the estimator's dtype
    bins: BinInputs | None  # the binned signals' queries and prefix sums
    grouping: Grouping
    mean: RunningMean | None  # the average branch, with gating


def chunked_context(sea: "SEAAttention", call: SEACall) -> Tensor:
    """The context (B, H, Tq, d) of a call that ``chunked_runs``, a span of rows (``span_size``) at a time."""
    config, tq = sea.config, call.q.shape[2]
    performer, bins = sea.estimator.per_position(call)  # fills a state's Performer sums and prefix sums
    shared = PerPosition(performer, bins, grouping_for(config),
                         RunningMean(call, config.kv_groups) if config.gating else None)
    out: Tensor | None = None
    starts = shared.grouping.span_starts(call.first, tq)
    for lo, hi in zip(starts, starts[1:] + [tq]):
        context = _span_context(sea, shared, call, lo, hi)  # (B, H, n, d)
        if out is None:
            out = context.new_empty(*context.shape[:2], tq, context.shape[-1])
        out[:, :, lo:hi] = context
    if call.state is not None:  # a prefill: the state as the full forward leaves it
        sea.fill_prefill_state(performer, call)
    return out


def _span_context(sea: "SEAAttention", shared: PerPosition, call: SEACall, lo: int, hi: int) -> Tensor:
    """The finished context (B, H, hi - lo, d) of query rows [lo, hi): estimate, select, attend, gate;
    rows the length policy picks (``SEAAttention.dense_until``) attend densely, and a span of only such
    rows estimates nothing."""
    # the state goes along: the block grouping keeps its open block's selection there
    part = replace(call, query_rows=torch.arange(lo, hi, device=call.q.device))
    if all_dense(part, sea.dense_until):
        if shared.mean is not None:
            shared.mean.span(lo, hi)  # carries the running sum to the next span
        return sea.exact_context(part)
    rows = shared.grouping.span_estimate_rows(call.first, lo, hi, call.q.device)
    estimate = sea.estimator.estimate_span(shared.performer, shared.bins, call, lo, hi, rows)
    context = shared.grouping.run(estimate, part).context  # (B, H, n, d)
    if shared.mean is not None:
        gates = gate_values(estimate.gate_logits, sea.config.gate_form).to(context.dtype)  # (B, H, n, 2)
        context = sea.gate(context, gates, shared.mean.span(lo, hi))
    return sea.put_dense_rows(sea.finish(context, part), part)
