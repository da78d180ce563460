"""benchmarks/retrieval_suspects.py: the cells_* overrides' causal-prefix path equals their reference."""

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "retrieval_suspects.py"


@pytest.fixture(scope="module")
def rs():
    spec = importlib.util.spec_from_file_location("retrieval_suspects", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def _call(tq: int, tk: int, width: int, heads: int = 4, kv_heads: int = 2, dim: int = 8):
    """A layer call (prefill when tq == tk, else the last tq rows of a cached prompt)."""
    generator = torch.Generator().manual_seed(tq * 1000 + tk)
    config = SimpleNamespace(kv_groups=heads // kv_heads, estimate_width=width, sinks=4, local_window=16)
    return SimpleNamespace(sea=SimpleNamespace(config=config), scaling=dim ** -0.5,
                           query=torch.randn(1, heads, tq, dim, generator=generator),
                           key=torch.randn(1, kv_heads, tk, dim, generator=generator) * 2,
                           value=torch.randn(1, kv_heads, tk, dim, generator=generator),
                           key_valid=torch.ones(1, tk, dtype=torch.bool))


@pytest.mark.parametrize("kind", ["mass", "max", "meankey"])
@pytest.mark.parametrize("tq,tk,width,k", [(300, 300, 16, 16),   # bins of 18-19 keys > cap 16
                                           (300, 300, 32, 16),   # bins <= 10 keys
                                           (1, 301, 32, 16),     # a decoding row
                                           (40, 340, 64, 8)])    # rows appended to a cache, chunks of 16
def test_prefix_path_matches_reference(rs, kind, tq, tk, width, k):
    call = _call(tq, tk, width)
    chunk = 16 if tq == 40 else 128
    fast, _ = rs.CellOverride(kind, k, chunk=chunk)(call)
    reference, _ = rs.CellOverride(kind, k, chunk=chunk, reference=True)(call)
    assert fast.shape == (1, 4, tq, 8)
    torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-6)


def test_kept_rows(rs, tmp_path):
    path = tmp_path / "r.json"
    path.write_text('{"setup": {"task": "needle", "length": 64, "prompts": 1, "k": 8}, '
                    '"rows": [{"method": "sea"}, {"method": "cells_mass"}]}')
    setup = {"task": "needle", "length": 64, "prompts": 1, "k": 8}
    assert rs.kept_rows(path, setup, ["cells_mass"]) == [{"method": "sea"}]
    with pytest.raises(ValueError, match="another setup"):
        rs.kept_rows(path, {**setup, "k": 16}, ["cells_mass"])
