"""The losses a recipe's ``loss`` key names, registered as ``bench.api.build_loss(name, **params)``.

Each is an ``nn.Module`` called as ``loss(logits [B, C], targets [B, C] in {0, 1})`` -> a scalar.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from bench.api.registry import register_loss


@register_loss("bce")
class BCELoss(nn.BCEWithLogitsLoss):
    """Binary cross-entropy with logits, averaged over all B x C entries."""


@register_loss("multilabel_soft_margin")
class MultiLabelSoftMarginLoss(nn.MultiLabelSoftMarginLoss):
    """ML-GCN's release: per sample the mean over classes of the binary cross-entropy, then the
    mean over the batch (the same value as ``bce``; kept under its own name for the preset)."""


@register_loss("asl")
class AsymmetricLoss(nn.Module):
    """The asymmetric loss (Ridnik et al., ICCV 2021; Alibaba-MIIL/ASL ``AsymmetricLoss``), SPEC §2.

    For logits x [B, C] and targets y [B, C] in {0, 1}, with p = σ(x) and the shifted negative
    probability ``p₋ = min(1 − p + clip, 1)`` (``p₋ = 1 − p`` when clip = 0)::

        L = −Σ_{b,c} [y log max(p, ε) + (1 − y) log max(p₋, ε)] · w,
        w = (1 − p·y − p₋·(1 − y)) ^ (γ₊·y + γ₋·(1 − y))

    a SUM over batch and classes, as released. The focusing weight w is a CONSTANT in the gradient
    (computed without autograd: the release's ``disable_torch_grad_focal_loss=True``, ML-Decoder's
    and Query2Label's training setting); with γ₋ = γ₊ = 0 it is 1 and L is the clipped binary
    cross-entropy. Computed in float32 for half-precision logits (the release calls ``.float()`` on
    the model output under autocast), in float64 for float64 logits.

    Args:
        gamma_neg: γ₋ >= 0, focusing of the negatives (4 as released).
        gamma_pos: γ₊ >= 0, focusing of the positives (0 here, ML-Decoder's setting; the release's
            class default is 1).
        clip: the probability margin added to 1 − p for negatives, in [0, 1] (0.05).
        eps: the floor of the probabilities inside the logarithms (1e-8; Query2Label's copy uses 1e-5).
    """

    def __init__(self, gamma_neg: float = 4.0, gamma_pos: float = 0.0, clip: float = 0.05, eps: float = 1e-8) -> None:
        super().__init__()
        for name, value in (("gamma_neg", gamma_neg), ("gamma_pos", gamma_pos)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} = {value!r} is not allowed; expected a finite number >= 0")
        if not (isinstance(clip, (int, float)) and 0 <= clip <= 1):
            raise ValueError(f"clip = {clip!r} is not allowed; expected a number in [0, 1]")
        if not (isinstance(eps, (int, float)) and 0 < eps < 1):
            raise ValueError(f"eps = {eps!r} is not allowed; expected a number in (0, 1)")
        self.gamma_neg = float(gamma_neg)
        self.gamma_pos = float(gamma_pos)
        self.clip = float(clip)
        self.eps = float(eps)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """logits [B, C], targets [B, C] in {0, 1} -> the summed loss, a scalar."""
        x = logits if logits.dtype == torch.float64 else logits.float()
        y = targets.to(x.dtype)
        p = torch.sigmoid(x)
        p_neg = 1 - p
        if self.clip > 0:
            p_neg = (p_neg + self.clip).clamp(max=1)
        loss = y * torch.log(p.clamp(min=self.eps)) + (1 - y) * torch.log(p_neg.clamp(min=self.eps))
        if self.gamma_neg > 0 or self.gamma_pos > 0:
            with torch.no_grad():  # the focusing weight is a constant in the gradient
                weight = torch.pow(1 - p * y - p_neg * (1 - y), self.gamma_pos * y + self.gamma_neg * (1 - y))
            loss = loss * weight
        return -loss.sum()
