"""Argument types shared by the `sea` subcommands: a bad value is an argparse error that
names the accepted range, before any model is loaded."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path


def _number(text: str, parse: Callable[[str], float], accepted: Callable[[float], bool], description: str):
    """``parse(text)`` if it is finite and ``accepted``; otherwise an argparse error."""
    try:
        value = parse(text)
    except ValueError:
        value = None
    if value is None or not math.isfinite(value) or not accepted(value):
        raise argparse.ArgumentTypeError(f"expected {description}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    return _number(text, int, lambda x: x >= 1, "a positive integer")


def non_negative_int(text: str) -> int:
    return _number(text, int, lambda x: x >= 0, "an integer >= 0")


def positive_float(text: str) -> float:
    return _number(text, float, lambda x: x > 0, "a finite number > 0")


def non_negative_float(text: str) -> float:
    return _number(text, float, lambda x: x >= 0, "a finite number >= 0")


def unit_interval(text: str) -> float:
    return _number(text, float, lambda x: 0 < x <= 1, "a number in (0, 1]")


def fraction(text: str) -> float:
    return _number(text, float, lambda x: 0 <= x < 1, "a number in [0, 1)")


def int_list(text: str) -> list[int]:
    """'32,64,128' -> [32, 64, 128]; anything else is an argparse error naming the format."""
    return _integers(text, 1, "32,64,128", "positive integers")


def layer_list(text: str) -> tuple[int, ...]:
    """'0,1' -> (0, 1), layer indices, and 'none' -> (); anything else is an argparse error naming the format."""
    if text.strip().lower() == "none":
        return ()
    return tuple(_integers(text, 0, "0,1 (or none)", "layer indices >= 0, or none"))


def _integers(text: str, minimum: int, example: str, what: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as {example}, got {text!r}")
    if not values or any(v < minimum for v in values):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return values


def name_list(check: Callable[[list[str]], tuple[str, ...]]) -> Callable[[str], tuple[str, ...]]:
    """An argparse type for 'a,b,c': the names, validated by ``check`` (its ValueError becomes an
    argparse error)."""

    def parse(text: str) -> tuple[str, ...]:
        try:
            return check([part.strip() for part in text.split(",") if part.strip()])
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error))

    return parse


def row_range(text: str) -> tuple[int | None, int | None]:
    """'START:STOP' (either may be left out: ':512', '768:') -> (START, STOP); an argparse error otherwise."""
    parts = text.split(":")
    try:
        bounds = [int(part) if part.strip() else None for part in parts]
    except ValueError:
        bounds = []
    if len(parts) != 2 or len(bounds) != 2 or any(b is not None and b < 0 for b in bounds):
        raise argparse.ArgumentTypeError(f"expected START:STOP with integers >= 0 such as 768:1024 or 768:, "
                                         f"got {text!r}")
    return bounds[0], bounds[1]


def _folders_problem(text: str) -> str | None:
    """Why the folders above ``text`` cannot be created or written into (the nearest existing one is
    not a folder), or None: the writers create missing folders."""
    for parent in Path(text).parents:
        if parent.exists():
            return None if parent.is_dir() else f"{str(parent)!r} is a file, not a folder"
    return None


def output_file(text: str) -> str:
    """A file the command writes (--json, --plot, plot's --out): refused before any work when a
    folder above it is a regular file, or when it is itself a folder."""
    problem = _folders_problem(text) or (f"{text!r} is a folder" if Path(text).is_dir() else None)
    if problem:
        raise argparse.ArgumentTypeError(f"cannot write {text!r}: {problem}; expected a file path")
    return text


def output_dir(text: str) -> str:
    """A folder the command writes (distill's --out and --checkpoint-dir, demo's --out): refused
    before any work when a folder above it is a regular file (what is at the path itself is for the
    command to judge: an earlier save may be replaced)."""
    problem = _folders_problem(text)
    if problem:
        raise argparse.ArgumentTypeError(f"cannot write {text!r}: {problem}; expected a folder path")
    return text
