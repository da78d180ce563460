"""Incremental decoding state of one causal SEA layer.

Everything SEA needs from earlier tokens, so that a new token costs the same whatever the
context length (apart from reading its selected keys and values):

* the Performer's running sums, sum phi(k) v'^T and sum phi(k), computed with the feature map;
* with ``kernel_bins`` / ``key_bins``, the running sums of phi(k) / k at the last row's K + 1 bin
  edges, which a call moves forward over the keys it passes, and phi(k) of every key (the keys are
  the KV cache's): ``kernel_bins.BinSums``; with ``key_bounds``, the keys' running
  extremes by rank and a window table that gains a row per completed block of keys;
* the last 8 rows of the CNN decoder's input (its causal receptive field) and their masks;
* the running sum of V over valid keys and the number of valid keys (the average branch,
  key ranks and row lengths all follow from it);
* with the ``block`` grouping, the selection of the block that is still open;
* whether every key and value seen so far was finite (then a step checks only its new ones).

With the length policy (``SEAConfig.dense_until``, ``dense_layers``) a state whose rows were all dense so far keeps
only its last queries (``queries``: the CNN's 8 history rows, and with the block grouping the rows
back to its open block's first) and the counts; the first longer row turns it into
SEA's own state (``dense_rows.start_sea``).

What grows with the context (the counts, phi(k)) lives in ``GrowingRows``: spare capacity that
grows when full, so a decoding step writes its new rows instead of copying the whole past.

A state is filled by the first call (prefill, no past keys) and continued by calls whose
queries are exactly the keys added since; ``SEAAttention`` checks this.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import Tensor

from .blocks import BlockSelection

if TYPE_CHECKING:
    from .estimator.kernel_bins import BinSums
    from .estimator.key_bounds import BoundTable


@dataclass
class GrowingRows:
    """A tensor that grows along ``dim`` by appending into spare capacity (a quarter more, at least
    ``SPARE`` rows, when full): appending n rows costs O(n) amortised, not a copy of every earlier
    row as ``torch.cat`` does. It belongs to one decoding state: two states must not share it (their
    appends would write into the same spare rows); ``map_batch`` makes an independent copy."""

    SPARE = 256

    data: Tensor  # the storage; rows [0, length) along dim are in use
    dim: int
    length: int

    @classmethod
    def of(cls, rows: Tensor, dim: int) -> "GrowingRows":
        """Rows that are already there (no spare capacity yet: the first append makes it)."""
        return cls(rows.detach(), dim, rows.shape[dim])

    @property
    def rows(self) -> Tensor:
        """The rows in use: a view of ``data``."""
        return self.data.narrow(self.dim, 0, self.length)

    def append(self, new: Tensor) -> None:
        """Add ``new`` after the rows in use (its other dimensions match ``data``'s)."""
        start = self.length
        self.grow_to(start + new.shape[self.dim])
        self.data.narrow(self.dim, start, new.shape[self.dim]).copy_(new.detach())

    def grow_to(self, length: int) -> None:
        """Use the rows before ``length`` (at least those in use); rows new to use hold garbage
        until written (``data`` is then at least ``length`` long)."""
        if length > self.data.shape[self.dim]:
            shape = list(self.data.shape)
            shape[self.dim] = max(length, shape[self.dim] + max(self.SPARE, shape[self.dim] // 4))
            grown = self.data.new_empty(shape)
            grown.narrow(self.dim, 0, self.length).copy_(self.rows)
            self.data = grown
        self.length = max(self.length, length)

    def map_batch(self, fn: Callable[[Tensor], Tensor]) -> "GrowingRows":
        """The rows in use with ``fn`` applied to them (a new batch dimension 0)."""
        return GrowingRows.of(fn(self.rows), self.dim)


@dataclass
class DecodeState:
    seen: int = 0  # keys consumed so far
    performer: tuple[Tensor, Tensor] | None = None  # (B, H_kv, m, 2d), (B, H_kv, m)
    cnn_rows: Tensor | None = None  # (B, H*c, 8, K/4) last decoder input rows
    cnn_mask: Tensor | None = None  # (B, 1, 8, 1) their query validity
    value_sum: Tensor | None = None  # (B, H_kv, d) sum of V over valid keys
    valid_keys: Tensor | None = None  # (B,) number of valid keys
    block: BlockSelection | None = None  # grouping "block": the selection of the open block
    bin_sums: "BinSums | None" = None  # kernel_bins / key_bins: the running sums at the last row's bin edges
    key_bounds: "BoundTable | None" = None  # key_bounds: the keys' extremes by rank and block windows
    finite_past: bool = True  # every key and value before ``seen`` was finite
    queries: Tensor | None = None  # (B, H, r, d) the last queries while every row was dense (dense_rows)

    def count_keys(self, key_valid: Tensor, finite: bool) -> None:
        """Count a call's new valid keys (``key_valid`` (B, Tk), its keys after ``seen``) and whether
        they were all finite; ``seen`` becomes Tk."""
        count = key_valid[:, self.seen:].long().sum(-1)
        self.valid_keys = count if not self.seen else self.valid_keys + count
        self.finite_past = self.finite_past and finite
        self.seen = key_valid.shape[-1]

    @property
    def holds_sea(self) -> bool:
        """Whether SEA's own state was started (not empty, not only the dense rows' queries)."""
        return self.seen > 0 and self.queries is None

    def select(self, index: Tensor) -> None:
        """Keep / reorder batch rows (beam search), in place."""
        self.map_batch(lambda t: t.index_select(0, index.to(t.device)))

    def repeat_interleave(self, repeats: int) -> None:
        """Expand every batch row ``repeats`` times, in place."""
        self.map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def map_batch(self, fn: Callable[[Tensor], Tensor]) -> None:
        """Apply ``fn`` (a new batch dimension 0) to every per-sample tensor of the state, in place."""
        for name in ("cnn_rows", "cnn_mask", "value_sum", "valid_keys", "queries"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, fn(value))
        if self.performer is not None:
            self.performer = tuple(fn(x) for x in self.performer)
        for name in ("bin_sums", "key_bounds", "block"):  # objects with their own map_batch
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.map_batch(fn))
