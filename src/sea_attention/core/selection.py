"""Grouped top-k: which cells of the compressed estimate each query attends to.

Budgets are counted in cells and chosen so that, once cells are stretched to keys
(``cells.py``), a query attends to about ``k`` keys per head:

* ``K_eff = min(K, L)`` live cells per head, each holding about ``L / K_eff`` keys, of
  which at most ``cap = k`` are used;
* a group of ``h`` heads gets ``round(h * k * K_eff / min(L, k * K_eff))`` cells, at least
  1 and at most all ``h * K_eff`` live cells;
* forced sink and window bins are taken first and count whole, the budget grown to hold them;
  with ``forced_keys`` (``query_budget``) rows longer than k take the forced cells on top of the
  estimate's cells for the other ``k - sinks - window`` keys.

So rows with L <= k are exact (every key), and every valid query gets at least one key.
Ties are broken by position (a stable sort), so a larger budget selects a superset. Scores
are compared exactly as computed, so a near-tie follows the estimate's last bits: the estimator
makes those independent of the batch, not of padding (docs/architecture.md, "Batch composition").
"""

from __future__ import annotations

import torch
from torch import Tensor

from .cells import forced_cells, forced_counts, live_cells

FORCED = 2.0  # score of a forced cell: above every probability, so the top-k takes it first


def cell_budget(lengths: Tensor, k: int, width: int, heads: int) -> Tensor:
    """Cells a group of ``heads`` heads of one query may select: (...,) -> (...,) long."""
    k_eff = lengths.clamp_max(width)
    numerator = heads * k * k_eff
    denominator = torch.minimum(lengths, k * k_eff).clamp_min(1)
    budget = (2 * numerator + denominator) // (2 * denominator)  # round half up, in integers
    budget = torch.minimum(budget.clamp_min(1), heads * k_eff)
    return torch.where(lengths > 0, budget, 0)


def query_budget(lengths: Tensor, k: int, width: int, heads: int, forced: tuple[int, int] = (0, 0),
                 forced_keys: bool = False) -> tuple[Tensor, Tensor | None]:
    """Cells a group of ``heads`` heads of one query selects, (...,) long, and its forced cells
    (..., K) bool (None without ``forced``, ``cells.forced_counts``). By default the forced cells count
    whole: ``cell_budget``, grown to hold them. With ``forced_keys``, in a row of more than k keys, the
    forced cells (they cover the sink and window keys only, ``cells.cell_range``) on top of the
    estimate's ``cell_budget`` for the other k - sinks - window keys; a shorter row selects every cell."""
    if not any(forced):
        return cell_budget(lengths, k, width, heads), None
    must = forced_cells(lengths, width, *forced)
    if not forced_keys:
        return torch.maximum(cell_budget(lengths, k, width, heads), must.sum(-1) * heads), must
    budget = cell_budget(lengths, k - sum(forced), width, heads) + must.sum(-1) * heads
    everything = heads * lengths.clamp_max(width)
    return torch.where(lengths > k, torch.minimum(budget, everything), everything), must


def max_keys_per_query(lengths: Tensor, k: int, width: int, heads: int, grouping: str = "query",
                       forced: tuple[int, int] = (0, 0)) -> Tensor:
    """Upper bound on the keys one query selects over all heads (groupings ``query``, ``query_head``):
    the estimate's cells, each at most k - sinks - window keys, and every head's forced keys."""
    rest = k - sum(forced)
    k_eff = lengths.clamp_max(width).clamp_min(1)
    longest_cell = ((lengths + k_eff - 1) // k_eff).clamp_max(rest)
    if grouping == "query_head":
        bound = heads * (cell_budget(lengths, rest, width, 1) * longest_cell + sum(forced))
    else:
        bound = cell_budget(lengths, rest, width, heads) * longest_cell + heads * sum(forced)
    return torch.where(lengths > k, bound, heads * lengths) if any(forced) else bound  # rows of <= k keys: all


def ranked(scores: Tensor) -> Tensor:
    """Rank of every element along the last axis, best first, ties by position."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(scores.shape[-1], device=scores.device).expand_as(order))
    return ranks


def _top_budget(scores: Tensor, budget: Tensor) -> Tensor:
    """The ``budget`` best elements of every row: scores (..., W), budget (...) -> (..., W) bool.

    Exactly ``ranked(scores) < budget[..., None]`` (best first, ties by position), without
    sorting the rows: t, the budget-th largest value (``topk``), splits a row into the
    elements above t, all taken, and those equal to t, taken by position while the budget
    lasts. A row whose ties at t overflow its budget is the only one that needs a cumsum.
    """
    most = min(int(budget.max()) if budget.numel() else 0, scores.shape[-1])
    if most <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    top = scores.topk(most, dim=-1).values  # (..., most), descending
    threshold = top.gather(-1, (budget - 1).clamp(0, most - 1).unsqueeze(-1))
    threshold = threshold.masked_fill((budget <= 0).unsqueeze(-1), float("inf"))  # budget 0: nothing
    picked = scores >= threshold
    overflow = picked.sum(-1, dtype=torch.int32) > budget  # ties at the threshold exceed the budget
    if bool(overflow.any()):
        rows = overflow.nonzero(as_tuple=True)
        row, t = scores[rows], threshold[rows]
        above, tied = row > t, row == t
        room = budget[rows].unsqueeze(-1) - above.sum(-1, keepdim=True)
        picked[rows] = above | (tied & (tied.cumsum(-1) <= room))
    return picked


def _masked_scores(estimate: Tensor, lengths: Tensor) -> Tensor:
    """Probabilities with dead bins and padding queries pushed below every real cell."""
    live = live_cells(lengths, estimate.shape[-1]).unsqueeze(1)  # (B, 1, Tq, K)
    return torch.where(live, estimate.float(), -1.0)


def select_cells(estimate: Tensor, lengths: Tensor, k: int, grouping: str, chunk: int = 256,
                 sinks: int = 0, window: int = 0, forced_keys: bool = False) -> Tensor:
    """Grouped top-k on the estimate (B, H, Tq, K): the selected cells as a bool tensor.

    ``lengths`` (B, Tq) holds each query's valid key count (0 for padding queries).
    Groupings: ``query`` (one query over all heads), ``query_head`` (one query and head),
    ``sample`` (one sample), ``head`` (one sample and head). With ``sinks`` or ``window``
    (``query`` and ``query_head`` only), every head first takes the bins of the row's first
    ``sinks`` and last ``window`` keys, each capped at k // 4 keys so that small budgets stay
    sparse (``cells.forced_counts``). They count whole against the budget, which grows to hold them
    (``query_budget``); with ``forced_keys`` such a cell stands for its forced keys only
    (``cells.cell_range``) and the estimate selects cells for the other k - sinks - window keys.
    """
    if grouping in ("query", "query_head"):
        forced = forced_counts(k, sinks, window)
        out = torch.empty(estimate.shape, dtype=torch.bool, device=estimate.device)
        for lo in range(0, estimate.shape[2], chunk):
            out[:, :, lo:lo + chunk] = _select_rows(estimate[:, :, lo:lo + chunk].detach(), lengths[:, lo:lo + chunk],
                                                    k, grouping == "query", forced, forced_keys)
        return out
    if sinks or window:
        raise ValueError(f"sinks and window apply to the groupings 'query' and 'query_head', not {grouping!r}")
    return _select_whole(estimate, lengths, k, grouping)


def _select_rows(part: Tensor, lengths: Tensor, k: int, across_heads: bool, forced: tuple[int, int],
                 forced_keys: bool) -> Tensor:
    """``query`` / ``query_head`` selection of a chunk of rows (B, H, c, K), forced bins first."""
    bsz, heads, rows, width = part.shape
    group_heads = heads if across_heads else 1
    budget, must = query_budget(lengths, k, width, group_heads, forced, forced_keys)  # (B, c), (B, c, K) or None
    # only rows with 0 < L < K have dead bins; padding rows (L = 0) get no budget at all
    part = _masked_scores(part, lengths) if bool(((lengths > 0) & (lengths < width)).any()) else part.float()
    if must is not None:  # the forced cells first
        part = part.masked_fill(must.unsqueeze(1), FORCED)
    if not across_heads:
        return _top_budget(part, budget[:, None].expand(-1, heads, -1))
    flat = part.permute(0, 2, 1, 3).reshape(bsz, rows, heads * width)
    return _top_budget(flat, budget).view(bsz, rows, heads, width).permute(0, 2, 1, 3)


def _select_whole(estimate: Tensor, lengths: Tensor, k: int, grouping: str) -> Tensor:
    """``sample`` / ``head`` selection: one budget per sample (or sample and head), plus each
    valid query's best cell so that no query is left empty."""
    bsz, heads, _, width = estimate.shape
    scores = _masked_scores(estimate.detach(), lengths)
    if grouping == "sample":
        budget = cell_budget(lengths, k, width, heads).sum(-1)  # (B,)
        picked = (ranked(scores.reshape(bsz, -1)) < budget[:, None]).view_as(scores)
    elif grouping == "head":
        budget = cell_budget(lengths, k, width, 1).sum(-1)  # (B,)
        picked = (ranked(scores.reshape(bsz, heads, -1)) < budget[:, None, None]).view_as(scores)
    else:
        raise ValueError(f"grouping must be one of ('query', 'query_head', 'sample', 'head'), got {grouping!r}")
    return picked | _best_cell_per_query(scores, lengths)


def _best_cell_per_query(scores: Tensor, lengths: Tensor) -> Tensor:
    """Each valid query's single best cell over all heads, so no query is left empty."""
    bsz, heads, tq, width = scores.shape
    flat = scores.permute(0, 2, 1, 3).reshape(bsz, tq, heads * width)
    best = torch.zeros_like(flat, dtype=torch.bool)
    best.scatter_(-1, flat.argmax(-1, keepdim=True), True)
    best &= (lengths > 0).unsqueeze(-1)
    return best.view(bsz, tq, heads, width).permute(0, 2, 1, 3)
