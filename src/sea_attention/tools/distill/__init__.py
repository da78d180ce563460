"""Distillation: train SEA's estimator (and optionally the whole model) from the dense model."""

from .data import TokenWindows, tokenize
from .trainer import DistillConfig, Distiller, StepRecord

__all__ = ["DistillConfig", "Distiller", "StepRecord", "TokenWindows", "tokenize"]
