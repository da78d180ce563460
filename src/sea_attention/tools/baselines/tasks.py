"""The retrieval and copy suite's prompts, generated offline with fixed seeds (one registry).

Every task builds prompts of exactly ``length`` tokens whose right continuation is known:

* ``passkey``: a 5-digit key in repeated filler sentences (``passkey.py``);
* ``needle``: a number of 5-7 digits in real prose (wiki and BBC *test* text, alternating), in one
  of several wordings, asked for at the end;
* ``multi_needle``: four labelled numbers in real prose, one of them asked for;
* ``copy``: a random string of prose tokens hidden in prose, repeated at the end: its first
  ``COPY_CUE`` tokens are given, the model must continue with the rest, token for token.

The needle (or copied string) sits at depth (j + 1) / (prompts + 1) of prompt j. Retrieval tasks
are right when the continuation contains the answer; copy is scored per position of the greedy
continuation (exact token match).

    prompts = task_prompts(tokenizer, "needle", 1024, count=10, seed=0, haystacks=haystack_tokens(tok))
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .passkey import passkey_prompt

HAYSTACKS: tuple[str, ...] = ("wiki", "bbc")  # test splits of the bundled corpora, alternating by prompt
NEEDLES: tuple[tuple[str, str], ...] = (  # (statement, question ending where the answer starts)
    ("The special magic number is {key}.", "What is the special magic number? The special magic number is"),
    ("Remember this secret code: {key}.", "What is the secret code? The secret code is"),
    ("The number written on the old blue door was {key}.",
     "Which number was written on the old blue door? The number on the door was"),
)
LABELS: tuple[str, ...] = ("Oslo", "Lima", "Cairo", "Perth", "Quito", "Hanoi", "Dakar", "Riga")
MULTI_STATEMENT = "The magic number for {label} is {key}."
MULTI_QUESTION = "What is the magic number for {label}? The magic number for {label} is"
NEEDLES_PER_PROMPT = 4
COPY_LENGTH, COPY_CUE = 24, 8  # tokens in the copied string, and how many of them the repeat gives


@dataclass
class TaskPrompt:
    task: str
    length: int
    depth: float  # where the needle (or the string) sits in the haystack, 0 = start, 1 = end
    ids: Tensor  # (length,) long
    answer: str  # the text a retrieval continuation must contain ("" for copy)
    expected: Tensor | None = None  # copy: (n,) long, the tokens the continuation must be


@dataclass(frozen=True)
class TaskSpec:
    build: Callable[["PromptSource", int, float, random.Random], TaskPrompt]
    max_new_tokens: int  # greedy steps that hold the whole answer
    haystack: bool  # needs real prose


@dataclass
class PromptSource:
    """The tokenizer and, for the prose tasks, the tokenized haystack sentences of each corpus."""

    tokenizer: object
    sentences: dict[str, list[list[int]]]  # corpus -> token ids of each sentence (with its leading space)
    corpus: str = "wiki"  # the haystack of the prompt being built


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def split_sentences(text: str, tokenizer, limit: int = 4000) -> list[list[int]]:
    """The first ``limit`` sentences of ``text``, each tokenized with a leading space."""
    parts = [s for s in re.split(r"(?<=[.!?])\s+", " ".join(text.split())) if s][:limit]
    return [_ids(tokenizer, " " + s) for s in parts]


def haystack_sentences(tokenizer, corpora: tuple[str, ...] = HAYSTACKS) -> dict[str, list[list[int]]]:
    """Sentences of each corpus, tokenized once: a bundled corpus's test split (never trained on),
    a text file whole."""
    from pathlib import Path

    from ...app import assets

    return {name: split_sentences(assets.load_text(name, "all" if Path(name).is_file() else "test"), tokenizer)
            for name in corpora}


def _prose(source: PromptSource, room: int, rng: random.Random) -> list[list[int]]:
    """Consecutive sentences from a random start, at least ``room`` tokens in all."""
    sentences = source.sentences.get(source.corpus)
    total = sum(map(len, sentences or []))
    if not sentences or total < 2 * room:
        raise ValueError(f"the {source.corpus} haystack holds {total} tokens, too few for {room}-token prompts")
    start, picked, count = rng.randrange(len(sentences)), [], 0
    while count < room:
        picked.append(sentences[start % len(sentences)])
        count += len(picked[-1])
        start += 1
    return picked


def _embed(source: PromptSource, length: int, depth: float, inserts: list[list[int]], tail: list[int],
           rng: random.Random) -> list[int]:
    """Prose with ``inserts`` between sentences, spread from ``depth`` on, cut to fit, then ``tail``."""
    room = length - len(tail) - sum(map(len, inserts))
    if room < 16:
        raise ValueError(f"a {length}-token prompt leaves no room for the haystack: need more than "
                         f"{length - room + 15} tokens")
    sentences = _prose(source, room, rng)
    sentences[-1] = sentences[-1][: len(sentences[-1]) - (sum(map(len, sentences)) - room)]  # exactly room
    spots = [round(min(depth + 0.05 * i, 1.0) * (len(sentences) - 1)) for i in range(len(inserts))]
    body: list[int] = []
    for i, sentence in enumerate(sentences):
        body += sentence
        body += [t for spot, insert in zip(spots, inserts) if spot == i for t in insert]
    return body + tail


def _key(rng: random.Random, digits: int) -> str:
    return str(rng.randint(10 ** (digits - 1), 10 ** digits - 1))


def needle_prompt(source: PromptSource, length: int, depth: float, rng: random.Random) -> TaskPrompt:
    """One number of 5-7 digits, in one of ``NEEDLES``' wordings, hidden in prose."""
    statement, question = rng.choice(NEEDLES)
    key = _key(rng, rng.choice((5, 6, 7)))
    tok = source.tokenizer
    ids = _embed(source, length, depth, [_ids(tok, " " + statement.format(key=key))], _ids(tok, "\n" + question), rng)
    return TaskPrompt("needle", length, depth, torch.tensor(ids, dtype=torch.long), key)


def multi_needle_prompt(source: PromptSource, length: int, depth: float, rng: random.Random) -> TaskPrompt:
    """``NEEDLES_PER_PROMPT`` labelled numbers in prose; the question names one of them."""
    labels = rng.sample(LABELS, NEEDLES_PER_PROMPT)
    keys = [_key(rng, 6) for _ in labels]
    asked = rng.randrange(len(labels))
    tok = source.tokenizer
    inserts = [_ids(tok, " " + MULTI_STATEMENT.format(label=label, key=key)) for label, key in zip(labels, keys)]
    tail = _ids(tok, "\n" + MULTI_QUESTION.format(label=labels[asked]))
    depth_first = depth * 0.8  # the four needles spread over 0.15 of the prose from here
    ids = _embed(source, length, depth_first, inserts, tail, rng)
    return TaskPrompt("multi_needle", length, depth, torch.tensor(ids, dtype=torch.long), keys[asked])


def copy_prompt(source: PromptSource, length: int, depth: float, rng: random.Random) -> TaskPrompt:
    """A string of ``COPY_LENGTH`` random prose tokens hidden in prose; its first ``COPY_CUE``
    tokens end the prompt, the rest is the expected continuation."""
    pool = sorted({t for sentence in source.sentences[source.corpus][:2000] for t in sentence})
    string = [rng.choice(pool) for _ in range(COPY_LENGTH)]
    newline = _ids(source.tokenizer, "\n")
    ids = _embed(source, length, depth, [newline + string + newline], newline + string[:COPY_CUE], rng)
    return TaskPrompt("copy", length, depth, torch.tensor(ids, dtype=torch.long), "",
                      torch.tensor(string[COPY_CUE:], dtype=torch.long))


def passkey_task_prompt(source: PromptSource, length: int, depth: float, rng: random.Random) -> TaskPrompt:
    """Today's passkey prompt (repeated filler), through the registry."""
    prompt = passkey_prompt(source.tokenizer, length, depth, str(rng.randint(10000, 99999)))
    return TaskPrompt("passkey", length, depth, prompt.ids, prompt.key)


TASKS: dict[str, TaskSpec] = {
    "passkey": TaskSpec(passkey_task_prompt, 8, haystack=False),
    "needle": TaskSpec(needle_prompt, 8, haystack=True),
    "multi_needle": TaskSpec(multi_needle_prompt, 8, haystack=True),
    "copy": TaskSpec(copy_prompt, COPY_LENGTH - COPY_CUE, haystack=True),
}


def check_tasks(tasks) -> tuple[str, ...]:
    """The task names in order without repeats; ValueError naming the accepted ones otherwise."""
    tasks = tuple(dict.fromkeys(tasks))
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise ValueError(f"tasks must be some of {','.join(TASKS)}, got {','.join(tasks) or 'none'}")
    return tasks


def task_prompts(source: PromptSource, task: str, length: int, count: int, seed: int) -> list[TaskPrompt]:
    """``count`` prompts of one task and length at depths (j + 1) / (count + 1); the same for the
    same (task, length, seed), whatever else runs."""
    spec = TASKS[check_tasks((task,))[0]]
    rng = random.Random(f"{task}/{length}/{seed}")
    prompts = []
    for j in range(count):
        corpora = tuple(source.sentences) or (source.corpus,)
        corpus = corpora[j % len(corpora)] if spec.haystack else source.corpus
        prompts.append(spec.build(PromptSource(source.tokenizer, source.sentences, corpus), length,
                                  (j + 1) / (count + 1), rng))
    return prompts
