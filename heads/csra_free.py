"""CSRA without training (SPEC §2, seed 003's "four lines"): rescore a trained baseline.

A DERIVED head: ``derived_from = ("baseline", {"pool": "avg"})``. The grid puts the trained
average-pooling baseline of the same dataset / backbone / recipe / seed before this cell; the
runner calls :meth:`CSRAFreeHead.adopt` with that trained head and only evaluates (no parameter
changes, no training). The row records ``lam`` (hparams) and ``source_run_id``.

Shapes: x [B, d, h, w] (any h, w >= 1), N = h*w, the baseline's fc: weight W [C, d], bias b [C].

    y_raw[b, c, k] = W_c · x[b, :, k] + b_c            the FC applied at every position  [B, C, N]
    logit[b, c]    = mean_k y_raw[b, c, k] + λ · max_k y_raw[b, c, k]                     [B, C]

Bias (``bias`` hyper-parameter):

- ``"per_position"`` (default): seed 003's four lines verbatim — ``FC(x)`` includes the bias at
  every position, so the bias enters the score as ``(1 + λ) · b_c``.
- ``"once"``: the bias is added once, ``mean_k(W_c·x_k) + λ · max_k(W_c·x_k) + b_c``; at λ = 0
  both equal the baseline exactly.

The two differ by ``λ · b_c``, a constant per class: per-class rankings, hence every AP and the
mAP, are identical; only the thresholded metrics (CP/CR/CF1, OP/OR/OF1 at 0.5) move.
Note that at λ = 0 the head is exactly the trained baseline (mean of per-position logits = logit of
the mean, the classifier being linear).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import nn

from bench.api import Head, HeadContext, register_head

BIAS_MODES = ("per_position", "once")


@register_head("csra_free")
class CSRAFreeHead(Head):
    """mean + λ·max over positions of a trained baseline's per-position logits."""

    #: training-free: reuse the trained average-pooling baseline (bench/config/grid.py ``with_sources``)
    derived_from = ("baseline", {"pool": "avg"})
    sweep = ({"lam": [0.1, 0.3, 0.5, 1.0]},)

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        context: HeadContext | None = None,
        *,
        lam: float = 0.1,
        bias: Literal["per_position", "once"] = "per_position",
    ) -> None:
        super().__init__()
        if not (isinstance(lam, (int, float)) and math.isfinite(lam) and lam >= 0):
            raise ValueError(f"lam = {lam!r} is not allowed; expected a finite number >= 0")
        if bias not in BIAS_MODES:
            raise ValueError(f"bias = {bias!r} is not allowed; allowed values: {', '.join(map(repr, BIAS_MODES))}")
        self.lam = float(lam)
        self.bias_mode = bias
        # Placeholder until adopt(): the same layer as the baseline's, so saved weights of this
        # head (head.fc.*) load back into a freshly built one for re-evaluation.
        self.fc = nn.Linear(in_channels, num_classes)

    def adopt(self, source: nn.Module) -> None:
        """Take the trained baseline's classifier (``source.fc``: weight [C, d], bias [C])."""
        fc = getattr(source, "fc", None)
        if not isinstance(fc, nn.Linear) or fc.bias is None:
            raise ValueError(f"csra_free adopts a baseline head with a biased nn.Linear 'fc'; got {type(source).__name__}")
        if fc.weight.shape != self.fc.weight.shape:
            raise ValueError(f"source classifier has shape {tuple(fc.weight.shape)}, expected {tuple(self.fc.weight.shape)}")
        with torch.no_grad():
            self.fc.weight.copy_(fc.weight)
            self.fc.bias.copy_(fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y_raw = torch.einsum("cd,bdn->bcn", self.fc.weight, x.flatten(2))  # [B, C, N], no bias yet
        score = y_raw.mean(dim=2) + self.lam * y_raw.amax(dim=2)  # [B, C]
        scale = 1.0 + self.lam if self.bias_mode == "per_position" else 1.0
        return score + scale * self.fc.bias

    @classmethod
    def describe_hparams(cls, hparams: dict[str, Any]) -> str:
        text = f"λ={hparams.get('lam', 0.1):g}, no training"
        if hparams.get("bias", "per_position") != "per_position":
            text += f", bias {hparams['bias']}"
        return text
