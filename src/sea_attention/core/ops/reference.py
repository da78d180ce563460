"""Dense masked softmax attention: the simple oracle every other op is tested against."""

from __future__ import annotations

import torch
from torch import Tensor


def repeat_kv(x: Tensor, groups: int) -> Tensor:
    """(B, H_kv, T, d) -> (B, H_kv * groups, T, d); query head h reads kv head h // groups."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def reference_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Softmax attention restricted to ``mask``; builds the full Tq x Tk score matrix.

    q (B, H, Tq, d), k and v (B, H_kv, Tk, d), mask (B, H, Tq, Tk) bool (True = attend).
    Returns the context (B, H, Tq, d) in q's dtype and the probabilities (B, H, Tq, Tk)
    in fp32 (or fp64). Rows with no selected key give a zero context.
    """
    groups = q.shape[1] // k.shape[1]
    compute = torch.promote_types(q.dtype, torch.float32)
    k, v = repeat_kv(k, groups).to(compute), repeat_kv(v, groups).to(compute)
    scores = (q.to(compute) @ k.transpose(-1, -2)) * scale  # (B, H, Tq, Tk)
    # a finite fill keeps empty rows NaN-free in forward and backward
    scores = scores.masked_fill(~mask, torch.finfo(compute).min)
    probs = torch.softmax(scores, dim=-1).masked_fill(~mask, 0.0)
    return (probs @ v).to(q.dtype), probs


def allowed_keys(key_valid: Tensor, tq: int, causal: bool) -> Tensor:
    """(B, 1, Tq, Tk) bool: which keys each query may see (padding, and causality when
    causal; queries are the last Tq positions)."""
    tk = key_valid.shape[-1]
    allowed = key_valid[:, None, None, :].expand(-1, 1, tq, tk)
    if causal:
        allowed = allowed & torch.ones(tq, tk, dtype=torch.bool, device=key_valid.device).tril(tk - tq)
    return allowed


def exact_attention(q: Tensor, k: Tensor, v: Tensor, key_valid: Tensor, scale: float,
                    causal: bool) -> tuple[Tensor, Tensor]:
    """Plain softmax attention (the teacher's): context (B, H, Tq, d) and probabilities (B, H, Tq, Tk)."""
    mask = allowed_keys(key_valid, q.shape[2], causal).expand(-1, q.shape[1], -1, -1)
    return reference_attention(q, k, v, mask, scale)
