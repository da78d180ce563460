"""The classification-task side of the `sea` command: `sea finetune`, and the ``--task`` options that
`sea distill` and `sea eval` share (see ``tools/tasks``)."""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict

from .cli_args import non_negative_int, positive_float, positive_int


def task_name(text: str) -> str:
    """argparse type of ``--task``: a bundled task, a .csv/.jsonl file or hf:ID."""
    from ..tools.tasks import check_task

    try:
        return check_task(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error))


TEXT_COLUMN_HELP = "column holding the text: of a `datasets` corpus (--data) or a task's CSV/JSONL/hub rows (default text)"


def add_task_options(parser: argparse.ArgumentParser, required: bool = False, text_column: bool = True) -> None:
    """``--task`` and the column flags of a user's CSV/JSONL (or hub dataset); ``text_column=False`` when
    the parser already has ``--text-column`` (the ``--data`` options share it)."""
    from ..tools.tasks import BUNDLED_TASKS

    group = parser.add_argument_group("classification task")
    group.add_argument("--task", type=task_name, required=required,
                       help=f"{' or '.join(BUNDLED_TASKS)} (bundled), PATH.csv / PATH.jsonl, or hf:DATASET_ID "
                            "(needs the `datasets` library and the hub)")
    if text_column:
        group.add_argument("--text-column", help=TEXT_COLUMN_HELP)
    group.add_argument("--label-column", default="label", help="column of the labels (default label)")
    group.add_argument("--group-column", help="column grouping rows that must share a split (default: the text)")
    group.add_argument("--max-examples", type=positive_int, help="use only the first N examples of the split")


def task_split(args, split: str):
    """The ``split`` of ``args.task`` with the column flags, cut to ``--max-examples``."""
    from ..tools.tasks import TaskColumns, load_task

    columns = TaskColumns(args.text_column or "text", args.label_column, args.group_column)
    return load_task(args.task, split, columns).subset(args.max_examples)


def require_classifier(model, name: str) -> None:
    """A ValueError unless ``model`` is a sequence classifier (what ``--task`` trains and measures)."""
    if not type(model).__name__.endswith("ForSequenceClassification"):
        raise ValueError(f"{name} is a {type(model).__name__}, not a classifier: fine-tune one with "
                         "`sea finetune --task ...` and distil it with `sea distill --task ...`")


def cmd_finetune(args) -> int:
    from pathlib import Path

    from ..tools.tasks.finetune import FinetuneConfig, finetune, load_classifier, save_classifier

    config = FinetuneConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, max_len=args.max_len,
                            seed=args.seed, checkpoint_every=args.checkpoint_every)
    data = task_split(args, "train")
    torch_seed(args.seed)
    model, tokenizer = load_classifier(args.model, data)
    checkpoints = Path(args.checkpoint_dir or f"{Path(args.out)}-checkpoints")
    started = time.perf_counter()
    losses = finetune(model, tokenizer, data, config, checkpoints, progress=not args.quiet)
    save_classifier(model.eval(), tokenizer, args.out)
    print(f"finetune {args.task}: {len(data.texts)} examples x {config.epochs} epoch(s), {len(losses)} steps, loss "
          f"{losses[0]:.4f} -> {sum(losses[-10:]) / len(losses[-10:]):.4f} (mean of the last 10), "
          f"{time.perf_counter() - started:.0f} s; saved to {args.out} ({asdict(config)})")
    return 0


def torch_seed(seed: int) -> None:
    import torch

    torch.manual_seed(seed)  # the new head's initial weights


def add_finetune_parser(commands) -> None:
    finetune = commands.add_parser("finetune", help="fine-tune a dense encoder with a classification head on a task "
                                                    "(the teacher of `sea distill --task`)")
    finetune.add_argument("--model", default="minilm-l6", help="bundled name, local dir or hub id")
    add_task_options(finetune, required=True)
    finetune.add_argument("--epochs", type=positive_int, default=1)
    finetune.add_argument("--batch-size", type=positive_int, default=32)
    finetune.add_argument("--lr", type=positive_float, default=5e-5)
    finetune.add_argument("--max-len", type=positive_int, default=128, help="tokens per text (longer ones truncated)")
    finetune.add_argument("--seed", type=int, default=0)
    finetune.add_argument("--out", required=True, help="directory of the fine-tuned model (transformers format)")
    finetune.add_argument("--checkpoint-dir", help="default: OUT-checkpoints; a run resumes from its checkpoint")
    finetune.add_argument("--checkpoint-every", type=non_negative_int, default=50, help="optimizer steps")
    finetune.add_argument("--quiet", action="store_true")
    finetune.set_defaults(func=cmd_finetune)
