"""Distillation losses: the layer-local attention losses and the model-level ones.

Layer-local (method doc 4.2), per SEA layer, against that layer's dense teacher attention:

* estimate KL: KL(teacher || estimate) between the teacher's attention summed into the K
  bins of each row (``cells.compress_attention``, the same mapping inference uses) and the
  estimator's compressed probabilities. Summing keys into bins is the O(T K) form of the
  paper's "stretch the estimate to T and compare": the two differ by a term that does
  not depend on the estimator.
* estimate MSE: mean squared error between the same two K-wide distributions.
* context MSE: SEA's attention output against the teacher's (before the output
  projection); this is what trains the gates.

Model-level (stage ``full``): task cross-entropy (next token, or the class of a classifier), hidden-state MSE (relative to each state's scale by
default), logit KL.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ...core.attention import SEAOutput
from ...core.cells import compress_attention, live_cells


@dataclass
class LayerTargets:
    """What a layer's estimator is trained towards, O(T K + T d) per layer."""

    estimate: Tensor  # (B, H, Tq, K) teacher attention summed into the K bins
    context: Tensor  # (B, H, Tq, d) teacher attention output
    query_valid: Tensor  # (B, Tq) bool


def layer_targets(teacher_probs: Tensor, teacher_context: Tensor, key_valid: Tensor, lengths: Tensor,
                  width: int) -> LayerTargets:
    """Compress a dense teacher map (B, H, Tq, Tk) into estimator targets."""
    query_valid = lengths > 0
    estimate = compress_attention(teacher_probs.float(), key_valid, lengths, width)
    return LayerTargets(estimate.detach(), teacher_context.detach().float(), query_valid)


@dataclass
class LayerLosses:
    estimate_kl: Tensor
    estimate_mse: Tensor
    context_mse: Tensor

    def total(self, kl_weight: float = 1.0, mse_weight: float = 1.0, context_weight: float = 1.0) -> Tensor:
        return kl_weight * self.estimate_kl + mse_weight * self.estimate_mse + context_weight * self.context_mse


def kl_rows(target: Tensor, log_probs: Tensor) -> Tensor:
    """KL(target || exp(log_probs)) of every row, summed over the last axis (0 log 0 = 0): (..., N) -> (...)."""
    return torch.where(target > 0, target * (target.clamp_min(1e-30).log() - log_probs), 0.0).sum(-1)


def layer_losses(output: SEAOutput, targets: LayerTargets) -> LayerLosses:
    """The three layer-local losses, averaged over valid (sample, head, query) rows."""
    rows = targets.query_valid[:, None, :].expand(-1, output.estimate.shape[1], -1)  # (B, H, Tq)
    count = rows.sum().clamp_min(1)
    live = live_cells(output.lengths, output.estimate.shape[-1]).unsqueeze(1)
    log_estimate = torch.log_softmax(
        output.estimate_logits.float().masked_fill(~live, torch.finfo(torch.float32).min), dim=-1)
    target = targets.estimate
    kl = (kl_rows(target, log_estimate) * rows).sum() / count
    mse = (((output.estimate.float() - target) ** 2).sum(-1) * rows).sum() / count
    context = ((output.context.float() - targets.context) ** 2).mean(-1)
    context = (context * rows).sum() / count
    return LayerLosses(kl, mse, context)


def logit_kl(student_logits: Tensor, teacher_logits: Tensor, token_mask: Tensor) -> Tensor:
    """KL(teacher || student) over the vocabulary, averaged over real tokens."""
    student = F.log_softmax(student_logits.float(), dim=-1)
    teacher = F.log_softmax(teacher_logits.float(), dim=-1)
    per_token = (teacher.exp() * (teacher - student)).sum(-1)
    return (per_token * token_mask).sum() / token_mask.sum().clamp_min(1)


HIDDEN_LOSSES = ("relative", "mse")


def hidden_mse(student_states: tuple[Tensor, ...], teacher_states: tuple[Tensor, ...], token_mask: Tensor,
               relative: bool = False, average: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """Mean squared error over all hidden states (embeddings ... last layer), real tokens only.

    ``relative``: each state's squared error is divided by the teacher state's mean square, so every
    layer weighs the same whatever its scale (a state that equals zero everywhere counts as scale 1).
    Without it the loss is in the residual stream's own units: on SmolLM2, whose stream carries a few
    huge activations, the plain MSE is ~1e5 at the start of training and drowns every other term.
    ``average`` (the mean over the ranks of a run) makes each scale the global batch's, as in one process.
    """
    total = student_states[0].new_zeros((), dtype=torch.float32)
    weights = token_mask.unsqueeze(-1).float()
    for s, t in zip(student_states, teacher_states):
        t = t.float()
        count = (weights.sum() * s.shape[-1]).clamp_min(1)
        error = (((s.float() - t) ** 2) * weights).sum() / count
        if relative:
            scale = ((t ** 2) * weights).sum() / count
            scale = average(scale) if average is not None else scale
            error = error / torch.where(scale > 0, scale, torch.ones_like(scale))
        total = total + error
    return total / len(student_states)


def classification_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy of (B, C) class logits against (B,) labels."""
    return F.cross_entropy(logits.float(), labels)


def language_model_loss(logits: Tensor, input_ids: Tensor, token_mask: Tensor) -> Tensor:
    """Next-token cross-entropy over real tokens."""
    targets = input_ids[:, 1:].masked_fill(~token_mask[:, 1:].bool(), -100)
    return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), targets.flatten(), ignore_index=-100)
