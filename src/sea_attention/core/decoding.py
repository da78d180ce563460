"""Incremental decoding state of one causal SEA layer.

Everything SEA needs from earlier tokens, so that a new token costs the same whatever the
context length (apart from reading its selected keys and values):

* the Performer's running sums, sum phi(k) v'^T and sum phi(k), computed with the feature map;
* with ``kernel_bins`` / ``key_bins``, the sums of phi(k) / k before every position (they grow
  by one row per key, like the KV cache beside them);
* the last 8 rows of the CNN decoder's input (its causal receptive field) and their masks;
* the running sum of V over valid keys and the number of valid keys (the average branch,
  key ranks and row lengths all follow from it);
* with the ``block`` grouping, the selection of the block that is still open.

A state is filled by the first call (prefill, no past keys) and continued by calls whose
queries are exactly the keys added since; ``SEAAttention`` checks this.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from .blocks import BlockSelection


@dataclass
class DecodeState:
    seen: int = 0  # keys consumed so far
    performer: tuple[Tensor, Tensor] | None = None  # (B, H_kv, m, 2d), (B, H_kv, m)
    cnn_rows: Tensor | None = None  # (B, H*c, 8, K/4) last decoder input rows
    cnn_mask: Tensor | None = None  # (B, 1, 8, 1) their query validity
    value_sum: Tensor | None = None  # (B, H_kv, d) sum of V over valid keys
    valid_keys: Tensor | None = None  # (B,) number of valid keys
    block: BlockSelection | None = None  # grouping "block": the selection of the open block
    # kernel_bins / key_bins: sums of [phi(k), k] over the keys before each position 0..seen,
    # float64 (B, H_kv, seen + 1, m and/or d), and the valid-key counts (B, seen + 1)
    bin_sums: tuple[Tensor, Tensor] | None = None

    def select(self, index: Tensor) -> None:
        """Keep / reorder batch rows (beam search), in place."""
        for name in ("cnn_rows", "cnn_mask", "value_sum", "valid_keys"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.index_select(0, index.to(value.device)))
        for name in ("performer", "bin_sums"):
            if getattr(self, name) is not None:
                setattr(self, name, tuple(x.index_select(0, index.to(x.device)) for x in getattr(self, name)))
        if self.block is not None:
            self.block = self.block.map_batch(lambda x: x.index_select(0, index.to(x.device)))

    def repeat_interleave(self, repeats: int) -> None:
        """Expand every batch row ``repeats`` times, in place."""
        for name in ("cnn_rows", "cnn_mask", "value_sum", "valid_keys"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.repeat_interleave(repeats, dim=0))
        for name in ("performer", "bin_sums"):
            if getattr(self, name) is not None:
                setattr(self, name, tuple(x.repeat_interleave(repeats, dim=0) for x in getattr(self, name)))
        if self.block is not None:
            self.block = self.block.map_batch(lambda x: x.repeat_interleave(repeats, dim=0))
