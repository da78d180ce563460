"""Atomic writes, and the debris a killed writer leaves, in one place.

A file or directory ``target`` is written as a hidden sibling ``.<name>.tmp-<host>-<pid>-<id>``
and renamed over it when complete; a directory being replaced is first moved aside as
``.<name>.old-<host>-<pid>-<id>``. Readers see the old or the new version, never half of one.
A process killed in between (kill -9, power loss) leaves such siblings behind:
:func:`remove_debris` deletes those whose writer is gone, either because its pid no longer runs on
this host, or because it is older than :data:`STALE_SECONDS` (a name without a pid, or another
host's).
"""

from __future__ import annotations

import os
import shutil
import socket
import time
import uuid
from collections.abc import Callable
from pathlib import Path

STALE_SECONDS = 3600.0  # debris older than this belongs to a dead writer, whatever its name says
KINDS = ("tmp", "old")


def sibling(target: Path, kind: str) -> Path:
    """A fresh hidden name next to ``target`` that records who wrote it."""
    host = socket.gethostname().replace("-", "_")
    return target.with_name(f".{target.name}.{kind}-{host}-{os.getpid()}-{uuid.uuid4().hex[:12]}")


def write_file(target: str | os.PathLike, write: Callable[[Path], None], mode: int = 0o644) -> Path:
    """``write(temporary)`` beside ``target``, flush it to disk, then rename it over ``target``."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = sibling(target, "tmp")
    try:
        write(temporary)
        with open(temporary, "rb+") as file:
            os.fsync(file.fileno())
        os.chmod(temporary, mode)
        os.replace(temporary, target)  # atomic on POSIX
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return target


def write_text(target: str | os.PathLike, text: str) -> Path:
    return write_file(target, lambda temporary: temporary.write_text(text, encoding="utf-8"))


def temp_dir(target: Path) -> Path:
    """An empty directory beside ``target`` to build it in (readable by everyone, like a normal one)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    folder = sibling(target, "tmp")
    folder.mkdir(mode=0o755)
    return folder


def replace_dir(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final``; an existing ``final`` is moved aside first, then deleted.

    Between the two renames ``final`` is briefly absent, never partial; if the process dies
    there, the previous version survives as ``.<name>.old-*`` next to it.
    """
    if not final.exists():
        os.replace(tmp, final)
        return
    old = sibling(final, "old")
    os.replace(final, old)
    try:
        os.replace(tmp, final)
    except BaseException:
        os.replace(old, final)
        raise
    shutil.rmtree(old, ignore_errors=True)


def remove_debris(target: str | os.PathLike, extra_patterns: tuple[str, ...] = ()) -> list[Path]:
    """Delete the temporary and moved-aside siblings of ``target`` whose writer is gone.

    ``extra_patterns`` are globs (in ``target``'s folder) of older debris names without a pid,
    removed by age only. Returns what was removed.
    """
    target = Path(target)
    if not target.parent.is_dir():
        return []
    candidates = [p for kind in KINDS for p in target.parent.glob(f".{target.name}.{kind}-*")]
    candidates += [p for pattern in extra_patterns for p in target.parent.glob(pattern)]
    removed = []
    for path in candidates:
        if _writer_is_gone(path):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _writer_is_gone(path: Path) -> bool:
    try:
        age = time.time() - path.lstat().st_mtime
    except OSError:
        return False  # removed meanwhile
    if age > STALE_SECONDS:
        return True
    parts = path.name.rsplit("-", 3)  # [".name.kind", host, pid, id]
    if len(parts) != 4 or not parts[2].isdigit():
        return False  # not ours to judge by pid
    host, pid = parts[1], int(parts[2])
    if host != socket.gethostname().replace("-", "_") or pid == os.getpid():
        return False
    return not _pid_alive(pid)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True
