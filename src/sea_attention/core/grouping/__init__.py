"""Selection strategies: one object per value of ``SEAConfig.grouping`` (``base.Grouping``)."""

from __future__ import annotations

from ..config import SEAConfig
from .base import Attended, Grouping, Step
from .block import BlockGrouping
from .long_rows import LongRowsGrouping
from .per_query import PerQueryGrouping

__all__ = ["Attended", "BlockGrouping", "Grouping", "LongRowsGrouping", "PerQueryGrouping", "Step", "grouping_for"]


def grouping_for(config: SEAConfig) -> Grouping:
    """The strategy a config asks for: the only place that reads ``config.grouping`` (and ``block_from``)."""
    if config.grouping == "block":
        return BlockGrouping(config)
    if config.block_from:
        return LongRowsGrouping(config)
    return PerQueryGrouping(config, config.grouping)
