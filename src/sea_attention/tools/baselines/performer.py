"""``performer`` (Choromanski et al. 2021): the layer's softmax replaced by random-feature linear attention.

phi is the project's one ``RandomFeatures`` on q·sqrt(scale) and k·sqrt(scale): ReLU features
when causal (the SEA paper's causal Performer baseline), FAVOR+ when bidirectional, with
m = floor(d ln d / nbf) features (``config.performer_features``). The features are drawn once
per layer from a fixed seed and saved with the model (no redraw). The layer reuses the model's
q, k, v; the whole model is distilled against its dense self (stage ``full``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor, nn

from ...core.config import performer_features
from ...core.estimator.features import RandomFeatures, layer_seed
from .linear import kernel_attention


@dataclass(frozen=True)
class PerformerConfig:
    feature_factor: int = 1  # nbf: m = floor(d ln d / nbf) random features
    seed: int = 0  # layer l draws its features from features.layer_seed(seed, l)

    def __post_init__(self) -> None:
        if isinstance(self.feature_factor, bool) or not isinstance(self.feature_factor, int) or self.feature_factor < 1:
            raise ValueError(f"feature_factor must be a positive integer, got {self.feature_factor!r}")


class PerformerAttention(nn.Module):
    """One layer's Performer attention on the model's own q, k, v."""

    def __init__(self, head_dim: int, causal: bool, config: PerformerConfig, layer_idx: int) -> None:
        super().__init__()
        features = performer_features(head_dim, config.feature_factor)
        if features < 1:
            raise ValueError(f"feature_factor={config.feature_factor} leaves no random features for "
                             f"head_dim={head_dim}: use a feature_factor <= {performer_features(head_dim, 1)}")
        self.config, self.causal = config, causal
        self.features = RandomFeatures(head_dim, features, "relu" if causal else "favor",
                                       seed=layer_seed(config.seed, layer_idx))

    def feature_maps(self, query: Tensor, key: Tensor, scaling: float) -> tuple[Tensor, Tensor]:
        """phi(q) (B, H, Tq, m) and phi(k) (B, H_kv, Tk, m), fp32."""
        root = math.sqrt(scaling)
        return self.features(query, is_query=True, root=root), self.features(key, is_query=False, root=root)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_valid: Tensor, scaling: float) -> Tensor:
        """query (B, H, Tq, d), key and value (B, H_kv, Tk, d), key_valid (B, Tk) -> (B, H, Tq, d) fp32."""
        phi_q, phi_k = self.feature_maps(query, key, scaling)
        return kernel_attention(phi_q, phi_k, value, key_valid, self.causal)
