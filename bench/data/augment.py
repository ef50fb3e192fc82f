"""Batched image preparation on tensors: uint8 [B, S, S, 3] -> float [B, 3, S, S] in [0, 1].

Augmentation runs on the cached, already resized images, on the training device, for a whole
batch at once: a horizontal flip and a random-resized crop are one affine resampling per image
(``affine_grid`` + ``grid_sample``), so there is no per-image Python work.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

AUGMENTATIONS = ("none", "flip", "flip_crop")


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float32 [B, 3, H, W] in [0, 1] (no augmentation)."""
    return images.permute(0, 3, 1, 2).float().div_(255.0)


def augment(
    images: torch.Tensor,
    kind: str,
    generator: torch.Generator,
    crop_scale_min: float = 0.7,
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> torch.Tensor:
    """Randomly flip (p = 0.5) and, for ``flip_crop``, crop then resize back to the input size.

    Args:
        images: uint8 [B, H, W, 3].
        kind: one of ``AUGMENTATIONS``.
        generator: a CPU generator (the random draws are made on the CPU, then moved).
        crop_scale_min: crop area is uniform in [crop_scale_min, 1] of the image.
        ratio: crop aspect ratio is log-uniform in this range (clipped so the crop fits).

    Returns:
        float32 [B, 3, H, W] in [0, 1].
    """
    x = to_float(images)
    if kind == "none":
        return x
    b = x.shape[0]
    flip = torch.rand(b, generator=generator) < 0.5
    if kind == "flip":
        return torch.where(flip.to(x.device)[:, None, None, None], x.flip(-1), x)
    if kind != "flip_crop":
        raise ValueError(f"unknown augmentation {kind!r}; valid: {AUGMENTATIONS}")
    area = crop_scale_min + (1.0 - crop_scale_min) * torch.rand(b, generator=generator)
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * torch.rand(b, generator=generator)
    aspect = torch.exp(log_r)
    # crop width / height as fractions of the image: w*h = area, w/h = aspect
    w = torch.sqrt(area * aspect).clamp(max=1.0)
    h = torch.sqrt(area / aspect).clamp(max=1.0)
    # centre offset in normalised coordinates [-1, 1]: the crop must stay inside the image
    cx = (1.0 - w) * (2.0 * torch.rand(b, generator=generator) - 1.0)
    cy = (1.0 - h) * (2.0 * torch.rand(b, generator=generator) - 1.0)
    sign = torch.where(flip, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = w * sign
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = h
    theta[:, 1, 2] = cy
    grid = F.affine_grid(theta.to(x.device), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
