"""The attention function transformers calls for ``attn_implementation="sea"``.

Every supported family calls ``attention_interface(module, query, key, value, attention_mask,
dropout=..., scaling=..., **kwargs)`` with query (B, H, Tq, d) and key/value (B, H_kv, Tk, d)
(grouped-query K/V are not repeated), and expects ``(output (B, Tq, H, d), weights or None)``.
:func:`sea_attention_forward` runs the ``SEAAttention`` that ``patch`` attached to the module
as ``module.sea``, or, inside ``layer_override``, whatever the override returns.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from ..core.attention import SEAAttention, SEAOutput
from ..core.grouping import Grouping, grouping_for
from ..core.ops.reference import exact_attention
from .decoding import decode_state
from .masks import key_padding_mask, sea_mask

IMPLEMENTATION = "sea"  # the name registered in transformers' attention and mask registries
OVERRIDE_ATTR = "sea_override"  # per attention module: the active layer override, or None


@dataclass
class LayerCall:
    """One attention call of a patched layer, as seen by a ``layer_override`` function."""

    module: nn.Module  # the transformers attention module
    sea: SEAAttention  # its SEA attention (``sea.k_budget``: the active dynamic k)
    layer_idx: int
    query: Tensor  # (B, H, Tq, d)
    key: Tensor  # (B, H_kv, Tk, d)
    value: Tensor  # (B, H_kv, Tk, d)
    key_valid: Tensor  # (B, Tk) bool, True for real tokens
    scaling: float  # score scale to use (OPT pre-scales its queries and passes 1.0)
    causal: bool
    output_attentions: bool  # whether the caller collects attention probabilities

    def run_sea(self, **kwargs: Any) -> SEAOutput:
        """What the layer runs without an override (kwargs go to ``SEAAttention.forward``)."""
        kwargs.setdefault("return_attention", self.output_attentions)
        return self.sea(self.query, self.key, self.value, attention_mask=self.key_valid, scale=self.scaling,
                        **kwargs)

    @property
    def grouping(self) -> Grouping:
        """The grouping that runs this call's rows (the part of a long-rows policy they lie in)."""
        tk = self.key.shape[2]
        return grouping_for(self.sea.config).at(tk - self.query.shape[2], tk)

    def dense(self) -> tuple[Tensor, Tensor]:
        """The dense softmax attention of the original model: context (B, H, Tq, d), probs (B, H, Tq, Tk)."""
        return exact_attention(self.query, self.key, self.value, self.key_valid, self.scaling, self.causal)


LayerOverride = Callable[[LayerCall], Optional[tuple[Tensor, Optional[Tensor]]]]


def _attentions_requested(kwargs: dict[str, Any]) -> bool:
    """Whether this forward collects attention maps.

    Llama and BERT forward ``output_attentions`` to the attention function; OPT and GPT-2 do
    not, so also ask transformers' output collector (private API, hence the guard).
    """
    if kwargs.get("output_attentions"):
        return True
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:
        return False
    collected = _active_collector.get()
    return collected is not None and "attentions" in collected


def sea_attention_forward(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                          attention_mask: Tensor | None, scaling: float | None = None,
                          **kwargs: Any) -> tuple[Tensor, Tensor | None]:
    """Attention function registered as "sea"; returns ((B, Tq, H, d), (B, H, Tq, Tk) or None).

    Without ``output_attentions`` only the context is needed: ``SEAAttention.context_only`` runs,
    whose prefill (and no-cache forward) in inference goes a span of rows at a time (``core/chunked.py``).
    A ``dropout`` keyword is accepted and ignored: SEA has no attention dropout (its estimator
    is trained by distillation, where the teacher runs without dropout too).
    """
    sea = getattr(module, "sea", None)
    if not isinstance(sea, SEAAttention):
        raise RuntimeError(f"{type(module).__name__} has no SEA attention: attn_implementation='sea' needs "
                           "sea_attention.hf.patch(model)")
    causal = sea.config.causal
    if kwargs.get("is_causal") is not None and bool(kwargs["is_causal"]) != causal:
        raise ValueError(f"is_causal={kwargs['is_causal']} disagrees with the SEA config (causal={causal})")
    scaling = query.shape[-1] ** -0.5 if scaling is None else float(scaling)
    batch, _, tq, _ = query.shape
    tk = key.shape[2]
    key_valid = key_padding_mask(attention_mask, batch, tq, tk, causal)  # (B, Tk) or None
    want_attention = _attentions_requested(kwargs)

    if getattr(module, OVERRIDE_ATTR, None) is not None:
        if key_valid is None:
            key_valid = torch.ones(batch, tk, dtype=torch.bool, device=key.device)
        result = _run_override(LayerCall(module=module, sea=sea, layer_idx=sea.layer_idx, query=query, key=key,
                                         value=value, key_valid=key_valid, scaling=scaling, causal=causal,
                                         output_attentions=want_attention))
        if result is not None:
            return result

    state = decode_state(module, sea.layer_idx, tq, tk) if causal else None
    if not want_attention:  # only the context: row-chunked where defined (SEAAttention.context_only)
        context = sea.context_only(query, key, value, attention_mask=key_valid, scale=scaling, state=state)
        return context.transpose(1, 2), None
    out = sea(query, key, value, attention_mask=key_valid, scale=scaling, return_attention=True, state=state)
    return out.context.transpose(1, 2), out.attention


def _run_override(call: LayerCall) -> tuple[Tensor, Tensor | None] | None:
    """The layer override's output in the interface's layout ((B, Tq, H, d), attention or None), or None
    when the override declines the call."""
    result = getattr(call.module, OVERRIDE_ATTR)(call)
    if result is None:
        return None
    context, attention = result  # (B, H, Tq, d), (B, H, Tq, Tk) or None
    # the output projection expects the model's dtype; overrides often compute in fp32
    return context.to(call.query.dtype).transpose(1, 2), attention if call.output_attentions else None


def register() -> None:
    """Register "sea" in transformers' attention and mask registries (idempotent).

    Class-level ``register`` on purpose: mask lookup only reads the global mapping.
    """
    AttentionInterface.register(IMPLEMENTATION, sea_attention_forward)
    AttentionMaskInterface.register(IMPLEMENTATION, sea_mask)
