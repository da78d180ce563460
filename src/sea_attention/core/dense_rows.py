"""The length policy (``SEAConfig.dense_until``): a query row with few keys attends to all of them.

SEA pays for its estimator whatever a row's length, so a short row is cheaper, and exact, when
it attends every key as the dense model does. With ``dense_until = N`` a valid query row with at
most N keys (its length L_i, ``cells.query_lengths``) runs exact softmax attention over them and
its output is the dense model's (no gates, no output norm); longer rows run SEA. The rule is per
row, not per call, so a decoding step and a full forward agree on every row.

Here: which rows the rule picks (``dense_rows``), their context through torch's SDPA
(``dense_context``; ``ops/reference.py`` is its reference in the tests) and their probabilities
for the attention view (``dense_probs``); and the decoding state of a sequence whose rows were all
dense so far: it keeps queries (``keep_queries``) instead of SEA's state, which ``start_sea`` builds
when the first longer row comes. ``SEAAttention`` applies the rule.
"""

from __future__ import annotations

from dataclasses import fields
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from .call import SEACall
from .config import SEAConfig
from .decoding import DecodeState, GrowingRows
from .estimator.decoder import CausalDecoder
from .grouping import grouping_for
from .ops.reference import reference_attention

if TYPE_CHECKING:
    from .attention import SEAAttention


def dense_rows(call: SEACall, until: int) -> Tensor | None:
    """(B, n) bool: the computed rows that attend densely (valid, at most ``until`` keys); None
    when there are none (``until = 0``: the policy is off)."""
    if not until:
        return None
    rows = call.asked(call.query_valid & (call.lengths <= until), 1)
    return rows if bool(rows.any()) else None


def all_dense(call: SEACall, until: int) -> bool:
    """Whether every valid computed row attends densely (padding rows count as dense: they are zeroed)."""
    return bool(until) and bool((call.asked_lengths <= until).all())


def _row_positions(call: SEACall) -> Tensor:
    """(n,) the key position of each computed query row."""
    if call.query_rows is not None:
        return call.first + call.query_rows
    return torch.arange(call.first, call.k.shape[2], device=call.q.device)


def _allowed(call: SEACall, causal: bool) -> Tensor | None:
    """(B, 1, n, Tk) bool, the keys each computed row may see; padding rows see every key (their
    output is zeroed later, and a row with no key would be NaN in SDPA's backward). None when
    every row sees every key."""
    positions = _row_positions(call)
    if bool(call.key_valid.all()) and (not causal or positions.numel() == 1 and call.query_rows is None):
        return None
    keys = torch.arange(call.k.shape[2], device=call.k.device)
    allowed = call.key_valid[:, None, None, :] & (keys <= positions[:, None] if causal else True)
    return allowed | ~call.asked(call.query_valid, 1)[:, None, :, None]


def dense_context(call: SEACall, causal: bool) -> Tensor:
    """(B, H, n, d) exact softmax attention of the computed rows over their allowed keys (SDPA)."""
    q = call.asked(call.q, 2)
    whole = causal and call.query_rows is None and q.shape[2] == call.k.shape[2] and bool(call.key_valid.all())
    mask = None if whole else _allowed(call, causal)
    return F.scaled_dot_product_attention(q, call.k.to(q.dtype), call.v.to(q.dtype), attn_mask=mask,
                                          is_causal=whole, scale=call.scale, enable_gqa=True)


def dense_probs(call: SEACall, causal: bool) -> Tensor:
    """(B, H, n, Tk) the computed rows' exact probabilities (the attention view; zero off their keys)."""
    q = call.asked(call.q, 2)
    allowed = _allowed(call, causal)
    if allowed is None:
        allowed = call.key_valid.new_ones(1, 1, q.shape[2], call.k.shape[2])
    allowed = allowed & call.asked(call.query_valid, 1)[:, None, :, None]
    return reference_attention(q, call.k, call.v, allowed.expand(-1, q.shape[1], -1, -1), call.scale)[1]


def kept_query_rows(config: SEAConfig) -> int | None:
    """How many of its last queries a dense-so-far state keeps: a per-query grouping's SEA state needs
    only the CNN's history rows (the rest of it comes from the keys and values); the block grouping's
    needs the selection of its open block, so it keeps every query (None)."""
    return CausalDecoder.HISTORY_ROWS if grouping_for(config).computes_row_subsets else None


def keep_queries(state: DecodeState, q: Tensor, limit: int | None) -> None:
    """Add a dense call's queries (B, H, Tq, d) to the state's, keeping the last ``limit`` (None: all)."""
    if state.queries is None:
        state.queries = GrowingRows.of(q if limit is None else q[:, :, -limit:], dim=2)
    elif limit is None:
        state.queries.append(q)
    else:
        state.queries = GrowingRows.of(torch.cat([state.queries.rows, q], dim=2)[:, :, -limit:], dim=2)


def start_sea(sea: "SEAAttention", call: SEACall) -> None:
    """Turn a state that kept queries (every earlier row was dense) into SEA's own, as a SEA prefill of
    the past would have left it. With only the last queries kept, the per-position work over the past
    keys (Performer and prefix sums), the CNN history of those rows and the counts fill it; with every
    query kept, one SEA prefill of them does."""
    state = call.state
    if state is None or state.queries is None:
        return
    past, kept = state.seen, state.queries.rows  # kept: (B, H, r, d)
    queries = kept
    if kept.shape[2] < past:  # the rows before the kept ones read nothing the state keeps: zeros
        queries = F.pad(kept, (0, 0, past - kept.shape[2], 0))
    fresh = DecodeState()
    options = {"attention_mask": call.key_valid[:, :past], "scale": call.scale, "k_budget": call.budget,
               "state": fresh, "positions": None if call.positions is None else call.positions[:, :past]}
    prefill = SEACall.build(sea.config, (queries, call.k[:, :, :past], call.v[:, :, :past]), options)
    if kept.shape[2] < past:
        performer, _ = sea.estimator.per_position(prefill)
        sea.estimator.remember_cnn_rows(performer, prefill)
        sea.advance_state(prefill)
    else:
        sea.sea_output(prefill)  # the output is discarded: only the state is wanted
    for field in fields(DecodeState):
        setattr(state, field.name, getattr(fresh, field.name))
