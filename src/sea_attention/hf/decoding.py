"""Thread each layer's SEA decoding state through transformers' KV cache.

transformers updates its cache before calling the attention function and does not pass
the cache to it. A forward pre-hook on every patched attention module remembers the
``past_key_values`` of the current call; the attention function then keeps a
``DecodeState`` on that cache's layer object, beside its keys and values. The layer's
batch operations (beam-search reordering, batch selection and expansion, reset) are
wrapped so the state follows the keys; cropping (assisted decoding) raises.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..decoding import DecodeState

CACHE_ATTR = "sea_cache"  # on an attention module, during its forward: the cache it was given
STATE_ATTR = "sea_state"  # on a cache layer: that layer's DecodeState
HOOKS_ATTR = "sea_cache_hooks"  # on an attention module: the hook handles


def attach_cache_hooks(module: nn.Module) -> None:
    """Make ``module`` remember the cache passed to its forward (cleared afterwards)."""

    def remember(mod: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        cache = kwargs.get("past_key_values", kwargs.get("past_key_value"))
        object.__setattr__(mod, CACHE_ATTR, cache)

    def forget(mod: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        object.__setattr__(mod, CACHE_ATTR, None)

    handles = (module.register_forward_pre_hook(remember, with_kwargs=True),
               module.register_forward_hook(forget, with_kwargs=True))
    object.__setattr__(module, HOOKS_ATTR, handles)
    object.__setattr__(module, CACHE_ATTR, None)


def detach_cache_hooks(module: nn.Module) -> None:
    for handle in module.__dict__.pop(HOOKS_ATTR, ()):
        handle.remove()
    module.__dict__.pop(CACHE_ATTR, None)


def decode_state(module: nn.Module, layer_idx: int, tq: int, tk: int) -> DecodeState | None:
    """The DecodeState for this call, or None when the forward runs without a cache.

    A call with no past keys starts a fresh state; a later call must continue it exactly.
    """
    cache = module.__dict__.get(CACHE_ATTR)
    if cache is None:
        return None
    cache = getattr(cache, "self_attention_cache", cache)  # encoder-decoder caches
    layers = getattr(cache, "layers", None)
    if layers is None or len(layers) <= layer_idx:
        raise ValueError(f"SEA decoding needs a transformers Cache with per-layer storage (DynamicCache); "
                         f"got {type(cache).__name__}")
    layer = layers[layer_idx]
    past = tk - tq
    state = getattr(layer, STATE_ATTR, None)
    if past == 0:
        state = DecodeState()
        _attach(layer, state)
    elif state is None or state.seen != past:
        seen = "no SEA state" if state is None else f"SEA state for {state.seen} keys"
        raise ValueError(f"the KV cache holds {past} past keys but {seen}: SEA decoding supports caches that "
                         "only grow (DynamicCache); sliding-window, static and cropped caches are not supported")
    return state


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
