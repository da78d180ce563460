"""``quest`` (Tang et al., ICML 2024): query-aware selection of key pages.

The valid keys are cut into pages of P consecutive keys (by rank, so padding changes nothing).
Per page and KV head the elementwise min and max of its keys bound any key's score:
``q . key <= sum_d max(q_d min_d, q_d max_d)``. Each query and head keeps its own page (the
keys of it that it may see) and the ``k // P - 1`` other visible pages with the highest bound,
so at most k keys. Rows with at most k keys are dense. Causal: only earlier pages compete.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...core.ops.reference import repeat_kv
from .chunks import QueryChunk

PAGE_SIZE = 16  # the paper's page size


def check_budget(k: int, page_size: int = PAGE_SIZE) -> None:
    """ValueError unless quest can run at budget ``k`` (at least one page)."""
    if page_size < 1:
        raise ValueError(f"page_size must be a positive integer, got {page_size!r}")
    if k < page_size:
        raise ValueError(f"quest needs k >= page_size (a page is its unit of selection), got k={k}, "
                         f"page_size={page_size}")


def key_pages(ranks: Tensor, key_valid: Tensor, page_size: int, num_pages: int) -> Tensor:
    """(B, Tk) long: the page of every valid key; padding keys go to the extra page ``num_pages``."""
    return torch.where(key_valid, ranks // page_size, num_pages)


def page_bounds(key: Tensor, pages: Tensor, num_pages: int) -> tuple[Tensor, Tensor]:
    """Elementwise min and max of each page's keys: (B, H_kv, num_pages, d) each (+-inf if empty)."""
    batch, kv_heads, _, dim = key.shape
    index = pages[:, None, :, None].expand(-1, kv_heads, -1, dim)
    shape = (batch, kv_heads, num_pages + 1, dim)
    lower = key.new_full(shape, float("inf")).scatter_reduce(2, index, key, "amin")
    upper = key.new_full(shape, float("-inf")).scatter_reduce(2, index, key, "amax")
    return lower[:, :, :num_pages], upper[:, :, :num_pages]


def page_scores(query: Tensor, lower: Tensor, upper: Tensor) -> Tensor:
    """(B, H, C, pages): sum_d max(q_d min_d, q_d max_d), as two products (q_d >= 0 takes max_d)."""
    groups = query.shape[1] // lower.shape[1]
    lower, upper = repeat_kv(lower, groups), repeat_kv(upper, groups)
    return query.clamp_min(0) @ upper.transpose(-1, -2) + query.clamp_max(0) @ lower.transpose(-1, -2)


def quest_mask(chunk: QueryChunk, k: int, page_size: int = PAGE_SIZE) -> Tensor:
    """(B, H, C, Tk) bool: the row's own page and its top ``k // P - 1`` other visible pages."""
    check_budget(k, page_size)
    tk = chunk.key.shape[2]
    num_pages = -(-tk // page_size)
    pages = key_pages(chunk.ranks, chunk.key_valid, page_size, num_pages)  # (B, Tk)
    lower, upper = page_bounds(chunk.key.float(), pages, num_pages)
    own = (chunk.ranks[:, chunk.positions].clamp_min(0) // page_size)[:, None, :, None]  # (B, 1, C, 1)
    page_ids = torch.arange(num_pages, device=pages.device)
    if chunk.causal:
        candidate = page_ids < own  # earlier pages: every key of them is visible
    else:
        filled = -(-chunk.key_valid.sum(-1) // page_size)[:, None, None, None]  # pages holding valid keys
        candidate = (page_ids != own) & (page_ids < filled)
    scores = page_scores(chunk.query.float(), lower, upper).masked_fill(~candidate, float("-inf"))
    count = min(k // page_size - 1, num_pages)
    top = scores.topk(count, dim=-1)
    chosen = torch.zeros(*scores.shape[:-1], num_pages + 1, dtype=torch.bool, device=scores.device)
    chosen.scatter_(-1, top.indices, top.values > float("-inf"))  # fewer candidates than pages: keep only real ones
    index = pages[:, None, None, :].expand(-1, chunk.num_heads, chunk.positions.numel(), -1)
    keep = chosen.gather(-1, index) | (pages[:, None, None, :] == own) | chunk.short_rows(k)
    return keep & chunk.allowed


def quest_reference(query: Tensor, key: Tensor, key_valid: Tensor, causal: bool, k: int,
                    page_size: int = PAGE_SIZE) -> Tensor:
    """The same selection one row and head at a time, with the bound written out per page."""
    batch, heads, tq, _ = query.shape
    tk = key.shape[2]
    groups = heads // key.shape[1]
    selected = torch.zeros(batch, heads, tq, tk, dtype=torch.bool)
    for b in range(batch):
        valid = [j for j in range(tk) if key_valid[b, j]]
        pages = [valid[p:p + page_size] for p in range(0, len(valid), page_size)]
        for i in range(tq):
            position = tk - tq + i
            visible = [j for j in valid if j <= position] if causal else valid
            if not key_valid[b, position]:
                continue  # a padding row: nothing to compare with
            own = valid.index(position) // page_size
            for h in range(heads):
                if len(visible) <= k:
                    selected[b, h, i, visible] = True
                    continue
                q = query[b, h, i].float()

                def bound(page: list[int]) -> float:
                    keys = key[b, h // groups, page].float()
                    return float(torch.maximum(q * keys.min(0).values, q * keys.max(0).values).sum())

                others = [p for p in range(len(pages)) if p != own and (p < own or not causal)]
                best = sorted(others, key=lambda p: -bound(pages[p]))[: k // page_size - 1]
                for p in [own, *best]:
                    selected[b, h, i, [j for j in pages[p] if j in visible]] = True
    return selected
