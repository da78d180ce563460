"""``indexer``: a DeepSeek-DSA-style "lightning indexer" per layer, distilled from the dense attention.

A few indexer heads (n, each of width e) score every key for every query:

    I(i, j) = sum_h w_h(i) * ReLU(q_h(i) . k(j))

read from the layer's own q and k (after RoPE): q_h = W_q [q_1 ... q_H] (the query heads
concatenated), one shared key per token k = LayerNorm(W_k [k_1 ... k_Hkv]) (DSA's MQA-style
key), and per-token head weights w = W_w [q_1 ... q_H] / sqrt(n e). Each query attends its top
min(L, k) keys by I, the same keys for every head of the layer, ties to the earlier key (the
stable rule of ``selection``). Scoring is quadratic, O(T^2 n e) per layer: that is the point of
comparing it with SEA's linear estimator.

Training is DSA's dense warm-up (``sea distill --method indexer``, stage ``estimator``): the base
stays frozen; per layer the target is the teacher's attention summed over heads and
normalised, the loss KL(target || softmax of I over the allowed keys), averaged over valid rows.
Rows are processed in chunks, each backpropagated at once, so at most n x chunk x T scores exist.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..distill.losses import kl_rows
from ...hf import LayerCall
from ...core.selection import _top_budget
from .chunks import QueryChunk, query_chunks


@dataclass(frozen=True)
class IndexerConfig:
    heads: int = 4  # n, indexer heads
    head_dim: int = 32  # e, width of an indexer head
    chunk_size: int = 256  # query rows per training chunk

    def __post_init__(self) -> None:
        for name in ("heads", "head_dim", "chunk_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"indexer {name} must be a positive integer, got {value!r}")


class LightningIndexer(nn.Module):
    """One layer's indexer: scores (query rows x keys) and the top-k keys by score."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, config: IndexerConfig) -> None:
        super().__init__()
        self.config = config
        self.query = nn.Linear(num_heads * head_dim, config.heads * config.head_dim, bias=False)
        self.key = nn.Linear(num_kv_heads * head_dim, config.head_dim, bias=False)
        self.key_norm = nn.LayerNorm(config.head_dim)
        self.weights = nn.Linear(num_heads * head_dim, config.heads, bias=False)

    def scores(self, query: Tensor, key: Tensor) -> Tensor:
        """query (B, H, C, d), key (B, H_kv, Tk, d) -> I (B, C, Tk) fp32."""
        flat_q = query.float().transpose(1, 2).flatten(2)  # (B, C, H d)
        flat_k = key.float().transpose(1, 2).flatten(2)  # (B, Tk, H_kv d)
        n, e = self.config.heads, self.config.head_dim
        q = self.query(flat_q).unflatten(-1, (n, e)).transpose(1, 2)  # (B, n, C, e)
        k = self.key_norm(self.key(flat_k))  # (B, Tk, e)
        w = self.weights(flat_q).transpose(1, 2) * (n * e) ** -0.5  # (B, n, C)
        dots = torch.relu(q @ k.unsqueeze(1).transpose(-1, -2))  # (B, n, C, Tk)
        return (w.unsqueeze(-1) * dots).sum(1)

    def select(self, chunk: QueryChunk, k: int) -> Tensor:
        """(B, H, C, Tk) bool: each row's top min(L, k) allowed keys by I, shared by every head."""
        allowed = chunk.allowed[:, 0]  # (B, C, Tk)
        scores = self.scores(chunk.query, chunk.key).masked_fill(~allowed, float("-inf"))
        top = _top_budget(scores, chunk.lengths.clamp_max(k))  # (B, C, Tk)
        return (top & allowed)[:, None].expand(-1, chunk.num_heads, -1, -1)

    def kl(self, chunk: QueryChunk, teacher_probs: Tensor) -> Tensor:
        """Sum over the chunk's valid rows of KL(teacher summed over heads, normalised || softmax(I))."""
        allowed = chunk.allowed[:, 0]  # (B, C, Tk)
        target = teacher_probs.sum(1) / teacher_probs.shape[1]  # (B, C, Tk): each valid row sums to 1
        scores = self.scores(chunk.query, chunk.key).masked_fill(~allowed, torch.finfo(torch.float32).min)
        return (kl_rows(target, torch.log_softmax(scores, dim=-1)) * chunk.query_valid).sum()


def distil_layer(indexer: LightningIndexer, call: LayerCall, loss_scale: float) -> tuple[Tensor, float]:
    """One layer call of the warm-up: backpropagates ``loss_scale`` x the mean KL over the call's
    valid rows, chunk by chunk; returns the teacher's context (B, H, Tq, d) and that mean KL."""
    q, k, v = (x.detach() for x in (call.query, call.key, call.value))
    rows = int(call.key_valid[:, k.shape[2] - q.shape[2]:].sum()) or 1
    contexts, total = [], 0.0
    for chunk in query_chunks(q, k, v, call.key_valid, call.scaling, call.causal, indexer.config.chunk_size):
        with torch.no_grad():
            context, probs = chunk.teacher
        with torch.enable_grad():
            kl = indexer.kl(chunk, probs)
            (kl * (loss_scale / rows)).backward()
        contexts.append(context)
        total += float(kl.detach())
    return torch.cat(contexts, dim=2), total / rows


def indexer_reference(indexer: LightningIndexer, query: Tensor, key: Tensor, key_valid: Tensor, causal: bool,
                      k: int) -> Tensor:
    """The selection one row at a time: I(i, j) written out head by head for each allowed key, the
    keys sorted by (-I, position), the first min(L, k) taken for every head."""
    batch, heads, tq, _ = query.shape
    tk = key.shape[2]
    n, e = indexer.config.heads, indexer.config.head_dim
    selected = torch.zeros(batch, heads, tq, tk, dtype=torch.bool)
    with torch.no_grad():
        for b in range(batch):
            keys = indexer.key_norm(indexer.key(key[b].float().transpose(0, 1).flatten(1)))  # (Tk, e)
            for i in range(tq):
                position = tk - tq + i
                if not key_valid[b, position]:
                    continue  # a padding row
                flat = query[b, :, i].float().flatten()  # (H d)
                q_heads = indexer.query(flat).view(n, e)
                w = indexer.weights(flat) * (n * e) ** -0.5
                visible = [j for j in range(tk) if key_valid[b, j] and (j <= position or not causal)]

                def score(j: int) -> float:
                    return float(sum(w[h] * torch.relu(q_heads[h] @ keys[j]) for h in range(n)))

                best = sorted(visible, key=lambda j: (-score(j), j))[:k]
                selected[b, :, i, best] = True
    return selected
