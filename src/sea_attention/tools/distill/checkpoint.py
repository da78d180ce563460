"""Training checkpoints written atomically (a crash mid-write leaves the previous one loadable),
and the one rule for which settings a resumed run may not change.
"""

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


# ------------------------------------------------------------------ what a resume may not change
# Every setting of a run shapes its weights, except these (they change when checkpoints are
# written, or how a layer computes the same thing): a resumed run may differ in them.
RESUMABLE = frozenset({"checkpoint_every", "sea.attention_path", "sea.query_chunk"})
# what a checkpoint written before a setting existed ran with (it has no such key); a setting
# missing from a checkpoint and absent here (the layers' settings of older checkpoints) is unchecked
LEGACY_SETTINGS = {"hidden_loss": "mse", "query_rows": 0, "updates_per_pass": 1, "method": "sea"}
STAGE_ONLY = {"hidden_loss": "full"}  # settings that have no effect outside their stage


def run_settings(config: dict[str, Any], method: str, layers: dict[str, Any] | None) -> dict[str, Any]:
    """Every setting that shapes a run's weights, flat: the distillation config's fields, the
    trained method, and the trained layers' settings as ``<method>.<field>`` (``sea.k``,
    ``sea.grouping``, ``indexer.heads``...). Built the same way for a run and a checkpoint."""
    settings = {"method": method, **config, **{f"{method}.{name}": v for name, v in (layers or {}).items()}}
    for name, stage in STAGE_ONLY.items():
        if settings.get("stage") != stage:
            settings.pop(name, None)
    return {name: value for name, value in settings.items() if name not in RESUMABLE}


def checkpoint_settings(state: dict[str, Any]) -> dict[str, Any]:
    """:func:`run_settings` of a checkpoint, settings it predates filled from ``LEGACY_SETTINGS``."""
    config = {**{k: v for k, v in LEGACY_SETTINGS.items() if k != "method"}, **state["config"]}
    return run_settings(config, state.get("method", LEGACY_SETTINGS["method"]), state.get("layers"))


def check_resume(state: dict[str, Any], now: dict[str, Any]) -> None:
    """ValueError naming every setting in which the run ``now`` differs from the checkpoint
    ``state``; a finished run asked for more steps is told how to train further."""
    saved = checkpoint_settings(state)
    if saved["method"] != now.get("method"):
        raise ValueError(f"cannot resume: the checkpoint trains {saved['method']}, this run {now.get('method')}")
    changed = sorted(name for name, value in saved.items() if now.get(name) != value)
    if not changed:
        return
    details = ", ".join(f"{n}: checkpoint {saved[n]!r}, now {now.get(n)!r}" for n in changed)
    message = f"cannot resume: the run's settings differ from the checkpoint's ({details})"
    if "steps" in changed and state["step"] >= saved["steps"]:
        message += (f". The checkpoint's run finished its {saved['steps']} steps, and the step count is part of "
                    "the run (the learning-rate schedule spans it), so it cannot be extended: to train further, "
                    "start a new run from the saved model (sea distill --model SAVED --out NEW --steps N: a fresh "
                    "optimizer, warmup and schedule)")
    raise ValueError(message)
