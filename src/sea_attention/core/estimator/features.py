"""Performer random features and kernel linear attention (bidirectional and causal).

Linear attention approximates softmax(q k^T) with phi(q) phi(k)^T, so a query's output
is phi(q) (sum_j phi(k_j) v_j^T) / (phi(q) . sum_j phi(k_j)): O(T) instead of O(T^2).
The estimator only uses it as a cheap feature; its output never reaches the model.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .per_sample import sample_wise

FAVOR_EPS = 1e-4  # keeps FAVOR+ features strictly positive
RELU_EPS = 1e-3  # keeps ReLU features strictly positive
DENOM_EPS = 1e-6  # a query whose keys are all padding divides by this, giving 0


def layer_seed(seed: int, layer_idx: int, redraw: int = 0) -> int:
    """The seed of layer ``layer_idx``'s random features (after ``redraw`` redraws): every layer
    and every redraw draws its own."""
    return seed + 1_000_003 * layer_idx + 7_919 * redraw


def orthogonal_gaussian_projection(num_features: int, dim: int, generator: torch.Generator) -> Tensor:
    """(m, d) Gaussian orthogonal random features: QR-orthogonal blocks, rows rescaled
    by the norms of i.i.d. Gaussian vectors (so each row is marginally Gaussian)."""
    blocks = []
    for _ in range(math.ceil(num_features / dim)):
        gaussian = torch.randn(dim, dim, generator=generator)
        q, _ = torch.linalg.qr(gaussian)
        blocks.append(q.T)
    rows = torch.cat(blocks)[:num_features]
    norms = torch.randn(num_features, dim, generator=generator).norm(dim=1, keepdim=True)
    return rows * norms


class RandomFeatures(nn.Module):
    """phi(x) for queries and keys, x scaled by ``root`` = sqrt(scale) first.

    ``relu``:  phi(x) = ReLU(W x) + 1e-3.
    ``favor``: phi(x) = m^-1/2 (exp(W x - |x|^2 / 2 - s) + 1e-4), where the stabiliser s
    is the row max for queries (it cancels in the ratio) and 0 for keys, so that keys
    never depend on other keys: the features stay causal and can be cached.
    """

    def __init__(self, head_dim: int, num_features: int, kind: str, seed: int) -> None:
        super().__init__()
        self.kind = kind
        self.num_features = num_features
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer("projection", orthogonal_gaussian_projection(num_features, head_dim, generator))

    @torch.no_grad()
    def redraw(self, seed: int) -> None:
        """Draw a new projection (the Performer's periodic feature redraw)."""
        generator = torch.Generator().manual_seed(seed)
        fresh = orthogonal_gaussian_projection(self.num_features, self.projection.shape[1], generator)
        self.projection.copy_(fresh.to(self.projection))

    @sample_wise
    def forward(self, x: Tensor, is_query: bool, root: float = 1.0) -> Tensor:  # (B, ..., d) -> (B, ..., m), fp32
        """phi(root * x): the factor goes into the small projection, not into a copy of x."""
        x = x.float()
        projected = x @ (self.projection.float() * root).T
        if self.kind == "relu":
            return torch.relu(projected) + RELU_EPS
        # in place on the product's own output (the product's backward needs only its inputs)
        exponent = projected.sub_((0.5 * root * root) * x.pow(2).sum(-1, keepdim=True))
        if is_query:
            exponent = exponent.sub_(exponent.amax(-1, keepdim=True).detach())
        return (torch.exp(exponent) + FAVOR_EPS) / math.sqrt(self.num_features)


@sample_wise  # batched matrix products round differently by batch size (per_sample.py)
def linear_attention(phi_q: Tensor, phi_k: Tensor, values: Tensor) -> Tensor:
    """Bidirectional linear attention.

    phi_q (B, H_kv, G, Tq, m) — query heads grouped by their kv head; phi_k (B, H_kv, Tk, m)
    with padding keys already zeroed; values (B, H_kv, Tk, e). Returns (B, H_kv, G, Tq, e).
    """
    kv = phi_k.transpose(-1, -2) @ values  # (B, H_kv, m, e)
    normaliser = phi_k.sum(-2)  # (B, H_kv, m)
    numerator = phi_q @ kv.unsqueeze(2)
    denominator = phi_q @ normaliser[:, :, None, :, None]
    return numerator / (denominator + DENOM_EPS)


def _prefix_state(phi_k: Tensor, values: Tensor, prefix: int,
                  state: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor]:
    """The running state (sum phi(k) v^T, sum phi(k)) after the first ``prefix`` keys, continued from ``state``."""
    m, e = phi_k.shape[-1], values.shape[-1]
    if state is None:
        kv = phi_k.new_zeros(*phi_k.shape[:2], m, e)
        normaliser = phi_k.new_zeros(*phi_k.shape[:2], m)
    else:
        kv, normaliser = state
    if prefix:
        kv = kv + phi_k[:, :, :prefix].transpose(-1, -2) @ values[:, :, :prefix]
        normaliser = normaliser + phi_k[:, :, :prefix].sum(-2)
    return kv, normaliser


def _one_step(phi_q: Tensor, phi_k: Tensor, values: Tensor,
              state: tuple[Tensor, Tensor] | None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """``causal_linear_attention`` of one new key that is also the only query: the state takes the
    key, then the query reads the state. phi_q (B, H_kv, G, 1, m), phi_k (B, H_kv, 1, m), values (B, H_kv, 1, e)."""
    kv, normaliser = _prefix_state(phi_k, values, 1, state)  # (B, H_kv, m, e), (B, H_kv, m)
    numerator = phi_q @ kv.unsqueeze(2)  # (B, H_kv, G, 1, e)
    denominator = phi_q @ normaliser[:, :, None, :, None]  # (B, H_kv, G, 1, 1)
    return numerator / (denominator + DENOM_EPS), (kv, normaliser)


@sample_wise  # batched matrix products round differently by batch size (per_sample.py)
def causal_linear_attention(phi_q: Tensor, phi_k: Tensor, values: Tensor, chunk: int = 64,
                            state: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """Causal linear attention where queries are the last Tq of the Tk keys.

    Shapes as in ``linear_attention``. Keys before the query suffix are folded into the
    running state in one product. The suffix is cut into chunks, all processed at once:
    a small masked quadratic product inside each chunk, plus the sum of phi(k) v^T over
    the earlier chunks (an exclusive cumulative sum of per-chunk sums). Memory is
    O(T * (m + e) + (T / chunk) * m * e), time O(T * chunk * (m + e) + T * m * e).
    ``state`` = (sum phi(k) v^T (B, H_kv, m, e), sum phi(k) (B, H_kv, m)) of keys seen in
    earlier calls; the updated state is returned (used by decoding).
    """
    tq, tk = phi_q.shape[-2], phi_k.shape[-2]
    if tq == tk == 1:  # a decoding step: the chunked scan below would be two dozen ops for one product
        return _one_step(phi_q, phi_k, values, state)
    prefix = tk - tq
    kv, normaliser = _prefix_state(phi_k, values, prefix, state)
    chunk = max(1, min(chunk, tq))
    n = -(-tq // chunk)
    pad = n * chunk - tq  # zero rows: no contribution as keys, sliced off as queries

    def blocks(x: Tensor) -> Tensor:  # (..., T, f) -> (..., n, c, f)
        return (torch.nn.functional.pad(x, (0, 0, 0, pad)) if pad else x).unflatten(-2, (n, chunk))

    # a column of ones after the values makes every product below also carry the normaliser
    ones = values.new_ones(*values.shape[:-1], 1)
    q_c = blocks(phi_q)  # (B, H_kv, G, n, c, m)
    k_c = blocks(phi_k[:, :, prefix:])  # (B, H_kv, n, c, m)
    v_c = blocks(torch.cat([values[:, :, prefix:], ones[:, :, prefix:]], dim=-1))  # (B, H_kv, n, c, e + 1)
    chunk_kv = k_c.transpose(-1, -2) @ v_c  # (B, H_kv, n, m, e + 1)
    start = torch.cat([kv, normaliser.unsqueeze(-1)], dim=-1)  # (B, H_kv, m, e + 1)
    # sums over all earlier chunks: an exclusive scan (cumsum - own would cancel, and NaN - NaN is NaN)
    earlier = torch.cat([torch.zeros_like(chunk_kv[:, :, :1]), chunk_kv[:, :, :-1].cumsum(2)], dim=2)
    before = start.unsqueeze(2) + earlier
    local = (q_c @ k_c.unsqueeze(2).transpose(-1, -2)).tril_()  # (B, H_kv, G, n, c, c), masked in place
    out = (local @ v_c.unsqueeze(2)).add_(q_c @ before.unsqueeze(2))  # (B, H_kv, G, n, c, e + 1)
    out = out.flatten(-3, -2)[..., :tq, :]
    total = start + chunk_kv.sum(2)
    return out[..., :-1] / (out[..., -1:] + DENOM_EPS), (total[..., :-1], total[..., -1])
