"""The estimator: what predicts each query's compressed attention row."""

from .estimator import AttentionEstimator, Estimate

__all__ = ["AttentionEstimator", "Estimate"]
