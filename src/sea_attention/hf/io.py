"""Save and load SEA-patched transformers models.

A saved directory holds:

* ``sea_config.json``: the SEA config as the layers run it (``set_runtime`` changes included),
  the active budget (``set_budget``), the base model's identity, family, architecture and
  dtype, the sea-attention version, whether the base weights are included, and the sha256
  of every weight file it writes (``sha256``: file name -> digest, checked on load; saves
  from before it carry only ``weights_sha256``, of the SEA weights, or nothing, and load with
  what they have checked);
* ``sea_weights.safetensors``: every SEA parameter and buffer (e.g. the random-feature
  projection) under its ``model.state_dict()`` name (``model.layers.0.self_attn.sea...``);
* with ``include_base_weights=True``: the base model (``config.json`` + weights, without the
  SEA tensors), so the directory also loads as a plain dense transformers model;
* the tokenizer files, when a tokenizer is given.

Directories are written into a temporary sibling and renamed into place when complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from .. import __version__
from ..atomic import remove_debris, replace_dir, temp_dir
from ..app.assets import load_model, load_tokenizer
from .families import family_of
from ..core.config import SEAConfig
from .patch import _require_patched, patch, sea_layers, set_budget

FORMAT_VERSION = 1
CONFIG_NAME = "sea_config.json"  # written last: a directory without it is not a SEA save
WEIGHTS_NAME = "sea_weights.safetensors"
REQUIRED_FIELDS = ("format_version", "base_model", "architecture", "torch_dtype", "include_base_weights",
                   "sea_config")


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
    state = sea_state_dict(model)  # also checks that the model is patched
    sea_config, k_budget = _layer_settings(model)
    base = base_description(model, base_model, tokenizer, include_base_weights)
    check_save_target(final)
    meta = {"format_version": FORMAT_VERSION, **base, "family": family_of(model).name, "sea_config": sea_config,
            "k_budget": k_budget}
    return write_save(final, model, state, set(state), meta, tokenizer, SaveFiles(CONFIG_NAME, WEIGHTS_NAME))


def base_description(model: nn.Module, base_model: str | None, tokenizer: PreTrainedTokenizerBase | None,
                     include_base_weights: bool) -> dict:
    """What a save records of its base model (see :func:`load_base`); ``base_model`` defaults to
    ``model.config.name_or_path`` and is needed when the base weights are not included."""
    base_model = base_model or getattr(model.config, "name_or_path", "") or None
    if base_model is None and not include_base_weights:
        raise ValueError("cannot tell which base model this is: pass base_model=... or include_base_weights=True")
    return {"sea_attention_version": __version__, "base_model": base_model, "architecture": type(model).__name__,
            "torch_dtype": str(model.dtype).removeprefix("torch."), "include_base_weights": include_base_weights,
            "include_tokenizer": tokenizer is not None}


@dataclass(frozen=True)
class SaveFiles:
    """The file names of one kind of save: its JSON (written last: its presence marks a complete save)
    and its own weights."""

    config: str
    weights: str


def write_save(final: Path, model: nn.Module, tensors: dict[str, Tensor], not_base: Collection[str], meta: dict,
               tokenizer: PreTrainedTokenizerBase | None, files: SaveFiles) -> Path:
    """Write a save directory atomically: ``tensors`` as ``files.weights``, the base model
    (``model``'s state without the names in ``not_base``) when ``meta["include_base_weights"]``,
    the tokenizer, and ``meta`` (with the sha256 of every weight file) as ``files.config``, last.
    Shared by SEA saves and the trained baselines' saves (``baselines/saving.py``)."""
    remove_debris(final)  # what earlier, killed saves to the same place left
    tmp = temp_dir(final)
    try:
        save_file(tensors, str(tmp / files.weights), metadata={"format": "pt"})
        if meta["include_base_weights"]:
            base = {k: v for k, v in model.state_dict().items() if k not in not_base}
            model.save_pretrained(tmp, state_dict=base)
        meta = {**meta, "sha256": {p.name: file_sha256(p) for p in sorted(tmp.iterdir()) if _is_weights(p.name)}}
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / files.config).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def check_save_target(path: str | os.PathLike, marker: str = CONFIG_NAME, kind: str = "a SEA save") -> None:
    """Refuse a ``path`` that :func:`save_pretrained` must not replace: anything but a missing or
    empty directory, or an earlier save of the same kind (a directory holding ``marker``);
    checked before long work such as training."""
    final = Path(path)
    if final.exists() and not (final.is_dir() and ((final / marker).is_file() or not any(final.iterdir()))):
        what = f"a directory that is not {kind}" if final.is_dir() else "not a directory"
        raise FileExistsError(f"{final} exists and is {what}; refusing to replace it")


def _layer_settings(model: nn.Module) -> tuple[dict, int | None]:
    """The SEA config and budget every patched layer runs with: what a reload must restore."""
    layers = _require_patched(model)
    configs = {repr(sea.config.to_dict()) for _, _, sea in layers}
    budgets = {sea.k_budget for _, _, sea in layers}
    if len(configs) > 1 or len(budgets) > 1:
        raise ValueError("the patched layers run different SEA configs or budgets, which one saved config cannot "
                         "hold: use set_runtime(model, ...) / set_budget(model, k) for all layers before saving")
    return layers[0][2].config.to_dict(), budgets.pop()


WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json", ".bin")  # every file holding (or mapping) tensors


def _is_weights(name: str) -> bool:
    return name.endswith(WEIGHT_SUFFIXES)


def check_files(folder: Path, meta: dict, weights_name: str, config_name: str) -> None:
    """Every weight file whose sha256 ``config_name`` records is present and matches it, before
    anything is loaded. Saves from before the ``sha256`` table recorded only ``weights_sha256``
    (of ``weights_name``), or nothing: what they recorded is checked."""
    recorded = meta.get("sha256")
    if recorded is None:
        legacy = meta.get("weights_sha256")
        recorded = {weights_name: legacy} if legacy is not None else {}
    if not isinstance(recorded, dict) or not all(isinstance(v, str) for v in recorded.values()):
        raise ValueError(f"{folder / config_name}: sha256 must map file names to hex digests, got {recorded!r}")
    for name, digest in recorded.items():
        file = folder / name
        if not file.is_file():
            raise ValueError(f"{file} is missing: the save is incomplete, save the model again")
        if file_sha256(file) != digest:
            raise ValueError(f"{file} does not match the sha256 recorded in {config_name}: the weights are corrupt "
                             "or were changed after saving")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def from_pretrained(path: str | os.PathLike, *, dtype: torch.dtype | None = None
                    ) -> tuple[nn.Module, PreTrainedTokenizerBase | None]:
    """Load a directory written by :func:`save_pretrained`: (patched model in eval mode, tokenizer).

    The base comes from the directory when its weights were included, else from
    ``sea_attention.app.assets.load_model(base_model)``. ``dtype`` defaults to the saved one. The
    tokenizer is the saved one if any, else the base model's (None for an included base saved
    without a tokenizer). Every SEA tensor must be present in the saved weights.
    """
    folder = Path(path)
    meta = _read_meta(folder)
    check_files(folder, meta, WEIGHTS_NAME, CONFIG_NAME)
    weights = read_weights(folder / WEIGHTS_NAME)
    model, tokenizer = load_base(folder, meta, dtype, CONFIG_NAME)
    try:
        patch(model, **SEAConfig.from_dict(meta["sea_config"]).to_dict())  # fields a save predates: their old value
    except ValueError as err:
        raise ValueError(f"{folder / CONFIG_NAME}: its sea_config does not fit the model: {err}") from err
    _load_sea_weights(model, weights, folder / WEIGHTS_NAME)
    set_budget(model, meta.get("k_budget"))
    # remembered so that saving this model again points at the same base (or carries its weights)
    model.config.sea_base_model = meta["base_model"]
    model.config.sea_base_weights_included = bool(meta["include_base_weights"])
    return model.eval(), tokenizer


def load_base(folder: Path, meta: dict, dtype: torch.dtype | None, config_name: str
              ) -> tuple[nn.Module, PreTrainedTokenizerBase | None]:
    """The base model a save describes (its own weights, or ``meta["base_model"]``) in ``dtype``
    (default: the saved one), and its tokenizer (the saved one first). Errors name ``config_name``."""
    saved_dtype = getattr(torch, str(meta["torch_dtype"]), None)
    if not isinstance(saved_dtype, torch.dtype):
        raise ValueError(f"{folder / config_name}: torch_dtype {meta['torch_dtype']!r} is not a torch dtype")
    dtype = dtype if dtype is not None else saved_dtype
    architecture = meta["architecture"]
    tokenizer = None
    if meta["include_base_weights"]:
        model_class = getattr(transformers, architecture, None)
        if model_class is None:
            raise ValueError(f"transformers has no model class {architecture!r}")
        model = model_class.from_pretrained(folder, dtype=dtype)
    else:
        try:
            model, tokenizer = load_model(meta["base_model"], dtype=dtype)
        except OSError as err:
            raise ValueError(f"{folder / config_name}: base_model {meta['base_model']!r} (where this save, which does "
                             f"not include the base weights, loads them from) cannot be loaded: {err}. Restore it, or "
                             f"set base_model in {config_name} to the base model's folder") from err
        if type(model).__name__ != architecture:
            raise ValueError(f"the saved model is a {architecture} but {meta['base_model']!r} loads as a "
                             f"{type(model).__name__}; save it with include_base_weights=True")
    if meta.get("include_tokenizer"):
        tokenizer = load_tokenizer(folder)
    return model, tokenizer


def read_json_object(file: Path, required: tuple[str, ...], version: int) -> dict:
    """A save's JSON description, checked: valid JSON, an object, ``required`` fields, ``version``.
    Every problem is a ``ValueError`` naming the file."""
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{file} is not valid JSON ({err}): the save is corrupt, save the model again") from err
    if not isinstance(meta, dict):
        raise ValueError(f"{file} must hold a JSON object, got {type(meta).__name__}")
    missing = [name for name in required if name not in meta]
    if missing:
        raise ValueError(f"{file} lacks the fields {missing}: the save is corrupt, save the model again")
    if meta["format_version"] != version:
        raise ValueError(f"{file} has format_version {meta['format_version']!r}; this sea-attention reads {version}")
    return meta


def _read_meta(folder: Path) -> dict:
    """``sea_config.json``, checked: every problem is a ``ValueError`` naming the file."""
    file = folder / CONFIG_NAME
    if not file.is_file():
        raise FileNotFoundError(f"{folder} is not a SEA save directory (no {CONFIG_NAME})")
    meta = read_json_object(file, REQUIRED_FIELDS, FORMAT_VERSION)
    if not isinstance(meta["sea_config"], dict):
        raise ValueError(f"{file}: sea_config must be a JSON object, got {meta['sea_config']!r}")
    return meta


def read_weights(file: Path) -> dict[str, Tensor]:
    """A save's tensors (its checksum is checked first, by :func:`check_files`)."""
    if not file.is_file():
        raise ValueError(f"{file} is missing: the save is incomplete, save the model again")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{file} is not a readable safetensors file ({err}): the save is corrupt") from err


def _load_sea_weights(model: nn.Module, state: dict[str, Tensor], file: Path) -> None:
    """Strict load: every SEA tensor of the model present with its shape, nothing else."""
    shapes = {name: tuple(t.shape) for name, t in sea_state_dict(model).items()}
    missing, unexpected = sorted(set(shapes) - set(state)), sorted(set(state) - set(shapes))
    if missing or unexpected:
        raise ValueError(f"{file} does not match the model: missing {missing[:5]}"
                         f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                         f"{'...' if len(unexpected) > 5 else ''}")
    wrong = [(name, tuple(state[name].shape), shape) for name, shape in shapes.items()
             if tuple(state[name].shape) != shape]
    if wrong:
        name, got, want = wrong[0]
        raise ValueError(f"{file} holds {name} of shape {got}, but the SEA config in {CONFIG_NAME} builds {want} "
                         f"({len(wrong)} tensors differ): the config (estimate_width, feature_factor, ...) was "
                         "edited or belongs to other weights")
    for name, _, sea in sea_layers(model):
        prefix = f"{name}.sea." if name else "sea."
        sea.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, strict=True)
