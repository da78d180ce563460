"""Attention on selected keys only, in linear memory, with its own backward.

Each query owns S slots (head, key) flattened over heads (``cells.KeySlots``). The
forward processes queries in chunks; a long chunk gathers its slot keys/values once,
scores all heads of a query against all its slots with one small matmul and lets each
head keep only its own slots (a masked softmax); a short chunk scores its key span with
plain matmuls and masks. Only the slot probabilities (B, Tq, S) are kept for backward,
which re-gathers keys and values, so memory stays O(Tq * S) plus one chunk of
O(chunk * H * max(S, span) + chunk * S * d) — never Tq x Tk.

``naive_sparse_attention`` is the same computation with plain autograd, kept beside it
as a readable fallback; both are tested against ``reference.reference_attention``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..cells import KeySlots
from .reference import repeat_kv


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


def _key_span(key: Tensor, valid: Tensor) -> int:
    """How many leading keys a chunk's slots reach (1 + the largest used key index)."""
    used = torch.where(valid, key, -1)
    return int(used.max()) + 1 if used.numel() else 0


def _dense_allowed(head: Tensor, key: Tensor, valid: Tensor, heads: int, span: int) -> Tensor:
    """The chunk's slots as a (B, H, c, span) bool mask."""
    bsz, rows, _ = head.shape
    dump = heads * span  # unused slots land in one extra column
    flat = torch.where(valid, head * span + key, dump)
    mask = torch.zeros(bsz, rows, dump + 1, dtype=torch.bool, device=head.device).scatter_(-1, flat, True)
    return mask[..., :dump].view(bsz, rows, heads, span).transpose(1, 2)


def _masked_softmax(scores: Tensor, allowed: Tensor) -> Tensor:
    scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)  # finite: empty rows stay NaN-free
    return torch.softmax(scores, dim=-1).masked_fill(~allowed, 0.0)


class _SparseAttention(torch.autograd.Function):
    """Per chunk of queries, one of two exact strategies, whichever touches fewer scores:

    * ``slots``: gather the chunk's S slot keys per query and score all heads against them
      (H * S scores per query; the long-sequence case);
    * ``dense``: score every head against the chunk's whole key span with plain matmuls and
      mask to the slots (H * span scores per query, no gather; short sequences, where S is
      about as large as the span anyway).
    """

    @staticmethod
    def forward(ctx, q, k, v, head, key, valid, scale, chunk, mode):
        bsz, heads, tq, dim = q.shape
        kv_heads, keys = k.shape[1], k.shape[2]
        groups = heads // kv_heads
        compute = torch.promote_types(q.dtype, torch.float32)
        dtypes = (q.dtype, k.dtype, v.dtype)
        # contiguous: transformers hands over (B, T, H, d)-strided views when it has no cache
        q, k, v = (x.to(compute).contiguous() for x in (q, k, v))
        k_flat, v_flat = k.view(-1, dim), v.view(-1, dim)
        out = q.new_empty(bsz, heads, tq, dim)
        probs = q.new_empty(head.shape)  # (B, Tq, S): each slot's probability in its own head
        for lo in range(0, tq, chunk):
            sl = slice(lo, lo + chunk)
            h, kk, ok = head[:, sl], key[:, sl], valid[:, sl]
            span = _key_span(kk, ok)
            if span == 0:  # no query of this chunk attends to anything
                out[:, :, sl], probs[:, sl] = 0.0, 0.0
            elif _use_dense(mode, span, head.shape[-1]):
                k_span = repeat_kv(k[:, :, :span], groups)  # (B, H, span, d)
                allowed = _dense_allowed(h, kk, ok, heads, span)  # (B, H, c, span)
                p = _masked_softmax((q[:, :, sl] @ k_span.transpose(-1, -2)) * scale, allowed)
                out[:, :, sl] = p @ repeat_kv(v[:, :, :span], groups)
                flat = (h * span + kk) * ok
                probs[:, sl] = p.transpose(1, 2).reshape(bsz, h.shape[1], -1).gather(-1, flat) * ok
            else:
                rows = _flat_rows(h, kk, groups, kv_heads, keys)
                own = _own_slots(h, ok, heads)
                q_c = q[:, :, sl].transpose(1, 2)  # (B, c, H, d)
                p = _masked_softmax((q_c @ _gather_rows(k_flat, rows).transpose(-1, -2)) * scale, own)
                out[:, :, sl] = (p @ _gather_rows(v_flat, rows)).transpose(1, 2)
                probs[:, sl] = p.sum(2)  # one non-zero per slot column
        ctx.save_for_backward(q, k, v, head, key, valid, probs, out)
        ctx.scale, ctx.chunk, ctx.mode, ctx.dtypes = scale, chunk, mode, dtypes
        ctx.mark_non_differentiable(probs)
        return out, probs

    @staticmethod
    def backward(ctx, grad_out, _grad_probs):
        q, k, v, head, key, valid, probs, out = ctx.saved_tensors
        scale, chunk = ctx.scale, ctx.chunk
        bsz, heads, tq, dim = q.shape
        kv_heads, keys = k.shape[1], k.shape[2]
        groups = heads // kv_heads
        grad_out = grad_out.to(q.dtype)
        delta = (grad_out * out).sum(-1, keepdim=True)  # (B, H, Tq, 1): sum_s p_s dp_s per head
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        k_flat, v_flat = k.reshape(-1, dim), v.reshape(-1, dim)
        dk_flat, dv_flat = dk.view(-1, dim), dv.view(-1, dim)
        for lo in range(0, tq, chunk):
            sl = slice(lo, lo + chunk)
            h, kk, ok = head[:, sl], key[:, sl], valid[:, sl]
            g, p_slots = grad_out[:, :, sl], probs[:, sl]
            span = _key_span(kk, ok)
            if span == 0:
                continue
            if _use_dense(ctx.mode, span, head.shape[-1]):
                k_span, v_span = repeat_kv(k[:, :, :span], groups), repeat_kv(v[:, :, :span], groups)
                flat = torch.where(ok, h * span + kk, heads * span)
                p = q.new_zeros(bsz, h.shape[1], heads * span + 1).scatter_(-1, flat, p_slots * ok)
                p = p[..., :-1].view(bsz, -1, heads, span).transpose(1, 2)  # (B, H, c, span)
                dscore = p * (g @ v_span.transpose(-1, -2) - delta[:, :, sl]) * scale
                dq[:, :, sl] = dscore @ k_span
                shape = (bsz, kv_heads, groups, span, dim)
                dk[:, :, :span] += (dscore.transpose(-1, -2) @ q[:, :, sl]).view(shape).sum(2)
                dv[:, :, :span] += (p.transpose(-1, -2) @ g).view(shape).sum(2)
            else:
                rows = _flat_rows(h, kk, groups, kv_heads, keys)
                own = _own_slots(h, ok, heads)
                p = p_slots.unsqueeze(2) * own  # (B, c, H, S) rebuilt from the slot probabilities
                k_s, v_s = _gather_rows(k_flat, rows), _gather_rows(v_flat, rows)
                g_c = g.transpose(1, 2)  # (B, c, H, d)
                dscore = p * (g_c @ v_s.transpose(-1, -2) - delta[:, :, sl].transpose(1, 2)) * scale
                dq[:, :, sl] = (dscore @ k_s).transpose(1, 2)
                index = rows.flatten()
                dk_flat.index_add_(0, index, (dscore.transpose(-1, -2) @ q[:, :, sl].transpose(1, 2)).flatten(0, 2))
                dv_flat.index_add_(0, index, (p.transpose(-1, -2) @ g_c).flatten(0, 2))
        q_dtype, k_dtype, v_dtype = ctx.dtypes
        return dq.to(q_dtype), dk.to(k_dtype), dv.to(v_dtype), None, None, None, None, None, None


MODES = ("auto", "slots", "dense")


def _use_dense(mode: str, span: int, slots: int) -> bool:
    return mode == "dense" or (mode == "auto" and span <= slots)


def sparse_attention(q: Tensor, k: Tensor, v: Tensor, slots: KeySlots, scale: float,
                     chunk: int = 256, mode: str = "auto") -> tuple[Tensor, Tensor]:
    """Softmax attention of each query over its slots only.

    q (B, H, Tq, d), k and v (B, H_kv, Tk, d). Returns the context (B, H, Tq, d) in q's
    dtype and the slot probabilities (B, Tq, S) (fp32, no gradient). A query with no
    slot in a head gets a zero context for that head. ``mode`` picks the per-chunk
    strategy (``auto``, ``slots`` or ``dense``; all give the same result).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    out, probs = _SparseAttention.apply(q, k, v, slots.head, slots.key, slots.valid, scale, chunk, mode)
    return out.to(q.dtype), probs


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
