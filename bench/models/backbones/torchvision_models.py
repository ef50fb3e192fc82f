"""The torchvision architectures (their bodies, random init: weights come only from local files)
and ``tiny_cnn``, the CPU benchmark backbone."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torchvision
from torch import nn


# --------------------------------------------------------------------------------------------
# Architectures


def _conv_bn_relu(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


def tiny_cnn() -> nn.Module:
    """A five-layer CNN (stride 8, 128 channels, ~13 M multiply-adds at 64 px) for CPU benchmarks.

    Not a published architecture: it exists so that the embedded benchmark trains in minutes on
    two CPU cores while keeping an 8 x 8 feature map at 64 px, where spatial pooling choices matter.
    """
    widths = [(3, 16, 2), (16, 32, 2), (32, 64, 1), (64, 64, 2), (64, 128, 1)]
    layers: list[nn.Module] = []
    for c_in, c_out, stride in widths:
        layers += _conv_bn_relu(c_in, c_out, stride)
    return nn.Sequential(*layers)


def _resnet_body(model: nn.Module) -> nn.Module:
    return nn.Sequential(
        model.conv1, model.bn1, model.relu, model.maxpool, model.layer1, model.layer2, model.layer3, model.layer4
    )


@dataclass(frozen=True)
class _TorchvisionSpec:
    factory: Callable[[], nn.Module]  # the full ImageNet model (random init: never weights=...)
    body_of: Callable[[nn.Module], nn.Module]
    out_channels: int
    stride: int
    classifier: tuple[str, ...]  # state-dict prefixes of the classifier (not part of the body)


TORCHVISION: dict[str, _TorchvisionSpec] = {
    "resnet18": _TorchvisionSpec(torchvision.models.resnet18, _resnet_body, 512, 32, ("fc.",)),
    "resnet34": _TorchvisionSpec(torchvision.models.resnet34, _resnet_body, 512, 32, ("fc.",)),
    "resnet50": _TorchvisionSpec(torchvision.models.resnet50, _resnet_body, 2048, 32, ("fc.",)),
    "resnet101": _TorchvisionSpec(torchvision.models.resnet101, _resnet_body, 2048, 32, ("fc.",)),
    "resnext50_32x4d": _TorchvisionSpec(torchvision.models.resnext50_32x4d, _resnet_body, 2048, 32, ("fc.",)),
    "convnext_tiny": _TorchvisionSpec(torchvision.models.convnext_tiny, lambda m: m.features, 768, 32, ("classifier.",)),
    "efficientnet_b0": _TorchvisionSpec(torchvision.models.efficientnet_b0, lambda m: m.features, 1280, 32, ("classifier.",)),
    "mobilenet_v3_large": _TorchvisionSpec(torchvision.models.mobilenet_v3_large, lambda m: m.features, 960, 32, ("classifier.",)),
}

OWN: dict[str, tuple[Callable[[], nn.Module], int, int]] = {
    "tiny_cnn": (tiny_cnn, 128, 8),
}
