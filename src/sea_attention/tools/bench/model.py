"""Prefill and decode speed of a whole model: its dense attention against SEA, same weights.

For each prompt length T: one forward over T tokens of real text with the KV cache on
(prefill: the last position's logits only, as ``generate`` asks; its time and its peak extra
resident memory), then ``decode_tokens`` greedy steps, one token each, through that cache (decode;
only these steps are timed). Both modes get an untimed warm-up first and the same cache class
(``CACHES``: ``GrowingCache`` by default, which appends in place; ``DynamicCache``, transformers'
default, copies every cached key and value per step and layer). SEA keeps a small per-layer
decoding state, so its step cost stays almost flat in T; dense attention reads every cached key
at every step.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .runtime import PeakMemory

MODES = ("dense", "sea")
CACHES = ("growing", "dynamic")  # hf.GrowingCache (appends in place), transformers' DynamicCache (torch.cat)


@dataclass
class ModelBenchSetup:
    model: str
    lengths: list[int]
    decode_tokens: int = 32
    data: str = "wiki"  # text of the prompts ('random' for models without a tokenizer)
    dense_implementation: str = "sdpa"
    threads: int | None = None
    cache: str = "growing"  # one of CACHES, the same for both modes

    def __post_init__(self) -> None:
        if self.cache not in CACHES:
            raise ValueError(f"cache must be one of {', '.join(CACHES)}; got {self.cache!r}")


@dataclass
class ModelBenchPoint:
    mode: str  # "dense" or "sea"
    length: int
    prefill_seconds: float
    decode_seconds: float  # all decode steps together
    prefill_tok_s: float
    decode_tok_s: float
    prefill_peak_mb: float | None = None  # the prefill's peak extra resident memory (None: not measured)


def tiny_model(max_positions: int = 2048) -> nn.Module:
    """A random narrow Llama (2 layers, 4 heads, 256 wide): attention dominates its step time."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                         intermediate_size=512, vocab_size=1000, max_position_embeddings=max(max_positions, 2048))
    return LlamaForCausalLM(config).eval()


def context_limit(model: nn.Module) -> int:
    """The most positions the model (and its SEA layers' positional tables) accept."""
    from ...hf import family_of, sea_layers

    family = family_of(model)
    if not family.is_causal(model.config):
        raise ValueError(f"{type(model).__name__} is not a causal LM: there is nothing to decode")
    return min([family.max_positions(model.config)] + [sea.config.max_positions for _, _, sea in sea_layers(model)])


def check_lengths(model: nn.Module, lengths: list[int], decode_tokens: int, name: str) -> None:
    """ValueError naming the limit when a prompt plus its decoded tokens does not fit the model."""
    if decode_tokens < 1:
        raise ValueError(f"--decode-tokens must be at least 1, got {decode_tokens}")
    limit = context_limit(model)
    too_long = [t for t in lengths if t + decode_tokens > limit]
    if too_long:
        raise ValueError(f"{name} takes at most {limit} positions, so with --decode-tokens {decode_tokens} the "
                         f"longest prompt is {limit - decode_tokens}; got --lengths {','.join(map(str, too_long))}")


def prompt_tokens(tokenizer, data: str, count: int, vocab_size: int) -> Tensor:
    """(1, count) token ids: the start of ``data``'s test split, or random ids without a tokenizer."""
    if tokenizer is None:
        generator = torch.Generator().manual_seed(0)
        return torch.randint(0, vocab_size, (1, count), generator=generator)
    from ...app import assets
    from ..distill import tokenize

    text = assets.load_text(data, "test")
    ids = tokenize(tokenizer, text[: 16 * count])  # ~4 characters a token: 16 leaves room
    if ids.numel() < count:
        ids = tokenize(tokenizer, text)
    if ids.numel() < count:
        raise ValueError(f"the {data!r} test text has {ids.numel()} tokens, fewer than the {count} asked for")
    return ids[:count].unsqueeze(0)


def new_cache(kind: str):
    """An empty KV cache of the kind named (one of ``CACHES``)."""
    from transformers import DynamicCache

    from ...hf import GrowingCache

    return GrowingCache() if kind == "growing" else DynamicCache()


@torch.no_grad()
def prefill_and_decode(model: nn.Module, ids: Tensor, decode_tokens: int,
                       cache: str = "growing") -> tuple[float, float, float]:
    """Seconds of the prefill forward and of ``decode_tokens`` greedy steps after it, on a new ``cache``,
    and the prefill's peak extra resident memory in MB. The prefill computes the last position's
    logits only, as ``generate`` does (a model whose forward takes ``logits_to_keep``)."""
    from ...hf import cache_kwargs, last_logits

    keep = last_logits(model, 1)
    past = cache_kwargs(new_cache(cache))  # the model grows this cache in place: each call hands it on
    with PeakMemory() as peak:
        start = time.perf_counter()
        out = model(input_ids=ids, use_cache=True, **past, **keep)
        prefill = time.perf_counter() - start
    token = out.logits[:, -1:].argmax(-1)
    start = time.perf_counter()
    for _ in range(decode_tokens):
        token = model(input_ids=token, use_cache=True, **past).logits[:, -1:].argmax(-1)
    return prefill, time.perf_counter() - start, peak.mb


def bench_model(model: nn.Module, tokenizer, setup: ModelBenchSetup, progress: bool = True) -> list[ModelBenchPoint]:
    """Dense and SEA prefill/decode speed of a SEA-patched ``model`` at each length.

    Prompts are prefixes of one text (``setup.data``), or random ids when there is no tokenizer.
    """
    from ...hf import dense_attention

    check_lengths(model, setup.lengths, setup.decode_tokens, setup.model)
    if tokenizer is None:
        setup.data = "random"
    tokens = prompt_tokens(tokenizer, setup.data, max(setup.lengths), model.config.vocab_size)
    if setup.threads:
        torch.set_num_threads(setup.threads)
    points = []
    for mode in MODES:
        # SEA is the patched model's own attention; dense_attention switches the same weights back
        with dense_attention(model, setup.dense_implementation) if mode == "dense" else nullcontext():
            prefill_and_decode(model, tokens[:, :min(setup.lengths)], 2, setup.cache)  # warm-up, untimed
            for length in setup.lengths:
                prefill, decode, peak = prefill_and_decode(model, tokens[:, :length], setup.decode_tokens,
                                                           setup.cache)
                points.append(ModelBenchPoint(mode, length, prefill, decode, length / prefill,
                                              setup.decode_tokens / decode, round(peak, 1)))
                if progress:
                    print(f"  {mode:<5} T={length:<6} prefill {points[-1].prefill_tok_s:8.0f} tok/s "
                          f"({peak:.0f} MB)   decode {points[-1].decode_tok_s:7.1f} tok/s", flush=True)
    return points


def format_model_table(name: str, points: list[ModelBenchPoint]) -> str:
    """Per length: prefill and decode tokens/s of dense and SEA, and SEA / dense; the prefill's peak MB."""
    by = {(p.mode, p.length): p for p in points}
    lengths = sorted({p.length for p in points})
    lines = [f"{'model':<16} {'T':>6} {'prefill dense':>14} {'prefill SEA':>12} {'SEA/dense':>10} "
             f"{'decode dense':>13} {'decode SEA':>11} {'SEA/dense':>10} {'peak MB dense':>14} {'peak MB SEA':>12}",
             f"{'':<16} {'':>6} {'(tokens/s)':>14}"]
    for t in lengths:
        dense, sea = by[("dense", t)], by[("sea", t)]
        lines.append(f"{name[-16:]:<16} {t:>6} {dense.prefill_tok_s:>14.0f} {sea.prefill_tok_s:>12.0f} "
                     f"{sea.prefill_tok_s / dense.prefill_tok_s:>10.2f} {dense.decode_tok_s:>13.1f} "
                     f"{sea.decode_tok_s:>11.1f} {sea.decode_tok_s / dense.decode_tok_s:>10.2f} "
                     f"{_megabytes(dense.prefill_peak_mb):>14} {_megabytes(sea.prefill_peak_mb):>12}")
    return "\n".join(lines)


def _megabytes(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"
