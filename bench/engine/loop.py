"""Training and evaluation of one model under an ``accelerate.Accelerator``.

The same code runs on one CPU process, under ``accelerate launch --cpu --num_processes N`` (gloo)
and on GPUs. Batches from the loaders are turned into model inputs by a ``prepare`` callable
(augmentation of cached images, or cached features as they are), so the loop does not care what
the model's input is. Evaluation gathers scores with ``gather_for_metrics``: samples duplicated
to pad the last batch across processes are dropped, so metrics do not depend on the process count.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from torch import nn

from bench.api.registry import build_loss
from bench.config.recipe import Recipe
from bench.engine.interrupt import Interrupted


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or infinite; the run stops at once."""


class PeerFailure(RuntimeError):
    """Another process of the launch raised during a training step; this one stops with it."""


def make_loss(recipe: Recipe) -> nn.Module:
    """The loss the recipe's ``loss`` key names (``bench.models.losses``), with the recipe's
    parameters for it (keys ``<loss>_<param>``, e.g. ``asl_gamma_neg``)."""
    name = recipe.loss
    params = {k[len(name) + 1 :]: v for k, v in recipe.to_dict().items() if k.startswith(f"{name}_")}
    return build_loss(name, **params)


@dataclass
class EpochStats:
    """One epoch: mean training loss (main process), images seen (all processes), seconds."""

    loss: float
    images: int
    seconds: float


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_epoch(
    model: nn.Module,
    loader: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    loss_fn: nn.Module,
    accelerator: Accelerator,
    prepare: Callable[[torch.Tensor], torch.Tensor],
    grad_clip: float = 0.0,
    on_step: Callable[[], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> EpochStats:
    """One pass over ``loader``.

    Raises :class:`NonFiniteLoss` at the first NaN/inf loss on any process,
    :class:`bench.engine.interrupt.Interrupted` after the step in which any process was asked to stop,
    and, when the forward pass or loss raised on some process, that exception there and
    :class:`PeerFailure` on the others; all three are decided from one small all-reduce per step,
    so all processes leave together.
    """
    model.train()
    total, steps = torch.zeros((), device=accelerator.device), 0
    start = time.perf_counter()
    for inputs, targets, _ignore in loader:
        error: Exception | None = None
        try:
            with accelerator.autocast():
                logits = model(prepare(inputs))
            loss = loss_fn(logits.float(), targets.float())
            not_finite = (~torch.isfinite(loss.detach())).float()
        except Exception as exc:  # noqa: BLE001 - shared with the other processes below, then raised
            if accelerator.num_processes == 1:
                raise
            error, not_finite = exc, torch.zeros((), device=accelerator.device)
        stop = bool(should_stop and should_stop())
        flags = torch.stack([not_finite, torch.tensor(float(stop), device=not_finite.device),
                             torch.tensor(float(error is not None), device=not_finite.device)])
        if accelerator.num_processes > 1:
            flags = accelerator.reduce(flags, "sum")
        not_finite_any, stop_any, failed_any = flags.tolist()
        if failed_any:
            _raise_shared_failure(error, steps, accelerator, "training step")
        if not_finite_any:
            raise NonFiniteLoss(f"training loss is {loss.item()} (on this or another process) at step {steps} of the epoch")
        accelerator.backward(loss)
        if grad_clip > 0:
            accelerator.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        total += loss.detach()
        steps += 1
        if on_step is not None:
            on_step()
        if stop_any:
            raise Interrupted(f"stopped by a signal after step {steps} of the epoch")
    _synchronize(accelerator.device)
    seconds = time.perf_counter() - start
    return EpochStats(loss=(total / max(1, steps)).item(), images=len(loader.dataset), seconds=seconds)


def _raise_shared_failure(error: Exception | None, step: int, accelerator: Accelerator, where: str = "step") -> None:
    """Raise on every process once any process failed in the forward pass (or loss) of a step.

    All processes reach this together (the failure flag is all-reduced), so the gather of the
    error messages is a collective they all take; a process that failed re-raises its own
    exception, the others a :class:`PeerFailure` naming it. Without this, the healthy processes
    would wait in the gradient all-reduce until the process group's timeout.
    """
    from accelerate.utils import gather_object

    mine = f"{type(error).__name__}: {error}" if error is not None else ""
    messages = gather_object([mine])
    if error is not None:
        raise error
    failed = [f"process {rank}: {message}" for rank, message in enumerate(messages) if message]
    raise PeerFailure(f"another process failed at {where} {step} ({'; '.join(failed)})")


@dataclass
class Predictions:
    """Evaluation output on all processes: scores float32 [N, C] (sigmoid), targets, ignore."""

    scores: np.ndarray
    targets: np.ndarray
    ignore: np.ndarray
    seconds: float


@torch.no_grad()
def predict(
    model: nn.Module,
    loader: Any,
    accelerator: Accelerator,
    prepare: Callable[[torch.Tensor], torch.Tensor],
    on_step: Callable[[], None] | None = None,
) -> Predictions:
    """Score every sample of ``loader`` once (duplicates from padding dropped).

    An exception in the forward pass on one process is shared as in :func:`train_epoch`.
    """
    model.eval()
    scores, targets, ignores = [], [], []
    start = time.perf_counter()
    for step, (inputs, target, ignore) in enumerate(loader):
        error: Exception | None = None
        try:
            with accelerator.autocast():
                logits = model(prepare(inputs))
            probs = torch.sigmoid(logits.float())
        except Exception as exc:  # noqa: BLE001 - shared with the other processes below, then raised
            if accelerator.num_processes == 1:
                raise
            error = exc
        if accelerator.num_processes > 1:
            failed = accelerator.reduce(torch.tensor(float(error is not None), device=accelerator.device), "sum")
            if failed.item():
                _raise_shared_failure(error, step, accelerator, "evaluation batch")
        probs, target, ignore = accelerator.gather_for_metrics((probs, target, ignore))
        scores.append(probs.cpu())
        targets.append(target.cpu())
        ignores.append(ignore.cpu())
        if on_step is not None:
            on_step()
    _synchronize(accelerator.device)
    seconds = time.perf_counter() - start
    return Predictions(
        scores=torch.cat(scores).numpy(),
        targets=torch.cat(targets).numpy().astype(np.uint8),
        ignore=torch.cat(ignores).numpy().astype(bool),
        seconds=seconds,
    )
