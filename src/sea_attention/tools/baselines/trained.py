"""The trained baselines on a model: which exist, how they attach to a patched model, how they run.

A trained baseline is one small module per attention layer, attached to the transformers
attention module as ``sea_baseline`` beside its (unused) ``sea``; the patch only routes the
layer's q, k, v to it through ``layer_override``. ``indexer`` selects keys at a budget k;
``performer`` and ``cosformer`` replace the softmax with linear attention over every key and
take no budget. :class:`BaselineLayers` is what ``sea compare`` runs and what
``Distiller(method=...)`` trains (its ``owns`` / ``train_layer`` / ``attend``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import Tensor, nn

from ...core.config import SEAConfig
from ...hf import LayerCall, sea_layers
from .cosformer import CosformerAttention, CosformerConfig
from .indexer import IndexerConfig, LightningIndexer, distil_layer
from .layer import SelectionStats, SelectorOverride
from .performer import PerformerAttention, PerformerConfig

ATTRIBUTE = "sea_baseline"  # on each attention module: its trained baseline


@dataclass(frozen=True)
class TrainedMethod:
    """One trained baseline: its per-layer module, its config and how it is distilled."""

    name: str
    config: type  # a frozen dataclass
    build: Callable[[SEAConfig, Any, int], nn.Module]  # (the layer's shape, config, layer index) -> module
    stage: str  # the distillation stage that trains it
    selects: bool  # True: a key selector at budget k; False: linear attention over every key, no budget


TRAINED: dict[str, TrainedMethod] = {m.name: m for m in (
    TrainedMethod("indexer", IndexerConfig,
                  lambda shape, config, layer: LightningIndexer(shape.num_heads, shape.num_kv_heads, shape.head_dim,
                                                                config),
                  stage="estimator", selects=True),
    TrainedMethod("performer", PerformerConfig,
                  lambda shape, config, layer: PerformerAttention(shape.head_dim, shape.causal, config, layer),
                  stage="full", selects=False),
    TrainedMethod("cosformer", CosformerConfig,
                  lambda shape, config, layer: CosformerAttention(shape.causal, config),
                  stage="full", selects=False),
)}


def trained_method(name: str) -> TrainedMethod:
    """The trained baseline called ``name``; ValueError naming the accepted ones otherwise."""
    if name not in TRAINED:
        raise ValueError(f"trained baseline must be one of {','.join(TRAINED)}, got {name!r}")
    return TRAINED[name]


@dataclass
class BaselineLayers:
    """The trained baseline attached to every patched layer of a model."""

    method: TrainedMethod
    config: Any  # the method's config dataclass
    modules: dict[int, nn.Module] = field(default_factory=dict)  # by layer index

    @property
    def name(self) -> str:
        return self.method.name

    @property
    def stages(self) -> tuple[str, ...]:
        return (self.method.stage,)

    def config_dict(self) -> dict[str, Any]:
        return asdict(self.config)

    # -------------------------------------------------------------- running
    def attend(self, call: LayerCall, k: int | None = None, stats: SelectionStats | None = None,
               chunk_size: int = 256) -> Tensor:
        """The layer's attention (B, H, Tq, d) with this baseline (``k``: the indexer's budget)."""
        module = self.modules[call.layer_idx]
        if not self.method.selects:
            return module(call.query, call.key, call.value, call.key_valid, call.scaling)
        if k is None:
            raise ValueError(f"{self.name} selects keys: it needs a budget k")
        context, _ = SelectorOverride(module.select, k, stats, chunk_size)(call)
        return context

    # -------------------------------------------------------------- what Distiller(method=...) calls
    def owns(self, parameter_name: str) -> bool:
        """Whether a parameter or buffer of the model belongs to this baseline."""
        return f".{ATTRIBUTE}." in f".{parameter_name}"

    def train_layer(self, call: LayerCall, loss_scale: float) -> tuple[Tensor, dict[str, float]]:
        """Stage ``estimator``: backpropagate the layer-local loss; the teacher's context and the loss."""
        if self.method.stage != "estimator":
            raise ValueError(f"{self.name} has no layer-local loss: it is distilled with stage {self.method.stage}")
        context, kl = distil_layer(self.modules[call.layer_idx], call, loss_scale)
        return context, {"loss": kl, "estimate_kl": kl}


def attach_baseline(model: nn.Module, name: str, config: Any = None) -> BaselineLayers:
    """Attach a fresh ``name`` baseline (default config if None) to every patched layer of ``model``."""
    method = trained_method(name)
    config = method.config() if config is None else config
    if not isinstance(config, method.config):
        raise ValueError(f"{name} takes a {method.config.__name__}, got {type(config).__name__}")
    if baseline_layers(model) is not None:
        raise ValueError("the model already carries a trained baseline; load the base model again to attach another")
    layers = BaselineLayers(method, config)
    for _, module, sea in sea_layers(model):
        built = method.build(sea.config, config, sea.layer_idx)
        reference = next(module.parameters(), None)
        if reference is not None:
            built.to(device=reference.device)
        module.add_module(ATTRIBUTE, built.train(module.training))
        layers.modules[sea.layer_idx] = built
    if not layers.modules:
        raise ValueError("the model is not SEA-patched: call sea_attention.hf.patch(model) first (the patch routes "
                         "every layer's q, k, v to the baseline)")
    return layers


def baseline_layers(model: nn.Module) -> BaselineLayers | None:
    """The trained baseline ``model`` carries, or None."""
    modules = {sea.layer_idx: getattr(module, ATTRIBUTE) for _, module, sea in sea_layers(model)
               if isinstance(getattr(module, ATTRIBUTE, None), nn.Module)}
    if not modules:
        return None
    first = next(iter(modules.values()))
    method = next(m for m in TRAINED.values() if isinstance(first.config, m.config))
    return BaselineLayers(method, first.config, modules)
