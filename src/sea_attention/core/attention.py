"""`SEAAttention`: estimate -> select -> attend -> compose the output."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .blocks import block_dense_mask, block_slots, carry, select_blocks, selecting_rows
from .cells import KeySlots, cells_to_keys, query_lengths
from .config import SEAConfig
from .decoding import DecodeState
from .estimator import AttentionEstimator, Estimate
from .inputs import call_budget, call_scale, validate_inputs, validate_query_rows
from .ops.block_sparse import block_sparse_attention
from .ops.reference import reference_attention, repeat_kv
from .ops.sparse import sparse_attention
from .selection import select_cells


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
    gates: Tensor | None  # (B, H, Tq, 2) sigmoid gates (scale, mix), None when gating is off
    cells: Tensor  # (B, H, Tq, K) bool, the selected cells (block grouping: the block's, in the bins of
    # its selecting row, whose length is not this row's: map them with blocks.block_dense_mask)
    slots: KeySlots | None  # the selected keys, flattened over heads (None with the block grouping)
    lengths: Tensor  # (B, Tq) valid keys of each query's row
    # None: every query row was estimated. Otherwise the (n,) rows that were: with
    # grouping="block" in causal inference (no autograd, no decoding state, no attention view
    # asked for) only the rows that select are, which saves most of the CNN
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

    def __init__(self, config: SEAConfig, layer_idx: int = 0) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.estimator = AttentionEstimator(config, layer_idx)
        width = config.num_heads * config.head_dim
        self.output_norm = nn.LayerNorm(width) if config.output_mode == "norm" else None

    def extra_repr(self) -> str:
        c = self.config
        return (f"heads={c.num_heads}, kv_heads={c.num_kv_heads}, head_dim={c.head_dim}, causal={c.causal}, "
                f"k={c.k}, K={c.estimate_width}, grouping={c.grouping}, path={c.attention_path}")

    def forward(self, q: Tensor, k: Tensor, v: Tensor, *, attention_mask: Tensor | None = None,
                scale: float | None = None, k_budget: int | None = None, positions: Tensor | None = None,
                return_attention: bool = False, state: DecodeState | None = None,
                query_rows: Tensor | None = None) -> SEAOutput:
        """Run SEA attention.

        Args:
            q: queries (B, H, Tq, d). k, v: keys and values (B, H_kv, Tk, d).
            attention_mask: optional (B, Tk) bool, True for real tokens.
            scale: score scale, finite and positive; defaults to 1/sqrt(d).
            k_budget: keys per query per head for this call (dynamic k); defaults to config.k.
                A budget of Tk or more selects every key.
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
        cfg = self.config
        key_valid = validate_inputs(cfg, q, k, v, attention_mask, scale, k_budget, positions, state)
        if query_rows is not None:
            validate_query_rows(cfg, query_rows, q.shape[2], state)
        tq, tk = q.shape[2], k.shape[2]
        budget = call_budget(k_budget, cfg.k, tk)
        scale = call_scale(scale, q.shape[-1])
        query_valid = key_valid[:, tk - tq:]
        q, k, v, poisoned = _finite_inputs(q, k, v, key_valid, query_valid, cfg.causal)
        if state is not None and state.seen:  # lengths from the running count: no pass over the past
            lengths = (state.valid_keys.unsqueeze(-1) + query_valid.long().cumsum(-1)) * query_valid
        else:
            lengths = query_lengths(key_valid, query_valid, cfg.causal)  # (B, Tq)

        rows = query_rows
        if cfg.grouping == "block" and cfg.causal and state is None and not return_attention \
                and not torch.is_grad_enabled():  # inference: only the rows that select need an estimate
            rows = selecting_rows(tk - tq, tq, cfg.query_block, q.device)
        estimate: Estimate = self.estimator(q, k, v, key_valid, query_valid, lengths, scale, positions, state, rows)
        pick = _row_picker(query_rows)  # (.., Tq, ..) -> (.., n, ..) on the asked rows; identity without
        if query_rows is not None:
            context, attention, cells, slots = self._attend_cells(pick(q, 2), k, v, estimate, pick(lengths, 1),
                                                                  key_valid, budget, scale, return_attention)
            nnz = slots.nnz(cfg.num_heads)
        elif cfg.grouping == "block":
            context, attention, cells, nnz = self._attend_blocks(q, k, v, estimate, lengths, key_valid,
                                                                 query_valid, budget, scale, return_attention, state)
            slots = None
        else:
            context, attention, cells, slots = self._attend_cells(q, k, v, estimate, lengths, key_valid, budget,
                                                                  scale, return_attention)
            nnz = slots.nnz(cfg.num_heads)

        gates = None
        if cfg.gating:
            gates = torch.sigmoid(pick(estimate.gate_logits, 2)).to(context.dtype)
            scaler, mix = gates[..., :1], gates[..., 1:]
            average = pick(self._average_values(v, key_valid, lengths, tq, state), 2).to(context.dtype)
            context = torch.lerp(average, scaler * context, mix)  # mix * scaler * context + (1 - mix) * average
        if state is not None:
            self._advance_state(state, v, key_valid)
        if self.output_norm is not None:
            context = self._norm_output(context)
        context = context.masked_fill(~pick(query_valid, 1)[:, None, :, None], 0.0)  # after the norm: no bias leak
        if poisoned is not None:
            context = context.masked_fill(pick(poisoned, 1)[:, None, :, None], float("nan"))
        return SEAOutput(
            context=context, estimated=estimate.probs, nnz=nnz, attention=attention,
            estimated_logits=estimate.logits, gates=gates, cells=cells, slots=slots, lengths=pick(lengths, 1),
            estimate_rows=None if query_rows is not None else estimate.rows,
        )

    def maybe_redraw_features(self, step: int) -> bool:
        """Redraw the Performer features if ``step`` is due (see ``feature_redraw_interval``)."""
        return self.estimator.maybe_redraw_features(step)

    # ------------------------------------------------------------------ helpers
    def _attend_cells(self, q: Tensor, k: Tensor, v: Tensor, estimate: Estimate, lengths: Tensor,
                      key_valid: Tensor, budget: int, scale: float, return_attention: bool):
        """Per-query groupings: select cells, stretch them to keys, attend on those keys."""
        cfg = self.config
        cells = select_cells(estimate.probs, lengths, budget, cfg.grouping, cfg.query_chunk, cfg.sinks,
                             cfg.local_window)
        slots = cells_to_keys(cells, lengths, key_valid, cap=budget, chunk=cfg.query_chunk)
        attention = None
        if self._use_flex(q, k, v, return_attention):
            from .ops.flex import flex_sea_attention  # imported on use: it pulls in torch.compile

            context = flex_sea_attention(q, k, v, cells, lengths, key_valid, cap=budget, scale=scale)
        elif cfg.attention_path == "reference":
            context, probs = reference_attention(q, k, v, slots.dense_mask(cfg.num_heads, k.shape[2]), scale)
            attention = probs if return_attention else None
        else:
            context, slot_probs = sparse_attention(q, k, v, slots, scale, cfg.query_chunk)
            attention = slots.to_dense(slot_probs, cfg.num_heads, k.shape[2]) if return_attention else None
        return context, attention, cells, slots

    def _attend_blocks(self, q: Tensor, k: Tensor, v: Tensor, estimate: Estimate, lengths: Tensor,
                       key_valid: Tensor, query_valid: Tensor, budget: int, scale: float,
                       return_attention: bool, state: DecodeState | None):
        """The ``block`` grouping: select per query block, attend with dense block products."""
        cfg = self.config
        tq = q.shape[2]
        carried = state.block if state is not None and state.seen else None
        selection = select_blocks(estimate.probs, lengths, query_valid, k.shape[2] - tq, budget, cfg.query_block,
                                  cfg.causal, carried, estimate.rows, cfg.sinks, cfg.local_window)
        if state is not None:
            state.block = carry(selection)
        attention = None
        if cfg.attention_path == "reference" or return_attention:
            mask = block_dense_mask(selection, key_valid, budget, cfg.num_heads, tq)
            context, probs = reference_attention(q, k, v, mask, scale)
            attention = probs if return_attention else None
            nnz = mask.sum(-1)
        elif cfg.causal and tq * 4 <= cfg.query_block:  # decoding: a block of rows would be mostly padding
            slots = block_slots(selection, key_valid, budget, cfg.num_heads, tq)
            context, _ = sparse_attention(q, k, v, slots, scale, cfg.query_chunk)
            nnz = slots.nnz(cfg.num_heads)
        else:
            context, nnz = block_sparse_attention(q, k, v, selection, key_valid, scale, budget)
        valid = query_valid[:, None, :]  # padding queries report no keys, as with the other groupings
        return context, attention, selection.per_query_cells(tq) & valid.unsqueeze(-1), nnz * valid

    def _use_flex(self, q: Tensor, k: Tensor, v: Tensor, return_attention: bool) -> bool:
        """FlexAttention runs only where it can: no dense attention view asked for, and no
        backward on CPU (PyTorch's CPU FlexAttention is forward only)."""
        if self.config.attention_path != "flex" or return_attention:
            return False
        needs_grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
        return not (needs_grad and q.device.type == "cpu")

    def _average_values(self, v: Tensor, key_valid: Tensor, lengths: Tensor, tq: int,
                        state: DecodeState | None) -> Tensor:
        """The average branch: mean of V over each query's valid keys, (B, H, Tq, d)."""
        past = state.seen if state is not None else 0  # the past is in the running sum
        masked = v[:, :, past:].float()
        if not bool(key_valid[:, past:].all()):
            masked = masked * key_valid[:, None, past:, None]
        if past:
            sums = state.value_sum.unsqueeze(2) + _running_sum(masked)
        elif self.config.causal:
            sums = _running_sum(masked)[:, :, v.shape[2] - tq:]  # running sums up to each query
        else:
            sums = masked.sum(2, keepdim=True).expand(-1, -1, tq, -1)
        mean = sums / lengths[:, None, :, None].clamp_min(1)
        return repeat_kv(mean, self.config.kv_groups)

    def _advance_state(self, state: DecodeState, v: Tensor, key_valid: Tensor) -> None:
        """Fold this call's keys into the decoding state (the estimator did its part)."""
        new_valid = key_valid[:, state.seen:]
        added = (v[:, :, state.seen:].float() * new_valid[:, None, :, None]).sum(2)  # (B, H_kv, d)
        count = new_valid.long().sum(-1)
        first = not state.seen
        state.value_sum = added if first else state.value_sum + added
        state.valid_keys = count if first else state.valid_keys + count
        state.seen = key_valid.shape[-1]

    def _norm_output(self, context: Tensor) -> Tensor:
        """'norm' output mode: LayerNorm over all heads, plus the context itself."""
        bsz, heads, tq, d = context.shape
        flat = context.transpose(1, 2).reshape(bsz, tq, heads * d)
        flat = self.output_norm(flat.to(self.output_norm.weight.dtype)).to(flat.dtype) + flat
        return flat.view(bsz, tq, heads, d).transpose(1, 2)


def _finite_inputs(q: Tensor, k: Tensor, v: Tensor, key_valid: Tensor, query_valid: Tensor,
                   causal: bool) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Keep non-finite inputs from reaching rows that do not attend to them.

    Products such as ``probs @ v`` or a masked intra-chunk scan multiply every key by a weight,
    and 0 * NaN is NaN: one NaN key would spread to earlier rows, one NaN padding value to
    the whole sample. So when anything is not finite, padding rows and non-finite entries are
    zeroed, and the rows that may attend to a non-finite key or value (causal: from its
    position on; bidirectional: the sample's valid rows), or whose own query is not finite,
    are returned as ``poisoned`` (B, Tq): their outputs become NaN. None when all is finite.
    """
    if bool(torch.isfinite(q).all() & torch.isfinite(k).all() & torch.isfinite(v).all()):
        return q, k, v, None
    tk, tq = k.shape[2], q.shape[2]
    finite_key = (torch.isfinite(k).all(-1) & torch.isfinite(v).all(-1)).all(1)  # (B, Tk)
    bad_key = key_valid & ~finite_key
    if causal:
        reaches = bad_key.long().cumsum(-1)[:, tk - tq:] > 0  # a bad key at or before the query
    else:
        reaches = bad_key.any(-1, keepdim=True).expand(-1, tq)
    poisoned = query_valid & (reaches | ~torch.isfinite(q).all(-1).all(1))
    k = torch.where(torch.isfinite(k) & key_valid[:, None, :, None], k, 0.0)
    v = torch.where(torch.isfinite(v) & key_valid[:, None, :, None], v, 0.0)
    q = torch.where(torch.isfinite(q) & query_valid[:, None, :, None], q, 0.0)
    return q, k, v, poisoned


def _row_picker(rows: Tensor | None):
    """``pick(x, dim)``: x's entries at ``rows`` along dim (x itself when rows is None)."""
    return lambda x, dim: x if rows is None else x.index_select(dim, rows)


def _running_sum(x: Tensor) -> Tensor:
    """cumsum over T of (B, H, T, d): a scan along the last, contiguous axis is several times
    faster on CPU than along T, even with the two transposed copies."""
    return x.transpose(-1, -2).contiguous().cumsum(-1).transpose(-1, -2)

