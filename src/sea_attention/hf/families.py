"""Model families SEA can patch: what differs between them, kept as data.

Every supported family routes its attention through transformers' ``AttentionInterface``
(``ALL_ATTENTION_FUNCTIONS.get_interface``), so one attention function serves them all. What
differs is where the attention modules are, how ``model.config`` names the head counts and the
context length, and whether attention is causal. Adding a family is adding a ``Family`` row.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from transformers import PretrainedConfig


@dataclass(frozen=True)
class Family:
    """How to patch one family of transformers models.

    Attributes:
        name: short name used in messages and saved in ``sea_config.json``.
        model_types: ``config.model_type`` values that belong to the family.
        attention_suffix: attention modules are those whose class name ends with this
            (``LlamaAttention``, ``OPTAttention``, ``GPT2Attention``, ``BertSelfAttention``)
            and that carry a ``layer_idx``; cross-attention modules are never patched.
        kv_heads_attr: config field with the key/value head count (grouped-query attention);
            ``None`` or a missing field means one kv head per query head.
        head_dim_attr: config field with the head width; ``None`` or a missing/empty field
            means ``hidden_size // num_attention_heads``.
        max_positions_attrs: config fields tried in order for the longest context.
        causal: whether the family's self-attention is causal ...
        causal_attr: ... unless this config field says otherwise (BERT: ``is_decoder``).
        rotary: whether q and k are rotated by position ids (RoPE) before attention: a forward
            without ``position_ids`` then gets them from its padding mask (``positions.py``).
    """

    name: str
    model_types: tuple[str, ...]
    attention_suffix: str
    kv_heads_attr: str | None = None
    head_dim_attr: str | None = None
    max_positions_attrs: tuple[str, ...] = ("max_position_embeddings", "n_positions")
    causal: bool = True
    causal_attr: str | None = None
    rotary: bool = False

    # ------------------------------------------------------------------ reading model.config
    def num_heads(self, config: PretrainedConfig) -> int:
        return int(config.num_attention_heads)  # GPT-2's attribute_map maps this to n_head

    def num_kv_heads(self, config: PretrainedConfig) -> int:
        value = getattr(config, self.kv_heads_attr, None) if self.kv_heads_attr else None
        return int(value) if value else self.num_heads(config)

    def head_dim(self, config: PretrainedConfig) -> int:
        value = getattr(config, self.head_dim_attr, None) if self.head_dim_attr else None
        return int(value) if value else int(config.hidden_size) // self.num_heads(config)

    def max_positions(self, config: PretrainedConfig) -> int:
        for attr in self.max_positions_attrs:
            value = getattr(config, attr, None)
            if value:
                return int(value)
        raise ValueError(f"{self.name} config has none of {self.max_positions_attrs}; pass max_positions=...")

    def is_causal(self, config: PretrainedConfig) -> bool:
        if self.causal_attr is not None:
            return bool(getattr(config, self.causal_attr, self.causal))
        return self.causal

    # ------------------------------------------------------------------ finding attention modules
    def is_attention(self, module: nn.Module) -> bool:
        """True for a self-attention module of this family (the modules SEA is attached to)."""
        return (type(module).__name__.endswith(self.attention_suffix)
                and isinstance(getattr(module, "layer_idx", None), int)
                and not getattr(module, "is_cross_attention", False))

    def attention_modules(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """(qualified name, module) of every self-attention module, in layer order."""
        found = [(name, m) for name, m in model.named_modules() if self.is_attention(m)]
        return sorted(found, key=lambda item: item[1].layer_idx)  # stable: keeps module order on ties


LLAMA = Family(
    name="llama",  # Llama, SmolLM2, Mistral, Qwen2, Qwen3: RoPE decoders with optional GQA
    model_types=("llama", "mistral", "qwen2", "qwen3"),
    attention_suffix="Attention",
    kv_heads_attr="num_key_value_heads",
    head_dim_attr="head_dim",
    rotary=True,
)
OPT = Family(name="opt", model_types=("opt",), attention_suffix="OPTAttention")
GPT2 = Family(name="gpt2", model_types=("gpt2",), attention_suffix="GPT2Attention")
BERT = Family(
    name="bert",  # BERT-style encoders, MiniLM included; causal only when configured as a decoder
    model_types=("bert",),
    attention_suffix="SelfAttention",  # BertSelfAttention, not the BertAttention wrapper
    causal=False,
    causal_attr="is_decoder",
)

FAMILIES: tuple[Family, ...] = (LLAMA, OPT, GPT2, BERT)


def supported_model_types() -> list[str]:
    return [t for family in FAMILIES for t in family.model_types]


def family_of(model_or_config: nn.Module | PretrainedConfig) -> Family:
    """The family of a model (or its config); ``ValueError`` naming the supported ones otherwise."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    names = ", ".join(f"{f.name} ({'/'.join(f.model_types)})" for f in FAMILIES)
    raise ValueError(f"SEA does not support model_type {model_type!r}; supported families: {names}")
