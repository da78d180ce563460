"""Passkey retrieval, generated offline: a random 5-digit key hidden in filler text.

A prompt of exactly ``length`` tokens: an instruction, filler sentences with the key line
inserted at a fixed depth, and a question; the model continues greedily and is right when the
continuation contains the key. Keys come from a seeded generator, depths are evenly spaced, so
every method sees the same prompts.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .compare import METHODS, check_budgets, method_attention, method_runs

INSTRUCTION = ("There is an important piece of information hidden inside a lot of irrelevant text. "
               "Find it and memorize it. I will quiz you about it.\n")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
KEY_LINE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\nWhat is the pass key? The pass key is"


@dataclass(frozen=True)
class PasskeyConfig:
    lengths: tuple[int, ...] = (1024, 2048, 4096)  # prompt tokens
    prompts: int = 3  # per length, at depths (j + 1) / (prompts + 1)
    seed: int = 0
    max_new_tokens: int = 8

    def __post_init__(self) -> None:
        for name in ("prompts", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if not self.lengths or min(self.lengths) < 1:
            raise ValueError(f"lengths must be positive integers, got {self.lengths!r}")

    def depths(self) -> list[float]:
        return [(j + 1) / (self.prompts + 1) for j in range(self.prompts)]


@dataclass
class PasskeyPrompt:
    length: int
    depth: float  # where the key line sits in the filler, 0 = start, 1 = end
    key: str
    ids: Tensor  # (length,) long


@dataclass
class PasskeyRow:
    method: str
    k: int | None
    length: int
    correct: int
    prompts: int
    accuracy: float
    answers: list[str]  # the greedy continuations, for reading


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def passkey_prompt(tokenizer, length: int, depth: float, key: str) -> PasskeyPrompt:
    """Exactly ``length`` tokens: instruction, filler (key line after ``depth`` of it), question."""
    head, line, question = _ids(tokenizer, INSTRUCTION), _ids(tokenizer, KEY_LINE.format(key=key)), \
        _ids(tokenizer, QUESTION)
    room = length - len(head) - len(line) - len(question)
    if room < 1:
        raise ValueError(f"passkey length {length} leaves no room for filler: need more than "
                         f"{length - room} tokens")
    unit = _ids(tokenizer, FILLER)
    filler = (unit * (room // len(unit) + 1))[:room]
    cut = round(depth * room / len(unit)) * len(unit)  # at a sentence-group boundary
    cut = min(cut, room)
    ids = head + filler[:cut] + line + filler[cut:] + question
    return PasskeyPrompt(length, depth, key, torch.tensor(ids, dtype=torch.long))


def passkey_prompts(tokenizer, config: PasskeyConfig) -> list[PasskeyPrompt]:
    """Every (length, depth) prompt, with keys drawn from ``config.seed``."""
    rng = random.Random(config.seed)
    return [passkey_prompt(tokenizer, length, depth, str(rng.randint(10000, 99999)))
            for length in config.lengths for depth in config.depths()]


@torch.no_grad()
def greedy_answer(model: nn.Module, tokenizer, prompt: PasskeyPrompt, max_new_tokens: int) -> str:
    """The model's greedy continuation of the prompt (KV cache), decoded."""
    device = next(model.parameters()).device
    ids = prompt.ids.unsqueeze(0).to(device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=pad)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def passkey_rows(model: nn.Module, tokenizer, methods: tuple[str, ...], budgets: tuple[int, ...],
                 config: PasskeyConfig, progress: bool = True) -> list[PasskeyRow]:
    """Accuracy per (method, k, length): dense and the linear attentions once, every other method
    at every budget.

    ``sea`` decodes through its own decoding state (no override); the other methods recompute
    their attention over the cached keys at every step.
    """
    check_budgets(methods, budgets)  # every pair before the first forward
    prompts = passkey_prompts(tokenizer, config)
    rows = []
    for method, k in method_runs(methods, budgets):
        if method not in METHODS:
            raise ValueError(f"method must be one of {','.join(METHODS)}, got {method!r}")
        with method_attention(model, method, k):
            for length in config.lengths:
                answers = [greedy_answer(model, tokenizer, p, config.max_new_tokens) for p in prompts
                           if p.length == length]
                keys = [p.key for p in prompts if p.length == length]
                correct = sum(key in answer for key, answer in zip(keys, answers))
                rows.append(PasskeyRow(method, k, length, correct, len(keys), correct / len(keys), answers))
                if progress:
                    print(f"passkey {method:<13} k={k or '-':<4} length={length}: {correct}/{len(keys)}", flush=True)
    return rows


def format_passkey_table(rows: list[PasskeyRow]) -> str:
    lines = [f"{'method':<13} {'k':>5} {'length':>7} {'accuracy':>9} {'correct':>8}"]
    for r in rows:
        k = "-" if r.k is None else str(r.k)
        lines.append(f"{r.method:<13} {k:>5} {r.length:>7} {r.accuracy:>9.2f} {r.correct:>4}/{r.prompts}")
    return "\n".join(lines)
