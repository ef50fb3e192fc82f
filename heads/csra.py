"""CSRA: class-specific residual attention (SPEC §2, seed 003; Zhu & Wu, ICCV 2021).

Shapes: x [B, d, h, w] (any h, w >= 1), N = h*w positions, C classes, H heads.

For head j (temperature T_j) and the per-class classifier vectors m_{j,c} (no bias):

    s_{b,j,c,k} = x_{b,:,k} · m_{j,c} / ||m_{j,c}||          scores at every position   [B, H, C, N]
    base_{b,j,c} = mean_k s_{b,j,c,k}                                                   [B, H, C]
    att_{b,j,c}  = Σ_k softmax_k(T_j · s_{b,j,c,:})_k · s_{b,j,c,k}    (T_j finite)      [B, H, C]
                 = max_k s_{b,j,c,k}                                    (T_j = ∞)
    logit_{b,c}  = Σ_j (base_{b,j,c} + λ · att_{b,j,c})                                 [B, C]

Temperatures (the official ``temp_settings``; ∞ is the release's ``99``):
H=1 → [1] (or [∞] with ``t1_inf = True``), H=2 → [1, ∞], H=4 → [1, 2, 4, ∞],
H=6 → [1, 2, 3, 4, 5, ∞], H=8 → [1, 2, 3, 4, 5, 6, 7, ∞].

Implementation: ONE parameter ``weight`` of shape [H, C, d] (head j, class c), so the head's
parameters flattened in parameter order read as [H, C, d]. The forward pass normalises it per
(head, class) row, computes the scores of all heads and classes at all positions in one einsum,
then the mean, the softmax-weighted sum (finite temperatures) and the max (T = ∞) for all heads at
once (every table lists its finite temperatures first and ∞ last, so the finite heads are one
slice, softmaxed together with a [H_finite] temperature vector, and the ∞ head is the max of the
last slice). No Python loop over heads or classes.

Initialisation: each [C, d] slice as a 1x1 ``nn.Conv2d(d, C, bias=False)`` of the release
(uniform in ±1/sqrt(d)); only the direction matters in the forward pass.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from bench.api import Head, HeadContext, Heatmap, register_head

INF = math.inf
TEMPERATURES: dict[int, tuple[float, ...]] = {
    1: (1.0,),
    2: (1.0, INF),
    4: (1.0, 2.0, 4.0, INF),
    6: (1.0, 2.0, 3.0, 4.0, 5.0, INF),
    8: (1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, INF),
}


def temperatures(num_heads: int, t1_inf: bool = False) -> tuple[float, ...]:
    """The temperature of each head (SPEC §2 table); ``t1_inf`` selects T = ∞ for H = 1."""
    if isinstance(num_heads, bool) or num_heads not in TEMPERATURES:
        raise ValueError(f"num_heads = {num_heads!r} is not allowed; allowed values: {', '.join(map(str, TEMPERATURES))}")
    if t1_inf:
        if num_heads != 1:
            raise ValueError(f"t1_inf = True applies only to num_heads = 1 (got num_heads = {num_heads}); H > 1 always ends with T = ∞")
        return (INF,)
    return TEMPERATURES[num_heads]


@register_head("csra")
class CSRAHead(Head):
    """Multi-head CSRA: [B, d, h, w] -> [B, C] logits (sum over heads of mean + λ·attention)."""

    sweep = (
        {"num_heads": [1, 2, 4, 6, 8], "lam": [0.1, 0.3, 0.5, 1.0]},  # H x λ, 20 configurations
        {"num_heads": 1, "t1_inf": True, "lam": [0.1, 0.3, 0.5, 1.0]},  # H = 1 with T = ∞: mean + λ·max, trained
    )
    heatmap = Heatmap(y="num_heads", x="lam", title="CSRA: mAP over H × λ", y_label="H (attention heads)", x_label="λ", slug="csra_H_lambda")

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        context: HeadContext | None = None,
        *,
        num_heads: int = 1,
        lam: float = 0.1,
        t1_inf: bool = False,
    ) -> None:
        super().__init__()
        temps = temperatures(num_heads, t1_inf)
        if not (isinstance(lam, (int, float)) and math.isfinite(lam) and lam >= 0):
            raise ValueError(f"lam = {lam!r} is not allowed; expected a finite number >= 0")
        self.num_heads = num_heads
        self.lam = float(lam)
        self.temps = temps
        bound = 1.0 / math.sqrt(in_channels)
        self.weight = nn.Parameter(torch.empty(num_heads, num_classes, in_channels).uniform_(-bound, bound))
        # Every temperature table lists its finite temperatures first and T = ∞ last.
        self.num_finite = sum(not math.isinf(t) for t in temps)
        assert all(not math.isinf(t) for t in temps[: self.num_finite])
        finite = torch.tensor(temps[: self.num_finite], dtype=torch.float32)
        self.register_buffer("finite_temp", finite.view(1, -1, 1, 1), persistent=False)  # [1, H_finite, 1, 1]

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """Per-position class scores with L2-normalised classifiers: [B, d, h, w] -> [B, H, C, N]."""
        m = self.weight / self.weight.norm(dim=2, keepdim=True).clamp_min(1e-12)  # [H, C, d]
        return torch.einsum("hcd,bdn->bhcn", m, x.flatten(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.scores(x)  # [B, H, C, N]: every head, class and position in one einsum
        logits = s.mean(dim=3).sum(dim=1)  # Σ_j base_j  [B, C]
        nf = self.num_finite
        if nf:  # heads with finite T, all at once: Σ_k softmax_k(T_j s) s
            finite = s[:, :nf]
            weights = torch.softmax(finite * self.finite_temp.to(s.dtype), dim=3)
            logits = logits + self.lam * (weights * finite).sum(dim=3).sum(dim=1)
        if nf < self.num_heads:  # the T = ∞ head(s): max over positions
            logits = logits + self.lam * s[:, nf:].amax(dim=3).sum(dim=1)
        return logits  # [B, C]

    @classmethod
    def describe_hparams(cls, hparams: dict[str, Any]) -> str:
        h = hparams.get("num_heads", 1)
        text = f"H={h}, λ={hparams.get('lam', 0.1):g}"
        if hparams.get("t1_inf"):
            text += ", T=∞"
        return text
