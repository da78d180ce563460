"""Attention on selected keys only, in linear memory, with its own backward.

Each query owns S slots (head, key) flattened over heads (``cells.KeySlots``). The
forward processes queries in chunks: gather the slot keys/values, score, softmax per
(query, head) segment, accumulate per head. It keeps only the slot probabilities
(B, Tq, S) for backward and re-gathers keys and values there, so memory stays
O(Tq * S) plus one chunk of O(chunk * S * d) — never Tq x Tk.

``naive_sparse_attention`` is the same computation with plain autograd, kept beside it
as a readable fallback; both are tested against ``reference.reference_attention``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..cells import KeySlots


def _flat_rows(head: Tensor, key: Tensor, groups: int, kv_heads: int, keys: int) -> Tensor:
    """Row of each slot in k.reshape(B * H_kv * Tk, d): (B, c, S) long."""
    batch = torch.arange(head.shape[0], device=head.device).view(-1, 1, 1)
    return (batch * kv_heads + head // groups) * keys + key


def _segment_softmax(scores: Tensor, head: Tensor, valid: Tensor, heads: int) -> Tensor:
    """Softmax of (B, c, S) scores within each (query, head) segment; invalid slots -> 0."""
    scores = scores.masked_fill(~valid, float("-inf"))
    peak = scores.new_full((*scores.shape[:-1], heads), float("-inf"))
    peak = peak.scatter_reduce(-1, head, scores, reduce="amax").detach()
    peak = peak.masked_fill(peak.isinf(), 0.0)  # heads with no slot in this row
    weights = torch.exp(scores - peak.gather(-1, head)).masked_fill(~valid, 0.0)
    total = weights.new_zeros(peak.shape).scatter_add(-1, head, weights)
    return weights / total.gather(-1, head).clamp_min(torch.finfo(weights.dtype).tiny)


def _gather_rows(x: Tensor, rows: Tensor) -> Tensor:
    """x (N, d), rows (B, c, S) -> (B, c, S, d)."""
    return x.index_select(0, rows.flatten()).view(*rows.shape, x.shape[-1])


def _per_slot_head(x: Tensor, head: Tensor) -> Tensor:
    """x (B, c, H, d), head (B, c, S) -> (B, c, S, d): each slot's own head row."""
    return x.gather(2, head.unsqueeze(-1).expand(-1, -1, -1, x.shape[-1]))


def _sum_per_head(x: Tensor, head: Tensor, heads: int) -> Tensor:
    """x (B, c, S, d) summed into its slots' heads: (B, c, H, d)."""
    out = x.new_zeros(x.shape[0], x.shape[1], heads, x.shape[-1])
    return out.scatter_add_(2, head.unsqueeze(-1).expand_as(x), x)


class _SparseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, head, key, valid, scale, chunk):
        bsz, heads, tq, dim = q.shape
        kv_heads, keys = k.shape[1], k.shape[2]
        groups = heads // kv_heads
        compute = torch.promote_types(q.dtype, torch.float32)
        q_rows = q.transpose(1, 2).to(compute)  # (B, Tq, H, d)
        k_flat = k.reshape(-1, dim).to(compute)
        v_flat = v.reshape(-1, dim).to(compute)
        out = q_rows.new_empty(bsz, tq, heads, dim)
        probs = q_rows.new_empty(head.shape)
        for lo in range(0, tq, chunk):
            sl = slice(lo, lo + chunk)
            rows = _flat_rows(head[:, sl], key[:, sl], groups, kv_heads, keys)
            q_s = _per_slot_head(q_rows[:, sl], head[:, sl])  # (B, c, S, d)
            scores = (q_s * _gather_rows(k_flat, rows)).sum(-1) * scale  # (B, c, S)
            p = _segment_softmax(scores, head[:, sl], valid[:, sl], heads)
            probs[:, sl] = p
            out[:, sl] = _sum_per_head(p.unsqueeze(-1) * _gather_rows(v_flat, rows), head[:, sl], heads)
        ctx.save_for_backward(q, k, v, head, key, probs, out)
        ctx.scale, ctx.chunk = scale, chunk
        ctx.mark_non_differentiable(probs)
        return out.transpose(1, 2).to(q.dtype), probs

    @staticmethod
    def backward(ctx, grad_out, _grad_probs):
        q, k, v, head, key, probs, out = ctx.saved_tensors
        scale, chunk = ctx.scale, ctx.chunk
        bsz, heads, tq, dim = q.shape
        kv_heads, keys = k.shape[1], k.shape[2]
        groups = heads // kv_heads
        compute = probs.dtype
        q_rows = q.transpose(1, 2).to(compute)
        k_flat = k.reshape(-1, dim).to(compute)
        v_flat = v.reshape(-1, dim).to(compute)
        g_rows = grad_out.transpose(1, 2).to(compute)  # (B, Tq, H, d)
        delta = (g_rows * out).sum(-1)  # (B, Tq, H): sum_s p_s * dp_s per segment
        dq = torch.zeros_like(q_rows)
        dk = torch.zeros_like(k_flat)
        dv = torch.zeros_like(v_flat)
        for lo in range(0, tq, chunk):
            sl = slice(lo, lo + chunk)
            h = head[:, sl]
            rows = _flat_rows(h, key[:, sl], groups, kv_heads, keys)
            k_s, v_s = _gather_rows(k_flat, rows), _gather_rows(v_flat, rows)
            g_s = _per_slot_head(g_rows[:, sl], h)  # (B, c, S, d)
            p = probs[:, sl]
            dscore = p * ((g_s * v_s).sum(-1) - delta[:, sl].gather(-1, h)) * scale  # (B, c, S)
            dq[:, sl] = _sum_per_head(dscore.unsqueeze(-1) * k_s, h, heads)
            q_s = _per_slot_head(q_rows[:, sl], h)
            dk.index_add_(0, rows.flatten(), (dscore.unsqueeze(-1) * q_s).flatten(0, 2))
            dv.index_add_(0, rows.flatten(), (p.unsqueeze(-1) * g_s).flatten(0, 2))
        return (dq.transpose(1, 2).to(q.dtype), dk.view_as(k).to(k.dtype), dv.view_as(v).to(v.dtype),
                None, None, None, None, None)


def sparse_attention(q: Tensor, k: Tensor, v: Tensor, slots: KeySlots, scale: float,
                     chunk: int = 256) -> tuple[Tensor, Tensor]:
    """Softmax attention of each query over its slots only.

    q (B, H, Tq, d), k and v (B, H_kv, Tk, d). Returns the context (B, H, Tq, d) in q's
    dtype and the slot probabilities (B, Tq, S) (fp32, no gradient). A query with no
    slot in a head gets a zero context for that head.
    """
    return _SparseAttention.apply(q, k, v, slots.head, slots.key, slots.valid, scale, chunk)


def naive_sparse_attention(q: Tensor, k: Tensor, v: Tensor, slots: KeySlots, scale: float) -> tuple[Tensor, Tensor]:
    """The same as ``sparse_attention`` in one chunk with plain autograd (readable, more memory)."""
    bsz, heads, tq, dim = q.shape
    compute = torch.promote_types(q.dtype, torch.float32)
    rows = _flat_rows(slots.head, slots.key, heads // k.shape[1], k.shape[1], k.shape[2])
    q_s = _per_slot_head(q.transpose(1, 2).to(compute), slots.head)  # (B, Tq, S, d)
    k_s = _gather_rows(k.reshape(-1, dim).to(compute), rows)
    v_s = _gather_rows(v.reshape(-1, dim).to(compute), rows)
    probs = _segment_softmax((q_s * k_s).sum(-1) * scale, slots.head, slots.valid, heads)
    out = _sum_per_head(probs.unsqueeze(-1) * v_s, slots.head, heads)  # (B, Tq, H, d)
    return out.transpose(1, 2).to(q.dtype), probs.detach()

