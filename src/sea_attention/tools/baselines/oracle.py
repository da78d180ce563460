"""Oracle selections on the true (dense) attention: what the sparsity itself costs.

* ``oracle``: per query, the top H*k probabilities across heads (the grouped oracle of
  ``sea eval``, :func:`sea_attention.tools.evaluate.grouped_oracle_mask`, reused here);
* ``oracle_head``: per query and head, the top k.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..evaluate import grouped_oracle_mask
from .chunks import QueryChunk


def oracle_mask(chunk: QueryChunk, k: int) -> Tensor:
    """(B, H, C, Tk) bool: per query, its top H*min(L, k) dense probabilities across heads."""
    return grouped_oracle_mask(chunk.teacher[1], chunk.allowed, k)


def oracle_head_mask(chunk: QueryChunk, k: int) -> Tensor:
    """(B, H, C, Tk) bool: per query and head, its top min(L, k) dense probabilities."""
    allowed = chunk.everything()
    scores = chunk.teacher[1].masked_fill(~allowed, -1.0)  # never pick a disallowed key
    top = scores.topk(min(k, scores.shape[-1]), dim=-1).indices
    budget = chunk.lengths.clamp_max(k)[:, None, :, None]  # (B, 1, C, 1)
    keep = torch.arange(top.shape[-1], device=top.device) < budget
    return torch.zeros_like(allowed).scatter_(-1, top, keep.expand_as(top)) & allowed


def oracle_head_reference(probs: Tensor, allowed: Tensor, k: int) -> Tensor:
    """The same selection one row at a time: sort each row's allowed keys by probability."""
    batch, heads, tq, tk = probs.shape
    selected = torch.zeros(batch, heads, tq, tk, dtype=torch.bool)
    for b in range(batch):
        for h in range(heads):
            for i in range(tq):
                keys = allowed[b, 0, i].nonzero().flatten().tolist()
                best = sorted(keys, key=lambda j: -float(probs[b, h, i, j]))[:k]
                selected[b, h, i, best] = True
    return selected


def grouped_oracle_reference(probs: Tensor, allowed: Tensor, k: int) -> Tensor:
    """The grouped oracle one row at a time: sort the row's (head, key) pairs by probability."""
    batch, heads, tq, tk = probs.shape
    selected = torch.zeros(batch, heads, tq, tk, dtype=torch.bool)
    for b in range(batch):
        for i in range(tq):
            keys = allowed[b, 0, i].nonzero().flatten().tolist()
            pairs = [(h, j) for h in range(heads) for j in keys]
            best = sorted(pairs, key=lambda pair: -float(probs[b, pair[0], i, pair[1]]))[: heads * min(k, len(keys))]
            for h, j in best:
                selected[b, h, i, j] = True
    return selected
