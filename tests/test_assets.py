"""Tests for sea_attention.app.assets: bundled texts, models and the atomic caches."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from sea_attention.app import assets
from sea_attention.app.assets import BUNDLED_MODELS, BUNDLED_TEXTS, SPLITS, load_model, load_text

PARTS = ("train", "validation", "test")


@pytest.fixture(scope="module")
def wiki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    # A private cache root: the test exercises parsing and the on-disk cache without touching ~.
    root = tmp_path_factory.mktemp("text-cache")
    return {split: load_text("wiki", split, cache_dir=root) for split in SPLITS} | {"root": str(root)}


def test_constants_name_licences() -> None:
    assert set(BUNDLED_MODELS) == {"smollm2-135m", "minilm-l6"}
    assert set(BUNDLED_TEXTS) == {"wiki", "bbc"}
    assert all("Apache-2.0" in v for v in BUNDLED_MODELS.values())
    assert "CC BY-SA" in BUNDLED_TEXTS["wiki"] and "BBC" in BUNDLED_TEXTS["bbc"]


def test_wiki_splits_disjoint_by_article_and_sized(wiki: dict[str, str]) -> None:
    assert all(wiki[p] for p in PARTS)
    # Articles contain blank lines themselves, so check disjointness on the (title, text) list.
    articles = assets._wiki_articles(Path(wiki["root"]).resolve())
    assert len(articles) == 105
    by_split = {p: {t for t, _ in articles if assets._split_of(t) == p} for p in PARTS}
    assert sum(len(s) for s in by_split.values()) == 105
    assert not (by_split["train"] & by_split["test"] or by_split["validation"] & by_split["test"])
    total = len(wiki["all"])
    assert 3_000_000 < total < 3_150_000
    for part, (lo, hi) in {"train": (0.7, 0.9), "validation": (0.05, 0.15), "test": (0.05, 0.15)}.items():
        assert lo < len(wiki[part]) / total < hi, part
    # No text of one split appears in another (first 200 chars of every test article).
    for _, text in (a for a in articles if assets._split_of(a[0]) == "test"):
        assert text[:200] in wiki["test"] and text[:200] not in wiki["train"]


def test_wiki_deterministic_and_cached(wiki: dict[str, str]) -> None:
    root = Path(wiki["root"])
    assert (root / "text" / f"wiki-v{assets._WIKI_CACHE_VERSION}.json").is_file()
    assets._wiki_articles.cache_clear()  # force a read from the on-disk cache
    assert load_text("wiki", "test", cache_dir=root) == wiki["test"]
    assert load_text("wiki", "validation", cache_dir=root) == wiki["validation"]


def test_bbc_loads_and_splits() -> None:
    texts = {split: load_text("bbc", split) for split in SPLITS}
    assert all(texts.values())
    assert "Ad sales boost Time Warner profit" in texts["all"]
    assert "\ufffd" not in texts["all"]  # the latin-1 file decoded cleanly
    # The splits partition the articles: only the two "\n\n" joins between splits are missing.
    assert sum(len(texts[p]) for p in PARTS) + 2 * 2 == len(texts["all"])
    assert 0.05 < len(texts["test"]) / len(texts["all"]) < 0.15


def test_text_file_split_at_paragraphs(tmp_path: Path) -> None:
    paragraphs = [f"Paragraph {i} " + "word " * 20 for i in range(100)]
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(paragraphs), encoding="utf-8")
    whole = load_text(str(path), "all")
    assert whole == path.read_text(encoding="utf-8")
    parts = [load_text(str(path), p) for p in PARTS]
    assert "".join(parts) == whole
    assert all(p.startswith("Paragraph") for p in parts)
    assert 0.85 < len(parts[0]) / len(whole) < 0.95


@pytest.mark.parametrize(
    ("name", "split", "expected"),
    [
        ("foo", "train", "expected one of 'wiki', 'bbc' or a path to a text file"),
        ("wiki", "dev", "'train', 'validation', 'test', 'all'"),
    ],
)
def test_bad_text_name_or_split(name: str, split: str, expected: str) -> None:
    with pytest.raises(ValueError, match=expected):
        load_text(name, split)


def test_unknown_model_error_names_the_options() -> None:
    # Not a hub id (so a path): a missing folder, said at once, without network retries.
    with pytest.raises(OSError, match="smollm2-135m") as info:
        load_model("no/such//model")
    assert "minilm-l6" in str(info.value) and "is a folder that does not exist" in str(info.value)
    assert "hub id" in str(info.value)


def test_minilm_loads_and_encodes() -> None:
    model, tokenizer = load_model("minilm-l6")
    assert type(model).__name__ == "BertModel" and not model.training
    batch = tokenizer("Sparse attention with an estimated mask.", return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    assert hidden.shape == (1, batch["input_ids"].shape[1], 384)


def test_cache_build_ignores_unfinished_temp_dir(tmp_path: Path) -> None:
    final = tmp_path / "m"
    crashed = tmp_path / ".m.tmp-crashed"  # what a killed process leaves behind
    crashed.mkdir()
    (crashed / "config.json").write_text("{half")
    assets._build_cache_atomically(final, lambda d: (d / "w.txt").write_text("ok"))
    assert (final / "w.txt").read_text() == "ok"
    assert (final / assets._COMPLETE_MARKER).is_file()


def test_cache_build_failure_leaves_nothing(tmp_path: Path) -> None:
    def crash(d: Path) -> None:
        (d / "w.txt").write_text("partial")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        assets._build_cache_atomically(tmp_path / "m", crash)
    assert list(tmp_path.iterdir()) == []


def test_cache_build_race_loser_uses_winner(tmp_path: Path) -> None:
    final = tmp_path / "m"

    def slow_loser(d: Path) -> None:
        # While this process builds, another one completes the cache.
        assets._build_cache_atomically(final, lambda w: (w / "w.txt").write_text("winner"))
        (d / "w.txt").write_text("loser")

    assert assets._build_cache_atomically(final, slow_loser) == final
    assert (final / "w.txt").read_text() == "winner"
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


@pytest.fixture(scope="module")
def smollm2_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, float]]:
    root = tmp_path_factory.mktemp("model-cache")
    crashed = root / ".smollm2-135m.tmp-crashed"
    crashed.mkdir()
    (crashed / "config.json").write_text("{}")  # would break loading if it were used
    start = time.perf_counter()
    load_model("smollm2-135m", cache_dir=root)
    yield root, time.perf_counter() - start
    shutil.rmtree(root, ignore_errors=True)  # 540 MB; pytest would keep it for three runs


@pytest.mark.slow
def test_smollm2_converts_once_then_loads_from_cache(smollm2_cache: tuple[Path, float]) -> None:
    root, first_seconds = smollm2_cache
    cache = root / "smollm2-135m"
    assert (cache / "model.safetensors").is_file() and (cache / "tokenizer.json").is_file()
    start = time.perf_counter()
    model, tokenizer = load_model("smollm2-135m", cache_dir=root, attn_implementation="eager")
    second_seconds = time.perf_counter() - start
    assert second_seconds < min(15.0, first_seconds)
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 9, 3)
    assert getattr(cfg, "quantization_config", None) is None
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model(ids, output_attentions=True)
    assert len(out.attentions) == 30 and out.attentions[0].shape[1] == 9
