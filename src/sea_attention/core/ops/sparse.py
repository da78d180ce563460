"""Attention on selected keys only, in linear memory, with its own backward.

Each query owns S slots (head, key) flattened over heads (``cells.KeySlots``). The
forward processes queries in chunks, each chunk in one of two exact ways:

* ``slots`` (long rows): the chunk's used slots become a sparse CSR matrix with one row
  per (head, query) and one column per key row of K/V, so each query-head only scores its
  own slots: ``sampled_addmm`` computes exactly those scores, a segment softmax runs along
  each row, and ``embedding_bag`` sums the weighted value rows. Nothing of size
  H x S or S x d is built; rows are ordered head-major, so the queries of a chunk that
  read the same head's keys run one after another. A handful of queries (decoding)
  instead gathers its slots' keys once and scores all heads against them.
* ``dense`` (short rows): plain matmuls over the chunk's key span, masked to the slots.

Only the slot probabilities (B, Tq, S) are kept for backward, which rebuilds the same
CSR rows: score gradients with ``sampled_addmm``, dq with ``embedding_bag``, and dk / dv
with ``embedding_bag`` over the entries sorted by key. Memory stays O(Tq * S) plus one
chunk of O(chunk * S) (``slots``) or O(chunk * H * span) (``dense``) -- never Tq x Tk.

``naive_sparse_attention`` is the same computation with plain autograd, kept beside it
as a readable fallback; both are tested against ``reference.reference_attention``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..cells import KeySlots
from ..rows import RowTable, row_table, same_layout, sampled_dots
from .reference import repeat_kv


def _flat_rows(head: Tensor, key: Tensor, groups: int, table: RowTable) -> Tensor:
    """Row of each slot in ``table``: (B, c, S) long."""
    batch = torch.arange(head.shape[0], device=head.device).view(-1, 1, 1)
    return table.row(batch, head // groups, key)


def _gather_rows(x: Tensor, rows: Tensor) -> Tensor:
    """x (N, d), rows (B, c, S) -> (B, c, S, d)."""
    return x.index_select(0, rows.flatten()).view(*rows.shape, x.shape[-1])


@dataclass
class _Rows:
    """A chunk's used slots as a CSR matrix: row (h, b, i) holds query i's slots of head h.

    ``crow`` (R + 1,) row offsets, ``counts`` (R,) entries per row, ``col`` (nnz,) the
    entries' rows in k.reshape(B * H_kv * Tk, d), ``slot`` (nnz,) each entry's place in
    the chunk's slots flattened over (B, c, S). R = H * B * c.
    """

    crow: Tensor
    counts: Tensor
    col: Tensor
    slot: Tensor

    def sampled_dot(self, rows: Tensor, table: Tensor, scale: float) -> Tensor:
        """scale * <rows[r], table[col]> for every entry (nnz,): rows (R, d), table (N, d)."""
        return sampled_dots(self.crow, self.col, rows, table, scale)

    def weighted_sum(self, table: Tensor, weights: Tensor) -> Tensor:
        """sum over a row's entries of weights * table[col]: (R, d)."""
        return F.embedding_bag(self.col, table, self.crow, per_sample_weights=weights, mode="sum",
                               include_last_offset=True)

    def per_entry(self, per_row: Tensor) -> Tensor:
        """Broadcast a (R,) row value to every entry of the row: (nnz,)."""
        return torch.repeat_interleave(per_row, self.counts, output_size=self.col.numel())

    def softmax(self, scores: Tensor) -> Tensor:
        """Softmax of the entries of each row (in place on ``scores``)."""
        peak = torch.segment_reduce(scores, "max", lengths=self.counts)  # -inf for empty rows, never read
        weights = scores.sub_(self.per_entry(peak)).exp_()
        total = torch.segment_reduce(weights, "sum", lengths=self.counts)
        return weights.mul_(self.per_entry(total.reciprocal_()))

    def transposed_sums(self, *pairs: tuple[Tensor, Tensor]) -> tuple[Tensor, list[Tensor]]:
        """Transposed products, one sort for all: for each (table (R, d), weights (nnz,)) pair,
        the sum over the entries of each column of weights * table[row].

        Returns the columns touched (U,) and one (U, d) tensor per pair.
        """
        rows = self.per_entry(torch.arange(self.counts.numel(), device=self.col.device))
        small = bool(self.col.numel()) and int(self.col.max()) < 2 ** 31
        order = torch.argsort(self.col.int() if small else self.col)  # int32 sorts about twice as fast
        col, rows = self.col.index_select(0, order), rows.index_select(0, order)
        touched, per_col = torch.unique_consecutive(col, return_counts=True)
        offsets = torch.zeros(touched.numel() + 1, dtype=torch.long, device=col.device)
        torch.cumsum(per_col, 0, out=offsets[1:])
        return touched, [F.embedding_bag(rows, table, offsets, per_sample_weights=weights.index_select(0, order),
                                         mode="sum", include_last_offset=True) for table, weights in pairs]


def _rows(head: Tensor, key: Tensor, valid: Tensor, heads: int, groups: int, table: RowTable) -> _Rows:
    """The CSR rows of a chunk's slots (B, c, S), columns in ``table``; see ``_Rows``."""
    bsz, rows, width = head.shape
    device = head.device
    owner = torch.where(valid, head, heads)  # unused slots go to an extra head H, left out below
    if bool((owner[..., 1:] < owner[..., :-1]).any()):  # used slots not first / not by head: sort them
        order = torch.sort(owner, dim=-1, stable=True).indices
        head, key, owner = (x.gather(-1, order) for x in (head, key, owner))
        place = (order + torch.arange(bsz * rows, device=device).view(bsz, rows, 1) * width).flatten()
    else:
        place = None
    runs = torch.zeros(bsz, rows, heads + 1, dtype=torch.long, device=device)
    runs.scatter_add_(-1, owner, torch.ones((), dtype=torch.long, device=device).expand_as(owner))
    run_start = runs.cumsum(-1) - runs  # (B, c, H+1) first slot of each head's run in a query
    counts = runs.permute(2, 0, 1).flatten()  # rows (h, b, i); the unused ones (h = H) come last
    used_rows = heads * bsz * rows
    crow = torch.zeros(counts.numel() + 1, dtype=torch.long, device=device)
    torch.cumsum(counts, 0, out=crow[1:])
    nnz = int(crow[used_rows])
    counts, crow = counts[:used_rows], crow[:used_rows + 1]
    first = (torch.arange(bsz * rows, device=device).view(bsz, rows, 1) * width + run_start).permute(2, 0, 1)
    slot = torch.repeat_interleave(first.flatten()[:used_rows] - crow[:-1], counts, output_size=nnz)
    slot += torch.arange(nnz, device=device)  # first slot of the run + place inside the run
    col = _flat_rows(head, key, groups, table).flatten().index_select(0, slot)
    if place is not None:
        slot = place.index_select(0, slot)
    return _Rows(crow, counts, col, slot)


def _head_rows(x: Tensor) -> Tensor:
    """(B, H, c, d) -> (H * B * c, d), the row order of ``_Rows``."""
    return x.transpose(0, 1).reshape(-1, x.shape[-1])


def _scatter_slots(values: Tensor, slot: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Per-entry values back to the chunk's slots (B, c, S), 0 on unused slots."""
    return values.new_zeros(shape).view(-1).scatter_(0, slot, values).view(shape)


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
    """Per chunk of queries, one of two exact strategies:

    * ``slots``: the chunk's used slots as CSR rows (``_Rows``): about S scores per query,
      one per used slot (the long-sequence case). A chunk of at most ``FEW_QUERIES``
      queries (decoding) gathers its slots' keys once and scores all heads against them
      instead (H * S scores, a fixed cost below the CSR set-up's); backward always uses CSR;
    * ``dense``: score every head against the chunk's whole key span with plain matmuls and
      mask to the slots (H * span scores per query, no gather; short sequences, where S is
      about as large as the span anyway).
    """

    @staticmethod
    def forward(ctx, q, k, v, slots: KeySlots, plan: "_Plan"):
        head, key, valid = slots.head, slots.key, slots.valid
        scale, chunk, mode = plan.scale, plan.chunk, plan.mode
        bsz, heads, tq, dim = q.shape
        kv_heads = k.shape[1]
        groups = heads // kv_heads
        compute = torch.promote_types(q.dtype, torch.float32)
        dtypes = (q.dtype, k.dtype, v.dtype)
        q, k, v = q.to(compute).contiguous(), k.to(compute), v.to(compute)
        k_table, v_table = same_layout(k, v)  # in place; copies only uneven layouts (transformers' no-cache views)
        k_flat, v_flat = k_table.rows, v_table.rows
        out = q.new_empty(bsz, heads, tq, dim)
        probs = q.new_empty(head.shape)  # (B, Tq, S): each slot's probability in its own head
        for sl, span, strategy in _chunks(key, valid, chunk, mode, heads):
            h, kk, ok = head[:, sl], key[:, sl], valid[:, sl]
            if span == 0:  # no query of this chunk attends to anything
                out[:, :, sl], probs[:, sl] = 0.0, 0.0
            elif strategy == "dense":
                k_span = repeat_kv(k[:, :, :span], groups)  # (B, H, span, d)
                allowed = _dense_allowed(h, kk, ok, heads, span)  # (B, H, c, span)
                p = _masked_softmax((q[:, :, sl] @ k_span.transpose(-1, -2)) * scale, allowed)
                out[:, :, sl] = p @ repeat_kv(v[:, :, :span], groups)
                flat = (h * span + kk) * ok
                probs[:, sl] = p.transpose(1, 2).reshape(bsz, h.shape[1], -1).gather(-1, flat) * ok
            elif strategy == "few":  # decoding: gather the slots once, score all heads
                rows = _flat_rows(h, kk, groups, k_table)
                own = _own_slots(h, ok, heads)
                q_c = q[:, :, sl].transpose(1, 2)  # (B, c, H, d)
                p = _masked_softmax((q_c @ _gather_rows(k_flat, rows).transpose(-1, -2)) * scale, own)
                out[:, :, sl] = (p @ _gather_rows(v_flat, rows)).transpose(1, 2)
                probs[:, sl] = p.sum(2)  # one non-zero per slot column
            else:
                rows = _rows(h, kk, ok, heads, groups, k_table)
                p = rows.softmax(rows.sampled_dot(_head_rows(q[:, :, sl]), k_flat, scale))
                out[:, :, sl] = rows.weighted_sum(v_flat, p).view(heads, bsz, -1, dim).transpose(0, 1)
                probs[:, sl] = _scatter_slots(p, rows.slot, h.shape)
        ctx.save_for_backward(q, k, v, head, key, valid, probs, out)
        ctx.plan, ctx.dtypes = plan, dtypes
        ctx.mark_non_differentiable(probs)
        return out, probs

    @staticmethod
    def backward(ctx, grad_out, _grad_probs):
        q, k, v, head, key, valid, probs, out = ctx.saved_tensors
        scale, chunk = ctx.plan.scale, ctx.plan.chunk
        bsz, heads, tq, dim = q.shape
        kv_heads = k.shape[1]
        groups = heads // kv_heads
        grad_out = grad_out.to(q.dtype)
        delta = (grad_out * out).sum(-1, keepdim=True)  # (B, H, Tq, 1): sum_s p_s dp_s per head
        dq, dk, dv = torch.zeros_like(q), k.new_zeros(k.shape), v.new_zeros(v.shape)  # contiguous
        table = row_table(k.contiguous())  # the layout of dk and dv
        k_flat, v_flat, dk_flat, dv_flat = table.rows, v.reshape(-1, dim), dk.view(-1, dim), dv.view(-1, dim)
        for sl, span, strategy in _chunks(key, valid, chunk, ctx.plan.mode, heads):
            h, kk, ok = head[:, sl], key[:, sl], valid[:, sl]
            g, p_slots = grad_out[:, :, sl], probs[:, sl]
            if span == 0:
                continue
            if strategy == "dense":
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
                rows = _rows(h, kk, ok, heads, groups, table)
                p = p_slots.reshape(-1).index_select(0, rows.slot)
                g_rows, q_rows = _head_rows(g), _head_rows(q[:, :, sl])
                dp = rows.sampled_dot(g_rows, v_flat, 1.0)  # dL/dp of every entry
                dscore = dp.sub_(rows.per_entry(_head_rows(delta[:, :, sl]).view(-1))).mul_(p).mul_(scale)
                dq[:, :, sl] = rows.weighted_sum(k_flat, dscore).view(heads, bsz, -1, dim).transpose(0, 1)
                touched, (dk_part, dv_part) = rows.transposed_sums((q_rows, dscore), (g_rows, p))
                dk_flat.index_add_(0, touched, dk_part)
                dv_flat.index_add_(0, touched, dv_part)
        q_dtype, k_dtype, v_dtype = ctx.dtypes
        return dq.to(q_dtype), dk.to(k_dtype), dv.to(v_dtype), None, None


MODES = ("auto", "slots", "dense")


@dataclass(frozen=True)
class _Plan:
    """How ``_SparseAttention`` runs: the score scale, queries per chunk and the chunk strategy."""

    scale: float
    chunk: int
    mode: str


SLOT_CHUNKS = 4  # a CSR chunk spans this many chunks: its memory, O(chunk * S), is far below a dense one's
FEW_QUERIES = 8  # up to this many queries (decoding), the CSR set-up costs more than scoring all H x S pairs


def _chunks(key: Tensor, valid: Tensor, chunk: int, mode: str, heads: int):
    """The query chunks and how each is computed: yields (slice, key span, strategy), the
    strategy one of ``dense``, ``few`` (gathered slots, all heads) or ``rows`` (CSR).

    ``auto`` compares scores per query: ``dense`` computes H * span of them with matmuls,
    ``few`` H * S the same way, ``rows`` at most S but each costs about 3 matmul scores
    (measured on CPU), so ``dense`` wins below H * span <= 1.5 S.
    """
    bsz, tq, slots = key.shape
    lo = 0
    while lo < tq:
        sl = slice(lo, lo + chunk)
        span = _key_span(key[:, sl], valid[:, sl])
        few = bsz * min(chunk * SLOT_CHUNKS, tq - lo) <= FEW_QUERIES
        if mode != "auto":
            dense = mode == "dense"
        elif few:
            dense = span <= slots
        else:
            dense = 2 * heads * span <= 3 * slots
        if span and not dense:
            sl = slice(lo, lo + chunk * SLOT_CHUNKS)
        yield sl, span, "dense" if dense else "few" if few else "rows"
        lo = min(sl.stop, tq)


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
    out, probs = _SparseAttention.apply(q, k, v, slots, _Plan(scale, chunk, mode))
    return out.to(q.dtype), probs


@torch.no_grad()
def candidate_scores(q: Tensor, k: Tensor, slots: KeySlots, scale: float, chunk: int = 256) -> Tensor:
    """scale * q . k of every used slot, (B, Tq, S) fp32, -inf on unused slots: the scores the
    ``rows`` strategy computes (CSR ``sampled_dot``), ``chunk`` queries at a time."""
    bsz, heads, tq, dim = q.shape
    kv_heads = k.shape[1]
    compute = torch.promote_types(q.dtype, torch.float32)
    table = row_table(k.to(compute))
    out = torch.full(slots.head.shape, float("-inf"), dtype=compute, device=q.device)
    for lo in range(0, tq, chunk):
        sl = slice(lo, lo + chunk)
        rows = _rows(slots.head[:, sl], slots.key[:, sl], slots.valid[:, sl], heads, heads // kv_heads, table)
        scores = rows.sampled_dot(_head_rows(q[:, :, sl].to(compute)).contiguous(), table.rows, scale)
        part = out[:, sl]
        out[:, sl] = part.reshape(-1).scatter(0, rows.slot, scores).view_as(part)
    return out


def naive_sparse_attention(q: Tensor, k: Tensor, v: Tensor, slots: KeySlots, scale: float) -> tuple[Tensor, Tensor]:
    """The same as ``sparse_attention`` with plain autograd and a per-slot segment softmax:
    readable, one chunk, more memory."""
    bsz, heads, tq, dim = q.shape
    compute = torch.promote_types(q.dtype, torch.float32)
    rows = _flat_rows(slots.head, slots.key, heads // k.shape[1], row_table(k.contiguous()))
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
