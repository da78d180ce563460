"""The length policy (``SEAConfig.dense_until``, ``dense_layers``): a query row with few keys, or any row of a
dense layer, attends to all of its keys.

SEA pays for its estimator whatever a row's length, so a short row is cheaper, and exact, when
it attends every key as the dense model does. With ``dense_until = N`` a valid query row with at
most N keys (its length L_i, ``cells.query_lengths``) runs exact softmax attention over them and
its output is the dense model's (no gates, no output norm); longer rows run SEA. The rule is per
row, not per call, so a decoding step and a full forward agree on every row. A layer of
``dense_layers`` applies it with no limit (``EVERY_ROW``): every row is the dense model's.

Here: which rows the rule picks (``dense_rows``), their context through torch's SDPA
(``dense_context``; ``ops/reference.py`` is its reference in the tests) and their probabilities
for the attention view (``dense_probs``); and the decoding state of a sequence whose rows were all
dense so far: it keeps queries (``keep_queries``) instead of SEA's state, which ``start_sea`` builds
when the first longer row comes. ``SEAAttention`` applies the rule.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from .call import SEACall
from .cells import row_keys
from .decoding import DecodeState
from .estimator.decoder import CausalDecoder
from .grouping import Grouping
from .ops.reference import reference_attention

if TYPE_CHECKING:
    from .attention import SEAAttention

# the length limit of a layer that is dense on every row; row lengths are int64 (cells.query_lengths)
EVERY_ROW = torch.iinfo(torch.int64).max


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


@dataclass
class Visible:
    """The keys the computed rows read, cut after the last one any of them sees (causal), and how."""

    k: Tensor  # (B, H_kv, end, d)
    v: Tensor  # (B, H_kv, end, d)
    mask: Tensor | None  # (B, 1, n, end) bool; None: every row sees every key (or is_causal)
    is_causal: bool  # the rows are every position [0, end) and no key is padding

    @classmethod
    def of(cls, call: SEACall, causal: bool) -> "Visible":
        """Padding rows see every key: their output is zeroed later, and a row with no key would be
        NaN in SDPA's backward. A row's keys are ``cells.row_keys``'s, the one rule."""
        rows = call.query_rows
        end = call.k.shape[2]
        if causal:  # no computed row sees a key after the last computed row
            end = call.first + (int(rows[-1]) if rows is not None else call.q.shape[2] - 1) + 1
        k, v, key_valid = call.k[:, :, :end], call.v[:, :, :end], call.key_valid[:, :end]
        count = call.asked_lengths.shape[1]
        if bool(key_valid.all()) and (not causal or count in (1, end)):  # one last row, or every row
            return cls(k, v, None, causal and count > 1)
        seen = row_keys(key_valid, call.asked_lengths) | ~call.asked(call.query_valid, 1)[:, :, None]
        return cls(k, v, seen[:, None], False)


def dense_context(call: SEACall, causal: bool) -> Tensor:
    """(B, H, n, d) exact softmax attention of the computed rows over their allowed keys (SDPA)."""
    q = call.asked(call.q, 2)
    seen = Visible.of(call, causal)
    return F.scaled_dot_product_attention(q, seen.k.to(q.dtype), seen.v.to(q.dtype), attn_mask=seen.mask,
                                          is_causal=seen.is_causal, scale=call.scale, enable_gqa=True)


def dense_probs(call: SEACall, causal: bool) -> Tensor:
    """(B, H, n, Tk) the computed rows' exact probabilities (the attention view; zero off their keys)."""
    q = call.asked(call.q, 2)
    seen = Visible.of(call, causal)
    allowed = row_keys(call.key_valid[:, :seen.k.shape[2]], call.asked_lengths)[:, None]  # padding rows: none
    probs = reference_attention(q, seen.k, seen.v, allowed.expand(-1, q.shape[1], -1, -1), call.scale)[1]
    return F.pad(probs, (0, call.k.shape[2] - seen.k.shape[2]))


def kept_query_rows(grouping: Grouping) -> int:
    """How many of its last queries a dense-so-far state keeps: SEA's state needs the CNN's history
    rows (the rest comes from the keys and values) and, with the block grouping (a layer's ``grouping``),
    the rows back to its open block's selecting row."""
    return CausalDecoder.HISTORY_ROWS + (grouping.config.query_block if grouping.keeps_open_block else 0)


def keep_queries(state: DecodeState, q: Tensor, limit: int) -> None:
    """Add a dense call's queries (B, H, Tq, d) to the state's, keeping the last ``limit`` (a copy:
    not a view that would hold the whole call's queries)."""
    kept = q if state.queries is None else torch.cat([state.queries, q], dim=2)
    state.queries = kept[:, :, -limit:].clone()


def start_sea(sea: "SEAAttention", call: SEACall) -> None:
    """Turn a state that kept queries (every earlier row was dense) into SEA's own, as a SEA prefill of
    the past would have left it, from the cached keys and values and the kept queries (the rows
    before them read nothing the state keeps: zeros stand in for them).

    A per-query grouping's state is the per-position work over the past (Performer features and
    sums, the binned signals' prefix sums: one pass, no estimate) plus the CNN history of the kept
    rows; the block grouping's also holds its open block's selection, so it runs SEA over the past."""
    state = call.state
    if state is None or state.queries is None:
        return
    past, kept = state.seen, state.queries  # kept: (B, H, r, d)
    queries = F.pad(kept, (0, 0, past - kept.shape[2], 0))
    fresh = DecodeState()
    options = {"attention_mask": call.key_valid[:, :past], "scale": call.scale, "k_budget": call.budget,
               "state": fresh, "positions": None if call.positions is None else call.positions[:, :past]}
    prefill = SEACall.build(sea.config, (queries, call.k[:, :, :past], call.v[:, :, :past]), options)
    if not sea.grouping.at(0, past).keeps_open_block:  # the past's rows hold no open block
        performer, _ = sea.estimator.per_position(prefill)
        sea.fill_prefill_state(performer, prefill)
    else:
        sea.sea_output(prefill)  # the output is discarded: only the state is wanted
    for field in fields(DecodeState):
        setattr(state, field.name, getattr(fresh, field.name))
