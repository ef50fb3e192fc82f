"""The model a run trains: input normalisation, backbone and head (or the head alone on cached features)."""

from __future__ import annotations

import torch
from torch import nn

from bench.models.backbones import IMAGENET_MEAN, IMAGENET_STD, Backbone


class Classifier(nn.Module):
    """Normalisation, backbone, head: images float [B, 3, H, W] in [0, 1] -> logits [B, C]."""

    def __init__(self, backbone: Backbone, head: nn.Module, freeze_backbone: bool = False, normalize: bool = True) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.freeze_backbone = freeze_backbone
        # each backbone carries the input normalisation its weights were trained with;
        # normalize=False feeds [0, 1] pixels as they are (recipe input_normalization = "none")
        mean = getattr(backbone, "mean", IMAGENET_MEAN) if normalize else (0.0, 0.0, 0.0)
        std = getattr(backbone, "std", IMAGENET_STD) if normalize else (1.0, 1.0, 1.0)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        if freeze_backbone:
            self.backbone.requires_grad_(False)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [0, 1] -> backbone features [B, d, h, w]."""
        x = (images - self.mean) / self.std
        if self.freeze_backbone:
            with torch.no_grad():
                return self.backbone(x)
        return self.backbone(x)

    def forward(self, images: torch.Tensor, label_state: torch.Tensor | None = None) -> torch.Tensor:
        """images [B, 3, H, W] -> logits [B, C]; ``label_state`` [B, C] (-1 unknown, 0, 1) only
        for a head that declares ``reads_label_states`` (training with label mask training)."""
        return call_head(self.head, self.features(images), label_state)

    def train(self, mode: bool = True) -> "Classifier":
        super().train(mode)
        if self.freeze_backbone:
            self.backbone.eval()  # a frozen backbone keeps its BatchNorm statistics fixed
        return self


class HeadOnly(nn.Module):
    """The head alone, fed cached backbone features [B, d, h, w] (the frozen protocol).

    Its state dict keys (``head.*``) match those of a :class:`Classifier`'s head.
    """

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, features: torch.Tensor, label_state: torch.Tensor | None = None) -> torch.Tensor:
        """features [B, d, h, w] -> logits [B, C] (``label_state`` as for :class:`Classifier`)."""
        return call_head(self.head, features.float(), label_state)


def reads_label_states(module: nn.Module) -> bool:
    """Whether the head inside ``module`` (a head, a Classifier or a HeadOnly) reads label states."""
    own = getattr(module, "reads_label_states", None)
    if own is not None:
        return bool(own)
    return bool(getattr(getattr(module, "head", None), "reads_label_states", False))


def call_head(head: nn.Module, features: torch.Tensor, label_state: torch.Tensor | None) -> torch.Tensor:
    """``head(features)``, with ``label_state=`` passed only when given: other heads never see labels."""
    if label_state is None:
        return head(features)
    if not getattr(head, "reads_label_states", False):
        raise TypeError("label states given to a head that does not declare reads_label_states")
    return head(features, label_state=label_state)
