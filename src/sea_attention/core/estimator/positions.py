"""Positional codes appended to V, so the Performer's output tells *where* attention goes.

Positions are ranks among the valid (non-padding) keys, so a padded sequence gets the
same codes as the unpadded one.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class LearnedPositionCode(nn.Module):
    """Causal models: a learned (max_positions, d) table, initialised N(0, 1)."""

    def __init__(self, max_positions: int, dim: int) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(max_positions, dim))

    def forward(self, positions: Tensor) -> Tensor:  # (B, Tk) long -> (B, Tk, d)
        longest = int(positions.max()) + 1 if positions.numel() else 0
        if longest > self.table.shape[0]:
            raise ValueError(
                f"sequence has {longest} positions but the estimator's max_positions is "
                f"{self.table.shape[0]}: raise SEAConfig.max_positions (and distil again)"
            )
        return self.table[positions]


def tent_code(ranks: Tensor, lengths: Tensor, dim: int) -> Tensor:
    """Bidirectional models: a fixed 'tent' code of width d.

    Key of rank r in a row of L valid keys sits at u = r / (L - 1) * (d - 1) and gets
    code[j] = max(0, 1 - |j - u|): linear interpolation between rows of the identity.
    ranks (B, Tk), lengths (B,) -> (B, Tk, d) fp32.
    """
    span = (lengths - 1).clamp_min(1).float().unsqueeze(-1)  # (B, 1)
    centre = ranks.clamp_min(0).float() / span * (dim - 1)  # (B, Tk)
    grid = torch.arange(dim, device=ranks.device, dtype=torch.float32)
    return (1 - (grid - centre.unsqueeze(-1)).abs()).clamp_min(0)
