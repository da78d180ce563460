"""Save and load a model that carries a trained baseline (``sea distill --method indexer|performer|cosformer``).

The directory parallels a SEA save (``hf/io.py``, whose atomic writer and checked readers it uses):

* ``baseline_config.json``: the method and its config, the base model's identity, architecture
  and dtype, whether the base weights and the tokenizer are included, the sea-attention version
  and the sha256 of every weight file (checked on load);
* ``baseline_weights.safetensors``: the baseline's parameters and buffers under their
  ``model.state_dict()`` names (``model.layers.0.self_attn.sea_baseline...``; cosFormer has none);
* with ``include_base_weights=True`` (the full-KD stage tunes the base): the base model without
  the SEA and baseline tensors, so the directory also loads as a plain dense transformers model;
* the tokenizer files, when a tokenizer is given.

It has no ``sea_config.json``, so it never loads as a SEA model by mistake. Loading patches the
base (the patch only routes each layer's q, k, v), attaches the method and loads its tensors.
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from ...hf import patch, sea_state_dict
from ...hf.io import (SaveFiles, base_description, check_files, check_save_target, load_base, read_json_object,
                      read_weights, write_save)
from .trained import BaselineLayers, attach_baseline, baseline_layers, trained_method

FORMAT_VERSION = 1
CONFIG_NAME = "baseline_config.json"  # written last: a directory without it is not a baseline save
WEIGHTS_NAME = "baseline_weights.safetensors"
REQUIRED_FIELDS = ("format_version", "method", "method_config", "base_model", "architecture", "torch_dtype",
                   "include_base_weights")
KIND = "a trained-baseline save"


def is_baseline_save(path: str | os.PathLike) -> bool:
    return (Path(path) / CONFIG_NAME).is_file()


def check_baseline_target(path: str | os.PathLike) -> None:
    """Refuse an ``--out`` that :func:`save_baseline` must not replace (before training)."""
    check_save_target(path, CONFIG_NAME, KIND)


def save_baseline(model: nn.Module, path: str | os.PathLike, *, base_model: str | None = None,
                  tokenizer: PreTrainedTokenizerBase | None = None, include_base_weights: bool = False) -> Path:
    """Save the baseline ``model`` carries (and optionally its base) to ``path``; returns the path.

    ``base_model`` names what :func:`load_baseline` loads when the base weights are not included
    (default ``model.config.name_or_path``).
    """
    layers = baseline_layers(model)
    if layers is None:
        raise ValueError("the model carries no trained baseline: attach one with attach_baseline(model, name)")
    final = Path(path)
    tensors = {name: t.detach().contiguous() for name, t in model.state_dict().items() if layers.owns(name)}
    base = base_description(model, base_model, tokenizer, include_base_weights)
    check_baseline_target(final)
    meta = {"format_version": FORMAT_VERSION, **base, "method": layers.name, "method_config": layers.config_dict()}
    not_base = set(tensors) | set(sea_state_dict(model))
    return write_save(final, model, tensors, not_base, meta, tokenizer, SaveFiles(CONFIG_NAME, WEIGHTS_NAME))


def load_baseline(path: str | os.PathLike) -> tuple[nn.Module, PreTrainedTokenizerBase | None]:
    """Load a directory written by :func:`save_baseline`: (patched model carrying the baseline, in
    eval mode; tokenizer). Every problem with the files is a ``ValueError`` naming the file."""
    folder = Path(path)
    file = folder / CONFIG_NAME
    if not file.is_file():
        raise FileNotFoundError(f"{folder} is not a trained-baseline save directory (no {CONFIG_NAME})")
    meta = read_json_object(file, REQUIRED_FIELDS, FORMAT_VERSION)
    try:
        method = trained_method(meta["method"])
        config = method.config(**meta["method_config"])
    except (TypeError, ValueError) as err:
        raise ValueError(f"{file}: method {meta['method']!r} with config {meta['method_config']!r} cannot be "
                         f"built ({err})") from err
    check_files(folder, meta, WEIGHTS_NAME, CONFIG_NAME)
    weights = read_weights(folder / WEIGHTS_NAME)
    model, tokenizer = load_base(folder, meta, None, CONFIG_NAME)
    patch(model)
    _load_tensors(model, attach_baseline(model, method.name, config), weights, folder / WEIGHTS_NAME)
    return model.eval(), tokenizer


def _load_tensors(model: nn.Module, layers: BaselineLayers, weights: dict[str, Tensor], file: Path) -> None:
    """Strict: every tensor of the baseline present with its shape, nothing else."""
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items() if layers.owns(name)}
    missing, unexpected = sorted(set(shapes) - set(weights)), sorted(set(weights) - set(shapes))
    wrong = sorted(name for name in set(shapes) & set(weights) if tuple(weights[name].shape) != shapes[name])
    if missing or unexpected or wrong:
        raise ValueError(f"{file} does not match the {layers.name} that {CONFIG_NAME} builds: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}, other shapes {wrong[:3]}")
    model.load_state_dict(weights, strict=False)
