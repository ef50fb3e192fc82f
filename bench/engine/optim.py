"""The optimiser and the learning-rate schedule a recipe names."""

from __future__ import annotations

import math
from typing import Any

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


class MemberOptimizer:
    """One member's own optimizer (as :func:`make_optimizer` builds it for the member alone), its
    learning-rate schedule and gradient clipping, and (``fp16``) its loss scaler.

    Each member of a pass has one, so members may differ in optimizer type and settings (tuning
    points of one pass). The schedule sets ``lr = base_lr · lr_factor(step)`` per parameter group
    before optimizer step ``step``, exactly as ``LambdaLR`` does; a step the fp16 scaler skips does
    not advance the schedule (as accelerate's scheduler wrapper does).
    """

    def __init__(self, backbone: nn.Module | None, head: nn.Module, recipe: Recipe, steps_per_epoch: int,
                 clip_parameters: list[nn.Parameter], scaler: Any = None) -> None:
        self.optimizer = make_optimizer(backbone, head, recipe)
        self.base_lrs = [g["lr"] for g in self.optimizer.param_groups]
        self.recipe, self.steps_per_epoch = recipe, steps_per_epoch
        self.clip_parameters = clip_parameters
        self.scaler = scaler  # torch.amp.GradScaler under fp16, else None
        self.step_index = 0  # optimizer steps taken (the schedule's position)

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss to backpropagate (scaled under fp16)."""
        return self.scaler.scale(loss) if self.scaler is not None else loss

    def step(self) -> None:
        """Clip (the norm of this member's own gradients), set the scheduled learning rates, step,
        clear the gradients."""
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * lr_factor(self.step_index, self.steps_per_epoch, self.recipe)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.recipe.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.clip_parameters, self.recipe.grad_clip)
        if self.scaler is not None:
            before = self.scaler.get_scale()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            skipped = self.scaler.get_scale() < before
        else:
            self.optimizer.step()
            skipped = False
        if not skipped:
            self.step_index += 1
        self.optimizer.zero_grad(set_to_none=True)

    def skip(self) -> None:
        """Drop this step's gradients (a member that failed in it is left as it was)."""
        self.optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "step": self.step_index,
                "scaler": self.scaler.state_dict() if self.scaler is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.step_index = int(state["step"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])


def optimizer_states(recipe: Recipe) -> int:
    """Tensors of optimizer state per parameter: AdamW 2 (moments), SGD 1 with momentum."""
    return 2 if recipe.optimizer == "adamw" else (1 if recipe.momentum > 0 else 0)
