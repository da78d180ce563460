"""Position ids from the attention mask, for RoPE families called without ``position_ids``.

RoPE rotates q and k by their position ids before the attention function is called. Dense
attention only sees differences of positions, so a left-padded prompt rotated by absolute
positions (transformers' default: ``arange``) gives the same logits as the prompt alone.
SEA's estimator sees the rotated vectors themselves, so it would select other keys. The
attention function cannot undo the rotation without re-implementing each family's rotary
embedding, so :func:`attach_position_hook` derives the position ids one level up: a forward
pre-hook on the decoder stack (the module owning ``rotary_emb``) fills in
``attention_mask.long().cumsum(-1) - 1`` (clamped at 0), the ids ``generate`` passes, when a
2D padding mask is given and ``position_ids`` is not. Given position ids are never changed.
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import Tensor, nn

from .decoding import find_cache

HOOK_ATTR = "sea_position_hook"  # on the decoder stack: the hook's handle


def mask_positions(attention_mask: Tensor, length: int) -> Tensor:
    """(B, length) position ids of the last ``length`` columns of a (B, Tk) 0/1 mask: each
    real token's rank among the real tokens before it; padding gets 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)[:, attention_mask.shape[1] - length:]


def _decoder_stack(model: nn.Module) -> nn.Module | None:
    """The module that computes the rotary embedding from ``position_ids`` (``LlamaModel``...)."""
    for module in model.modules():
        parameters = inspect.signature(module.forward).parameters
        if hasattr(module, "rotary_emb") and {"position_ids", "attention_mask"} <= set(parameters):
            return module
    return None


def _new_tokens(arguments: dict[str, Any]) -> int | None:
    for name in ("input_ids", "inputs_embeds"):
        value = arguments.get(name)
        if isinstance(value, Tensor) and value.dim() >= 2:
            return value.shape[1]
    return None


def _seen_tokens(args: tuple, kwargs: dict[str, Any]) -> int:
    """Tokens already in the KV cache of the call (found by type: its keyword changed across versions)."""
    cache = find_cache(args, kwargs)
    return int(cache.get_seq_length()) if cache is not None else 0


def attach_position_hook(model: nn.Module) -> None:
    """Make ``model``'s decoder stack derive missing position ids from a 2D attention mask."""
    stack = _decoder_stack(model)
    if stack is None:
        raise ValueError(f"{type(model).__name__} has no module with a rotary embedding taking position_ids")
    signature = inspect.signature(stack.forward)
    slot = list(signature.parameters).index("position_ids")  # where a positional position_ids goes

    def derive(module: nn.Module, args: tuple, kwargs: dict[str, Any]):
        arguments = signature.bind_partial(*args, **kwargs).arguments
        mask = arguments.get("attention_mask")
        if arguments.get("position_ids") is not None or not isinstance(mask, Tensor) or mask.dim() != 2:
            return None
        length = _new_tokens(arguments)
        if length is None or mask.shape[1] != _seen_tokens(args, kwargs) + length or bool(mask.all()):
            return None  # no padding, or a mask that does not cover the cache: transformers decides
        positions = mask_positions(mask, length)
        if len(args) > slot:
            return (*args[:slot], positions, *args[slot + 1:]), kwargs
        return args, {**kwargs, "position_ids": positions}

    object.__setattr__(stack, HOOK_ATTR, stack.register_forward_pre_hook(derive, with_kwargs=True))


def detach_position_hook(model: nn.Module) -> None:
    for module in model.modules():
        handle = module.__dict__.pop(HOOK_ATTR, None)
        if handle is not None:
            handle.remove()
