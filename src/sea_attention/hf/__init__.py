"""SEA for Hugging Face transformers: the only part of sea-attention that knows transformers.

    from sea_attention.hf import patch, dense_attention, save_pretrained, from_pretrained
    model = patch(model, k=32)  # Llama/Mistral/Qwen2/Qwen3, OPT, GPT-2, BERT
"""

from .cache import GrowingCache, cache_kwargs
from .families import FAMILIES, Family, family_of
from .interface import LayerCall, LayerOverride, sea_attention_forward
from .io import from_pretrained, save_pretrained, sea_state_dict
from .masks import sea_mask
from .patch import (
    dense_attention,
    is_patched,
    last_logits,
    layer_override,
    no_cache,
    patch,
    sea_budget,
    sea_config_for,
    sea_layers,
    set_budget,
    set_runtime,
    unpatch,
)

__all__ = [
    "FAMILIES", "Family", "GrowingCache", "LayerCall", "LayerOverride", "cache_kwargs", "dense_attention", "family_of",
    "from_pretrained", "is_patched", "last_logits", "layer_override", "no_cache", "patch", "save_pretrained",
    "sea_attention_forward", "sea_budget", "sea_config_for", "sea_layers", "sea_mask", "sea_state_dict", "set_budget",
    "set_runtime", "unpatch",
]
