"""`GrowingCache`: a transformers KV cache that grows in spare capacity instead of by concatenation.

transformers' ``DynamicCache`` appends a decoding step's key and value with ``torch.cat``, which
copies every cached key and value of the layer: at 32k tokens that copy costs more than SEA's whole
step. Here each layer keeps its keys and values in ``GrowingRows`` (``core/decoding.py``, the rule
SEA's own prefix sums grow by): a step writes its new rows into spare capacity and the attention
reads a view of the rows in use. Nothing else changes: dense attention and SEA see exactly the
tensors a ``DynamicCache`` would hand them, so the two modes can be timed on the same cache class.

    cache = GrowingCache()
    model.generate(**inputs, **cache_kwargs(cache))      # or model(ids, **cache_kwargs(cache))

``cache_kwargs`` names the cache by the keyword the installed transformers takes: ``cache`` from
5.24 (where ``past_key_values`` still works but emits a FutureWarning in ``generate`` and in the
models' ``forward``), ``past_key_values`` in 5.23 (which has no ``cache`` keyword: ``generate``
refuses it as an unused model kwarg).
"""

from __future__ import annotations

import functools
import inspect

import torch
from transformers.cache_utils import Cache, DynamicLayer

from ..core.decoding import GrowingRows

SEQ_DIM = 2  # keys and values are (B, H_kv, T, d)


class GrowingLayer(DynamicLayer):
    """One layer's keys and values, (B, H_kv, T, d) views of storage with room to grow."""

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self._grown: tuple[GrowingRows, GrowingRows] | None = None
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args,
               **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the new keys and values; returns all of them (views, no copy of the past)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self._grown is None:  # the first call keeps its tensors as they are (no spare rows yet)
            self._grown = (GrowingRows.of(key_states, SEQ_DIM), GrowingRows.of(value_states, SEQ_DIM))
        else:
            self._grown[0].append(key_states)
            self._grown[1].append(value_states)
        self.keys, self.values = self._grown[0].rows, self._grown[1].rows
        return self.keys, self.values

    def _adopt(self) -> None:
        """Take ``self.keys`` / ``self.values`` as set by a batch operation as the rows in use."""
        if self.is_initialized and self.keys is not None and self.keys.numel():
            self._grown = (GrowingRows.of(self.keys, SEQ_DIM), GrowingRows.of(self.values, SEQ_DIM))

    def reset(self) -> None:
        super().reset()
        self._grown = None

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        self._adopt()

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._adopt()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._adopt()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._adopt()


class GrowingCache(Cache):
    """A ``DynamicCache`` stand-in whose layers grow in spare capacity (``GrowingLayer``)."""

    def __init__(self) -> None:
        super().__init__(layer_class_to_replicate=GrowingLayer)


@functools.cache
def cache_keyword() -> str:
    """The keyword transformers' ``generate`` and models' ``forward`` take a KV cache by.

    Read from the installed transformers, not its version number: the name the generation loop hands
    the cache to the model under (``prepare_inputs_for_generation``'s parameter) is ``cache`` from
    5.24 and ``past_key_values`` before.
    """
    from transformers.generation.utils import GenerationMixin

    parameters = inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def cache_kwargs(cache: Cache) -> dict[str, Cache]:
    """``{keyword: cache}`` for ``model.generate(..., **cache_kwargs(cache))`` or a model's forward,
    under the keyword the installed transformers takes without a deprecation warning."""
    return {cache_keyword(): cache}
