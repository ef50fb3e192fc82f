"""The optimiser and the learning-rate schedule a recipe names."""

from __future__ import annotations

import math

import torch
from torch import nn

from bench.config.recipe import Recipe


def make_optimizer(backbone: nn.Module | None, head: nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    """SGD or AdamW; the head trains at ``lr``, the backbone at ``lr * lrp``."""
    groups = [{"params": [p for p in head.parameters() if p.requires_grad], "lr": recipe.lr}]
    if backbone is not None:
        trainable = [p for p in backbone.parameters() if p.requires_grad]
        if trainable:
            groups.append({"params": trainable, "lr": recipe.lr * recipe.lrp})
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay, nesterov=recipe.nesterov)
    return torch.optim.AdamW(groups, lr=recipe.lr, weight_decay=recipe.weight_decay)


def lr_factor(step: int, steps_per_epoch: int, recipe: Recipe) -> float:
    """Multiplier of the base learning rates at optimiser step ``step`` (0-based).

    Linear warm-up over ``warmup_epochs``, then cosine decay to 0 over the remaining steps,
    ``gamma ** (epoch // step_size)`` for ``step``, or 1 for ``constant``.
    """
    warmup = int(round(recipe.warmup_epochs * steps_per_epoch))
    if step < warmup:
        return (step + 1) / warmup
    if recipe.schedule == "cosine":
        total = recipe.epochs * steps_per_epoch
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    if recipe.schedule == "step":
        return recipe.gamma ** ((step // steps_per_epoch) // recipe.step_size)
    return 1.0
