"""`sea diagnose`: where SEA's selection loses the teacher's attention, per layer and head.

One forward per window that stays dense (every layer passes the teacher's output on, so every
layer sees the teacher's inputs). In each layer, on that layer's own q/k/v, SEA estimates and
selects at budget k, and, query rows chunk by chunk (no Tq x Tk float map), we measure:

* coverage: the teacher's attention mass on the keys a method selects, for SEA and for the
  training-free baselines at the same k (``oracle``, ``oracle_head``, ``window_sinks``; the
  latter only for causal models), per layer and head (``baselines.SelectionStats``);
* recall of the oracle's covered mass: SEA's coverage / the grouped oracle's, the mass SEA keeps
  of what H*k keys per query could keep;
* the estimate's KL: KL(teacher attention summed into the K bins || SEA's compressed estimate),
  with the definitions training uses (``distill.losses.layer_targets`` / ``layer_losses``).

    diagnosis = diagnose(model, tokens, DiagnoseConfig(k=64, seq_len=1024))
    print(format_diagnosis_table(diagnosis))
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..atomic import write_file, write_text
from ..core.attention import SEAOutput
from .baselines import SELECTORS, SelectionStats, query_chunks
from .baselines.chunks import QueryChunk
from .baselines.layer import late_rows, sea_selection
from ..core.cells import KeySlots
from .distill.losses import LayerTargets, layer_losses, layer_targets
from .evaluate import sliding_windows
from ..hf import LayerCall, layer_override, no_cache, sea_layers

BASELINES: tuple[str, ...] = ("oracle", "oracle_head", "window_sinks")  # measured beside SEA
CAUSAL_ONLY: tuple[str, ...] = ("window_sinks",)  # a recent-past window needs causal attention


def baseline_methods(causal: bool) -> tuple[str, ...]:
    """The baselines a model's attention admits: all of them when causal."""
    return tuple(m for m in BASELINES if causal or m not in CAUSAL_ONLY)


@dataclass(frozen=True)
class DiagnoseConfig:
    k: int = 64  # keys per query per head, for SEA and every baseline
    seq_len: int = 1024  # tokens per window (non-overlapping; the last one may be shorter)
    coverage_skip: float = 0.0  # measure rows at positions >= skip * window length only
    chunk_size: int = 256  # query rows per chunk (memory: chunk x keys per head)

    def __post_init__(self) -> None:
        for name in ("k", "chunk_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(self.seq_len, bool) or not isinstance(self.seq_len, int) or self.seq_len < 2:
            raise ValueError(f"seq_len must be an integer >= 2, got {self.seq_len!r}")
        if not 0.0 <= self.coverage_skip < 1.0:
            raise ValueError(f"coverage_skip must be a fraction in [0, 1), got {self.coverage_skip!r}")


@dataclass
class EstimateKL:
    """The estimate's KL per layer, accumulated over calls as a sum over (row, head) pairs."""

    total: dict[int, float] = field(default_factory=dict)
    pairs: dict[int, int] = field(default_factory=dict)

    def record(self, layer: int, output: SEAOutput, targets: LayerTargets) -> None:
        """``layer_losses`` averages over the valid (sample, head, row) triples: undo the mean."""
        count = int(targets.query_valid.sum()) * output.estimate.shape[1]
        if count == 0:
            return
        kl = float(layer_losses(output, targets).estimate_kl)
        self.total[layer] = self.total.get(layer, 0.0) + kl * count
        self.pairs[layer] = self.pairs.get(layer, 0) + count

    def mean(self, layer: int) -> float:
        return self.total.get(layer, 0.0) / max(self.pairs.get(layer, 0), 1)


def _chunk_selection(call: LayerCall, out: SEAOutput, rows: slice) -> Tensor:
    """(B, H, C, Tk) bool: the keys SEA attended to from query rows ``rows`` of the call."""
    slots = None if out.slots is None else KeySlots(out.slots.head[:, rows], out.slots.key[:, rows],
                                                    out.slots.valid[:, rows])
    attention = None if out.attention is None else out.attention[:, :, rows]
    return sea_selection(call, slots, attention)  # reads only the call's heads and keys


def _join_targets(pieces: list[LayerTargets], counted: Tensor) -> LayerTargets:
    """One layer's targets from its chunks' (along the rows), counting only ``counted`` (B, Tq) rows."""
    return LayerTargets(torch.cat([p.estimate for p in pieces], 2), torch.cat([p.context for p in pieces], 2),
                        torch.cat([p.query_valid for p in pieces], 1) & counted)


@dataclass
class DiagnoseOverride:
    """``layer_override`` function: passes the teacher's attention on and measures SEA and the
    baselines on the same q/k/v."""

    config: DiagnoseConfig
    coverage: dict[str, SelectionStats]  # method ("sea" and the baselines) -> its coverage
    kl: EstimateKL

    def __call__(self, call: LayerCall) -> tuple[Tensor, None]:
        out = call.run_sea(k_budget=self.config.k, return_attention=not call.grouping.reports_slots)
        tq, tk = call.query.shape[2], call.key.shape[2]
        contexts, targets = [], []
        for chunk in query_chunks(call.query, call.key, call.value, call.key_valid, call.scaling, call.causal,
                                  self.config.chunk_size):
            rows = slice(int(chunk.positions[0]) - (tk - tq), int(chunk.positions[-1]) + 1 - (tk - tq))
            context, probs = chunk.teacher  # (B, H, C, d), (B, H, C, Tk)
            self._record_coverage(call, chunk, _chunk_selection(call, out, rows), probs)
            targets.append(layer_targets(probs, context, call.key_valid, out.lengths[:, rows],
                                         call.sea.config.estimate_width))
            contexts.append(context)
        positions = torch.arange(tk - tq, tk, device=call.key.device)
        self.kl.record(call.layer_idx, out, _join_targets(targets, late_rows(positions, tk, self.config.coverage_skip)))
        return torch.cat(contexts, 2), None  # the teacher's output: the forward stays dense

    def _record_coverage(self, call: LayerCall, chunk: QueryChunk, sea: Tensor, probs: Tensor) -> None:
        tk = call.key.shape[2]
        for method, stats in self.coverage.items():
            selected = sea & chunk.everything() if method == "sea" else SELECTORS[method](chunk, self.config.k)
            stats.record(call.layer_idx, selected, probs, chunk.query_valid, chunk.positions, tk)


@dataclass
class LayerDiagnosis:
    layer: int
    coverage: dict[str, float]  # method -> mean teacher mass on its keys over (row, head) pairs
    head_coverage: dict[str, list[float]]  # method -> the same per head
    keys_per_query: dict[str, float]  # method -> mean keys per (row, head) it selected
    recall: float  # SEA's coverage / the grouped oracle's
    head_recall: list[float]  # per head: SEA's coverage / the grouped oracle's (may exceed 1)
    estimate_kl: float  # nats, mean over (row, head) pairs


@dataclass
class Diagnosis:
    layers: list[LayerDiagnosis]
    methods: tuple[str, ...]  # "sea" and the baselines measured
    windows: int
    tokens: int

    def mean(self, value: Callable[[LayerDiagnosis], float]) -> float:
        """``value(layer)`` averaged over layers."""
        return sum(value(layer) for layer in self.layers) / max(len(self.layers), 1)

    def summary(self) -> dict[str, float]:
        """Layer means: each method's coverage, the recall and the estimate's KL."""
        means = {f"coverage_{m}": self.mean(lambda layer, m=m: layer.coverage[m]) for m in self.methods}
        return {**means, "recall": self.mean(lambda layer: layer.recall),
                "estimate_kl": self.mean(lambda layer: layer.estimate_kl)}


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator > 0 else float("nan")


def layer_diagnosis(layer: int, coverage: dict[str, SelectionStats], kl: EstimateKL) -> LayerDiagnosis:
    """One layer's numbers from the accumulated statistics."""
    stats = {method: s.layers[layer] for method, s in coverage.items()}
    sea, oracle = stats["sea"], stats["oracle"]
    head_recall = [_ratio(s, o) for s, o in zip(sea.mean_head_coverage, oracle.mean_head_coverage)]
    return LayerDiagnosis(layer, {m: s.mean_coverage for m, s in stats.items()},
                          {m: s.mean_head_coverage for m, s in stats.items()},
                          {m: s.keys_per_query for m, s in stats.items()},
                          _ratio(sea.mean_coverage, oracle.mean_coverage), head_recall, kl.mean(layer))


@torch.no_grad()
def diagnose(model: nn.Module, tokens: Tensor, config: DiagnoseConfig, progress: bool = True) -> Diagnosis:
    """SEA's coverage, the baselines' and the estimate's KL per layer, over non-overlapping windows
    of the 1-D ``tokens`` of a SEA-patched ``model``."""
    layers = sea_layers(model)
    if not layers:
        raise ValueError("the model is not SEA-patched: call sea_attention.hf.patch(model) first")
    if tokens.dim() != 1 or tokens.numel() < 2:
        raise ValueError(f"diagnose needs a 1-D tensor of at least 2 tokens, got shape {tuple(tokens.shape)}")
    methods = ("sea", *baseline_methods(layers[0][2].config.causal))
    coverage = {m: SelectionStats(config.coverage_skip) for m in methods}
    kl = EstimateKL()
    windows = sliding_windows(tokens.numel(), config.seq_len, config.seq_len)
    device = next(model.parameters()).device
    model.eval()
    with layer_override(model, DiagnoseOverride(config, coverage, kl)):
        for begin, end, _ in tqdm(windows, desc="diagnose", disable=not progress, leave=False, dynamic_ncols=True):
            model(input_ids=tokens[begin:end].unsqueeze(0).to(device), **no_cache(model))
    measured = sorted(coverage["sea"].layers)
    return Diagnosis([layer_diagnosis(i, coverage, kl) for i in measured], methods, len(windows),
                     sum(end - begin for begin, end, _ in windows))


COLUMNS = {"sea": "SEA cov", "oracle": "oracle cov", "oracle_head": "oracle_head", "window_sinks": "window cov"}


def format_diagnosis_table(diagnosis: Diagnosis) -> str:
    """One line per layer, then the layer means; a baseline the model does not admit shows '-'."""
    header = f"{'layer':>5} {'SEA keys':>8} " + " ".join(f"{COLUMNS[m]:>11}" for m in COLUMNS)
    lines = [header + f" {'recall':>7} {'KL':>7}"]

    def line(name: str, keys: float, coverage: dict[str, float], recall: float, kl: float) -> str:
        cells = " ".join(f"{coverage[m]:>11.3f}" if m in coverage else f"{'-':>11}" for m in COLUMNS)
        return f"{name:>5} {keys:>8.1f} {cells} {recall:>7.3f} {kl:>7.3f}"

    for layer in diagnosis.layers:
        lines.append(line(str(layer.layer), layer.keys_per_query["sea"], layer.coverage, layer.recall,
                          layer.estimate_kl))
    summary = diagnosis.summary()
    means = {m: summary[f"coverage_{m}"] for m in diagnosis.methods}
    lines.append(line("mean", diagnosis.mean(lambda layer: layer.keys_per_query["sea"]), means, summary["recall"],
                      summary["estimate_kl"]))
    return "\n".join(lines)


def write_diagnosis_json(diagnosis: Diagnosis, path: str | Path, **about) -> Path:
    """``{**about, "machine", "windows", "tokens", "summary", "layers": [...]}``, written atomically."""
    from .bench.runtime import machine_info

    payload = {**about, "machine": machine_info(), "windows": diagnosis.windows, "tokens": diagnosis.tokens,
               "methods": list(diagnosis.methods), "summary": diagnosis.summary(),
               "layers": [dataclasses.asdict(layer) for layer in diagnosis.layers]}
    return write_text(path, json.dumps(payload, indent=2) + "\n")


def plot_diagnosis(diagnosis: Diagnosis, path: str | Path, title: str = "") -> Path:
    """A PNG: per layer, grouped coverage bars (SEA and the baselines), and the estimate's KL below."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    layers = [layer.layer for layer in diagnosis.layers]
    fig = Figure(figsize=(max(7.0, 0.45 * len(layers) + 2), 6.5), layout="constrained")
    FigureCanvasAgg(fig)  # the Agg backend, without pyplot's global state
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(2, 1))
    width = 0.8 / len(diagnosis.methods)
    for i, method in enumerate(diagnosis.methods):
        offsets = [x + (i - (len(diagnosis.methods) - 1) / 2) * width for x in layers]
        top.bar(offsets, [layer.coverage[method] for layer in diagnosis.layers], width,
                label="SEA" if method == "sea" else method)
    top.set_ylabel("teacher mass on the selected keys")
    top.set_ylim(0, 1.18)  # room for the legend above the bars
    top.set_yticks([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    top.legend(ncols=len(diagnosis.methods), loc="upper left", fontsize="small")
    top.grid(True, axis="y", alpha=0.3)
    top.set_title(title or "coverage per layer", fontsize="medium")
    bottom.bar(layers, [layer.estimate_kl for layer in diagnosis.layers], 0.6, color="gray")
    bottom.set_ylabel("estimate KL (nats)")
    bottom.set_xlabel("layer")
    bottom.set_xticks(layers)
    bottom.grid(True, axis="y", alpha=0.3)
    return write_file(path, lambda temporary: fig.savefig(temporary, dpi=110, format="png"))
