"""Distil a SEA-patched model from its own dense attention.

Two stages:

* ``estimator``: the base model stays frozen. One dense (teacher) forward per batch; inside
  each layer, SEA runs on that layer's q, k, v and is trained with layer-local losses
  against that layer's dense attention, which is then dropped. No backward pass through
  the transformer, and only one layer's T x T map exists at a time.
* ``full``: the paper's recipe. The whole model is trained against a frozen dense copy of
  itself: task cross-entropy, hidden-state MSE, logit KL and the layer-local losses, with
  a high learning rate for SEA modules and a low one for the rest.

``Distiller(method=...)`` trains another method in SEA's place, through the same stages (the
trained baselines of ``sea compare``, ``baselines/trained.py``): a :class:`LayerMethod` says which
parameters are its own and what it does in a layer call; SEA's modules are then frozen.

Under torchrun (``group``, :mod:`..distributed`) each rank trains on its share of a global batch of
``batch_size x world_size`` windows: stage estimator with every SEA layer under DDP, stage full with the
student under FSDP2 (the frozen teacher replicated); the gradients, schedule and losses are those of one
process with the global batch. Rank 0 shows progress and writes the checkpoints, which hold full tensors.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ...core.cells import query_lengths, row_keys
from ...hf import LayerCall, dense_attention, layer_override, no_cache, sea_layers
from ...core.ops.reference import reference_attention
from .. import distributed
from ..distributed import Group
from .checkpoint import check_resume, load_checkpoint, run_settings, save_checkpoint
from .data import TokenWindows
from .losses import (HIDDEN_LOSSES, LayerTargets, classification_loss, hidden_mse, language_model_loss, layer_losses,
                     layer_targets, logit_kl)

STAGES = ("estimator", "full")
SCHEDULES = ("cosine", "linear", "constant")
ROW_RUN = 16  # consecutive query rows drawn together by ``query_rows``


@dataclass
class DistillConfig:
    """Knobs of a distillation run (defaults: the estimator stage on a CPU)."""

    stage: str = "estimator"
    steps: int = 100  # optimizer steps
    seq_len: int = 512
    batch_size: int = 1
    grad_accum: int = 1
    lr: float = 1e-3  # SEA modules
    base_lr: float = 1e-5  # everything else (stage full)
    weight_decay: float = 0.01
    warmup_steps: int = 10
    schedule: str = "cosine"
    clip_norm: float = 1.0
    bf16: bool = False
    seed: int = 0
    checkpoint_every: int = 50  # 0: only at the end
    # stage estimator (SEA, causal layers): how much each teacher forward is used
    query_rows: int = 0  # query rows per window trained in each layer, drawn afresh every step in runs of
    # ROW_RUN consecutive rows (0: every row); each trains its per-query estimate and output, also past a layer's
    # block_from (``_per_query``: the long-rows policy's blocks select with that estimate of their first row)
    updates_per_pass: int = 1  # optimizer steps per teacher forward: the layers' q, k, v are held between them
    # layer-local loss weights
    kl_weight: float = 1.0
    mse_weight: float = 1.0
    context_weight: float = 1.0
    # model-level loss weights (stage full; the paper's OPT recipe)
    task_weight: float = 0.1
    hidden_weight: float = 5.0
    hidden_loss: str | None = None  # stage full: "relative" (None), or "mse": the paper's plain MSE in the
    # residual stream's units
    logit_weight: float = 0.2
    attention_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {self.stage!r}")
        if self.hidden_loss is not None and self.stage != "full":
            raise ValueError(f"hidden_loss applies to stage 'full' only (stage {self.stage} trains layer-local "
                             f"losses and compares no hidden states), got hidden_loss={self.hidden_loss!r}")
        if self.stage == "full" and self.hidden_loss is None:
            self.hidden_loss = "relative"
        if self.stage == "full" and self.hidden_loss not in HIDDEN_LOSSES:
            raise ValueError(f"hidden_loss must be one of {HIDDEN_LOSSES}, got {self.hidden_loss!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        for name in ("steps", "seq_len", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.checkpoint_every < 0 or self.warmup_steps < 0 or self.query_rows < 0:
            raise ValueError("checkpoint_every, warmup_steps and query_rows must be >= 0")
        if self.updates_per_pass < 1:
            raise ValueError(f"updates_per_pass must be >= 1, got {self.updates_per_pass}")
        if self.stage != "estimator" and (self.query_rows or self.updates_per_pass > 1):
            raise ValueError("query_rows and updates_per_pass apply to stage 'estimator' only (stage full trains "
                             "the whole model on every row of every window)")
        for name in ("lr", "base_lr"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


class LayerMethod(Protocol):
    """A method distilled in SEA's place: one module per attention layer, attached to the model."""

    name: str
    stages: tuple[str, ...]  # the stages it can be trained with

    def owns(self, parameter_name: str) -> bool:
        """Whether a parameter or buffer of the model is the method's own (trained at ``lr``)."""

    def train_layer(self, call: LayerCall, loss_scale: float) -> tuple[Tensor, dict[str, float]]:
        """Stage estimator: backpropagate ``loss_scale`` x its layer-local loss; return the teacher's
        context (B, H, Tq, d) and the loss terms (``loss``, and ``estimate_kl`` where it has one)."""

    def attend(self, call: LayerCall) -> Tensor:
        """Stage full: the layer's attention (B, H, Tq, d) with the method."""


def _is_sea(name: str) -> bool:
    return ".sea." in f".{name}"


@dataclass
class StepRecord:
    step: int
    loss: float
    estimate_kl: float  # nan where the trained method has no such term
    context_mse: float  # idem
    lr: float
    tokens_per_s: float
    extra: dict[str, float] = field(default_factory=dict)


CHECKPOINT_KEYS = ("step", "config", "trainable", "buffers", "optimizer", "scheduler", "history")  # state_dict()


class _StopForward(Exception):
    """Raised after the last layer in the estimator stage: the LM head is not needed."""


class Distiller:
    """Runs one distillation stage on a patched model; checkpoints and resumes."""

    def __init__(self, model: nn.Module, windows: TokenWindows, config: DistillConfig,
                 checkpoint_dir: str | Path | None = None, method: LayerMethod | None = None,
                 group: Group | None = None) -> None:
        self.model, self.windows, self.config, self.method = model, windows, config, method
        self.group = group or Group()
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.layers = [sea for _, _, sea in sea_layers(model)]
        if not self.layers:
            raise ValueError("the model is not patched with SEA: call sea_attention.patch(model) first")
        if method is not None and config.stage not in method.stages:
            raise ValueError(f"{method.name} is distilled with stage {' or '.join(method.stages)}, "
                             f"not {config.stage!r}")
        _validate_row_sampling(config, self.layers, method)
        if method is not None and self.group.backend is not None:
            raise ValueError(f"{method.name} is distilled in one process: launch `sea distill --method "
                             f"{method.name}` without torchrun")
        self.step = 0
        self.history: list[StepRecord] = []
        # micro-batch -> its teacher pass's layer calls, each with its every-row targets (None with query_rows)
        self._held: dict[int, list[tuple[LayerCall, LayerTargets | None]]] = {}
        self._held_pass = -1  # which teacher pass ``_held`` is from
        self._set_trainable()
        self.teacher = self._frozen_teacher() if config.stage == "full" else None  # replicated on every rank
        self._replicas = self._parallelize()  # before the optimizer: FSDP2 replaces the parameters
        groups = self._param_groups()
        self._sea_group = next((i for i, g in enumerate(groups) if g["lr"] == config.lr), 0)  # reported lr
        self.optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.95))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)

    # ------------------------------------------------------------------ set-up
    def _owns(self, name: str) -> bool:
        """The trained method's own parameters and buffers (SEA's, by default): trained at ``lr``."""
        return self.method.owns(name) if self.method is not None else _is_sea(name)

    def _set_trainable(self) -> None:
        full = self.config.stage == "full"
        for name, param in self.model.named_parameters():
            param.requires_grad_(self._owns(name) or (full and not _is_sea(name)))

    def _param_groups(self) -> list[dict[str, Any]]:
        cfg = self.config
        groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
        for name, param in self.model.named_parameters():
            if param.requires_grad:
                own = self._owns(name)
                decay = param.dim() >= 2 and "norm" not in name.lower()
                groups.setdefault((own, decay), []).append(param)
        return [{"params": params, "lr": cfg.lr if own else cfg.base_lr,
                 "weight_decay": cfg.weight_decay if decay else 0.0}
                for (own, decay), params in groups.items()]

    def _lr_factor(self, step: int) -> float:
        cfg = self.config
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - 1 - cfg.warmup_steps)  # 1 at the last step
        if cfg.schedule == "cosine":
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        if cfg.schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 1.0

    def _parallelize(self) -> dict[int, nn.Module]:
        """Many processes: stage estimator, each SEA layer under DDP (returned, by id of the layer);
        stage full, the student sharded with FSDP2 (in place). One process: nothing to do."""
        if self.config.stage == "estimator":
            return {id(sea): distributed.replicate(sea, self.group) for sea in self.layers}
        distributed.shard_model(self.model, [name for name, _, _ in sea_layers(self.model)], self.group)
        return {}

    def trained_model(self) -> nn.Module | None:
        """The trained model as one plain module, to save: the model itself; under FSDP2 its gathered
        weights in rank 0's copy of the teacher (the same architecture), None on the other ranks."""
        if self.group.backend is None or self.config.stage == "estimator":
            return self.model
        state = {name: distributed.full(value.detach()) for name, value in self.model.state_dict().items()}
        if not self.group.is_main:
            return None
        self.teacher.load_state_dict(state)
        return self.teacher

    def _frozen_teacher(self) -> nn.Module:
        teacher = copy.deepcopy(self.model).eval()
        teacher.requires_grad_(False)
        return teacher

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Full tensors whatever the world size (gathering shards is a collective: every rank calls it)."""
        trainable = {n: distributed.full(p.detach()).clone() for n, p in self.model.named_parameters()
                     if p.requires_grad}
        buffers = {n: b.clone() for n, b in self.model.named_buffers() if self._owns(n)}
        return {"step": self.step, "config": asdict(self.config), "trainable": trainable, "buffers": buffers,
                "optimizer": distributed.full_optimizer_state(self.optimizer.state_dict()),
                "scheduler": self.scheduler.state_dict(), "history": [asdict(r) for r in self.history],
                "method": self._method_name, "world_size": self.group.world_size, "layers": self._layer_settings()}

    @property
    def _method_name(self) -> str:
        return self.method.name if self.method is not None else "sea"

    def _layer_settings(self) -> dict[str, Any]:
        """The trained layers' settings (a field that differs between layers: its list per layer)."""
        if self.method is not None:
            return self.method.config_dict() if hasattr(self.method, "config_dict") else {}
        per_layer = [{**asdict(sea.config), "k_budget": getattr(sea, "k_budget", None)} for sea in self.layers]  # as run
        return {name: values[0] if all(v == values[0] for v in values) else values
                for name, values in ((n, [layer[n] for layer in per_layer]) for n in per_layer[0])}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = self._with_our_world_size(state)
        check_resume(state, run_settings(asdict(self.config), self._method_name, self._layer_settings()))
        params, buffers = dict(self.model.named_parameters()), dict(self.model.named_buffers())
        for name, value in [*state["trainable"].items(), *state["buffers"].items()]:
            ours_now = params.get(name, buffers.get(name))
            if ours_now is None or ours_now.shape != value.shape:
                now = "missing" if ours_now is None else f"{tuple(ours_now.shape)}"
                raise ValueError(f"cannot resume: {name} is {tuple(value.shape)} in the checkpoint and {now} in this "
                                 "model: it was patched with other SEA settings (e.g. --estimate-width: causal layers "
                                 "default to K=256 now, 128 before)")
        with torch.no_grad():
            for name, value in [*state["trainable"].items(), *state["buffers"].items()]:
                distributed.assign(params.get(name, buffers.get(name)), value)
        self.optimizer.load_state_dict(state["optimizer"])
        distributed.shard_optimizer_state(self.optimizer)
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = state["step"]
        self.history = [StepRecord(**r) for r in state["history"]]

    def _with_our_world_size(self, state: dict[str, Any]) -> dict[str, Any]:
        """A checkpoint written by another number of processes resumes when the global batch is the
        same (then so are the data, schedule and losses); its per-rank batch size is no difference."""
        world, theirs = self.group.world_size, state.get("world_size", 1)
        if theirs == world:
            return state
        global_batch = state["config"]["batch_size"] * theirs
        if global_batch != self.config.batch_size * world:
            fits = f"--batch-size {global_batch // world}" if global_batch % world == 0 else \
                f"a number of processes dividing {global_batch}"
            raise ValueError(f"cannot resume: the checkpoint was written by {theirs} process(es) with a global batch "
                             f"of {global_batch} windows, and {world} x --batch-size {self.config.batch_size} make "
                             f"{self.config.batch_size * world}: use {fits}")
        return {**state, "config": {**state["config"], "batch_size": self.config.batch_size}}

    def resume(self) -> bool:
        """Continue from the last checkpoint in ``checkpoint_dir``; False if there is none. Rank 0 reads
        it and hands it to the other ranks (their machines need not see the folder)."""
        directory = self.checkpoint_dir
        state = self.group.from_main(lambda: load_checkpoint(directory, CHECKPOINT_KEYS)) if directory else None
        if state is None:
            return False
        self.load_state_dict(state)
        return True

    def save(self) -> None:
        if self.checkpoint_dir is not None:
            state = self.state_dict()  # every rank: gathering shards is a collective
            if self.group.is_main:
                save_checkpoint(self.checkpoint_dir, state)

    # ------------------------------------------------------------------ training
    def run(self, progress: bool = True, until: int | None = None) -> list[StepRecord]:
        """Train until optimizer step ``until`` (default: ``config.steps``); returns the history.

        Stopping early and resuming later is the same run: the schedule always spans
        ``config.steps``.
        """
        cfg = self.config
        until = cfg.steps if until is None else min(until, cfg.steps)
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not (progress and self.group.is_main),
                   desc=f"distil [{cfg.stage}]",
                   unit="step", dynamic_ncols=True)
        while self.step < until:
            record = self._optimizer_step()
            self.history.append(record)
            bar.update(1)
            bar.set_postfix(loss=f"{record.loss:.4f}", kl=f"{record.estimate_kl:.3f}",
                            tok_s=f"{record.tokens_per_s:.0f}")
            if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and self.step < cfg.steps:
                self.save()
        bar.close()
        if self.step >= cfg.steps:  # the held q, k, v are not needed past the run
            self._held, self._held_pass = {}, -1
        self.save()
        return self.history

    def _optimizer_step(self) -> StepRecord:
        cfg = self.config
        started = time.perf_counter()
        # dropout etc. depend on the step (and rank) only: resumable
        torch.manual_seed(cfg.seed * 1_000_003 + self.step + 104_729 * self.group.rank)
        self.model.train(cfg.stage == "full")
        self.optimizer.zero_grad(set_to_none=True)
        totals: dict[str, float] = {}
        tokens = 0  # real (unpadded) tokens the teacher read
        teacher_pass = self.step // cfg.updates_per_pass  # the windows this step trains on
        world = self.group.world_size
        for micro in range(cfg.grad_accum):
            raw = self.windows.batch(teacher_pass * cfg.grad_accum + micro, cfg.batch_size * world)  # global
            batch = model_batch(_rank_rows(raw, self.group), self.device)
            with distributed.no_sync(self._replicas.values(), micro < cfg.grad_accum - 1):
                parts = self._pass(batch, teacher_pass, micro)
            tokens += int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
            for key, value in parts.items():
                totals[key] = totals.get(key, 0.0) + value / cfg.grad_accum
        totals = self.group.average(totals)
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.clip_norm) if cfg.clip_norm else None
        lr = self.optimizer.param_groups[self._sea_group]["lr"]  # the rate this step used
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        for sea in self.layers:
            sea.maybe_redraw_features(self.step)
        seconds = time.perf_counter() - started
        # real teacher tokens of all ranks, amortised over the steps that share the teacher pass
        tokens = self.group.sum([tokens])[0] / cfg.updates_per_pass
        if "rows" in totals:  # query rows trained per layer (stage estimator), all ranks
            totals["rows_per_s"] = totals.pop("rows") * cfg.grad_accum * world / seconds
        if grad_norm is not None:
            totals["grad_norm"] = float(distributed.full(grad_norm))
        return StepRecord(step=self.step, loss=totals.pop("loss"), estimate_kl=totals.pop("estimate_kl", math.nan),
                          context_mse=totals.pop("context_mse", math.nan), lr=lr,
                          tokens_per_s=tokens / seconds, extra=totals)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.bf16)

    def _layer_loss(self, call: LayerCall, targets: LayerTargets, rows: Tensor | None = None):
        """SEA on the call's q, k, v (only ``rows`` of its queries, if given, per query: ``_per_query``) and
        its layer-local losses against ``targets`` (of the same rows)."""
        cfg = self.config
        sea = self._replicas.get(id(call.sea), call.sea)  # under DDP: its gradients averaged over the ranks
        with self._autocast(), _per_query(call.sea, cfg.query_rows > 0):
            out = sea(call.query, call.key, call.value, attention_mask=call.key_valid, scale=call.scaling,
                      query_rows=rows)
        losses = layer_losses(out, targets)
        return out, losses, losses.total(cfg.kl_weight, cfg.mse_weight, cfg.context_weight)

    def _dense_targets(self, call: LayerCall, rows: Tensor | None = None) -> tuple[Tensor, LayerTargets]:
        """The teacher's context and the estimator's targets, of every query row or of ``rows``:
        only those rows' scores (rows x Tk) are computed."""
        query_valid = call.key_valid[:, call.key.shape[2] - call.query.shape[2]:]
        lengths = query_lengths(call.key_valid, query_valid, call.causal)  # (B, Tq)
        query = call.query
        if rows is not None:
            query, lengths = query.index_select(2, rows), lengths.index_select(1, rows)
        mask = row_keys(call.key_valid, lengths).unsqueeze(1).expand(-1, query.shape[1], -1, -1)
        context, probs = reference_attention(query, call.key, call.value, mask, call.scaling)
        return context, layer_targets(probs, context, call.key_valid, lengths, call.sea.config.estimate_width)

    def _pass(self, batch: dict[str, Tensor], teacher_pass: int, micro: int) -> dict[str, float]:
        """One micro-batch (``model_batch``) of the configured stage: backpropagated; returns the loss terms."""
        if self.method is not None:
            return self._method_pass(batch) if self.config.stage == "estimator" else self._method_full_pass(batch)
        if self.config.stage == "estimator":
            return self._estimator_pass(self._teacher_calls(batch, teacher_pass, micro))
        return self._full_pass(batch)

    def _layerwise_forward(self, batch: dict[str, Tensor], train_layer: Callable[[LayerCall], Tensor]) -> None:
        """The frozen model's dense forward with ``train_layer(call)`` in every layer (it trains on the
        call and returns the teacher's context, so the forward stays dense), stopped after the last
        layer: the LM head is not needed."""
        last = len(self.layers) - 1

        def layer(call: LayerCall):
            context = train_layer(call)
            if call.layer_idx == last:
                raise _StopForward
            return context.to(call.query.dtype), None

        try:
            with torch.no_grad(), layer_override(self.model, layer):
                self.model(**forward_inputs(batch), **no_cache(self.model))
        except _StopForward:
            pass

    def _teacher_calls(self, batch: dict[str, Tensor], teacher_pass: int,
                       micro: int) -> list[tuple[LayerCall, LayerTargets | None]]:
        """Every layer's call (its q, k, v, no autograd) in the frozen model's dense forward of
        ``batch``, held for the ``updates_per_pass`` steps that train on this teacher pass.
        Training every row, the layer's dense attention is both its output and its targets, so
        they are kept with the call; with ``query_rows`` each step scores its own rows."""
        if teacher_pass != self._held_pass:
            self._held, self._held_pass = {}, teacher_pass
        if micro not in self._held:
            calls: list[tuple[LayerCall, LayerTargets | None]] = []

            def hold(call: LayerCall) -> Tensor:
                if self.config.query_rows:
                    calls.append((call, None))
                    return call.dense()[0]  # the forward stays dense
                context, targets = self._dense_targets(call)
                calls.append((call, targets))
                return context

            self._layerwise_forward(batch, hold)
            if self.config.updates_per_pass == 1:
                return calls
            self._held[micro] = calls
        return self._held[micro]

    def _query_rows(self, call: LayerCall) -> Tensor | None:
        """The query rows this step trains in this layer: ``query_rows`` of them, in aligned runs of
        ROW_RUN consecutive rows (a run shares its CNN history: ``estimator._decode_rows``), drawn
        from the step, the layer and the seed only (a resumed run draws the same); None for every row."""
        tq, count = call.query.shape[2], self.config.query_rows
        if count == 0 or count >= tq:
            return None
        run = min(ROW_RUN, count)
        generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + self.step * 1_009 + call.layer_idx)
        starts = torch.randperm(-(-tq // run), generator=generator)[: -(-count // run)].sort().values * run
        rows = (starts[:, None] + torch.arange(run)).flatten()
        return rows[rows < tq][:count].to(call.query.device)

    def _estimator_pass(self, calls: list[tuple[LayerCall, LayerTargets | None]]) -> dict[str, float]:
        """Stage estimator: every layer's SEA trained on the teacher's held calls, one layer's graph at a time."""
        scale = 1.0 / (len(calls) * self.config.grad_accum)
        sums = {"loss": 0.0, "estimate_kl": 0.0, "context_mse": 0.0, "rows": 0.0}
        for call, targets in calls:
            rows = self._query_rows(call)
            if targets is None:
                with torch.no_grad():
                    _, targets = self._dense_targets(call, rows)
            _, losses, total = self._layer_loss(call, targets, rows)
            (total * scale).backward()
            sums["loss"] += float(total.detach()) / len(calls)
            sums["estimate_kl"] += float(losses.estimate_kl.detach()) / len(calls)
            sums["context_mse"] += float(losses.context_mse.detach()) / len(calls)
            sums["rows"] += call.query.shape[0] * (call.query.shape[2] if rows is None else rows.numel()) / len(calls)
        return sums

    def _method_pass(self, batch: dict[str, Tensor]) -> dict[str, float]:
        """Stage estimator for a method: the frozen model's dense forward, the method trained in every layer."""
        scale = 1.0 / (len(self.layers) * self.config.grad_accum)
        sums: dict[str, float] = {}

        def train_layer(call: LayerCall) -> Tensor:
            context, parts = self.method.train_layer(call, scale)
            for key, value in parts.items():
                sums[key] = sums.get(key, 0.0) + value / len(self.layers)
            return context

        self._layerwise_forward(batch, train_layer)
        return sums

    def _method_full_pass(self, batch: dict[str, Tensor]) -> dict[str, float]:
        """Stage full for a method: the model-level losses only (the method has no SEA layer losses)."""
        with torch.no_grad(), dense_attention(self.teacher, "sdpa"):
            teacher = self.teacher(**forward_inputs(batch), output_hidden_states=True, **no_cache(self.teacher))
        with self._autocast(), layer_override(self.model, lambda call: (self.method.attend(call), None)):
            student = self.model(**forward_inputs(batch), output_hidden_states=True, **no_cache(self.model))
        task, hidden, logits = self._model_losses(student, teacher, batch)
        cfg = self.config
        loss = cfg.task_weight * task + cfg.hidden_weight * hidden + cfg.logit_weight * logits
        (loss / cfg.grad_accum).backward()
        return {"loss": float(loss.detach()), "task": float(task.detach()), "hidden_mse": float(hidden.detach()),
                "logit_kl": float(logits.detach())}

    def _model_losses(self, student, teacher, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """Task cross-entropy, hidden-state MSE (real tokens) and logit KL of the student against the
        teacher: next-token for a language model, the class for a classifier (a batch with ``labels``)."""
        input_ids = batch["input_ids"]
        mask = batch.get("attention_mask", torch.ones_like(input_ids)).bool()
        relative = self.config.hidden_loss == "relative"
        hidden = hidden_mse(student.hidden_states, teacher.hidden_states, mask, relative, self.group.mean)
        if "labels" in batch:  # (B, C) logits: one row per text
            rows = torch.ones(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
            return (classification_loss(student.logits, batch["labels"]), hidden,
                    logit_kl(student.logits, teacher.logits, rows))
        return language_model_loss(student.logits, input_ids, mask), hidden, logit_kl(student.logits, teacher.logits,
                                                                                       mask)

    def _full_pass(self, batch: dict[str, Tensor]) -> dict[str, float]:
        cfg = self.config
        targets = {}

        def record_teacher(call: LayerCall):
            context, targets[call.layer_idx] = self._dense_targets(call)
            return context.to(call.query.dtype), None

        with torch.no_grad(), layer_override(self.teacher, record_teacher):
            teacher = self.teacher(**forward_inputs(batch), output_hidden_states=True, **no_cache(self.teacher))

        layer_terms = []

        def train_layer(call: LayerCall):
            out, losses, total = self._layer_loss(call, targets[call.layer_idx])
            layer_terms.append((total, losses))
            return out.context.to(call.query.dtype), None

        with self._autocast(), layer_override(self.model, train_layer):
            student = self.model(**forward_inputs(batch), output_hidden_states=True, **no_cache(self.model))
        task, hidden, logits = self._model_losses(student, teacher, batch)
        attention = torch.stack([t for t, _ in layer_terms]).mean()
        loss = (cfg.task_weight * task + cfg.hidden_weight * hidden + cfg.logit_weight * logits
                + cfg.attention_weight * attention)
        (loss / cfg.grad_accum).backward()
        count = len(layer_terms)
        loss, task, hidden, logits = (x.detach() for x in (loss, task, hidden, logits))
        return {"loss": float(loss), "task": float(task), "hidden_mse": float(hidden), "logit_kl": float(logits),
                "estimate_kl": sum(float(l.estimate_kl.detach()) for _, l in layer_terms) / count,
                "context_mse": sum(float(l.context_mse.detach()) for _, l in layer_terms) / count}


def _rank_rows(batch: Tensor | dict[str, Tensor], group: Group) -> Tensor | dict[str, Tensor]:
    """This rank's rows of a global micro-batch (token ids, or a task's dict of tensors)."""
    if isinstance(batch, Tensor):
        return group.shard(batch)
    return {name: group.shard(value) for name, value in batch.items()}


def model_batch(batch: Tensor | dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    """A micro-batch of the training data on ``device``: ``TokenWindows`` gives token ids (B, T), a task's
    ``TaskBatches`` gives {input_ids, attention_mask, labels}."""
    if isinstance(batch, Tensor):
        batch = {"input_ids": batch}
    return {name: value.to(device) for name, value in batch.items()}


def forward_inputs(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """What the model's forward takes from a micro-batch (the labels are for the losses)."""
    return {name: value for name, value in batch.items() if name != "labels"}


@contextmanager
def _per_query(sea: nn.Module, rows: bool) -> Iterator[None]:
    """Row subsets (``rows``: ``query_rows`` > 0, also when a window's rows are all drawn) train every sampled
    row per query; without them every row trains as the layer runs it. A layer with the long-rows policy runs its
    call with ``block_from=0`` (no weight depends on it), since the block grouping computes no row subsets
    and its blocks select with the per-query estimate of their first row, the estimate trained here."""
    config = sea.config
    if not (rows and config.block_from):
        yield
        return
    sea.config = config.replace(block_from=0, block_candidates=None)
    try:
        yield
    finally:
        sea.config = config


def _validate_row_sampling(config: DistillConfig, layers: list[nn.Module], method: LayerMethod | None) -> None:
    """``query_rows`` and ``updates_per_pass`` train SEA's causal layers; refuse them elsewhere."""
    if not (config.query_rows or config.updates_per_pass > 1):
        return
    if method is not None:
        raise ValueError(f"query_rows and updates_per_pass train SEA only; {method.name} trains on every row "
                         "once per teacher pass")
    if config.query_rows and not all(sea.config.causal for sea in layers):
        raise ValueError("query_rows needs causal SEA layers: a bidirectional row's estimate depends on every row")
    if config.query_rows and not all(sea.grouping.computes_row_subsets for sea in layers):
        raise ValueError("query_rows needs a per-query grouping (query or query_head): a block's selection is made "
                         "by its first row for every row of the block")
