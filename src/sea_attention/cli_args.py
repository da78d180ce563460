"""Argument types shared by the `sea` subcommands."""

from __future__ import annotations

import argparse


def int_list(text: str) -> list[int]:
    """'32,64,128' -> [32, 64, 128]; anything else is an argparse error naming the format."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 32,64,128, got {text!r}")
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values
