"""The losses a recipe's ``loss`` key names, registered as ``bench.api.build_loss(name, **params)``.

Each is an ``nn.Module`` called as ``loss(logits [B, C], targets [B, C] in {0, 1}, known=None,
epoch=1)`` -> a scalar. ``known`` is the batch's observed mask, bool [B, C] (``bench.api.observe``;
None: every label observed); ``epoch`` is the 1-based training epoch (only the large-loss losses
read it). An unknown entry's target is meaningless: no loss reads it.

``bce``, ``multilabel_soft_margin`` and ``asl`` take ``unknown_labels``: ``"ignore"`` (the
default: unknown entries take no part in the loss) or ``"negative"`` (they are treated as
negatives, "assume negative"). ``ll_r``, ``ll_ct`` and ``ll_cp`` (Kim et al., "Large Loss
Matters in Weakly Supervised Multi-Label Classification", CVPR 2022) assume unknowns negative
and, from epoch 2 on, reject or correct the largest losses among them. With every label observed
all of them give the values they gave before ``known`` existed.

The recipe passes its keys to a loss by the ``<loss>_<param>`` convention (``asl_gamma_neg`` ->
``gamma_neg``), plus ``unknown_labels`` to the losses that take it: :func:`loss_params`.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bench.api.registry import LOSSES, register_loss

UNKNOWN_LABELS = ("ignore", "negative")


def loss_params(name: str, recipe: Mapping[str, Any]) -> dict[str, Any]:
    """The keyword arguments of loss ``name`` from a recipe's values (``Recipe.to_dict()``): every
    ``<name>_<param>`` key as ``param``, and ``unknown_labels`` when the loss takes it."""
    params = {k[len(name) + 1 :]: v for k, v in recipe.items() if k.startswith(f"{name}_")}
    if "unknown_labels" in recipe and "unknown_labels" in inspect.signature(LOSSES.get(name).__init__).parameters:
        params["unknown_labels"] = recipe["unknown_labels"]
    return params


def _check_unknown_labels(value: str) -> str:
    if value not in UNKNOWN_LABELS:
        raise ValueError(f"unknown_labels = {value!r} is not allowed; expected one of {', '.join(map(repr, UNKNOWN_LABELS))}")
    return value


def _working(logits: torch.Tensor, targets: torch.Tensor, known: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x in float32, or float64 for float64 logits; targets with unknown entries set to 0; known bool)."""
    x = logits if logits.dtype == torch.float64 else logits.float()
    y = targets.to(x.dtype)
    if known is None:
        mask = torch.ones_like(y, dtype=torch.bool)
    else:
        mask = known.to(device=y.device, dtype=torch.bool)
        if mask.shape != y.shape:
            raise ValueError(f"known {tuple(mask.shape)} and targets {tuple(y.shape)} disagree")
        y = torch.where(mask, y, torch.zeros_like(y))
    return x, y, mask


def _zero(x: torch.Tensor) -> torch.Tensor:
    """A zero that keeps the graph (a batch with nothing to learn from)."""
    return (x * 0).sum()


@register_loss("bce")
class BCELoss(nn.Module):
    """Binary cross-entropy with logits: the mean over all B x C entries (``"negative"``, or every
    label observed), or the mean over the observed entries (``"ignore"``; 0 when none is)."""

    def __init__(self, unknown_labels: str = "ignore") -> None:
        super().__init__()
        self.unknown_labels = _check_unknown_labels(unknown_labels)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor, known: torch.Tensor | None = None, epoch: int = 1) -> torch.Tensor:
        """logits [B, C], targets [B, C] in {0, 1}, known bool [B, C] or None -> a scalar."""
        x, y, mask = _working(logits, targets, known)
        if known is None or bool(mask.all()):  # every label observed: torch's own mean (as BCEWithLogitsLoss)
            return F.binary_cross_entropy_with_logits(x, y)
        entries = F.binary_cross_entropy_with_logits(x, y, reduction="none")
        if self.unknown_labels == "negative":
            return entries.mean()
        count = int(mask.sum())
        return entries[mask].sum() / count if count else _zero(x)


@register_loss("multilabel_soft_margin")
class MultiLabelSoftMarginLoss(nn.Module):
    """ML-GCN's release: per sample the mean over classes of the binary cross-entropy, then the
    mean over the batch (the same value as ``bce`` when every label counts; kept under its own name
    for the preset). ``"ignore"``: per sample the mean over its OBSERVED classes, then the mean over
    the samples with at least one observed class (0 when none has)."""

    def __init__(self, unknown_labels: str = "ignore") -> None:
        super().__init__()
        self.unknown_labels = _check_unknown_labels(unknown_labels)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor, known: torch.Tensor | None = None, epoch: int = 1) -> torch.Tensor:
        """logits [B, C], targets [B, C] in {0, 1}, known bool [B, C] or None -> a scalar."""
        x, y, mask = _working(logits, targets, known)
        if known is None or bool(mask.all()):  # every label observed: torch's own (as MultiLabelSoftMarginLoss)
            return F.multilabel_soft_margin_loss(x, y)
        entries = F.binary_cross_entropy_with_logits(x, y, reduction="none")
        if self.unknown_labels == "negative":
            return entries.mean(dim=1).mean()
        per_sample = mask.sum(dim=1)
        rows = per_sample > 0
        if not bool(rows.any()):
            return _zero(x)
        sample_loss = (entries * mask).sum(dim=1)[rows] / per_sample[rows].to(x.dtype)
        return sample_loss.mean()


@register_loss("asl")
class AsymmetricLoss(nn.Module):
    """The asymmetric loss (Ridnik et al., ICCV 2021; Alibaba-MIIL/ASL ``AsymmetricLoss``), SPEC §2.

    For logits x [B, C] and targets y [B, C] in {0, 1}, with p = σ(x) and the shifted negative
    probability ``p₋ = min(1 − p + clip, 1)`` (``p₋ = 1 − p`` when clip = 0)::

        L = −Σ_{b,c} [y log max(p, ε) + (1 − y) log max(p₋, ε)] · w,
        w = (1 − p·y − p₋·(1 − y)) ^ (γ₊·y + γ₋·(1 − y))

    a SUM over batch and classes, as released; with unknown labels the sum runs over the observed
    entries (``"ignore"``) or over all with unknown y = 0 (``"negative"``). The focusing weight w
    is a CONSTANT in the gradient (computed without autograd: the release's
    ``disable_torch_grad_focal_loss=True``, ML-Decoder's and Query2Label's training setting); with
    γ₋ = γ₊ = 0 it is 1 and L is the clipped binary cross-entropy. Computed in float32 for
    half-precision logits (the release calls ``.float()`` on the model output under autocast), in
    float64 for float64 logits.

    Args:
        gamma_neg: γ₋ >= 0, focusing of the negatives (4 as released).
        gamma_pos: γ₊ >= 0, focusing of the positives (0 here, ML-Decoder's setting; the release's
            class default is 1).
        clip: the probability margin added to 1 − p for negatives, in [0, 1] (0.05).
        eps: the floor of the probabilities inside the logarithms (1e-8; Query2Label's copy uses 1e-5).
        unknown_labels: ``"ignore"`` or ``"negative"``.
    """

    def __init__(self, gamma_neg: float = 4.0, gamma_pos: float = 0.0, clip: float = 0.05, eps: float = 1e-8,
                 unknown_labels: str = "ignore") -> None:
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
        self.unknown_labels = _check_unknown_labels(unknown_labels)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor, known: torch.Tensor | None = None, epoch: int = 1) -> torch.Tensor:
        """logits [B, C], targets [B, C] in {0, 1}, known bool [B, C] or None -> the summed loss, a scalar."""
        x, y, mask = _working(logits, targets, known)
        p = torch.sigmoid(x)
        p_neg = 1 - p
        if self.clip > 0:
            p_neg = (p_neg + self.clip).clamp(max=1)
        loss = y * torch.log(p.clamp(min=self.eps)) + (1 - y) * torch.log(p_neg.clamp(min=self.eps))
        if self.gamma_neg > 0 or self.gamma_pos > 0:
            with torch.no_grad():  # the focusing weight is a constant in the gradient
                weight = torch.pow(1 - p * y - p_neg * (1 - y), self.gamma_pos * y + self.gamma_neg * (1 - y))
            loss = loss * weight
        if known is not None and self.unknown_labels == "ignore":
            loss = loss * mask
        return -loss.sum()


def release_clean_rate(delta_rel: float, epoch: int) -> float:
    """The release's ``clean_rate`` at 1-based ``epoch``: 1 at epoch 1, then lowered by
    ``delta_rel`` after every epoch — by repeated float subtraction, as the release does, so that
    ``ceil(B·C·(1 − clean_rate))`` rounds exactly as there."""
    rate = 1.0
    for _ in range(max(0, epoch - 1)):
        rate -= delta_rel
    return rate


class LargeLoss(nn.Module):
    """The large-loss family (Kim et al., CVPR 2022; snucml/LargeLossMatters ``losses.py``).

    Unknown labels are assumed negative: ℓ = BCE(x, y·known) per entry [B, C]. At epoch e with
    ``clean_rate = 1 − δ·(e − 1)`` (the release lowers it by δ = ``delta_rel`` after each epoch),
    nothing changes while clean_rate = 1 (epoch 1, or δ = 0). Afterwards
    ``k = ceil(B·C·(1 − clean_rate))``, the
    threshold t is the k-th largest of ``unknown · ℓ`` over the B x C entries, and every unknown
    entry with ℓ >= t (ties included, as the release's ``where(u < t, ...)``) is rejected (loss 0,
    LL-R) or has its target flipped to positive (loss BCE(x, 1), LL-Ct / LL-Cp). The result is the
    SUM over entries divided by B·C, observed entries and rejected ones included.

    One guard differs from the release, in a case its settings never reach: k is capped at the
    number of unknown entries of the batch, and observed entries are never rejected or flipped
    (the release, with k beyond the unknown entries, gets t = 0 and would then also zero or flip
    its observed positives, or fail in ``topk`` when k > B·C; with every label observed, LL-R
    would then train on nothing). With k within the unknown entries, which every setting of the
    paper satisfies, the two agree exactly.
    """

    #: True for a loss whose flips are permanent (LL-Cp): the trainer reads ``last_modified`` after
    #: every step and from then on gives the flipped entries as observed positives
    corrects_labels: bool = False

    def __init__(self, delta_rel: float = 0.002) -> None:
        super().__init__()
        if not (isinstance(delta_rel, (int, float)) and math.isfinite(delta_rel) and 0 <= delta_rel <= 1):
            raise ValueError(f"delta_rel = {delta_rel!r} is not allowed; expected a number in [0, 1]")
        self.delta_rel = float(delta_rel)
        #: bool [B, C] of the last call: the unknown entries whose target was flipped (LL-Ct/Cp) or
        #: whose loss was rejected (LL-R); None before any modification
        self.last_modified: torch.Tensor | None = None

    def correct(self) -> bool:
        """True: large losses are corrected (target flipped); False: rejected."""
        raise NotImplementedError

    def count(self, entries: int, epoch: int) -> int:
        """k, the number of largest unknown losses modified in a batch of ``entries`` = B·C."""
        return math.ceil(entries * (1 - release_clean_rate(self.delta_rel, epoch)))

    def forward(self, logits: torch.Tensor, targets: torch.Tensor, known: torch.Tensor | None = None, epoch: int = 1) -> torch.Tensor:
        """logits [B, C], targets [B, C] in {0, 1}, known bool [B, C] or None, epoch 1-based -> a scalar."""
        x, y, mask = _working(logits, targets, known)
        entries = F.binary_cross_entropy_with_logits(x, y, reduction="none")
        self.last_modified = None
        unknown = ~mask
        n_unknown = int(unknown.sum())
        if release_clean_rate(self.delta_rel, epoch) != 1 and n_unknown:
            k = min(self.count(entries.numel(), epoch), n_unknown)
            if k > 0:
                candidate = torch.where(unknown, entries.detach(), torch.zeros_like(entries))
                threshold = torch.topk(candidate.flatten(), k).values[-1]
                large = unknown & (candidate >= threshold)
                replaced = F.binary_cross_entropy_with_logits(x, 1 - y, reduction="none") if self.correct() else torch.zeros_like(entries)
                entries = torch.where(large, replaced, entries)
                self.last_modified = large
        return entries.sum() / entries.numel()


@register_loss("ll_r")
class LargeLossRejection(LargeLoss):
    """LL-R: the largest unknown losses are rejected (their loss is 0). See :class:`LargeLoss`."""

    def correct(self) -> bool:
        return False


@register_loss("ll_ct")
class LargeLossCorrectionTemporary(LargeLoss):
    """LL-Ct: the largest unknown losses have their target flipped to positive for this step only.
    See :class:`LargeLoss`."""

    def correct(self) -> bool:
        return True


@register_loss("ll_cp")
class LargeLossCorrectionPermanent(LargeLoss):
    """LL-Cp, the paper's permanent correction (Kim et al., CVPR 2022, Sec. 3.3): the step's rule
    is LL-Ct's (same ``k`` schedule), and every flipped (image, class) stays a positive for the
    rest of training. The loss itself is stateless: it reports the step's flips in
    ``last_modified`` and the trainer, which knows each batch row's image, gives them back as
    observed positives (``targets`` 1, ``known`` True) in every later batch, where they are no
    longer candidates. The release (snucml/LargeLossMatters) names LL-Cp but its branch never
    runs (it compares the parsed scheme with ``is``); this follows the paper's text."""

    corrects_labels = True

    def correct(self) -> bool:
        return True
