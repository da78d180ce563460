"""Patch a transformers model in place so its attention runs through SEA.

    model = patch(model, k=32)              # attach SEA, select attn_implementation="sea"
    with dense_attention(model): ...        # the original dense attention, same weights
    with sea_budget(model, 8): ...          # dynamic k, no retraining
    with layer_override(model, fn): ...     # distillation / evaluation hook per layer call

State lives on the model itself: each attention module gets a ``sea`` submodule (so SEA
parameters and buffers show up in ``state_dict()`` as ``...self_attn.sea.estimator...``) and a
plain ``sea_override`` attribute; ``model.config`` gets ``sea_config`` (saved with config.json)
and ``sea_dense_implementation``, the implementation that was active before patching.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn

from ..core.attention import SEAAttention
from ..core.config import SEAConfig
from ..core.inputs import validate_budget
from .decoding import attach_cache_hooks, detach_cache_hooks
from .families import family_of
from .interface import IMPLEMENTATION, OVERRIDE_ATTR, LayerOverride, register
from .positions import attach_position_hook, detach_position_hook

SEA_CONFIG_ATTR = "sea_config"  # on model.config: SEAConfig.to_dict() of every patched layer
DENSE_ATTR = "sea_dense_implementation"  # on model.config: what patch() switched away from
SHAPE_FIELDS = ("num_heads", "num_kv_heads", "head_dim", "causal")  # must match the model


def sea_config_for(model: nn.Module, config: SEAConfig | None = None, **overrides: Any) -> SEAConfig:
    """The SEAConfig ``patch`` would use.

    The shape fields (``num_heads``, ``num_kv_heads``, ``head_dim``, ``causal``) and
    ``max_positions`` are read from ``model.config``; ``config`` supplies every other field
    (its shape fields must match the model, its ``max_positions`` is not used); ``overrides``
    win over both, ``max_positions`` included.
    """
    family = family_of(model)
    hf_config = model.config
    derived = {
        "num_heads": family.num_heads(hf_config),
        "num_kv_heads": family.num_kv_heads(hf_config),
        "head_dim": family.head_dim(hf_config),
        "causal": family.is_causal(hf_config),
        "max_positions": family.max_positions(hf_config),
    }
    valid = SEAConfig.field_names()
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        raise ValueError(f"unknown SEA config fields {unknown}; valid fields: {valid}")
    values = config.to_dict() if config is not None else {}
    for name in SHAPE_FIELDS:
        for source, given in (("config", values), ("override", overrides)):
            if name in given and given[name] != derived[name]:
                raise ValueError(f"{source} {name}={given[name]!r} does not match the {family.name} model "
                                 f"({derived[name]!r})")
    return SEAConfig(**{**values, **derived, **overrides})


def sea_layers(model: nn.Module) -> list[tuple[str, nn.Module, SEAAttention]]:
    """(qualified name, transformers attention module, its SEAAttention) per patched layer, in layer order."""
    layers = [(name, m, m.sea) for name, m in model.named_modules() if isinstance(getattr(m, "sea", None), SEAAttention)]
    return sorted(layers, key=lambda item: item[2].layer_idx)


def is_patched(model: nn.Module) -> bool:
    return bool(sea_layers(model))


def _require_patched(model: nn.Module) -> list[tuple[str, nn.Module, SEAAttention]]:
    layers = sea_layers(model)
    if not layers:
        raise ValueError("the model is not SEA-patched: call sea_attention.hf.patch(model) first")
    return layers


def patch(model: nn.Module, config: SEAConfig | None = None, **overrides: Any) -> nn.Module:
    """Attach SEA attention to every self-attention layer of ``model`` (in place) and select it.

    See :func:`sea_config_for` for how the config is assembled. New SEA modules take the
    device, dtype and train/eval mode of the module they are attached to. Patching a patched
    model raises ``ValueError`` (it would silently drop trained estimators): ``unpatch`` first.
    Returns ``model``.
    """
    if is_patched(model):
        raise ValueError("the model is already SEA-patched; call sea_attention.hf.unpatch(model) first")
    family = family_of(model)
    sea_config = sea_config_for(model, config, **overrides)
    modules = family.attention_modules(model)
    if not modules:
        raise ValueError(f"found no {family.name} attention modules (class name ending in "
                         f"{family.attention_suffix!r}) in {type(model).__name__}")
    _check_dense_layers(sea_config, [module.layer_idx for _, module in modules])
    previous = getattr(model.config, "_attn_implementation", None) or "eager"
    try:
        setattr(model.config, DENSE_ATTR, previous)  # first, so a failed patch unpatches to it
        for _, module in modules:
            sea = SEAAttention(sea_config, module.layer_idx)
            reference = next(module.parameters(), None)
            if reference is not None:
                sea.to(device=reference.device, dtype=reference.dtype)
            sea.train(module.training)
            module.sea = sea
            object.__setattr__(module, OVERRIDE_ATTR, None)  # a plain attribute: never a submodule
            attach_cache_hooks(module)  # decoding state rides on the KV cache
        if family.rotary:  # left padding without position_ids: ids from the mask, as generate passes them
            attach_position_hook(model)
        register()
        setattr(model.config, SEA_CONFIG_ATTR, sea_config.to_dict())
        model.set_attn_implementation(IMPLEMENTATION)
        if model.config._attn_implementation != IMPLEMENTATION:  # transformers only warns when it cannot
            raise ValueError(f"{type(model).__name__} does not let transformers switch its attention implementation")
    except BaseException:
        unpatch(model)
        raise
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Remove SEA from ``model`` and restore the implementation it had before ``patch``."""
    previous = getattr(model.config, DENSE_ATTR, None)
    for _, module, _ in sea_layers(model):
        del module.sea
        module.__dict__.pop(OVERRIDE_ATTR, None)
        detach_cache_hooks(module)
    detach_position_hook(model)
    if previous is not None and model.config._attn_implementation != previous:
        model.set_attn_implementation(previous)
    for attr in (SEA_CONFIG_ATTR, DENSE_ATTR):
        if hasattr(model.config, attr):
            delattr(model.config, attr)
    return model


@contextmanager
def layer_override(model: nn.Module, fn: LayerOverride) -> Iterator[nn.Module]:
    """Route every patched layer call of ``model`` through ``fn(call: LayerCall)``.

    ``fn`` returns ``(context (B, H, Tq, d), attention (B, H, Tq, Tk) or None)`` to replace
    the layer's result, or ``None`` to run SEA as usual. Only this model is affected; the
    previous override (None outside any ``layer_override``) comes back on exit, also on errors.
    """
    layers = _require_patched(model)
    previous = [module.__dict__.get(OVERRIDE_ATTR) for _, module, _ in layers]
    try:
        for _, module, _ in layers:
            object.__setattr__(module, OVERRIDE_ATTR, fn)
        yield model
    finally:
        for (_, module, _), old in zip(layers, previous):
            object.__setattr__(module, OVERRIDE_ATTR, old)


@contextmanager
def dense_attention(model: nn.Module, implementation: str = "eager") -> Iterator[nn.Module]:
    """Run the patched model with dense attention (``"eager"``, ``"sdpa"``, ...), same weights.

    Not thread-safe: the implementation is a field of the shared ``model.config``.
    """
    _require_patched(model)
    if implementation == IMPLEMENTATION:
        raise ValueError(f"implementation must be a dense one, not {IMPLEMENTATION!r}")
    current = model.config._attn_implementation
    model.set_attn_implementation(implementation)
    try:
        yield model
    finally:
        model.set_attn_implementation(current)


def no_cache(model: nn.Module) -> dict[str, Any]:
    """Forward kwargs that skip building a KV cache (and SEA decoding state) when nothing decodes."""
    return {"use_cache": False} if _forward_takes(model, "use_cache") else {}


def last_logits(model: nn.Module, n: int) -> dict[str, Any]:
    """Forward kwargs that compute the logits of the last ``n`` positions only, as ``generate`` does,
    where the forward takes ``logits_to_keep`` (none otherwise: the logits then cover every position)."""
    return {"logits_to_keep": n} if _forward_takes(model, "logits_to_keep") else {}


def _forward_takes(model: nn.Module, name: str) -> bool:
    """Whether ``model.forward`` has a parameter ``name``."""
    return name in inspect.signature(model.forward).parameters


RUNTIME_FIELDS = ("grouping", "query_block", "attention_path", "query_chunk", "candidates", "block_from",
                  "block_candidates", "bin_sums_dtype", "dense_until", "dense_layers", "forced_keys")  # no weight depends on them


def _check_dense_layers(config: SEAConfig, layer_indices: list[int]) -> None:
    """ValueError when ``config.dense_layers`` names a layer the model does not have."""
    unknown = sorted(set(config.dense_layers) - set(layer_indices))
    if unknown:
        raise ValueError(f"dense_layers {unknown} name layers the model does not have: its attention layers are "
                         f"{min(layer_indices)}-{max(layer_indices)}")


def set_runtime(model: nn.Module, **changes: Any) -> None:
    """Change how every patched layer selects and attends, without touching its weights:
    ``grouping``, ``query_block``, ``attention_path``, ``query_chunk``, ``candidates``, ``block_from``,
    ``block_candidates``, ``bin_sums_dtype``, ``dense_until``, ``dense_layers``, ``forced_keys``. A distilled
    model can, for example, be run with ``grouping="block"`` for speed on long inputs, ``block_from=0`` to
    select per query on every row (by default a causal model's rows past 1,024 keys run the block grouping
    with exact refinement: the long-rows policy), ``block_candidates=4`` for cheaper long rows, ``candidates=4`` to
    choose its keys by their exact scores among four times as many, ``bin_sums_dtype="float32"`` for a faster
    prefill, ``dense_until=2048`` to attend densely wherever a row has at most 2,048 keys, or
    ``dense_layers=(0, 1)`` to keep the first two layers dense."""
    unknown = set(changes) - set(RUNTIME_FIELDS)
    if unknown:
        raise ValueError(f"set_runtime changes only {RUNTIME_FIELDS} (the rest changes the weights), "
                         f"got {sorted(unknown)}")
    layers = _require_patched(model)
    configs = [sea.config.replace(**changes) for _, _, sea in layers]  # validated: a bad value raises here
    _check_dense_layers(configs[0], [sea.layer_idx for _, _, sea in layers])
    for (_, _, sea), config in zip(layers, configs):
        sea.config = config
    setattr(model.config, SEA_CONFIG_ATTR, {**getattr(model.config, SEA_CONFIG_ATTR),
                                                 **{name: configs[0].to_dict()[name] for name in changes}})


def set_budget(model: nn.Module, k: int | None) -> None:
    """Set the keys per query per head of every patched layer (None: back to ``config.k``)."""
    validate_budget("k", k)
    for _, _, sea in _require_patched(model):
        sea.k_budget = k


@contextmanager
def sea_budget(model: nn.Module, k: int | None) -> Iterator[nn.Module]:
    """``set_budget`` for the duration of a ``with`` block; the previous budgets come back after."""
    validate_budget("k", k)
    layers = _require_patched(model)
    previous = [sea.k_budget for _, _, sea in layers]
    try:
        for _, _, sea in layers:
            sea.k_budget = k
        yield model
    finally:
        for (_, _, sea), old in zip(layers, previous):
            sea.k_budget = old
