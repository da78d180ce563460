"""Kernel (linear) attention for the trained linear baselines, ``performer`` and ``cosformer``.

The layer's softmax is replaced by a non-negative kernel phi(q) . phi(k):

    out_i = sum_j A(i, j) v_j / sum_j A(i, j),   A(i, j) = allowed(i, j) phi(q_i) . phi(k_j)

computed in O(T) by ``estimator.features`` (prefix sums when causal), the project's one
implementation; the methods differ only in their feature maps. Queries are the last Tq
positions of the keys; padding keys are dropped.
"""

from __future__ import annotations

from torch import Tensor

from ...core.estimator.features import DENOM_EPS, causal_linear_attention, linear_attention
from ...core.ops.reference import allowed_keys, repeat_kv


def kernel_attention(phi_q: Tensor, phi_k: Tensor, value: Tensor, key_valid: Tensor, causal: bool) -> Tensor:
    """phi_q (B, H, Tq, f), phi_k (B, H_kv, Tk, f), value (B, H_kv, Tk, d), key_valid (B, Tk) -> (B, H, Tq, d) fp32."""
    batch, heads, tq, width = phi_q.shape
    kv_heads = phi_k.shape[1]
    keep = key_valid[:, None, :, None]  # (B, 1, Tk, 1)
    phi_k = phi_k.float().masked_fill(~keep, 0.0)
    value = value.float().masked_fill(~keep, 0.0)
    grouped = phi_q.float().reshape(batch, kv_heads, heads // kv_heads, tq, width)  # (B, H_kv, G, Tq, f)
    if causal:
        out, _ = causal_linear_attention(grouped, phi_k, value)
    else:
        out = linear_attention(grouped, phi_k, value)
    return out.reshape(batch, heads, tq, -1)  # (B, H_kv, G, Tq, d) -> (B, H, Tq, d)


def kernel_attention_reference(phi_q: Tensor, phi_k: Tensor, value: Tensor, key_valid: Tensor,
                               causal: bool) -> Tensor:
    """The same as a dense (Tq x Tk) kernel matrix under the allowed-keys mask, in float64."""
    groups = phi_q.shape[1] // phi_k.shape[1]
    allowed = allowed_keys(key_valid, phi_q.shape[2], causal)  # (B, 1, Tq, Tk)
    kernel = phi_q.double() @ repeat_kv(phi_k.double(), groups).transpose(-1, -2) * allowed  # (B, H, Tq, Tk)
    values = repeat_kv(value.double(), groups).masked_fill(~key_valid[:, None, :, None], 0.0)
    return kernel @ values / (kernel.sum(-1, keepdim=True) + DENOM_EPS)
