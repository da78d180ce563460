"""Training checkpoints written atomically: a crash mid-write leaves the previous one loadable."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from ...atomic import remove_debris, write_file

CHECKPOINT_NAME = "checkpoint.pt"
LEGACY_DEBRIS = (".checkpoint-*.tmp",)  # temporary names of earlier versions (no pid: removed by age)


def save_checkpoint(directory: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``directory/checkpoint.pt`` via a temporary file and an atomic rename
    (removing what killed writers left there first)."""
    target = Path(directory) / CHECKPOINT_NAME
    remove_debris(target, LEGACY_DEBRIS)
    return write_file(target, lambda temporary: torch.save(state, temporary))


def load_checkpoint(directory: str | Path, required_keys: tuple[str, ...] = ()) -> dict[str, Any] | None:
    """The last complete checkpoint in ``directory``, or None if there is none.

    Debris of killed writers is removed first. A file that is not a checkpoint (unreadable,
    or not a dict with ``required_keys``) is a ``ValueError`` naming it.
    """
    target = Path(directory) / CHECKPOINT_NAME
    remove_debris(target, LEGACY_DEBRIS)
    if not target.exists():
        return None
    try:
        state = torch.load(target, map_location="cpu", weights_only=False)
    except (EOFError, RuntimeError, ValueError, pickle.UnpicklingError, OSError) as err:
        raise ValueError(f"{target} is not a readable checkpoint ({type(err).__name__}: {err}); delete it to "
                         "start fresh") from err
    missing = [key for key in required_keys if not isinstance(state, dict) or key not in state]
    if missing:
        raise ValueError(f"{target} is not a distillation checkpoint (no {missing}); delete it to start fresh")
    return state
