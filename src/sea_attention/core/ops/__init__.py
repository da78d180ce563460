"""Attention on the selected keys: a dense reference and the linear-memory sparse op."""

from .reference import allowed_keys, exact_attention, reference_attention, repeat_kv
from .sparse import naive_sparse_attention, sparse_attention

__all__ = ["allowed_keys", "exact_attention", "reference_attention", "repeat_kv", "sparse_attention", "naive_sparse_attention"]
