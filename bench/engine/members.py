"""The members of a pass and the one module that holds them all.

A member is one run being trained: its cell, the module it trains (a head on a frozen backbone, or
the whole classifier when the backbone trains), its own random stream, optimizer, training record,
model selection and, at the end, its predictions or its failure. :class:`MemberModules` holds every
member's module; it is what the trainer wraps in ``DistributedDataParallel`` (once, around all of
them), so one backward all-reduces every member's gradients.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn

from bench.config.grid import Cell
from bench.engine.failures import MemberFailure
from bench.engine.optim import MemberOptimizer
from bench.engine.selection import EpochSelector, SelectionResult
from bench.engine.streams import RngStream
from bench.models.classifier import reads_label_states
from bench.results.locks import RunLock


@dataclass
class TrainingRecord:
    """Totals over all epochs of a run, carried across a resume."""

    seconds: float = 0.0
    images: int = 0
    losses: list[float] = field(default_factory=list)
    selection: SelectionResult | None = None  # the kept epoch (bench.engine.selection)


@dataclass
class Member:
    """One run of a pass.

    ``module``: what it trains (fed the pass's features [B, d, h, w], or images [B, 3, H, W] when
    its backbone trains); ``view``: the module whose state dict is the run's saved weights
    (``HeadOnly(head)`` on cached features, else the ``Classifier``); ``selected``: what model
    selection keeps (the head alone when the backbone is frozen, which never changes).
    """

    cell: Cell
    lock: RunLock | None
    head: nn.Module
    module: nn.Module
    view: nn.Module
    selected: nn.Module
    stream: RngStream
    initial: tuple[dict[str, torch.Tensor], RngStream]  # to start again (a pass that ran out of memory)
    backbone: nn.Module | None = None  # the backbone it trains (finetune), else None
    index: int = 0  # position in the pass's MemberModules
    record: TrainingRecord = field(default_factory=TrainingRecord)
    selector: EpochSelector | None = None
    optimizer: MemberOptimizer | None = None
    failure: MemberFailure | None = None
    preds: Any = None  # Predictions on the test split, once evaluated
    resume: tuple[Path, dict[str, Any]] | None = None  # the epoch checkpoint to continue from

    def reset(self) -> None:
        """Back to the state after initialisation, with a fresh training record."""
        self.module.load_state_dict(self.initial[0])
        self.stream = self.initial[1].copy()
        self.record, self.failure, self.preds, self.optimizer = TrainingRecord(), None, None, None

    def fail(self, failure: MemberFailure) -> None:
        """Record the member's first failure; it leaves the gradient all-reduce from now on."""
        if self.failure is None:
            self.failure = failure
        self.module.requires_grad_(False)


class MemberModules(nn.Module):
    """Every member's module: features -> one output per active member (None where it raised).

    Each member runs inside its own :class:`RngStream`; an exception in one member's forward is
    kept in ``failures`` (by member index) and the others go on.
    """

    def __init__(self, modules: list[nn.Module], streams: list[RngStream], float_input: bool) -> None:
        super().__init__()
        self.members = nn.ModuleList(modules)
        self.streams = streams
        self.float_input = float_input  # cached features are stored in float16 (as HeadOnly's .float())
        self.failures: dict[int, MemberFailure] = {}

    def forward(self, features: torch.Tensor, active: list[int], label_state: torch.Tensor | None = None) -> list[Any]:
        """features [B, ...] -> per active member its output (logits [B, C] for a working head) or
        None. ``label_state`` [B, C] (label mask training) goes to the members whose head declares
        ``reads_label_states``, and to no other."""
        x = features.float() if self.float_input else features
        out: list[Any] = []
        for i in active:
            try:
                with self.streams[i]:
                    if label_state is not None and reads_label_states(self.members[i]):
                        out.append(self.members[i](x, label_state))
                    else:
                        out.append(self.members[i](x))
            except Exception as exc:  # noqa: BLE001 - one member's failure is that run's, not the pass's
                self.failures[i] = MemberFailure.of(exc)
                out.append(None)
        return out


def wrap(module: nn.Module, accelerator: Accelerator) -> nn.Module:
    """``module`` on the accelerator's device, in ``DistributedDataParallel`` when the launch has
    several processes (as ``accelerator.prepare_model`` wraps a model: same keyword arguments and
    device ids); only parameters that require a gradient take part."""
    module = module.to(accelerator.device)
    if accelerator.num_processes == 1 or not any(p.requires_grad for p in module.parameters()):
        return module
    kwargs = accelerator.ddp_handler.to_kwargs() if getattr(accelerator, "ddp_handler", None) is not None else {}
    ids = [accelerator.local_process_index] if accelerator.device.type not in ("cpu", "mps") else None
    wrapped = torch.nn.parallel.DistributedDataParallel(module, device_ids=ids, output_device=ids[0] if ids else None, **kwargs)
    if getattr(accelerator, "ddp_handler", None) is not None:
        accelerator.ddp_handler.register_comm_hook(wrapped)
    return wrapped


def unwrap(module: nn.Module) -> MemberModules:
    """The :class:`MemberModules` inside a (possibly DDP-wrapped) module."""
    return module.module if isinstance(module, torch.nn.parallel.DistributedDataParallel) else module  # type: ignore[return-value]
