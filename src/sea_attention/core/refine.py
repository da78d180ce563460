"""Exact refinement: the estimate proposes candidate keys, their exact scores keep the budget.

With ``SEAConfig.candidates = c > 1`` a per-query grouping selects cells for ``c`` times the
budget (the grouped top-k as usual, so the heads share the candidates as they would share the
keys), stretches them to key slots, scores every candidate exactly, s = scale * q . k, and keeps
the best ``ceil(n_h / c)`` of the ``n_h`` candidates of each (query, head): every head keeps its
share of the grouped budget, chosen by the exact score instead of by the bin the key lies in.
This is the oracle restricted to the candidates: with all keys as candidates it is the per-head
exact top-k (``naive_refine`` and the tests). Cost per query: ``c * k`` exact dot products per
head on top of the ``k`` the attention reads, linear in the sequence length.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .cells import KeySlots
from .ops.sparse import candidate_scores


@torch.no_grad()  # a selection: no gradient flows through which keys are kept
def refine_slots(q: Tensor, k: Tensor, slots: KeySlots, candidates: int, scale: float, chunk: int = 64) -> KeySlots:
    """Keep the exactly best ``ceil(n_h / candidates)`` slots of each query's ``n_h`` slots of head h.

    q (B, H, Tq, d), k (B, H_kv, Tk, d), slots (B, Tq, S) ordered by head. Returns slots
    (B, Tq, S') ordered by head, S' the most slots any query keeps.
    """
    scores = candidate_scores(q, k, slots, scale, chunk)  # (B, Tq, S), -inf on unused slots
    heads = q.shape[1]
    owner = torch.where(slots.valid, slots.head, heads)  # (B, Tq, S); unused slots: an extra head H
    # best first inside each head's run: sort by score, then (stably) by head
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    order = order.gather(-1, torch.sort(owner.gather(-1, order), dim=-1, stable=True).indices)
    owner_sorted = owner.gather(-1, order)
    per_head = torch.zeros(*owner.shape[:2], heads + 1, dtype=torch.long, device=owner.device)
    per_head.scatter_add_(-1, owner, torch.ones_like(owner))  # (B, Tq, H + 1) candidates per head
    run_start = per_head.cumsum(-1) - per_head
    rank = torch.arange(owner.shape[-1], device=owner.device) - run_start.gather(-1, owner_sorted)
    keep_count = (per_head + candidates - 1) // candidates  # ceil(n_h / c)
    keep = (rank < keep_count.gather(-1, owner_sorted)) & (owner_sorted < heads)
    return _compact(slots, order, keep, owner_sorted, heads)


def _compact(slots: KeySlots, order: Tensor, keep: Tensor, owner: Tensor, heads: int) -> KeySlots:
    """The kept slots (in ``order``), moved to the front and still ordered by head."""
    owner = torch.where(keep, owner, heads)
    front = torch.sort(owner, dim=-1, stable=True).indices  # kept slots first, by head
    width = max(int(keep.sum(-1).max()) if keep.numel() else 0, 1)
    picked = order.gather(-1, front)[..., :width]
    valid = keep.gather(-1, front)[..., :width]
    head = torch.where(valid, slots.head.gather(-1, picked), 0)
    key = torch.where(valid, slots.key.gather(-1, picked), 0)
    return KeySlots(head, key, valid)


def naive_refine(q: Tensor, k: Tensor, slots: KeySlots, candidates: int, scale: float) -> Tensor:
    """The refinement as a dense (B, H, Tq, Tk) bool mask, from the dense scores: the reference."""
    heads, keys = q.shape[1], k.shape[2]
    allowed = slots.dense_mask(heads, keys)  # (B, H, Tq, Tk)
    kv = k.repeat_interleave(heads // k.shape[1], dim=1)
    scores = (q.float() @ kv.float().transpose(-1, -2) * scale).masked_fill(~allowed, float("-inf"))
    count = allowed.sum(-1, keepdim=True)  # (B, H, Tq, 1)
    keep = (count + candidates - 1) // candidates
    rank = torch.argsort(torch.argsort(scores, dim=-1, descending=True, stable=True), dim=-1)  # place by score
    return allowed & (rank < keep)
