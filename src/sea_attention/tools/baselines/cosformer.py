"""``cosformer`` (Qin et al., ICLR 2022): ReLU linear attention with a cos re-weighting by distance.

    A(i, j) = ReLU(q_i) . ReLU(k_j) * cos(pi/2 * (r_i - r_j) / M)

where r is a position's rank among the valid keys (so padding changes nothing) and M the
``horizon``. Because cos(a - b) = cos a cos b + sin a sin b, A is the kernel of the features
phi(x_r) = [ReLU(x) cos(pi r / 2M), ReLU(x) sin(pi r / 2M)] (width 2d), computed in O(T) by
``linear.kernel_attention`` (prefix sums when causal). The paper takes M from each input's
length; here M is fixed when the layer is built (the distillation length), so a row's output
never depends on later tokens or on the window length, and every position must stay below M
(an error otherwise: past M the weights turn negative). The layer reuses the model's q, k, v;
the whole model is distilled against its dense self (stage ``full``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ...core.cells import key_ranks
from ...core.estimator.features import DENOM_EPS
from ...core.ops.reference import allowed_keys, repeat_kv
from .linear import kernel_attention


@dataclass(frozen=True)
class CosformerConfig:
    horizon: int = 1024  # M: positions (ranks among valid keys) must stay below it

    def __post_init__(self) -> None:
        if isinstance(self.horizon, bool) or not isinstance(self.horizon, int) or self.horizon < 1:
            raise ValueError(f"horizon must be a positive integer, got {self.horizon!r}")


def position_angles(key_valid: Tensor, horizon: int) -> Tensor:
    """(B, Tk) fp32: pi/2 * r / M for every key (r its rank among the valid keys)."""
    ranks = key_ranks(key_valid)
    longest = int(ranks.max()) + 1 if ranks.numel() else 0
    if longest > horizon:
        raise ValueError(f"cosformer was built for at most horizon={horizon} positions, got an input with "
                         f"{longest} tokens: evaluate with --seq-len <= {horizon} (or distil with a longer one)")
    return ranks.float() * (math.pi / (2 * horizon))


def cos_sin_features(x: Tensor, angles: Tensor) -> Tensor:
    """x (B, H, T, d), angles (B, T) -> (B, H, T, 2d): [ReLU(x) cos, ReLU(x) sin]."""
    positive, angles = torch.relu(x.float()), angles[:, None, :, None]
    return torch.cat([positive * torch.cos(angles), positive * torch.sin(angles)], dim=-1)


class CosformerAttention(nn.Module):
    """One layer's cosFormer attention on the model's own q, k, v (no parameters of its own)."""

    def __init__(self, causal: bool, config: CosformerConfig) -> None:
        super().__init__()
        self.config, self.causal = config, causal

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_valid: Tensor, scaling: float) -> Tensor:
        """query (B, H, Tq, d), key and value (B, H_kv, Tk, d), key_valid (B, Tk) -> (B, H, Tq, d) fp32.

        ``scaling`` is not used: a common factor of q or k cancels in the normalised kernel.
        """
        angles = position_angles(key_valid, self.config.horizon)  # (B, Tk)
        phi_q = cos_sin_features(query, angles[:, key.shape[2] - query.shape[2]:])
        return kernel_attention(phi_q, cos_sin_features(key, angles), value, key_valid, self.causal)


def cosformer_reference(query: Tensor, key: Tensor, value: Tensor, key_valid: Tensor, causal: bool,
                        horizon: int) -> Tensor:
    """The defining formula as a dense (Tq x Tk) matrix, in float64: ReLU dot products times the cos
    of the rank distance, under the allowed-keys mask, normalised per row."""
    tq, tk = query.shape[2], key.shape[2]
    groups = query.shape[1] // key.shape[1]
    ranks = key_ranks(key_valid).double()  # (B, Tk)
    distance = ranks[:, None, tk - tq:, None] - ranks[:, None, None, :]  # (B, 1, Tq, Tk)
    dots = torch.relu(query.double()) @ torch.relu(repeat_kv(key.double(), groups)).transpose(-1, -2)
    kernel = dots * torch.cos(math.pi / 2 * distance / horizon) * allowed_keys(key_valid, tq, causal)
    values = repeat_kv(value.double(), groups).masked_fill(~key_valid[:, None, :, None], 0.0)
    return kernel @ values / (kernel.sum(-1, keepdim=True) + DENOM_EPS)
