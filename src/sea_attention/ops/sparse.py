"""Attention on selected keys only, in linear memory, with its own backward.

Each query owns S slots (head, key) flattened over heads (``cells.KeySlots``). The
forward processes queries in chunks: gather the slot keys/values once, score all heads
of a query against all its slots with one small matmul, and let each head keep only its
own slots (a masked softmax). It keeps only the slot probabilities (B, Tq, S) for
backward and re-gathers keys and values there, so memory stays O(Tq * S) plus one chunk
of O(chunk * H * S + chunk * S * d) — never Tq x Tk.

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


def _gather_rows(x: Tensor, rows: Tensor) -> Tensor:
    """x (N, d), rows (B, c, S) -> (B, c, S, d)."""
    return x.index_select(0, rows.flatten()).view(*rows.shape, x.shape[-1])


def _own_slots(head: Tensor, valid: Tensor, heads: int) -> Tensor:
    """(B, c, H, S) bool: slot s belongs to head h (and is used)."""
    return (head.unsqueeze(2) == torch.arange(heads, device=head.device).view(1, 1, -1, 1)) & valid.unsqueeze(2)


def _chunk_probs(q_c: Tensor, k_s: Tensor, own: Tensor, scale: float) -> Tensor:
    """Per-head softmax over the head's own slots: (B, c, H, d) x (B, c, S, d) -> (B, c, H, S).

    Every head is scored against every slot of the query (one small matmul), then each
    head keeps only its own slots: the masked softmax is the per-(query, head) softmax.
    """
    scores = (q_c @ k_s.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~own, torch.finfo(scores.dtype).min)  # finite: empty heads stay NaN-free
    return torch.softmax(scores, dim=-1).masked_fill(~own, 0.0)


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
        probs = q_rows.new_empty(head.shape)  # (B, Tq, S): each slot's probability in its own head
        for lo in range(0, tq, chunk):
            sl = slice(lo, lo + chunk)
            rows = _flat_rows(head[:, sl], key[:, sl], groups, kv_heads, keys)
            own = _own_slots(head[:, sl], valid[:, sl], heads)
            p = _chunk_probs(q_rows[:, sl], _gather_rows(k_flat, rows), own, scale)  # (B, c, H, S)
            out[:, sl] = p @ _gather_rows(v_flat, rows)
            probs[:, sl] = p.sum(2)  # one non-zero per slot column
        ctx.save_for_backward(q, k, v, head, key, valid, probs, out)
        ctx.scale, ctx.chunk = scale, chunk
        ctx.mark_non_differentiable(probs)
        return out.transpose(1, 2).to(q.dtype), probs

    @staticmethod
    def backward(ctx, grad_out, _grad_probs):
        q, k, v, head, key, valid, probs, out = ctx.saved_tensors
        scale, chunk = ctx.scale, ctx.chunk
        bsz, heads, tq, dim = q.shape
        kv_heads, keys = k.shape[1], k.shape[2]
        groups = heads // kv_heads
        compute = probs.dtype
        q_rows = q.transpose(1, 2).to(compute)
        k_flat = k.reshape(-1, dim).to(compute)
        v_flat = v.reshape(-1, dim).to(compute)
        g_rows = grad_out.transpose(1, 2).to(compute)  # (B, Tq, H, d)
        delta = (g_rows * out).sum(-1, keepdim=True)  # (B, Tq, H, 1): sum_s p_s dp_s per head
        dq = torch.zeros_like(q_rows)
        dk = torch.zeros_like(k_flat)
        dv = torch.zeros_like(v_flat)
        for lo in range(0, tq, chunk):
            sl = slice(lo, lo + chunk)
            rows = _flat_rows(head[:, sl], key[:, sl], groups, kv_heads, keys)
            own = _own_slots(head[:, sl], valid[:, sl], heads)
            p = probs[:, sl].unsqueeze(2) * own  # (B, c, H, S) rebuilt from the slot probabilities
            k_s, v_s = _gather_rows(k_flat, rows), _gather_rows(v_flat, rows)
            g_c = g_rows[:, sl]
            dscore = p * (g_c @ v_s.transpose(-1, -2) - delta[:, sl]) * scale  # (B, c, H, S)
            dq[:, sl] = dscore @ k_s
            flat = rows.flatten()
            dk.index_add_(0, flat, (dscore.transpose(-1, -2) @ q_rows[:, sl]).flatten(0, 2))
            dv.index_add_(0, flat, (p.transpose(-1, -2) @ g_c).flatten(0, 2))
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
    """The same as ``sparse_attention`` with plain autograd and a per-slot segment softmax:
    readable, one chunk, more memory."""
    bsz, heads, tq, dim = q.shape
    compute = torch.promote_types(q.dtype, torch.float32)
    rows = _flat_rows(slots.head, slots.key, heads // k.shape[1], k.shape[1], k.shape[2])
    index = slots.head.unsqueeze(-1).expand(-1, -1, -1, dim)
    q_s = q.transpose(1, 2).to(compute).gather(2, index)  # (B, Tq, S, d): each slot's own query head
    k_s = _gather_rows(k.reshape(-1, dim).to(compute), rows)
    v_s = _gather_rows(v.reshape(-1, dim).to(compute), rows)
    scores = ((q_s * k_s).sum(-1) * scale).masked_fill(~slots.valid, float("-inf"))  # (B, Tq, S)
    peak = scores.new_full((bsz, tq, heads), float("-inf")).scatter_reduce(-1, slots.head, scores, "amax")
    peak = peak.masked_fill(peak.isinf(), 0.0).detach()
    weights = torch.exp(scores - peak.gather(-1, slots.head)).masked_fill(~slots.valid, 0.0)
    total = weights.new_zeros(bsz, tq, heads).scatter_add(-1, slots.head, weights)
    probs = weights / total.gather(-1, slots.head).clamp_min(torch.finfo(compute).tiny)
    out = torch.zeros(bsz, tq, heads, dim, dtype=compute).scatter_add(2, index, probs.unsqueeze(-1) * v_s)
    return out.transpose(1, 2).to(q.dtype), probs.detach()
