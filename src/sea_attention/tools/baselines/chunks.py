"""What every training-free selector sees: a chunk of one layer call's query rows.

A selector is ``selector(chunk, k) -> (B, H, C, Tk) bool``: the keys each of the chunk's C query
rows attends to, per head, always a subset of ``chunk.allowed``. Working on chunks of rows keeps
every (rows x keys) tensor at C x Tk, so a long sequence never holds a Tq x Tk map.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

from ...core.cells import key_ranks
from ...core.ops.reference import reference_attention


@dataclass
class QueryChunk:
    """Query rows ``positions`` of one attention call, with the call's keys and values."""

    query: Tensor  # (B, H, C, d)
    key: Tensor  # (B, H_kv, Tk, d), after RoPE and the cache update
    value: Tensor  # (B, H_kv, Tk, d)
    key_valid: Tensor  # (B, Tk) bool, True for real tokens
    positions: Tensor  # (C,) long: the key position of each query row
    scaling: float
    causal: bool

    @property
    def num_heads(self) -> int:
        return self.query.shape[1]

    @cached_property
    def allowed(self) -> Tensor:
        """(B, 1, C, Tk) bool: the keys each row may see (not padding; not later, when causal)."""
        allowed = self.key_valid[:, None, None, :].expand(-1, 1, self.positions.numel(), -1)
        if self.causal:
            later = torch.arange(self.key.shape[2], device=self.key.device) > self.positions[:, None]
            allowed = allowed & ~later
        return allowed

    @cached_property
    def lengths(self) -> Tensor:
        """(B, C) long: L, the number of keys each row may see."""
        return self.allowed[:, 0].sum(-1)

    @cached_property
    def ranks(self) -> Tensor:
        """(B, Tk) long: each key's rank among the valid keys (padding-invariant positions)."""
        return key_ranks(self.key_valid)

    @cached_property
    def query_valid(self) -> Tensor:
        """(B, C) bool: rows that are real tokens (padding rows are not scored or counted)."""
        return self.key_valid[:, self.positions]

    @cached_property
    def teacher(self) -> tuple[Tensor, Tensor]:
        """The dense attention of these rows: context (B, H, C, d), probabilities (B, H, C, Tk)."""
        return reference_attention(self.query, self.key, self.value, self.everything(), self.scaling)

    def everything(self) -> Tensor:
        """(B, H, C, Tk) bool: every allowed key, for every head."""
        return self.allowed.expand(-1, self.num_heads, -1, -1)

    def short_rows(self, k: int) -> Tensor:
        """(B, 1, C, 1) bool: rows with at most k keys, which every selector attends densely."""
        return (self.lengths <= k)[:, None, :, None]


Selector = Callable[[QueryChunk, int], Tensor]  # (chunk, k) -> (B, H, C, Tk) bool


def query_chunks(query: Tensor, key: Tensor, value: Tensor, key_valid: Tensor, scaling: float, causal: bool,
                 size: int) -> Iterator[QueryChunk]:
    """The query rows in chunks of ``size``; queries are the last Tq positions of the keys."""
    if size < 1:
        raise ValueError(f"chunk size must be a positive integer, got {size!r}")
    tq, tk = query.shape[2], key.shape[2]
    for start in range(0, tq, size):
        stop = min(start + size, tq)
        positions = torch.arange(tk - tq + start, tk - tq + stop, device=key.device)
        yield QueryChunk(query[:, :, start:stop], key, value, key_valid, positions, scaling, causal)
