"""Passkey retrieval, generated offline: a random 5-digit key hidden in filler text.

A prompt of exactly ``length`` tokens: an instruction, filler sentences with the key line
inserted at a fixed depth, and a question; the model continues greedily and is right when the
continuation contains the key. The suite (``tasks.py``, task ``passkey``) draws the keys from a
seeded generator at evenly spaced depths, so every method sees the same prompts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

INSTRUCTION = ("There is an important piece of information hidden inside a lot of irrelevant text. "
               "Find it and memorize it. I will quiz you about it.\n")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
KEY_LINE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\nWhat is the pass key? The pass key is"


@dataclass
class PasskeyPrompt:
    length: int
    depth: float  # where the key line sits in the filler, 0 = start, 1 = end
    key: str
    ids: Tensor  # (length,) long


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
