"""Save and load SEA-patched transformers models.

A saved directory holds:

* ``sea_config.json``: the SEA config, the base model's identity, family, architecture and
  dtype, the sea-attention version, and whether the base weights are included;
* ``sea_weights.safetensors``: every SEA parameter and buffer (e.g. the random-feature
  projection) under its ``model.state_dict()`` name (``model.layers.0.self_attn.sea...``);
* with ``include_base_weights=True``: the base model (``config.json`` + weights, without the
  SEA tensors), so the directory also loads as a plain dense transformers model;
* the tokenizer files, when a tokenizer is given.

Directories are written into a temporary sibling and renamed into place when complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from .. import __version__
from ..assets import load_model
from .families import family_of
from ..config import LEGACY_DEFAULTS
from .patch import SEA_CONFIG_ATTR, _require_patched, patch, sea_layers

FORMAT_VERSION = 1
CONFIG_NAME = "sea_config.json"  # written last: a directory without it is not a SEA save
WEIGHTS_NAME = "sea_weights.safetensors"


def sea_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """SEA parameters and buffers of a patched model, named as in ``model.state_dict()``."""
    state = {}
    for name, _, sea in _require_patched(model):
        prefix = f"{name}.sea." if name else "sea."
        for key, tensor in sea.state_dict().items():
            state[prefix + key] = tensor.detach().contiguous()
    return state


def save_pretrained(model: nn.Module, path: str | os.PathLike, *, base_model: str | None = None,
                    tokenizer: PreTrainedTokenizerBase | None = None, include_base_weights: bool = False) -> Path:
    """Save a patched model's SEA config and weights (and optionally its base) to ``path``.

    ``base_model`` names what :func:`from_pretrained` loads when the base weights are not
    included (a bundled name such as ``"smollm2-135m"``, a local directory or a hub id);
    default ``model.config.name_or_path``. An existing ``path`` is replaced only once the new
    directory is complete, and only if it is empty or an earlier SEA save. Returns the path.
    """
    final = Path(path)
    sea_config = getattr(model.config, SEA_CONFIG_ATTR, None)
    state = sea_state_dict(model)  # also checks that the model is patched
    base_model = base_model or getattr(model.config, "name_or_path", "") or None
    if base_model is None and not include_base_weights:
        raise ValueError("cannot tell which base model this is: pass base_model=... or include_base_weights=True")
    if final.exists() and not (final.is_dir() and ((final / CONFIG_NAME).is_file() or not any(final.iterdir()))):
        raise FileExistsError(f"{final} exists and is not a SEA save directory; refusing to replace it")
    meta = {
        "format_version": FORMAT_VERSION,
        "sea_attention_version": __version__,
        "base_model": base_model,
        "family": family_of(model).name,
        "architecture": type(model).__name__,
        "torch_dtype": str(model.dtype).removeprefix("torch."),
        "include_base_weights": include_base_weights,
        "include_tokenizer": tokenizer is not None,
        "sea_config": sea_config,
    }

    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        if include_base_weights:
            base = {k: v for k, v in model.state_dict().items() if k not in state}
            model.save_pretrained(tmp, state_dict=base)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        _move_into_place(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _move_into_place(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final``; an existing ``final`` is moved aside first, then deleted.

    Between the two renames ``final`` is briefly absent, never partial; if the process dies
    there, the previous version survives as ``.<name>.old-*`` next to it.
    """
    if not final.exists():
        os.replace(tmp, final)
        return
    old = final.with_name(f".{final.name}.old-{os.getpid()}-{time.time_ns()}")
    os.replace(final, old)
    try:
        os.replace(tmp, final)
    except BaseException:
        os.replace(old, final)
        raise
    shutil.rmtree(old, ignore_errors=True)


def from_pretrained(path: str | os.PathLike, *, dtype: torch.dtype | None = None
                    ) -> tuple[nn.Module, PreTrainedTokenizerBase | None]:
    """Load a directory written by :func:`save_pretrained`: (patched model in eval mode, tokenizer).

    The base comes from the directory when its weights were included, else from
    ``sea_attention.assets.load_model(base_model)``. ``dtype`` defaults to the saved one. The
    tokenizer is the saved one if any, else the base model's (None for an included base saved
    without a tokenizer). Every SEA tensor must be present in the saved weights.
    """
    folder = Path(path)
    if not (folder / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{folder} is not a SEA save directory (no {CONFIG_NAME})")
    meta = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{folder / CONFIG_NAME} has format_version {meta.get('format_version')!r}; "
                         f"this sea-attention reads {FORMAT_VERSION}")
    dtype = dtype if dtype is not None else getattr(torch, meta["torch_dtype"])
    architecture = meta["architecture"]

    tokenizer = None
    if meta["include_base_weights"]:
        model_class = getattr(transformers, architecture, None)
        if model_class is None:
            raise ValueError(f"transformers has no model class {architecture!r}")
        model = model_class.from_pretrained(folder, dtype=dtype)
    else:
        model, tokenizer = load_model(meta["base_model"], dtype=dtype)
        if type(model).__name__ != architecture:
            raise ValueError(f"the saved model is a {architecture} but {meta['base_model']!r} loads as a "
                             f"{type(model).__name__}; save it with include_base_weights=True")
    if meta.get("include_tokenizer"):
        tokenizer = AutoTokenizer.from_pretrained(folder)

    patch(model, **{**LEGACY_DEFAULTS, **meta["sea_config"]})  # fields a save predates keep their old value
    _load_sea_weights(model, load_file(str(folder / WEIGHTS_NAME)))
    # remembered so that saving this model again points at the same base (or carries its weights)
    model.config.sea_base_model = meta["base_model"]
    model.config.sea_base_weights_included = bool(meta["include_base_weights"])
    return model.eval(), tokenizer


def _load_sea_weights(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Strict load: every SEA tensor of the model present, nothing else."""
    expected = set(sea_state_dict(model))
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(f"SEA weights do not match the model: missing {missing[:5]}"
                         f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                         f"{'...' if len(unexpected) > 5 else ''}")
    for name, _, sea in sea_layers(model):
        prefix = f"{name}.sea." if name else "sea."
        sea.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, strict=True)
