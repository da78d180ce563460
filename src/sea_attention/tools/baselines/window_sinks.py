"""``window_sinks`` (StreamingLLM, Xiao et al. 2023): the first s keys and the last k - s keys.

Keys are counted among the valid ones (by rank), so left padding changes nothing. A row with at
most k keys sees all of them; any longer row sees exactly k. Defined for causal attention only.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .chunks import QueryChunk

SINKS = 4  # the paper's number of attention-sink tokens


def _check(causal: bool, sinks: int) -> None:
    if not causal:
        raise ValueError("window_sinks is defined for causal attention only (its window is the recent past)")
    if sinks < 0:
        raise ValueError(f"sinks must be a non-negative integer, got {sinks!r}")


def window_sinks_mask(chunk: QueryChunk, k: int, sinks: int = SINKS) -> Tensor:
    """(B, H, C, Tk) bool: keys of rank < s, or among the row's last k - s (s = min(sinks, k))."""
    _check(chunk.causal, sinks)
    sinks = min(sinks, k)
    ranks = chunk.ranks[:, None, None, :]  # (B, 1, 1, Tk)
    recent_from = (chunk.lengths - (k - sinks))[:, None, :, None]  # (B, 1, C, 1)
    keep = (ranks < sinks) | (ranks >= recent_from)
    return (keep & chunk.allowed).expand(-1, chunk.num_heads, -1, -1)


def window_sinks_reference(key_valid: Tensor, num_heads: int, tq: int, k: int, sinks: int = SINKS) -> Tensor:
    """The same selection one row at a time, from the list of keys the row may see."""
    batch, tk = key_valid.shape
    selected = torch.zeros(batch, num_heads, tq, tk, dtype=torch.bool)
    s = min(sinks, k)
    for b in range(batch):
        for i in range(tq):
            position = tk - tq + i
            keys = [j for j in range(position + 1) if key_valid[b, j]]
            chosen = keys if len(keys) <= k else keys[:s] + keys[len(keys) - (k - s):]
            selected[b, :, i, chosen] = True
    return selected
