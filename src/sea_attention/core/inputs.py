"""Checks of `SEAAttention.forward`'s arguments: one small function per rule.

Each rule raises a ``ValueError`` that names the argument and says what is accepted, so a
wrong call fails at the door instead of computing something else further in.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Any

import torch
from torch import Tensor

from .config import SEAConfig
from .decoding import DecodeState


OPTIONS = ("attention_mask", "scale", "k_budget", "positions", "return_attention", "state", "query_rows")


def validate_call(config: SEAConfig, q: Any, k: Any, v: Any, options: dict[str, Any]) -> Tensor:
    """Check every argument of one call (``options``: ``call.CallOptions``); return the (B, Tk) bool key mask."""
    config.validate()  # a config edited after construction is checked where it is used
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise TypeError(f"SEAAttention.forward() got unexpected keyword arguments {unknown}; accepted: {OPTIONS}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        _validate_tensor(name, x)
    _validate_shapes(config, q, k, v)
    _validate_not_empty(q, k)
    state = options.get("state")
    _validate_suffix(config, q, k, state)
    _validate_scale(options.get("scale"))
    validate_budget("k_budget", options.get("k_budget"))
    key_valid = _validate_mask(options.get("attention_mask"), k.shape[0], k.shape[2], k.device)
    _validate_positions(config, options.get("positions"), key_valid)
    if options.get("query_rows") is not None:
        _validate_query_rows(config, options["query_rows"], q.shape[2], state)
    return key_valid


def _validate_tensor(name: str, x: Any) -> None:
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__module__}.{type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name} must have shape (B, heads, T, head_dim), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must have a floating dtype (float32, bfloat16, ...), got {x.dtype}")


def _validate_shapes(config: SEAConfig, q: Tensor, k: Tensor, v: Tensor) -> None:
    if q.shape[1] != config.num_heads:
        raise ValueError(f"q has {q.shape[1]} heads but config.num_heads is {config.num_heads}")
    if k.shape[1] != config.num_kv_heads or v.shape[1] != config.num_kv_heads:
        raise ValueError(
            f"k and v must have num_kv_heads={config.num_kv_heads} heads, got {k.shape[1]} and {v.shape[1]}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.shape[-1] != config.head_dim:
            raise ValueError(f"{name} has head_dim {x.shape[-1]} but config.head_dim is {config.head_dim}")
    if not (q.shape[0] == k.shape[0] == v.shape[0]):
        raise ValueError(f"batch sizes differ: q {q.shape[0]}, k {k.shape[0]}, v {v.shape[0]}")
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"k and v must have the same length, got {k.shape[2]} and {v.shape[2]}")
    if q.shape[2] > k.shape[2]:
        raise ValueError(f"queries ({q.shape[2]}) must not outnumber keys ({k.shape[2]}): queries are the "
                         "last positions of the key sequence")


def _validate_not_empty(q: Tensor, k: Tensor) -> None:
    if q.shape[0] == 0 or q.shape[2] == 0:
        raise ValueError(f"q must hold at least one sample and one query (B >= 1, Tq >= 1), got shape "
                         f"{tuple(q.shape)}")


def _validate_suffix(config: SEAConfig, q: Tensor, k: Tensor, state: DecodeState | None) -> None:
    """A causal query suffix is only defined with the state of the prefix: the estimator's CNN
    reads the earlier rows' inputs, which the suffix alone cannot rebuild."""
    tq, tk = q.shape[2], k.shape[2]
    if state is None:
        if config.causal and tq < tk:
            raise ValueError(
                f"q holds the last {tq} of {tk} positions but no state was given: a causal query suffix needs "
                "the DecodeState carried from the call that consumed the earlier positions (state=...), "
                "or pass the queries of the full sequence")
        return
    if not config.causal:
        raise ValueError("incremental decoding state needs a causal SEA layer (causal=True)")
    if state.seen != tk - tq:
        raise ValueError(
            f"decoding state has seen {state.seen} keys, but this call has {tk} keys and {tq} queries: the "
            "queries must be exactly the keys added since the last call")


def _validate_scale(scale: Any) -> None:
    if scale is None:
        return
    if isinstance(scale, Tensor) and scale.numel() == 1:
        scale = scale.item()
    if isinstance(scale, bool) or not isinstance(scale, Real) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a finite positive number or None (1/sqrt(head_dim)), got {scale!r}")


def validate_budget(name: str, k_budget: Any) -> None:
    """A budget of keys per query per head: a positive integer, or None for the default."""
    if k_budget is not None and (isinstance(k_budget, bool) or not isinstance(k_budget, int) or k_budget < 1):
        raise ValueError(f"{name} must be a positive integer or None, got {k_budget!r}")


def _validate_mask(attention_mask: Any, bsz: int, tk: int, device: torch.device) -> Tensor:
    if attention_mask is None:
        return torch.ones(bsz, tk, dtype=torch.bool, device=device)
    if not isinstance(attention_mask, Tensor):
        raise ValueError(f"attention_mask must be a torch.Tensor or None, got {type(attention_mask).__name__}")
    if attention_mask.shape != (bsz, tk):
        raise ValueError(f"attention_mask must have shape (B, Tk) = {(bsz, tk)} (True for real tokens), "
                         f"got {tuple(attention_mask.shape)}")
    if attention_mask.dtype != torch.bool:
        if attention_mask.is_floating_point() or not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
            raise ValueError("attention_mask must be bool (or 0/1 integers), True for real tokens")
        attention_mask = attention_mask.bool()
    return attention_mask.to(device)


def _validate_positions(config: SEAConfig, positions: Any, key_valid: Tensor) -> None:
    if positions is None:
        return
    if not config.causal:
        raise ValueError("positions only apply to causal models (bidirectional ones use ranks)")
    shape = tuple(key_valid.shape)
    if not isinstance(positions, Tensor) or positions.shape != shape or \
            positions.dtype not in (torch.int32, torch.int64):
        got = f"{tuple(positions.shape)} {positions.dtype}" if isinstance(positions, Tensor) else type(positions).__name__
        raise ValueError(f"positions must be an integer tensor of shape {shape}, got {got}")
    if bool((positions.to(key_valid.device) < 0)[key_valid].any()):
        raise ValueError("positions must be >= 0 at real tokens (padding entries are never read), got "
                         f"{int(positions.min())}")


def _validate_query_rows(config: SEAConfig, query_rows: Any, tq: int, state: DecodeState | None) -> None:
    """``query_rows``: a 1-D integer tensor of strictly increasing rows in [0, Tq), for a causal layer
    with a per-query grouping and no decoding state (the rows' CNN history comes from the full input)."""
    from .grouping import grouping_for  # the grouping says whether it computes row subsets

    if not config.causal or state is not None or not grouping_for(config).computes_row_subsets:
        raise ValueError("query_rows needs a causal SEA layer, grouping 'query' or 'query_head' and no decoding "
                         f"state (got causal={config.causal}, grouping={config.grouping!r}, "
                         f"state={'given' if state is not None else None})")
    if not isinstance(query_rows, Tensor) or query_rows.dim() != 1 or query_rows.dtype != torch.long:
        raise ValueError(f"query_rows must be a 1-D torch.long tensor, got {type(query_rows).__name__}"
                         f"{'' if not isinstance(query_rows, Tensor) else f' {query_rows.dtype} of shape {tuple(query_rows.shape)}'}")
    if query_rows.numel() == 0 or int(query_rows.min()) < 0 or int(query_rows.max()) >= tq \
            or bool((query_rows[1:] <= query_rows[:-1]).any()):
        raise ValueError(f"query_rows must be non-empty, strictly increasing and in [0, {tq}), got "
                         f"{query_rows.tolist()[:8]}{'...' if query_rows.numel() > 8 else ''}")
    if config.block_from and int(query_rows.max()) >= config.block_from:
        raise ValueError(f"query_rows must be below block_from={config.block_from}: later rows run the block "
                         f"grouping, which computes no row subsets (got row {int(query_rows.max())})")
