"""`sea eval --task`: a classifier's accuracy, macro-F1 and confusion matrix with dense attention, the
oracle selection and SEA at several budgets, with the keys per query each actually used.

Rows: ``dense`` (the same weights, the model's dense attention: the teacher), then per k the
``oracle`` (per query, the top H*k dense probabilities across heads, ``baselines/oracle.py``) and
``sea`` (the model's own selection at budget k). Keys per query and coverage are measured per
layer by ``baselines.layer.SelectionStats`` (for dense: every real key of a real query's text).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ...atomic import write_text
from ...hf import dense_attention, no_cache
from ..baselines.compare import method_attention
from ..baselines.layer import SelectionStats
from .data import TaskData, encode


@dataclass(frozen=True)
class TaskEvalSetup:
    """What `sea eval --task` measures."""

    budgets: tuple[int, ...] = (8, 16, 32, 64)  # k: keys per query per head
    max_len: int = 512  # tokens per text, special tokens included
    batch_size: int = 16
    oracle: bool = True


@dataclass
class TaskRow:
    method: str  # dense, oracle or sea
    k: int | None
    accuracy: float
    macro_f1: float
    confusion: list[list[int]]  # [true label][predicted label]
    keys_per_query: float  # mean keys per (real query, head) actually used, over layers
    coverage: float | None  # mean dense attention mass on the selected keys (None for dense: 1)
    examples: int
    seconds: float
    layer_keys: list[float] = field(default_factory=list)


def confusion_matrix(labels: list[int], predictions: list[int], num_labels: int) -> list[list[int]]:
    matrix = [[0] * num_labels for _ in range(num_labels)]
    for truth, guess in zip(labels, predictions):
        matrix[truth][guess] += 1
    return matrix


def macro_f1(matrix: list[list[int]]) -> float:
    """Mean over classes of 2 TP / (2 TP + FP + FN); a class never true nor predicted is left out."""
    scores = []
    for c in range(len(matrix)):
        tp = matrix[c][c]
        fn = sum(matrix[c]) - tp
        fp = sum(row[c] for row in matrix) - tp
        if tp + fn + fp:
            scores.append(2 * tp / (2 * tp + fp + fn))
    return sum(scores) / max(len(scores), 1)


@torch.no_grad()
def predict(model: nn.Module, tokenizer, data: TaskData, setup: TaskEvalSetup, desc: str = "predict",
            progress: bool = True) -> list[int]:
    """The predicted label of every text, in ``data``'s order; texts are batched by length (right padding)."""
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(data.texts)), key=lambda i: len(data.texts[i]))  # similar lengths: little padding
    predictions = [0] * len(order)
    for start in tqdm(range(0, len(order), setup.batch_size), desc=desc, disable=not progress, leave=False,
                      dynamic_ncols=True):
        picks = order[start:start + setup.batch_size]
        batch = encode(tokenizer, [data.texts[i] for i in picks], [data.labels[i] for i in picks], setup.max_len)
        inputs = {name: value.to(device) for name, value in batch.inputs().items()}
        logits = model(**inputs, **no_cache(model)).logits  # (B, C)
        for i, guess in zip(picks, logits.argmax(-1).tolist()):
            predictions[i] = guess
    return predictions


def dense_keys_per_query(tokenizer, data: TaskData, max_len: int) -> float:
    """Keys each real query sees with bidirectional dense attention: the text's length, averaged over queries."""
    lengths = torch.tensor([len(ids) for ids in tokenizer(data.texts, truncation=True, max_length=max_len)["input_ids"]],
                           dtype=torch.float64)
    return float((lengths ** 2).sum() / lengths.sum())


def _row(method: str, k: int | None, data: TaskData, predictions: list[int], seconds: float,
         stats: SelectionStats | None, dense_keys: float) -> TaskRow:
    matrix = confusion_matrix(data.labels, predictions, data.num_labels)
    correct = sum(matrix[c][c] for c in range(data.num_labels))
    layers = stats.per_layer() if stats is not None else []
    return TaskRow(method, k, correct / len(data.labels), macro_f1(matrix), matrix,
                   stats.keys_per_query() if stats is not None else dense_keys,
                   stats.coverage() if stats is not None else None, len(data.labels), seconds,
                   [keys for keys, _ in layers])


def evaluate_task(model: nn.Module, tokenizer, data: TaskData, setup: TaskEvalSetup,
                  progress: bool = True) -> list[TaskRow]:
    """Dense first, then the oracle (if ``setup.oracle``) and SEA at each budget, on the same texts."""
    dense_keys = dense_keys_per_query(tokenizer, data, setup.max_len)
    started = time.perf_counter()
    with dense_attention(model, "sdpa"):
        predictions = predict(model, tokenizer, data, setup, "dense", progress)
    rows = [_row("dense", None, data, predictions, time.perf_counter() - started, None, dense_keys)]
    for k in setup.budgets:
        for method in ("oracle", "sea") if setup.oracle else ("sea",):
            stats, started = SelectionStats(), time.perf_counter()
            with method_attention(model, method, k, stats):
                predictions = predict(model, tokenizer, data, setup, f"{method} k={k}", progress)
            rows.append(_row(method, k, data, predictions, time.perf_counter() - started, stats, dense_keys))
    return rows


def format_task_table(rows: list[TaskRow]) -> str:
    dense = next(r.accuracy for r in rows if r.method == "dense")
    lines = [f"{'method':<7} {'k':>4} {'accuracy':>9} {'vs dense':>9} {'macro-F1':>9} {'keys/query':>11} "
             f"{'coverage':>9} {'seconds':>8}"]
    for r in rows:
        coverage = "-" if r.coverage is None else f"{r.coverage:.3f}"
        lines.append(f"{r.method:<7} {'-' if r.k is None else r.k:>4} {100 * r.accuracy:>8.2f}% "
                     f"{100 * (r.accuracy - dense):>+8.2f} {100 * r.macro_f1:>8.2f}% {r.keys_per_query:>11.1f} "
                     f"{coverage:>9} {r.seconds:>8.0f}")
    return "\n".join(lines)


def write_task_json(rows: list[TaskRow], path: str | Path, data: TaskData, setup: TaskEvalSetup, **about) -> Path:
    """The rows, the setup and the task's labels as JSON, written atomically."""
    payload = {**about, "task": data.name, "split": data.split, "examples": len(data.labels),
               "label_names": list(data.label_names), "setup": asdict(setup), "rows": [asdict(r) for r in rows]}
    return write_text(path, json.dumps(payload, indent=2))


def check_max_len(model: nn.Module, max_len: int) -> int:
    """``max_len`` if the model has positions for it; a ValueError naming the model's limit otherwise."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and max_len > limit:
        raise ValueError(f"--seq-len {max_len} exceeds the model's {limit} positions: use --seq-len {limit} or less")
    return max_len

