"""``dense``: every key the row may see; the reference every other method is measured against."""

from __future__ import annotations

from torch import Tensor

from .chunks import QueryChunk


def dense_mask(chunk: QueryChunk, k: int) -> Tensor:
    """(B, H, C, Tk) bool: all allowed keys; ``k`` is ignored (dense has no budget)."""
    return chunk.everything()
