"""`sea compare --task passkey|needle|multi_needle|copy|retrieval`: the retrieval and copy suite.

Per method, k, task and length: the prompts of ``tasks.py`` (the same for every method), a greedy
continuation with the KV cache, and its score: retrieval tasks count the prompts whose
continuation contains the answer; ``copy`` counts exact tokens per position of the continuation
(``accuracy`` is their mean, ``correct`` the prompts copied whole).

    rows = retrieval_rows(model, tokenizer, ("dense", "sea"), (64,), RetrievalConfig(("needle",), (1024,)))
    print(format_retrieval_table(rows))
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from ...hf import GrowingCache, cache_kwargs
from .compare import check_budgets, check_methods, method_attention, method_runs
from .tasks import HAYSTACKS, TASKS, PromptSource, TaskPrompt, check_tasks, haystack_sentences, task_prompts

SUITE_LENGTHS: tuple[int, ...] = (1024, 2048, 4096, 8192)  # 8192: SmolLM2's maximum


@dataclass(frozen=True)
class RetrievalConfig:
    tasks: tuple[str, ...] = tuple(TASKS)
    lengths: tuple[int, ...] = SUITE_LENGTHS  # prompt tokens
    prompts: int = 10  # per task and length, at depths (j + 1) / (prompts + 1)
    seed: int = 0
    max_new_tokens: int | None = None  # None: each task's own (enough for its answer)
    haystacks: tuple[str, ...] = HAYSTACKS  # corpora (test splits) or text files the prose tasks hide in

    def __post_init__(self) -> None:
        object.__setattr__(self, "tasks", check_tasks(self.tasks))
        if isinstance(self.prompts, bool) or not isinstance(self.prompts, int) or self.prompts < 1:
            raise ValueError(f"prompts must be a positive integer, got {self.prompts!r}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not self.lengths or any(isinstance(n, bool) or not isinstance(n, int) or n < 64 for n in self.lengths):
            raise ValueError(f"lengths must be integers >= 64 (prompt tokens), got {self.lengths!r}")
        if not self.haystacks:
            raise ValueError("haystacks must name at least one corpus ('wiki', 'bbc') or text file")

    def new_tokens(self, task: str) -> int:
        return self.max_new_tokens or TASKS[task].max_new_tokens

    def check_fits(self, max_positions: int | None) -> None:
        """ValueError when a prompt and its answer would pass the model's last position."""
        if max_positions is None:
            return
        for task in self.tasks:
            too_long = [n for n in self.lengths if n + self.new_tokens(task) > max_positions]
            if too_long:
                raise ValueError(f"lengths {too_long} plus {self.new_tokens(task)} answer tokens of {task} pass "
                                 f"the model's {max_positions} positions: use lengths <= "
                                 f"{max_positions - self.new_tokens(task)}")


@dataclass
class RetrievalRow:
    method: str
    k: int | None
    task: str
    length: int
    correct: int  # prompts answered (copy: copied whole)
    prompts: int
    accuracy: float  # correct / prompts (copy: exact tokens / tokens)
    answers: list[str]  # the greedy continuations, for reading
    position_accuracy: list[float] = field(default_factory=list)  # copy: per continuation position


def suite_prompts(tokenizer, config: RetrievalConfig) -> dict[tuple[str, int], list[TaskPrompt]]:
    """Every (task, length)'s prompts, built once for all methods."""
    needs_prose = any(TASKS[t].haystack for t in config.tasks)
    source = PromptSource(tokenizer, haystack_sentences(tokenizer, config.haystacks) if needs_prose else {})
    return {(task, n): task_prompts(source, task, n, config.prompts, config.seed)
            for task in config.tasks for n in config.lengths}


@torch.no_grad()
def greedy_ids(model: nn.Module, tokenizer, ids: Tensor, max_new_tokens: int) -> Tensor:
    """(n,) the model's greedy continuation of the 1-D prompt ``ids`` (KV cache), n <= max_new_tokens."""
    device = next(model.parameters()).device
    ids = ids.unsqueeze(0).to(device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=pad, **cache_kwargs(GrowingCache()))
    return out[0, ids.shape[1]:].cpu()


def copy_matches(continuation: Tensor, expected: Tensor) -> Tensor:
    """(n,) bool: position i of the continuation equals the expected token (missing tokens miss)."""
    got = continuation[: expected.numel()]
    matches = torch.zeros(expected.numel(), dtype=torch.bool)
    matches[: got.numel()] = got == expected[: got.numel()]
    return matches


def score_prompts(model: nn.Module, tokenizer, prompts: list[TaskPrompt], max_new_tokens: int,
                  method: str = "", k: int | None = None) -> RetrievalRow:
    """One row: greedy answers to ``prompts`` (one task, one length) under the active attention."""
    continuations = [greedy_ids(model, tokenizer, p.ids, max_new_tokens) for p in prompts]
    answers = [tokenizer.decode(c, skip_special_tokens=True) for c in continuations]
    task, length = prompts[0].task, prompts[0].length
    if task == "copy":
        matches = torch.stack([copy_matches(c, p.expected) for c, p in zip(continuations, prompts)]).float()
        correct = int(matches.all(-1).sum())
        return RetrievalRow(method, k, task, length, correct, len(prompts), float(matches.mean()), answers,
                            matches.mean(0).tolist())
    correct = sum(p.answer in a for p, a in zip(prompts, answers))
    return RetrievalRow(method, k, task, length, correct, len(prompts), correct / len(prompts), answers)


def retrieval_rows(model: nn.Module, tokenizer, methods: tuple[str, ...], budgets: tuple[int, ...],
                   config: RetrievalConfig, progress: bool = True,
                   on_row: Callable[[list[RetrievalRow]], None] | None = None) -> list[RetrievalRow]:
    """A row per (method, k, task, length): dense first, then every other method at every budget.

    ``sea`` decodes through its own decoding state (no override); the other methods recompute
    their attention over the cached keys at every step. ``on_row(rows so far)`` runs after each row.
    """
    config.check_fits(getattr(getattr(model, "config", None), "max_position_embeddings", None))
    methods = check_methods(methods)
    check_budgets(methods, budgets)  # every (method, k) before the first forward
    return score_runs(model, tokenizer, method_runs(methods, budgets), config, progress, on_row)


def score_runs(model: nn.Module, tokenizer, runs: list[tuple[str, int | None]], config: RetrievalConfig,
               progress: bool = True, on_row: Callable[[list[RetrievalRow]], None] | None = None
               ) -> list[RetrievalRow]:
    """A row per (method, k) of ``runs`` and (task, length) of ``config``, in that order (no checks:
    ``retrieval_rows`` is the checked entry point). ``on_row(rows so far)`` runs after each row."""
    prompts = suite_prompts(tokenizer, config)
    rows: list[RetrievalRow] = []
    for method, k in runs:
        with method_attention(model, method, k):
            for (task, length), batch in prompts.items():
                rows.append(score_prompts(model, tokenizer, batch, config.new_tokens(task), method, k))
                if progress:
                    r = rows[-1]
                    print(f"{task:<12} {method:<13} k={k or '-':<4} length={length}: {r.correct}/{r.prompts} "
                          f"(accuracy {r.accuracy:.2f})", flush=True)
                if on_row is not None:
                    on_row(rows)
    return rows


def format_retrieval_table(rows: list[RetrievalRow]) -> str:
    """Methods down, (task, length) across: correct/prompts (copy: exact-token accuracy)."""
    columns = list(dict.fromkeys((r.task, r.length) for r in rows))
    methods = list(dict.fromkeys((r.method, r.k) for r in rows))
    cell = {(r.method, r.k, r.task, r.length): r for r in rows}
    head = f"{'method':<13} {'k':>4} " + " ".join(f"{t[:8] + '@' + str(n):>14}" for t, n in columns)
    lines = [head]
    for method, k in methods:
        parts = []
        for task, n in columns:
            r = cell.get((method, k, task, n))
            text = "-" if r is None else f"{r.accuracy:.2f}" if task == "copy" else f"{r.correct}/{r.prompts}"
            parts.append(f"{text:>14}")
        lines.append(f"{method:<13} {'-' if k is None else k:>4} " + " ".join(parts))
    return "\n".join(lines)


def plot_retrieval(rows: list[RetrievalRow], path: str | Path, title: str = "") -> Path:
    """A PNG: one panel per task, accuracy against prompt length, a line per (method, k)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from ...atomic import write_file

    tasks = list(dict.fromkeys(r.task for r in rows))
    fig = Figure(figsize=(3.6 * len(tasks) + 1, 3.8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(tasks), squeeze=False)[0]
    for ax, task in zip(axes, tasks):
        for method, k in dict.fromkeys((r.method, r.k) for r in rows):
            mine = sorted((r.length, r.accuracy) for r in rows if r.task == task and (r.method, r.k) == (method, k))
            label = method if k is None else f"{method}@{k}"
            ax.plot([n for n, _ in mine], [a for _, a in mine], marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_ylim(-0.05, 1.05)
        ax.set_title(task + (" (exact tokens)" if task == "copy" else " (prompts answered)"), fontsize="medium")
        ax.set_xlabel("prompt tokens")
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("accuracy")
    axes[-1].legend(fontsize="small")
    if title:
        fig.suptitle(title, fontsize="medium")
    return write_file(path, lambda temporary: fig.savefig(temporary, dpi=110, format="png"))
