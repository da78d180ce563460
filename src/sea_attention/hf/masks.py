"""Masks: what transformers builds for the "sea" implementation, and how SEA reads it.

SEA needs only a key padding mask (B, Tk), True for real tokens: causality comes from its own
config, with queries aligned to the last Tq keys (lower-right, as with ``DynamicCache``).

transformers calls the registered mask function once per forward; its return value reaches
every layer's attention function unchanged. Without a registered mask function transformers
passes ``attention_mask=None`` to custom attention, i.e. padding would be silently ignored.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor
from transformers.masking_utils import (
    bidirectional_mask_function,
    causal_mask_function,
    prepare_padding_mask,
    sdpa_mask,
)

from ..core.ops.reference import allowed_keys

_PLAIN = (causal_mask_function, bidirectional_mask_function)


def sea_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
             mask_function=causal_mask_function, **kwargs: Any) -> Tensor | None:
    """The mask function registered as "sea" in ``AttentionMaskInterface``.

    transformers passes the (B, Tk) ``attention_mask`` (or None) among ``kwargs``.

    Returns the (B, Tk) bool key padding mask, or ``None`` when there is no padding mask.
    Masks with more structure than padding + causality (sliding windows, packed sequences,
    custom overlays) come back as the dense (B, 1, Tq, Tk) bool mask, unless it turns out to
    be plain after all (e.g. a sliding window longer than the sequence).
    """
    attention_mask: Tensor | None = kwargs.get("attention_mask")
    if mask_function in _PLAIN:
        if mask_function is causal_mask_function and int(q_offset) + q_length != kv_offset + kv_length:
            # StaticCache: keys are a fixed-size buffer, so queries are not the last keys
            raise ValueError("SEA needs the queries to be the last keys (DynamicCache); static caches are "
                             "not supported")
        if attention_mask is None:
            return None
        padding = prepare_padding_mask(attention_mask, kv_length, kv_offset)  # pads with False if short
        return padding[:, kv_offset:kv_offset + kv_length].bool()

    def dense(function) -> Tensor:  # (B, 1, Tq, Tk) bool, never skipped
        return sdpa_mask(batch_size, q_length, kv_length, q_offset, kv_offset, function, attention_mask,
                         allow_is_causal_skip=False, allow_is_bidirectional_skip=False,
                         use_vmap=kwargs.get("use_vmap", False), device=kwargs.get("device", "cpu"))

    mask = dense(mask_function)
    for plain in _PLAIN:
        if torch.equal(mask, dense(plain)):
            return mask.any(dim=2)[:, 0]  # a key is real iff some query sees it
    return mask


def key_padding_mask(attention_mask: Tensor | None, batch: int, tq: int, tk: int,
                     causal: bool) -> Tensor | None:
    """Turn whatever mask reaches the attention function into a (B, Tk) bool mask (or None).

    * ``None``: no padding.
    * (B, Tk): a padding mask (bool or 0/1), as returned by :func:`sea_mask`.
    * (B, 1 or H, Tq, Tk) bool (True = attend) or additive float (0 / large negative): a
      key is real iff at least one query may see it; with padding + causality every real
      key is seen by the last real query, and padding keys by none. Any other structure
      (sliding window, packed sequences) cannot be expressed by SEA, whose budgeted
      selection replaces it; a warning says so.
    """
    if attention_mask is None:
        return None
    if attention_mask.dim() == 2:
        if attention_mask.shape != (batch, tk):
            raise ValueError(f"2D attention mask must be (B, Tk) = {(batch, tk)}, got {tuple(attention_mask.shape)}")
        return attention_mask.bool()
    if attention_mask.dim() != 4 or attention_mask.shape[-2:] != (tq, tk) or attention_mask.shape[0] != batch:
        raise ValueError(f"attention mask must be (B, Tk) or (B, heads, Tq, Tk) = {(batch, '*', tq, tk)}, "
                         f"got {tuple(attention_mask.shape)}")
    if attention_mask.dtype == torch.bool:
        allowed = attention_mask
    elif attention_mask.is_floating_point():
        allowed = attention_mask > torch.finfo(attention_mask.dtype).min / 2  # additive: 0 or ~-inf
    else:
        allowed = attention_mask != 0
    key_valid = allowed.any(dim=2).any(dim=1)  # (B, Tk)
    expected = allowed_keys(key_valid, tq, causal)  # (B, 1, Tq, Tk)
    query_valid = key_valid[:, tk - tq:][:, None, :, None]  # padding queries are ignored by SEA
    if bool(((allowed != expected) & query_valid).any()):
        warnings.warn("the attention mask has structure beyond padding and causality (sliding window, packed "
                      "sequences?); SEA keeps only the key padding it implies", stacklevel=3)
    return key_valid
