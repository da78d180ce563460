"""Thread each layer's SEA decoding state through transformers' KV cache.

transformers updates its cache before calling the attention function and does not pass
the cache to it. A forward pre-hook on every patched attention module remembers the
transformers ``Cache`` object handed to the module, found by its type among the call's
arguments, not by a keyword name (the keyword changed from ``past_key_value`` to
``past_key_values`` to ``cache`` across 4.x and 5.x). The attention function then keeps a
``DecodeState`` on that cache's layer object, beside its keys and values. The layer's
batch operations (beam-search reordering, batch selection and expansion, reset) are
wrapped so the state follows the keys; cropping (assisted decoding) raises, and so does a cache
whose layers hand back other keys than they were given (quantized caches).

A causal call with past keys (Tq < Tk) for which no state can be attached raises
:class:`DecodingStateError` instead of computing something else.
"""

from __future__ import annotations

from typing import Any

import transformers
from torch import nn
from transformers.cache_utils import BaseQuantizedLayer, Cache

from ..core.decoding import DecodeState

CACHE_ATTR = "sea_cache"  # on an attention module, during its forward: the cache it was given
STATE_ATTR = "sea_state"  # on a cache layer: that layer's DecodeState
HOOKS_ATTR = "sea_cache_hooks"  # on an attention module: the hook handles


def attach_cache_hooks(module: nn.Module) -> None:
    """Make ``module`` remember the cache passed to its forward (cleared afterwards)."""

    def remember(mod: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        object.__setattr__(mod, CACHE_ATTR, find_cache(args, kwargs))

    def forget(mod: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        object.__setattr__(mod, CACHE_ATTR, None)

    handles = (module.register_forward_pre_hook(remember, with_kwargs=True),
               module.register_forward_hook(forget, with_kwargs=True))
    object.__setattr__(module, HOOKS_ATTR, handles)
    object.__setattr__(module, CACHE_ATTR, None)


class DecodingStateError(ValueError):
    """A decoding call arrived for which SEA cannot attach its decoding state."""


def find_cache(args: tuple, kwargs: dict[str, Any]) -> Cache | None:
    """The transformers ``Cache`` among a module call's arguments, whatever its keyword."""
    found = [x for x in (*args, *kwargs.values()) if isinstance(x, Cache)]
    if len(found) > 1:
        raise DecodingStateError(f"an attention call got {len(found)} KV caches; SEA expects at most one")
    return found[0] if found else None


def detach_cache_hooks(module: nn.Module) -> None:
    for handle in module.__dict__.pop(HOOKS_ATTR, ()):
        handle.remove()
    module.__dict__.pop(CACHE_ATTR, None)


def decode_state(module: nn.Module, layer_idx: int, tq: int, tk: int) -> DecodeState | None:
    """The DecodeState for this call, or None when the forward runs without a cache.

    A call with no past keys starts a fresh state; a later call must continue it exactly.
    A call with past keys but no cache to read the state from raises ``DecodingStateError``.
    """
    cache = module.__dict__.get(CACHE_ATTR)
    if cache is None:
        if tk > tq:
            raise DecodingStateError(
                f"{type(module).__name__} was called with {tk - tq} past keys but SEA found no transformers Cache "
                f"among its arguments (transformers {transformers.__version__}), so it has no decoding state for "
                "them; decode through model(..., **cache_kwargs(GrowingCache())) (or a DynamicCache()) / generate(), "
                "or report this transformers version as unsupported")
        return None
    cache = getattr(cache, "self_attention_cache", cache)  # encoder-decoder caches
    layers = getattr(cache, "layers", None)
    if layers is None or len(layers) <= layer_idx:
        raise DecodingStateError(f"SEA decoding needs a transformers Cache with per-layer storage (DynamicCache); "
                                 f"got {type(cache).__name__}")
    layer = layers[layer_idx]
    _validate_layer(layer)
    past = tk - tq
    state = getattr(layer, STATE_ATTR, None)
    if past == 0:
        state = DecodeState()
        _attach(layer, state)
    elif state is None or state.seen != past:
        seen = "no SEA state" if state is None else f"SEA state for {state.seen} keys"
        raise DecodingStateError(f"the KV cache holds {past} past keys but {seen}: SEA decoding supports caches that "
                                 "only grow (GrowingCache, DynamicCache); sliding-window, static and cropped caches are not supported")
    return state


def _validate_layer(layer: Any) -> None:
    """Refuse a cache layer whose past keys change (quantized caches): SEA's decoding state keeps vectors
    computed from each key as it arrived, which would no longer be the keys the cache hands back."""
    if isinstance(layer, BaseQuantizedLayer):  # every quantized layer (quanto, hqq, fp8)
        raise DecodingStateError(f"SEA decoding cannot use {type(layer).__name__} cache layers: they hand back "
                                 "quantized past keys, not the keys SEA's decoding state was built from; use a cache "
                                 "that keeps them exactly (GrowingCache, DynamicCache)")


def _attach(layer: Any, state: DecodeState) -> None:
    setattr(layer, STATE_ATTR, state)
    if getattr(layer, "_sea_wrapped", False):
        return

    def with_state(name: str, update):
        original = getattr(layer, name, None)
        if original is None:
            return

        def wrapped(*args, **kwargs):
            result = original(*args, **kwargs)
            current = getattr(layer, STATE_ATTR, None)
            if current is not None:
                update(current, *args, **kwargs)
            return result

        setattr(layer, name, wrapped)

    with_state("reorder_cache", lambda s, beam_idx: s.select(beam_idx))
    with_state("batch_select_indices", lambda s, indices: s.select(indices))
    with_state("batch_repeat_interleave", lambda s, repeats: s.repeat_interleave(repeats))
    original_reset, original_crop = getattr(layer, "reset", None), getattr(layer, "crop", None)

    def reset(*args, **kwargs):
        setattr(layer, STATE_ATTR, None)
        return original_reset(*args, **kwargs) if original_reset else None

    def crop(*args, **kwargs):
        if getattr(layer, STATE_ATTR, None) is not None:
            raise NotImplementedError("SEA decoding state cannot be cropped (assisted/speculative decoding): "
                                      "its running sums cannot forget tokens")
        return original_crop(*args, **kwargs)

    layer.reset = reset
    if original_crop is not None:
        layer.crop = crop
    layer._sea_wrapped = True
