"""`SEACall`: the facts of one `SEAAttention` call, derived once and handed to every stage.

``SEAAttention.forward(q, k, v, **options)`` validates its options (``inputs.py``), then
builds one ``SEACall``; the estimator, the grouping's selection and its attention all read
it instead of a dozen loose arguments.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypedDict

import torch
from torch import Tensor

from .cells import query_lengths
from .config import SEAConfig
from .decoding import DecodeState
from .inputs import validate_call


class CallOptions(TypedDict, total=False):
    """The keyword options of ``SEAAttention.forward`` (see its docstring)."""

    attention_mask: Tensor | None  # (B, Tk) bool, True for real tokens
    scale: float | None  # score scale; 1/sqrt(d) by default
    k_budget: int | None  # keys per query per head for this call; the layer's budget by default
    positions: Tensor | None  # (B, Tk) rows of the learned positional table (causal)
    return_attention: bool  # also return the sparse probabilities as a (B, H, Tq, Tk) view
    state: DecodeState | None  # incremental decoding state (causal)
    query_rows: Tensor | None  # (n,) compute only these query rows (causal, per-query grouping)


@dataclass
class SEACall:
    """One call's inputs and everything derived from them (queries are the last Tq keys)."""

    q: Tensor  # (B, H, Tq, d), non-finite entries of unused rows zeroed
    k: Tensor  # (B, H_kv, Tk, d)
    v: Tensor  # (B, H_kv, Tk, d)
    key_valid: Tensor  # (B, Tk) bool
    query_valid: Tensor  # (B, Tq) bool
    lengths: Tensor  # (B, Tq) valid keys each query's row may attend to, 0 for padding queries
    budget: int  # keys per query per head, capped at Tk
    scale: float
    positions: Tensor | None = None
    state: DecodeState | None = None
    return_attention: bool = False
    query_rows: Tensor | None = None  # (n,) the only rows computed; None: all Tq
    poisoned: Tensor | None = None  # (B, Tq) rows that may read a non-finite input: their output is NaN

    @classmethod
    def build(cls, config: SEAConfig, qkv: tuple[Tensor, Tensor, Tensor], options: CallOptions,
              default_budget: int | None = None) -> "SEACall":
        """Validate ``options`` against the config and derive the call's facts.

        ``default_budget`` is the layer's budget for calls that pass no ``k_budget``
        (``None``: ``config.k``).
        """
        q, k, v = qkv
        key_valid = validate_call(config, q, k, v, options)
        tq, tk = q.shape[2], k.shape[2]
        query_valid = key_valid[:, tk - tq:]
        state = options.get("state")
        checked_from = state.seen if state is not None and state.finite_past else 0  # the rest was checked
        q, k, v, poisoned = _finite_inputs(q, k, v, key_valid, config.causal, checked_from)
        if state is not None and state.seen:  # lengths from the running count: no pass over the past
            lengths = (state.valid_keys.unsqueeze(-1) + query_valid.long().cumsum(-1)) * query_valid
        else:
            lengths = query_lengths(key_valid, query_valid, config.causal)
        budget = options.get("k_budget")
        budget = (config.k if default_budget is None else default_budget) if budget is None else budget
        scale = options.get("scale")
        return cls(q, k, v, key_valid, query_valid, lengths, min(budget, tk),
                   q.shape[-1] ** -0.5 if scale is None else float(scale), options.get("positions"), state,
                   bool(options.get("return_attention", False)), options.get("query_rows"), poisoned)

    @property
    def first(self) -> int:
        """Key position of the first query (Tk - Tq): the keys before it come from the past."""
        return self.k.shape[2] - self.q.shape[2]

    def asked(self, x: Tensor, dim: int) -> Tensor:
        """x's entries at the computed rows along ``dim`` (x itself when every row is computed)."""
        return x if self.query_rows is None else x.index_select(dim, self.query_rows)

    @property
    def asked_lengths(self) -> Tensor:
        """(B, n) the lengths of the computed rows."""
        return self.asked(self.lengths, 1)


def _all_finite(x: Tensor) -> bool:
    """Whether every entry of ``x`` is finite, screened by one sum: a sum is finite only if every
    term is (an inf or NaN term makes it inf or NaN). A sum that overflows, though every entry is
    finite, falls back to the elementwise check."""
    return bool(torch.isfinite(x.sum(dtype=torch.float32))) or bool(torch.isfinite(x).all())


def _finite_inputs(q: Tensor, k: Tensor, v: Tensor, key_valid: Tensor, causal: bool,
                   checked_from: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Keep non-finite inputs from reaching rows that do not attend to them.

    Products such as ``probs @ v`` or a masked intra-chunk scan multiply every key by a weight,
    and 0 * NaN is NaN: one NaN key would spread to earlier rows, one NaN padding value to
    the whole sample. So when anything is not finite, padding rows and non-finite entries are
    zeroed, and the rows that may attend to a non-finite key or value (causal: from its
    position on; bidirectional: the sample's valid rows), or whose own query is not finite,
    are returned as ``poisoned`` (B, Tq): their outputs become NaN. None when all is finite.
    Keys and values before ``checked_from`` are known to be finite (a decoding state's past), so
    a decoding step reads only its new ones.
    """
    new_k, new_v = k[:, :, checked_from:], v[:, :, checked_from:]
    if all(_all_finite(x) for x in (q, new_k, new_v)):
        return q, k, v, None
    tk, tq = k.shape[2], q.shape[2]
    query_valid = key_valid[:, tk - tq:]
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
