"""Training checkpoints written atomically: a crash mid-write leaves the previous one loadable."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_NAME = "checkpoint.pt"


def save_checkpoint(directory: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``directory/checkpoint.pt`` via a temporary file and an atomic rename."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / CHECKPOINT_NAME
    handle, temporary = tempfile.mkstemp(prefix=".checkpoint-", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save(state, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, target)  # atomic on POSIX: readers see the old or the new file
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return target


def load_checkpoint(directory: str | Path) -> dict[str, Any] | None:
    """The last complete checkpoint in ``directory``, or None if there is none."""
    target = Path(directory) / CHECKPOINT_NAME
    if not target.exists():
        return None
    return torch.load(target, map_location="cpu", weights_only=False)
