"""Exact refinement: the estimate proposes candidate keys, their exact scores keep the budget.

With ``SEAConfig.candidates = c > 1`` a grouping selects cells for ``c`` times the
budget (the grouped top-k as usual, so the heads share the candidates as they would share the
keys), stretches them to key slots, scores every candidate exactly, s = scale * q . k, and keeps
the best ``ceil(n_h / c)`` of the ``n_h`` candidates of each (query, head) (``Refinement.kept``;
a row too short to offer c times the budget keeps its budget's share of what it was offered):
every head keeps its share of the grouped budget, chosen by the exact score instead of by the
bin the key lies in.
This is the oracle restricted to the candidates: with all keys as candidates it is the per-head
exact top-k (``naive_refine`` and the tests). Cost per query: ``c * k`` exact dot products per
head on top of the ``k`` the attention reads, linear in the sequence length.

The per-query groupings refine their key slots here (``refine_slots``); the block grouping shares
one candidate list per block and head, and its op keeps each row's best with ``keep_best`` on the
scores it computes anyway (``ops/block_sparse.py``): the candidates cost no extra product there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .blocks import BlockSelection, block_dense_parts
from .cells import KeySlots
from .ops.sparse import candidate_scores
from .selection import ranked


@dataclass(frozen=True)
class Refinement:
    """One call's exact refinement: its cells were selected for ``candidates`` times its ``budget``
    keys per query and head (at most the row's keys), and each (row, head) keeps its share."""

    candidates: int
    budget: int  # keys per query per head (``SEACall.budget``)

    def kept(self, count: Tensor, lengths: Tensor) -> Tensor:
        """THE refinement's share: of ``count`` candidates of one head of a row whose selection was made
        on ``lengths`` keys (both long, broadcast), the fraction min(budget, L) / min(candidates * budget, L)
        of them, rounded up. A row of candidates * budget keys or more keeps ceil(count / candidates); a
        shorter one was offered every key it has, so it keeps its budget's share of them; a row of at most
        ``budget`` keys keeps every candidate, as the unrefined selection attends every key."""
        offered = lengths.clamp_max(self.candidates * self.budget).clamp_min(1)
        return (count * lengths.clamp_max(self.budget) + offered - 1) // offered


@torch.no_grad()  # a selection: no gradient flows through which keys are kept
def refine_slots(q: Tensor, k: Tensor, slots: KeySlots, lengths: Tensor, refinement: Refinement, scale: float,
                 chunk: int = 256) -> KeySlots:
    """Keep the exactly best of each query's ``n_h`` slots of head h, its share ``refinement.kept``.

    q (B, H, Tq, d), k (B, H_kv, Tk, d), slots (B, Tq, S) ordered by head (``cells_to_keys``), lengths
    (B, Tq) the keys of each query's row.
    Returns slots (B, Tq, S') ordered by head, the kept ones first, S' the most any query keeps.
    ``chunk`` queries at a time.
    """
    scores = candidate_scores(q, k, slots, scale, chunk)  # (B, Tq, S), -inf on unused slots
    parts = [_keep_best_per_head(scores[:, lo:lo + chunk], _part(slots, lo, chunk), q.shape[1], refinement,
                                 lengths[:, lo:lo + chunk]) for lo in range(0, scores.shape[1], chunk)]
    width = max(part.width for part in parts)
    return KeySlots(*(torch.cat([_pad(getattr(p, name), width) for p in parts], 1) for name in ("head", "key", "valid")))


def _keep_best_per_head(scores: Tensor, slots: KeySlots, heads: int, refinement: Refinement,
                        lengths: Tensor) -> KeySlots:
    """``refine_slots`` for one chunk of c queries (lengths (B, c)): each head's run of slots padded to
    one width, one top-k."""
    owner = torch.where(slots.valid, slots.head, heads)  # (B, c, S); unused slots: an extra head H
    per_head = torch.zeros(*owner.shape[:2], heads + 1, dtype=torch.long, device=owner.device)
    per_head = per_head.scatter_add_(-1, owner, torch.ones_like(owner))[..., :heads]  # (B, c, H) candidates
    run_start = per_head.cumsum(-1) - per_head  # each head's first slot (slots are ordered by head)
    offsets = torch.arange(max(int(per_head.max()) if per_head.numel() else 0, 1), device=owner.device)
    inside = offsets < per_head.unsqueeze(-1)  # (B, c, H, W)
    index = (run_start.unsqueeze(-1) + offsets).clamp_max(owner.shape[-1] - 1)
    padded = scores.gather(-1, index.flatten(2)).view(index.shape).masked_fill(~inside, float("-inf"))
    keep = refinement.kept(per_head, lengths.unsqueeze(-1))  # (B, c, H)
    best = padded.topk(max(int(keep.max()) if keep.numel() else 0, 1), dim=-1).indices  # (B, c, H, kmax)
    kept = (torch.arange(best.shape[-1], device=owner.device) < keep.unsqueeze(-1)).flatten(2)  # (B, c, H*kmax)
    picked = index.gather(-1, best).flatten(2)  # the kept slots, head-major
    return _compact(slots, picked, kept)


@torch.no_grad()  # a selection: no gradient flows through which keys are kept
def keep_best(scores: Tensor, keep: Tensor) -> Tensor:
    """(..., R, W) bool: each row's ``keep`` highest finite scores, exactly that many (all its finite
    ones where it has fewer). ``keep`` (..., R or 1, 1) broadcasts against the rows."""
    values, index = best_scores(scores, keep)
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, index, values > float("-inf"))


def best_scores(scores: Tensor, keep: Tensor) -> tuple[Tensor, Tensor]:
    """THE kept candidates: each row's ``keep`` highest finite scores of ``scores`` (..., R, W) as
    (values, columns) (..., R, M), highest first, M the most any row keeps; -inf where a row keeps
    fewer (``keep`` (..., R or 1, 1) broadcast, or fewer finite scores). The values carry gradients."""
    most = min(int(keep.max()) if keep.numel() else 0, scores.shape[-1])
    top = scores.topk(most, dim=-1)
    dropped = torch.arange(most, device=scores.device) >= keep  # past the row's share
    return top.values.masked_fill(dropped, float("-inf")), top.indices


def _compact(slots: KeySlots, picked: Tensor, kept: Tensor) -> KeySlots:
    """The slots ``picked[kept]`` moved to the front of each query's row, in order (no sort)."""
    count = kept.sum(-1, keepdim=True)  # (B, c, 1)
    width = max(int(count.max()) if count.numel() else 0, 1)
    place = torch.where(kept, kept.long().cumsum(-1) - 1, width)  # unused: a dump column
    rows = torch.zeros(*kept.shape[:2], width + 1, dtype=torch.long, device=kept.device)
    rows = rows.scatter_(-1, place, picked)[..., :width]  # (B, c, width) slot of each kept entry
    valid = torch.arange(width, device=kept.device) < count
    head = torch.where(valid, slots.head.gather(-1, rows), 0)
    key = torch.where(valid, slots.key.gather(-1, rows), 0)
    return KeySlots(head, key, valid)


def _part(slots: KeySlots, lo: int, chunk: int) -> KeySlots:
    return KeySlots(slots.head[:, lo:lo + chunk], slots.key[:, lo:lo + chunk], slots.valid[:, lo:lo + chunk])


def _pad(x: Tensor, width: int) -> Tensor:
    """(B, c, w) -> (B, c, width), zeros (False) on the right."""
    return torch.nn.functional.pad(x, (0, width - x.shape[-1]))


def naive_refine(q: Tensor, k: Tensor, allowed: Tensor, lengths: Tensor, refinement: Refinement,
                 scale: float) -> Tensor:
    """The refinement of the candidates ``allowed`` (B, H, Tq, Tk) bool as a dense bool mask of the
    same shape, from the dense scores and a full sort: the reference. ``lengths`` (B, Tq): the keys
    each row's selection was made on."""
    heads, compute = q.shape[1], torch.promote_types(q.dtype, torch.float32)
    kv = k.repeat_interleave(heads // k.shape[1], dim=1)
    scores = (q.to(compute) @ kv.to(compute).transpose(-1, -2) * scale).masked_fill(~allowed, float("-inf"))
    keep = refinement.kept(allowed.sum(-1, keepdim=True), lengths[:, None, :, None])  # (B, H, Tq, 1)
    rank = ranked(scores)  # place by score, ties by position
    return allowed & (rank < keep)


def naive_block_refine(q: Tensor, k: Tensor, selection: BlockSelection, key_valid: Tensor, cap: int,
                       refinement: Refinement, scale: float) -> Tensor:
    """The block grouping's refined selection as a dense (B, H, Tq, Tk) bool mask: each row's
    candidates (its block's cell keys) refined by ``naive_refine`` on its block's selecting row's
    length, its tile whole. The reference of ``ops/block_sparse.py``'s refinement (the reference
    path and the tests)."""
    cells, tile = block_dense_parts(selection, key_valid, cap, q.shape[1], q.shape[2])
    lengths = selection.lengths.index_select(1, selection.query_blocks(q.shape[2]))  # (B, Tq)
    refined = naive_refine(q, k, cells, lengths, refinement, scale)
    return refined if tile is None else refined | tile
