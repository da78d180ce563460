"""`sea finetune`: fine-tune a dense encoder and a fresh classification head on a task (the teacher SEA
is later distilled from). Checkpointed every ``checkpoint_every`` steps and resumable; the result is
a plain transformers directory (``AutoModelForSequenceClassification``) with its tokenizer."""

from __future__ import annotations

import math
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForSequenceClassification, PreTrainedModel

from ...app.assets import load_tokenizer, model_source
from ...atomic import remove_debris, replace_dir, temp_dir
from ..distill.checkpoint import load_checkpoint, save_checkpoint
from ..distill.losses import classification_loss
from .data import TaskData, encode

CHECKPOINT_KEYS = ("step", "config", "data", "model", "optimizer", "scheduler", "losses")


@dataclass
class FinetuneConfig:
    """Knobs of a dense fine-tune (defaults: the usual BERT recipe, sized for a CPU)."""

    epochs: int = 1
    batch_size: int = 32
    lr: float = 5e-5
    max_len: int = 128  # tokens per text, special tokens included (longer texts are truncated)
    warmup_fraction: float = 0.06
    weight_decay: float = 0.01
    seed: int = 0
    checkpoint_every: int = 50  # optimizer steps; 0: only at the end

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "max_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr!r}")
        if not 0 <= self.warmup_fraction < 1 or self.checkpoint_every < 0:
            raise ValueError("warmup_fraction must be in [0, 1) and checkpoint_every >= 0")


def load_classifier(name_or_path: str, data: TaskData) -> tuple[PreTrainedModel, object]:
    """A bundled name, local directory or hub id as a sequence classifier with ``data``'s labels (a new
    head when the base has none) and its tokenizer."""
    source = model_source(name_or_path)
    ids = {name: i for i, name in enumerate(data.label_names)}
    model = AutoModelForSequenceClassification.from_pretrained(
        source, num_labels=data.num_labels, id2label=dict(enumerate(data.label_names)), label2id=ids,
        ignore_mismatched_sizes=True)  # a head of another task is replaced, not silently reused
    return model, load_tokenizer(source)


def _order(count: int, config: FinetuneConfig) -> list[int]:
    """Example indices of every epoch, each epoch shuffled by (seed, epoch): a pure function of the config."""
    order = []
    for epoch in range(config.epochs):
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch)
        order += torch.randperm(count, generator=generator).tolist()
    return order


def finetune(model: PreTrainedModel, tokenizer, data: TaskData, config: FinetuneConfig,
             checkpoint_dir: str | Path | None = None, progress: bool = True) -> list[float]:
    """Train ``model`` (every weight) with cross-entropy on ``data``; returns the loss of every step.
    With ``checkpoint_dir``, resumes from the checkpoint there (same config) and writes new ones."""
    order = _order(len(data.texts), config)
    steps = -(-len(order) // config.batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    warmup = int(config.warmup_fraction * steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / (warmup + 1) if s < warmup else max(0.0, (steps - s) / max(1, steps - warmup)))
    about = {"task": data.name, "split": data.split, "examples": len(data.texts), "labels": list(data.label_names)}
    step, losses = _resume(model, optimizer, scheduler, {**asdict(config), **about}, checkpoint_dir)
    model.train()
    for step in tqdm(range(step, steps), initial=step, total=steps, desc="finetune", disable=not progress,
                     dynamic_ncols=True):
        picks = order[step * config.batch_size:(step + 1) * config.batch_size]
        batch = encode(tokenizer, [data.texts[i] for i in picks], [data.labels[i] for i in picks], config.max_len)
        torch.manual_seed(config.seed * 1_000_003 + step)  # dropout: a function of the step, resumable
        loss = classification_loss(model(**batch.inputs()).logits, batch.labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(float(loss.detach()))
        if checkpoint_dir and config.checkpoint_every and (step + 1) % config.checkpoint_every == 0:
            save_checkpoint(checkpoint_dir, {"step": step + 1, "config": asdict(config), "data": about,
                                             "model": model.state_dict(),
                                             "optimizer": optimizer.state_dict(),
                                             "scheduler": scheduler.state_dict(), "losses": losses})
    return losses


def _resume(model, optimizer, scheduler, run: dict, checkpoint_dir) -> tuple[int, list[float]]:
    """The step and losses of the checkpoint in ``checkpoint_dir`` (0, [] without one), loaded into the
    model, optimizer and scheduler; ``run`` (config and data) must match the checkpoint's."""
    state = load_checkpoint(checkpoint_dir, CHECKPOINT_KEYS) if checkpoint_dir else None
    if state is None:
        return 0, []
    ours = {k: v for k, v in run.items() if k != "checkpoint_every"}
    theirs = {k: v for k, v in {**state["config"], **state["data"]}.items() if k != "checkpoint_every"}
    if ours != theirs:
        raise ValueError(f"cannot resume from {checkpoint_dir}: its run had {theirs}, this one {ours}")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    print(f"resumed at step {state['step']}")
    return state["step"], list(state["losses"])


def save_classifier(model: PreTrainedModel, tokenizer, path: str | Path) -> Path:
    """Write the fine-tuned model and tokenizer to ``path`` atomically (built beside it, renamed in)."""
    final = Path(path)
    if final.exists() and not (final / "config.json").is_file() and any(final.iterdir()):
        raise FileExistsError(f"{final} exists and is not a model directory; refusing to replace it")
    remove_debris(final)
    tmp = temp_dir(final)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final

