"""`SEAAttention`: estimate -> select -> attend -> compose the output."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .call import CallOptions, SEACall
from .cells import KeySlots
from .config import SEAConfig
from .dense_rows import (EVERY_ROW, all_dense, dense_context, dense_probs, dense_rows, keep_queries, kept_query_rows,
                         start_sea)
from .estimator import AttentionEstimator, Estimate
from .gates import gate_values
from .grouping import Grouping, grouping_for
from .ops.reference import repeat_kv

if TYPE_CHECKING:
    from typing_extensions import Unpack


@dataclass
class SEAOutput:
    """Everything one SEA attention call produces.

    ``context`` is what the model uses; the rest is there to train the estimator and to
    look at what the attention did.
    """

    context: Tensor  # (B, H, Tq, d) attention output before the output projection
    estimated: Tensor  # (B, H, n, K) the estimated rows' probabilities (all Tq rows unless estimate_rows)
    nnz: Tensor  # (B, H, Tq) keys each query attended to, per head
    attention: Tensor | None  # (B, H, Tq, Tk) sparse probabilities, only with return_attention=True
    estimated_logits: Tensor  # (B, H, n, K) the estimator's raw logits for the same rows
    gates: Tensor | None  # (B, H, Tq, 2) gates (scale, mix) (core/gates.py), None when gating is off
    cells: Tensor  # (B, H, Tq, K) bool, the selected cells (block grouping, and block_from's long rows: the block's, in the bins of
    # its selecting row, whose length is not this row's: map them with blocks.block_dense_mask;
    # with candidates > 1: the candidates' cells, of which slots keeps the exactly best keys)
    slots: KeySlots | None  # the selected keys, flattened over heads (None with the block grouping, and for a call
    # with rows past block_from)
    lengths: Tensor  # (B, Tq) valid keys of each query's row
    # None: every query row was estimated. Otherwise the (n,) rows that were: with
    # grouping="block" in causal inference (no autograd, no attention view asked for) only the
    # rows that select are, which saves most of the CNN (with block_from, of the rows past it)
    estimate_rows: Tensor | None = None

    @property
    def estimate(self) -> Tensor:
        """(B, H, Tq, K) compressed estimated attention probabilities; rows that were not
        estimated (see ``estimate_rows``) are NaN, so using them fails loudly."""
        return self._all_rows(self.estimated)

    @property
    def estimate_logits(self) -> Tensor:
        """(B, H, Tq, K) the estimator's raw logits (NaN rows as in ``estimate``)."""
        return self._all_rows(self.estimated_logits)

    def _all_rows(self, x: Tensor) -> Tensor:
        if self.estimate_rows is None:
            return x
        full = x.new_full((*x.shape[:2], self.lengths.shape[1], x.shape[-1]), float("nan"))
        return full.index_copy_(2, self.estimate_rows, x)


class SEAAttention(nn.Module):
    """Sparse attention over keys picked from an estimated attention map.

    ``forward(q, k, v)`` takes per-head queries (B, H, Tq, d) and keys/values
    (B, H_kv, Tk, d). When Tq < Tk the queries are the last Tq positions: decoding, which
    needs the ``DecodeState`` of the earlier calls when causal.
    """

    _grouping: tuple[tuple, Grouping] | None = None  # (the config's values, grouping_for(config)); None: not built

    def __init__(self, config: SEAConfig, layer_idx: int = 0) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.estimator = AttentionEstimator(config, layer_idx)  # holds the layer's one config
        width = config.num_heads * config.head_dim
        self.output_norm = nn.LayerNorm(width) if config.output_mode == "norm" else None
        self.k_budget: int | None = None  # keys per query per head of calls that pass none; None: config.k

    @property
    def config(self) -> SEAConfig:
        """The layer's config (stored once, on the estimator; assigning it changes both)."""
        return self.estimator.config

    @config.setter
    def config(self, config: SEAConfig) -> None:
        self.estimator.config = config

    @property
    def grouping(self) -> Grouping:
        """The config's selection strategy (``grouping_for``), built again only when the config changes
        (``set_runtime`` assigns a new one; a field edited in place changes its values too)."""
        values = tuple(vars(self.config).values())
        if self._grouping is None or self._grouping[0] != values:
            self._grouping = (values, grouping_for(self.config))
        return self._grouping[1]

    @property
    def dense_until(self) -> int:
        """The length policy this layer applies (``dense_rows.py``): ``config.dense_until``, or every
        row in a layer of ``config.dense_layers``."""
        return EVERY_ROW if self.layer_idx in self.config.dense_layers else self.config.dense_until

    def extra_repr(self) -> str:
        c = self.config
        return (f"heads={c.num_heads}, kv_heads={c.num_kv_heads}, head_dim={c.head_dim}, causal={c.causal}, "
                f"k={c.k}, K={c.estimate_width}, grouping={c.grouping}, path={c.attention_path}")

    def forward(self, q: Tensor, k: Tensor, v: Tensor, **options: Unpack[CallOptions]) -> SEAOutput:
        """Run SEA attention: validate -> estimate -> select -> attend -> gate.

        Args:
            q: queries (B, H, Tq, d). k, v: keys and values (B, H_kv, Tk, d).
            attention_mask: optional (B, Tk) bool, True for real tokens.
            scale: score scale, finite and positive; defaults to 1/sqrt(d).
            k_budget: keys per query per head for this call (dynamic k); defaults to the layer's
                ``k_budget``, then config.k. A budget of Tk or more selects every key.
            positions: optional (B, Tk) rows of the learned positional table for the keys
                (causal only); defaults to each key's rank among the valid keys.
            return_attention: also return the sparse probabilities as a dense (B, H, Tq, Tk) view.
            state: incremental decoding state (causal only). An empty ``DecodeState()`` is
                filled by a call with no past keys (prefill); later calls pass only the new
                queries (Tq = Tk - state.seen) and reuse it. Results equal one full forward.
            query_rows: (n,) strictly increasing rows of the Tq queries (causal, per-query grouping,
                no state): compute only these; every Tq-long field of the output then holds these
                n rows, each equal to the full forward's row. Trains on a subset of rows.
        """
        return self.run(SEACall.build(self.config, (q, k, v), options, self.k_budget))

    def run(self, call: SEACall) -> SEAOutput:
        """``forward`` on a call already built from its arguments."""
        start_sea(self, call)
        return self.with_dense_rows(self.sea_output(call), call)

    def sea_output(self, call: SEACall) -> SEAOutput:
        """SEA on every computed row (the length policy not applied)."""
        grouping = self.grouping
        estimate = self.estimator(call, grouping.estimate_rows(call))
        attended = grouping.run(estimate, call)
        context, gates = self.compose(attended.context, estimate, call)
        return SEAOutput(
            context=context, estimated=estimate.probs, nnz=attended.nnz, attention=attended.attention,
            estimated_logits=estimate.logits, gates=gates, cells=attended.cells, slots=attended.slots,
            lengths=call.asked_lengths, estimate_rows=None if call.query_rows is not None else estimate.rows,
        )

    def context_only(self, q: Tensor, k: Tensor, v: Tensor, **options: Unpack[CallOptions]) -> Tensor:
        """Only the layer's context (B, H, Tq, d): ``forward(q, k, v, **options).context``, computed
        without the (B, H, Tq, K) fields of ``SEAOutput`` where that is defined.

        A call whose rows all attend densely (``dense_until``) and whose state, if any, is
        empty or still dense runs SDPA alone, and such a state keeps its last queries instead of SEA's
        state (``dense_rows.py``); once the state holds SEA's, SEA runs and the short rows (a batch's
        padded samples) are replaced. ``forward`` always runs SEA (a state it fills is SEA's).

        A causal layer on the ``sparse`` path in inference (no autograd, no ``return_attention``,
        no ``query_rows``, no state or an empty one being prefilled) runs the row-chunked path
        (``chunked.py``): the per-position work once, then the estimate, selection and attention a
        span of rows at a time (``query_chunk`` rows per query, 16 blocks for the block grouping),
        so no stage holds a Tq x K tensor. Every other call runs ``forward`` and returns its
        context. All equal the full forward's context to float rounding (``tests/test_chunked.py``,
        ``test_dense_rows.py``).
        """
        from .chunked import chunked_context, chunked_runs  # chunked.py builds on this module

        call = SEACall.build(self.config, (q, k, v), options, self.k_budget)
        if all_dense(call, self.dense_until) and (call.state is None or not call.state.holds_sea):
            return self.dense_call(call)
        start_sea(self, call)
        if not chunked_runs(self, call):
            return self.with_dense_rows(self.sea_output(call), call).context
        return chunked_context(self, call)

    # ------------------------------------------------------------------ the length policy
    def dense_call(self, call: SEACall) -> Tensor:
        """The context of a call whose rows all attend densely; a decoding state keeps its queries."""
        if call.state is not None:  # what start_sea needs: the last queries and the counts
            keep_queries(call.state, call.q, kept_query_rows(self.grouping))
            call.state.count_keys(call.key_valid, finite=call.poisoned is None)
        return self.exact_context(call)

    def exact_context(self, call: SEACall) -> Tensor:
        """(B, H, n, d) the computed rows' exact attention (SDPA), padding rows zeroed, poisoned rows NaN."""
        return self.mask_rows(dense_context(call, self.config.causal), call)

    def with_dense_rows(self, out: SEAOutput, call: SEACall) -> SEAOutput:
        """``out`` with the rows the length policy picks replaced by exact attention (context, nnz
        and the attention view; the estimate and the cells still hold SEA's for them)."""
        rows = dense_rows(call, self.dense_until)  # (B, n)
        if rows is None:
            return out
        nnz = torch.where(rows[:, None, :], call.asked_lengths[:, None, :].to(out.nnz.dtype), out.nnz)
        attention = out.attention
        if attention is not None:
            attention = torch.where(rows[:, None, :, None], dense_probs(call, self.config.causal).to(attention.dtype),
                                    attention)
        return replace(out, context=self.put_dense_rows(out.context, call, rows), nnz=nnz, attention=attention)

    def put_dense_rows(self, context: Tensor, call: SEACall, rows: Tensor | None = None) -> Tensor:
        """``context`` (B, H, n, d) with the rows the length policy picks (``rows`` (B, n), by default
        ``dense_rows``) replaced by their masked exact context."""
        rows = dense_rows(call, self.dense_until) if rows is None else rows
        if rows is None:
            return context
        return torch.where(rows[:, None, :, None], self.dense_rows_context(call, rows).to(context.dtype), context)

    def dense_rows_context(self, call: SEACall, rows: Tensor) -> Tensor:
        """(B, H, n, d) the masked exact context of the computed rows, computed up to the last row
        in ``rows`` (B, n) only (the rest is zero: SEA's rows replace it)."""
        last = int(rows.any(0).nonzero().max()) + 1
        if last < rows.shape[1]:
            head = call.query_rows[:last] if call.query_rows is not None else torch.arange(last, device=rows.device)
            call = replace(call, query_rows=head)
        return F.pad(self.exact_context(call), (0, 0, 0, rows.shape[1] - last))

    def compose(self, context: Tensor, estimate: Estimate, call: SEACall) -> tuple[Tensor, Tensor | None]:
        """The layer's output from the sparse context: gates, decoding state, norm, masks."""
        gates = None
        if self.config.gating:
            gates = gate_values(call.asked(estimate.gate_logits, 2), self.config.gate_form).to(context.dtype)
            context = self.gate(context, gates, call.asked(self.average_values(call), 2))
        if call.state is not None:
            self.advance_state(call)
        return self.finish(context, call), gates

    @staticmethod
    def gate(context: Tensor, gates: Tensor, average: Tensor) -> Tensor:
        """Gated context: mix * scaler * context + (1 - mix) * average, gates (B, H, n, 2)."""
        scaler, mix = gates[..., :1], gates[..., 1:]
        return torch.lerp(average.to(context.dtype), scaler * context, mix)

    def finish(self, context: Tensor, call: SEACall) -> Tensor:
        """The output norm, then padding rows zeroed and poisoned rows NaN (the computed rows)."""
        if self.output_norm is not None:
            context = self._norm_output(context)
        return self.mask_rows(context, call)  # after the norm

    @staticmethod
    def mask_rows(context: Tensor, call: SEACall) -> Tensor:
        """Padding rows zeroed and poisoned rows NaN, of the computed rows."""
        context = context.masked_fill(~call.asked(call.query_valid, 1)[:, None, :, None], 0.0)
        if call.poisoned is not None:
            context = context.masked_fill(call.asked(call.poisoned, 1)[:, None, :, None], float("nan"))
        return context

    def maybe_redraw_features(self, step: int) -> bool:
        """Redraw the Performer features if ``step`` is due (see ``feature_redraw_interval``)."""
        return self.estimator.maybe_redraw_features(step)

    # ------------------------------------------------------------------ helpers
    def average_values(self, call: SEACall) -> Tensor:
        """The average branch: mean of V over each query's valid keys, (B, H, Tq, d)."""
        v, key_valid, state, tq = call.v, call.key_valid, call.state, call.q.shape[2]
        past = state.seen if state is not None else 0  # the past is in the running sum
        masked = v[:, :, past:].float()
        if not bool(key_valid[:, past:].all()):
            masked = masked * key_valid[:, None, past:, None]
        if past:
            sums = state.value_sum.unsqueeze(2) + running_sum(masked)
        elif self.config.causal:
            sums = running_sum(masked)[:, :, v.shape[2] - tq:]  # running sums up to each query
        else:
            sums = masked.sum(2, keepdim=True).expand(-1, -1, tq, -1)
        mean = sums / call.lengths[:, None, :, None].clamp_min(1)
        return repeat_kv(mean, self.config.kv_groups)

    def fill_prefill_state(self, performer: Tensor, call: SEACall) -> None:
        """What a prefill leaves in its empty state besides ``estimator.per_position``'s sums (which
        gave ``performer``, (B, H, Tq, p)): the CNN's history rows and the counts."""
        self.estimator.remember_cnn_rows(performer, call)
        self.advance_state(call)

    def advance_state(self, call: SEACall) -> None:
        """Fold this call's keys into its decoding state (the estimator did its part)."""
        state, new_valid = call.state, call.key_valid[:, call.state.seen:]
        added = (call.v[:, :, state.seen:].float() * new_valid[:, None, :, None]).sum(2)  # (B, H_kv, d)
        state.value_sum = added if not state.seen else state.value_sum + added
        state.count_keys(call.key_valid, finite=call.poisoned is None)

    def _norm_output(self, context: Tensor) -> Tensor:
        """'norm' output mode: LayerNorm over all heads, plus the context itself."""
        bsz, heads, tq, d = context.shape
        flat = context.transpose(1, 2).reshape(bsz, tq, heads * d)
        flat = self.output_norm(flat.to(self.output_norm.weight.dtype)).to(flat.dtype) + flat
        return flat.view(bsz, tq, heads, d).transpose(1, 2)


def running_sum(x: Tensor) -> Tensor:
    """cumsum over T of (B, H, T, d): a scan along the last, contiguous axis is several times
    faster on CPU than along T, even with the two transposed copies."""
    return x.transpose(-1, -2).contiguous().cumsum(-1).transpose(-1, -2)

