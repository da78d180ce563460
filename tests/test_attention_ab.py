"""benchmarks/attention_ab.py: each tree runs with its own modules (also those imported at call time)."""

import importlib.util
import shutil
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("attention_ab", ROOT / "benchmarks" / "attention_ab.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_each_tree_runs_its_own_modules(tmp_path):
    saved = {name: m for name, m in sys.modules.items() if name == "sea_attention" or name.startswith("sea_attention.")}
    try:
        ab = _script()
        trees = {}
        for name in ("a", "b"):
            shutil.copytree(ROOT / "src" / "sea_attention", tmp_path / name / "sea_attention")
            trees[name] = ab.Tree(str(tmp_path / name), heads=2, kv_heads=2, length=16, seed=0)
        q, k, v = (torch.randn(1, 2, 16, 64) for _ in range(3))
        with torch.no_grad():
            for name in ("a", "b", "a"):  # "a" after "b" was loaded last
                trees[name].run(q, k, v)
                chunked = sys.modules["sea_attention.core.chunked"]
                assert Path(chunked.__file__).is_relative_to(tmp_path / name)
    finally:
        for name in [n for n in sys.modules if n == "sea_attention" or n.startswith("sea_attention.")]:
            del sys.modules[name]
        sys.modules.update(saved)
