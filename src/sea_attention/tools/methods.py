"""The one check of a list of method names (``sea compare --methods``, ``sea bench --methods``)."""

from __future__ import annotations

from collections.abc import Iterable


def check_methods(methods: Iterable[str], accepted: tuple[str, ...]) -> tuple[str, ...]:
    """The methods in order without repeats; a ValueError naming the unknown ones and the accepted ones."""
    methods = tuple(dict.fromkeys(methods))
    unknown = [m for m in methods if m not in accepted]
    if unknown:
        raise ValueError(f"unknown method{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}: "
                         f"methods must be some of {','.join(accepted)}")
    if not methods:
        raise ValueError(f"no methods given: methods must be some of {','.join(accepted)}")
    return methods
