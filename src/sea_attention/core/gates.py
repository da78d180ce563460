"""The output gates: how a layer's two gate logits per token and head become (scale, mix).

A gated layer returns ``mix * scale * sparse + (1 - mix) * average`` (``SEAAttention.gate``). The two
logits come from a linear map of the token encoder's hidden state whose weights start at zero, so
every token starts from the bias below. Two forms (``SEAConfig.gate_form``):

* ``"sigmoid"`` (the paper's): scale = sigmoid(s0), mix = sigmoid(s1), both biases 4: the gates start
  almost open (0.982), so an untrained layer returns 0.964 x the sparse context + 0.018 x the average.
* ``"identity"``: scale = 1 + tanh(s0) in (0, 2), mix = 1 - tanh(s1) in (0, 2), both biases 0: scale
  and mix start at exactly 1, so an untrained layer returns the sparse context unchanged (with the
  oracle selection, exact sparse attention), and both gates still get gradients from the start
  (mix > 1 subtracts some of the average).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .config import GATE_FORMS

GATE_BIAS = {"sigmoid": 4.0, "identity": 0.0}  # the gate logits' initial value


def gate_values(logits: Tensor, form: str) -> Tensor:
    """Gate logits (..., 2) -> (scale, mix) values (..., 2) of ``form`` (one of ``GATE_FORMS``)."""
    if form == "sigmoid":
        return torch.sigmoid(logits)
    if form == "identity":
        tanh = torch.tanh(logits)
        return torch.stack((1.0 + tanh[..., 0], 1.0 - tanh[..., 1]), dim=-1)
    raise ValueError(f"gate_form must be one of {GATE_FORMS}, got {form!r}")
