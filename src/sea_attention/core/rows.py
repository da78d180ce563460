"""THE rule for reading a (B, H, n, f) tensor's rows as one (N, f) table, in place.

Keys and values (``ops/sparse.py``) and the estimator's prefix sums (``estimator/kernel_bins.py``)
are read by row index: row t of head h in sample b. When they are views of storage with spare
rows (a decoding state's ``GrowingRows``, ``hf.GrowingCache``), copying them together would cost
a whole context per decoding step; ``row_table`` addresses the storage itself instead.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class RowTable:
    """Row t of head h in sample b is ``rows[b * batch + h * head + t]``."""

    rows: Tensor  # (N, f)
    batch: int
    head: int

    def row(self, batch: Tensor, head: Tensor, index: Tensor) -> Tensor:
        """The table row of each (sample, head, row) triple (broadcast), long."""
        return torch.add(index, head, alpha=self.head) + batch * self.batch

    def starts(self, bsz: int, heads: int, device: torch.device) -> Tensor:
        """(B, H, 1): the table row of each (sample, head)'s row 0."""
        batch = torch.arange(bsz, device=device).view(bsz, 1, 1)
        head = torch.arange(heads, device=device).view(1, heads, 1)
        return self.row(batch, head, torch.zeros_like(head))


def row_table(x: Tensor) -> RowTable:
    """``x`` (B, H, n, f) as a ``RowTable``: in place when its rows lie evenly in memory (each row
    contiguous, every head and sample a whole number of rows apart), else a contiguous copy."""
    bsz, heads, count, f = x.shape
    strides = [0 if size == 1 else stride for size, stride in zip(x.shape, x.stride())]
    if x.stride(-1) == 1 and strides[2] in (0, f) and all(s >= 0 and s % f == 0 for s in strides[:2]):
        batch, head = strides[0] // f, strides[1] // f
        rows = (bsz - 1) * batch + (heads - 1) * head + count
        return RowTable(x.as_strided((rows, f), (f, 1)), batch, head)
    return RowTable(x.reshape(-1, f), heads * count, count)  # a copy, laid out like a contiguous x


def same_layout(a: Tensor, b: Tensor) -> tuple[RowTable, RowTable]:
    """Tables of ``a`` and ``b`` (same shape) whose rows share one index (contiguous copies when the
    two lie differently in memory)."""
    table_a, table_b = row_table(a), row_table(b)
    if (table_a.batch, table_a.head) != (table_b.batch, table_b.head):
        table_a, table_b = row_table(a.contiguous()), row_table(b.contiguous())
    return table_a, table_b


def sampled_dots(crow: Tensor, col: Tensor, rows: Tensor, table: Tensor, scale: float = 1.0) -> Tensor:
    """scale * rows[r] . table[col[e]] for every entry e of CSR row r (crow (R + 1,), col (nnz,), one
    index dtype): (nnz,). rows (R, f); table (N, f), read in place.

    One sampled product, written into its own pattern (a new result would first copy the pattern's
    indices and values). Each entry is one dot whose rounding depends on neither the other entries
    nor the rows given with it (measured, 1 and 2 threads). The pattern's values start at zero:
    ``beta=0`` does not ignore them (NaN stays NaN).
    """
    with warnings.catch_warnings():  # "sparse CSR support is in beta": sampled_addmm is stable
        warnings.simplefilter("ignore", UserWarning)
        pattern = torch.sparse_csr_tensor(crow, col, rows.new_zeros(col.shape), (rows.shape[0], table.shape[0]),
                                          check_invariants=False)
        torch.sparse.sampled_addmm(pattern, rows, table.t(), beta=0.0, alpha=scale, out=pattern)
    return pattern.values()
