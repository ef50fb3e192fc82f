"""One pass for a whole head group on a frozen backbone (``[run] heads_together = true``).

When the backbone is frozen (``protocol = "frozen"``, or ``freeze_backbone = true``), every cell
of a group — same dataset, splits, backbone and weights, recipe and seed
(:func:`bench.config.grid.head_group_key`) — sees exactly the same batches of the same features.
The group then trains in one pass: per batch, the features once (read from the feature cache, or
the frozen backbone run once on the augmented batch), every head's forward, ONE backward of the
summed losses, ONE optimizer step; per evaluation, one pass for all heads. Each head's numbers are
those it gets when trained alone:

- the gradient of ``sum_i L_i`` with respect to head i's parameters is ``dL_i/dθ_i`` exactly
  (heads share no parameter and the features carry no gradient);
- the optimizer holds each head's own parameter groups, as :func:`bench.engine.optim.make_optimizer`
  builds them for that head alone (its learning rate, weight decay, momentum); the learning-rate
  schedule sets ``lr = base_lr · lr_factor(step)`` per group, as ``LambdaLR`` does; gradient
  clipping is applied to each head's own parameters (the norm of head i's gradients alone);
- each head has its own random streams (:class:`RngStream`): it is initialised from the state the
  global generator has after the backbone is built (as in a run of its own), and its dropout draws
  continue that stream; streams are swapped in around each head's forward.

Per run stays per run: one row per head with its own metrics, scores, weights and head cost; the
shared pass is recorded in ``trained_with`` (``{"id", "size", "wall_s"}``): throughput is the
group's, ``wall_s`` is the group's wall time divided by its size.

Resume: after every epoch each head's state (weights, its optimizer state, its random streams on
every process, its losses and model-selection record) is saved into its own run's checkpoint folder
(``checkpoints/<run_id>/group_epoch_NNNN``), so a killed group resumes from its last epoch, a head
whose row is written is never retrained, and a group whose members are partly finished trains only
the rest (members resuming from different epochs train in separate passes). A member with a
one-at-a-time checkpoint (``epoch_NNNN``), or left alone, runs through the one-at-a-time path.

Memory: a group is split into sub-groups whose estimated training memory fits a budget
(:func:`split_by_memory`). A head's estimate is its parameters, gradients and optimizer states plus
the activations its forward keeps for the backward at the per-process batch size (measured once on
a CPU copy of the head with ``saved_tensors_hooks`` for one feature map, times the batch); the
budget is 80 % of the device's free memory less the frozen backbone's own forward (CUDA), or half
the available RAM (CPU), or ``$HEADBENCH_GROUP_MEMORY_MIB``. On one process, a sub-group that still
runs out of device memory is halved and retried from its heads' last checkpoints.

Distributed: the module holding all heads is wrapped ONCE in ``DistributedDataParallel`` under
accelerate's process group (the frozen backbone stays outside: it has no gradient), so one
backward all-reduces every head's gradients; batches are split by the accelerate-prepared loader
exactly as for one head. A head that fails (an exception, or a non-finite loss on any process) is
recorded as failed and leaves the group; on several processes the wrapper is rebuilt without it and
the step is redone for the others from their saved random streams.

Mixed precision ``fp16`` (one loss scaler shared by all heads would skip every head's step when one
overflows) trains one head at a time.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import inspect
import json
import os
import shutil
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object, set_seed
from torch import nn

from bench.api.registry import build_head
from bench.config.grid import Cell, head_group_key
from bench.core.errors import DataError, UsageError
from bench.data.batched_arrays import array_loader
from bench.engine.checkpoints import DamagedCheckpointWarning, EpochCheckpoints
from bench.engine.interrupt import Interrupted
from bench.engine.loop import NonFiniteLoss, PeerFailure, Predictions, make_loss
from bench.engine.optim import lr_factor, make_optimizer
from bench.engine.rows import base_row, finished_row, now, write_outputs
from bench.engine.selection import EpochSelector
from bench.eval.head_cost import PeakMemory
from bench.models.backbones import build_backbone
from bench.models.classifier import Classifier, HeadOnly
from bench.results import store as results
from bench.results.locks import RunLock

#: ``steps`` below: the module ``bench.engine.runner``, whose per-cell steps (claim, inputs, model
#: selection, rows, outcomes) a group takes as a run of its own does; its ``run_grid`` passes itself
#: in, since it imports this module (imports run one way)
Steps = ModuleType

GROUP_CHECKPOINT = "group_epoch_"
MEMORY_ENV = "HEADBENCH_GROUP_MEMORY_MIB"
#: share of the free device memory (CUDA) / available RAM (CPU) a group may plan to use
CUDA_SHARE, CPU_SHARE = 0.8, 0.5


# ----------------------------------------------------------------------------------------------
# Random streams and the module holding all heads
# ----------------------------------------------------------------------------------------------


def _device_rng(device: torch.device) -> Any:
    """``torch.cuda`` for a CUDA device (whose generator draws a head's dropout there), else None."""
    return torch.cuda if device.type == "cuda" else None


class RngStream:
    """One head's own torch random streams: the CPU generator's state and the accelerator
    device's. ``with stream:`` makes them the global generators' states and saves them back after,
    restoring the states that were there before."""

    def __init__(self, device: torch.device, cpu: torch.Tensor, accel: torch.Tensor | None) -> None:
        self.device, self.cpu, self.accel = device, cpu, accel
        self._outer: tuple[torch.Tensor, torch.Tensor | None] | None = None

    @classmethod
    def capture(cls, device: torch.device) -> "RngStream":
        """The global generators' current states."""
        accel = _device_rng(device)
        return cls(device, torch.get_rng_state(), accel.get_rng_state(device) if accel is not None else None)

    def copy(self) -> "RngStream":
        return RngStream(self.device, self.cpu.clone(), None if self.accel is None else self.accel.clone())

    def restore(self) -> None:
        """Set the global generators to this stream's states (without saving them back later)."""
        torch.set_rng_state(self.cpu)
        accel = _device_rng(self.device)
        if accel is not None and self.accel is not None:
            accel.set_rng_state(self.accel, self.device)

    def __enter__(self) -> "RngStream":
        outer = RngStream.capture(self.device)
        self._outer = (outer.cpu, outer.accel)
        self.restore()
        return self

    def __exit__(self, *exc: object) -> None:
        mine = RngStream.capture(self.device)
        self.cpu, self.accel = mine.cpu, mine.accel
        assert self._outer is not None
        RngStream(self.device, *self._outer).restore()
        self._outer = None

    def state_dict(self) -> dict[str, torch.Tensor | None]:
        return {"cpu": self.cpu, "accel": self.accel}

    def load_state_dict(self, state: dict[str, torch.Tensor | None]) -> None:
        self.cpu = state["cpu"]
        if state.get("accel") is not None and _device_rng(self.device) is not None:
            self.accel = state["accel"]


@dataclass
class HeadFailure:
    """Why a head left its group: the exception's type, message and traceback as the row records them."""

    error_type: str
    error: str
    traceback: str
    exception: BaseException | None = None  # where it was raised (this process), else None

    @classmethod
    def of(cls, exc: BaseException, text: str | None = None) -> "HeadFailure":
        return cls(type(exc).__name__, str(exc)[:2000], (text or "".join(traceback.format_exception(exc)))[-4000:], exc)


class HeadGroup(nn.Module):
    """Every head of a group: features [B, d, h, w] -> one logits tensor [B, C] per active head.

    Each head runs inside its own :class:`RngStream`. An exception in one head's forward is kept
    in ``failures`` (by head index) and that head's output is None; the others go on.
    """

    def __init__(self, heads: list[nn.Module], streams: list[RngStream], float_input: bool) -> None:
        super().__init__()
        self.heads = nn.ModuleList(heads)
        self.streams = streams
        self.float_input = float_input  # cached features are stored in float16 (HeadOnly's .float())
        self.failures: dict[int, HeadFailure] = {}

    def forward(self, features: torch.Tensor, active: list[int]) -> list[torch.Tensor | None]:
        x = features.float() if self.float_input else features
        out: list[torch.Tensor | None] = []
        for i in active:
            try:
                with self.streams[i]:
                    out.append(self.heads[i](x))
            except Exception as exc:  # noqa: BLE001 - one head's failure is that run's, not the group's
                self.failures[i] = HeadFailure.of(exc)
                out.append(None)
        return out


def _wrap(module: nn.Module, accelerator: Accelerator) -> nn.Module:
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


def _inner(module: nn.Module) -> HeadGroup:
    return module.module if isinstance(module, torch.nn.parallel.DistributedDataParallel) else module  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------
# One optimizer, each head's own parameter groups
# ----------------------------------------------------------------------------------------------


class GroupOptimizer:
    """One torch optimizer over every head's own parameter groups (as ``make_optimizer`` builds
    them for the head alone), with each group's learning rate set per step by its head's schedule."""

    def __init__(self, heads: list[nn.Module], recipes: list[Any], steps_per_epoch: int) -> None:
        groups: list[dict[str, Any]] = []
        self.owner: list[int] = []
        first: torch.optim.Optimizer | None = None
        for i, (head, recipe) in enumerate(zip(heads, recipes)):
            own = make_optimizer(None, head, recipe)
            if first is None:
                first = own
            elif type(own) is not type(first):
                raise ValueError("the heads of a group must use one optimizer type (a bug: the group shares a recipe)")
            for group in own.param_groups:
                groups.append(group)
                self.owner.append(i)
        assert first is not None
        # each group carries all its settings; the constructor takes the ones it accepts by name
        accepted = inspect.signature(type(first).__init__).parameters
        self.optimizer = type(first)(groups, **{k: v for k, v in first.defaults.items() if k in accepted})
        self.base_lrs = [g["lr"] for g in self.optimizer.param_groups]
        self.recipes, self.steps_per_epoch = recipes, steps_per_epoch

    def groups_of(self, head: int) -> list[int]:
        return [j for j, owner in enumerate(self.owner) if owner == head]

    def step(self, index: int, active: list[int]) -> None:
        """Optimizer step ``index`` (0-based, counted over all epochs) for the active heads; the
        learning rate of each group is ``base_lr · lr_factor(index)`` as LambdaLR sets it."""
        live = set(active)
        for j, group in enumerate(self.optimizer.param_groups):
            owner = self.owner[j]
            group["lr"] = self.base_lrs[j] * lr_factor(index, self.steps_per_epoch, self.recipes[owner])
            if owner not in live:
                for p in group["params"]:
                    p.grad = None  # a failed head is left as it was
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def head_state(self, head: int) -> list[dict[str, Any]]:
        """The optimizer state of head ``head``: per group, its settings and per-parameter state."""
        out = []
        for j in self.groups_of(head):
            group = self.optimizer.param_groups[j]
            out.append({
                "settings": {k: v for k, v in group.items() if k != "params"},
                "state": [dict(self.optimizer.state.get(p, {})) for p in group["params"]],
            })
        return out

    def load_head_state(self, head: int, saved: list[dict[str, Any]]) -> None:
        """Restore head ``head``'s optimizer state (as ``Optimizer.load_state_dict`` casts it)."""
        full = self.optimizer.state_dict()
        index = 0
        positions: dict[int, list[int]] = {}
        for j, group in enumerate(self.optimizer.param_groups):
            positions[j] = list(range(index, index + len(group["params"])))
            index += len(group["params"])
        mine = self.groups_of(head)
        if len(saved) != len(mine):
            raise ValueError(f"checkpoint has {len(saved)} optimizer groups for this head, the optimizer {len(mine)}")
        for j, entry in zip(mine, saved):
            if len(entry["state"]) != len(positions[j]):
                raise ValueError("checkpoint's optimizer state does not fit the head's parameters")
            full["param_groups"][j].update({k: v for k, v in entry["settings"].items() if k != "params"})
            for pos, state in zip(positions[j], entry["state"]):
                if state:
                    full["state"][pos] = state
                else:
                    full["state"].pop(pos, None)
        self.optimizer.load_state_dict(full)


def _clip(head: nn.Module, max_norm: float) -> None:
    """Gradient clipping of one head: the norm of its own gradients (as ``accelerator.clip_grad_norm_``
    over the model of a run of its own, whose frozen backbone has no gradient)."""
    if max_norm > 0:
        torch.nn.utils.clip_grad_norm_(head.parameters(), max_norm)


# ----------------------------------------------------------------------------------------------
# Per-head epoch checkpoints
# ----------------------------------------------------------------------------------------------


class HeadCheckpoints:
    """Epoch checkpoints of heads trained in a group, one folder per head in its run's checkpoint
    folder: ``checkpoints/<run_id>/group_epoch_NNNN/`` holds ``state.pt`` (weights and optimizer
    state), ``rng_<process>.pt`` (the head's random streams on each process), the model selection's
    best weights, and ``progress.json`` (epoch, seconds, images, losses, selection record). Saved
    into ``.tmp`` folders and renamed once whole; only the newest is kept."""

    def __init__(self, results_dir: Path, accelerator: Accelerator) -> None:
        self.results_dir, self.accelerator = Path(results_dir), accelerator

    def root(self, run_id: str) -> Path:
        return self.results_dir / "checkpoints" / run_id

    def latest(self, run_id: str) -> tuple[Path, dict[str, Any]] | None:
        """Main process: the newest readable group checkpoint of ``run_id`` and its progress; a
        damaged one is deleted with a warning (its head restarts, or uses an older one)."""
        root = self.root(run_id)
        if not root.is_dir():
            return None
        for folder in sorted(root.glob(f"{GROUP_CHECKPOINT}[0-9][0-9][0-9][0-9]"), reverse=True):
            try:
                progress = json.loads((folder / "progress.json").read_text())
                if progress.get("epoch") != int(folder.name[len(GROUP_CHECKPOINT):]):
                    raise ValueError("progress.json names another epoch")
                for key in ("seconds", "images", "losses", "steps_per_epoch"):
                    if key not in progress:
                        raise ValueError(f"progress.json lacks {key!r}")
                torch.load(folder / "state.pt", map_location="cpu", weights_only=True)
                if not (folder / "rng_0.pt").is_file():
                    raise ValueError("rng_0.pt is missing")
                return folder, progress
            except Exception as exc:  # noqa: BLE001 - json, torch and the checks above each raise their own
                warnings.warn(f"discarding damaged checkpoint {folder}: {type(exc).__name__}: {exc}", DamagedCheckpointWarning, stacklevel=2)
                shutil.rmtree(folder, ignore_errors=True)
        return None

    def has_single(self, run_id: str) -> bool:
        """Main process: whether ``run_id`` has a one-at-a-time epoch checkpoint to resume."""
        return EpochCheckpoints(self.results_dir, run_id, self.accelerator).latest() is not None

    def save(self, epoch: int, members: list["Member"], optimizer: GroupOptimizer) -> None:
        """Every process: save each member's state after ``epoch`` (0-based)."""
        acc = self.accelerator
        name = f"{GROUP_CHECKPOINT}{epoch:04d}"
        if acc.is_main_process:
            for m in members:
                tmp = self.root(m.cell.run_id) / f"{name}.tmp"
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        for m in members:
            torch.save(m.stream.state_dict(), self.root(m.cell.run_id) / f"{name}.tmp" / f"rng_{acc.process_index}.pt")
        acc.wait_for_everyone()
        if acc.is_main_process:
            for m in members:
                tmp = self.root(m.cell.run_id) / f"{name}.tmp"
                state = {"head": {k: v.detach().cpu() for k, v in m.head.state_dict().items()}, "optimizer": optimizer.head_state(m.index)}
                torch.save(state, tmp / "state.pt")
                m.selector.save(tmp)
                progress = {
                    "epoch": epoch, "seconds": m.record.seconds, "images": m.record.images, "losses": m.record.losses,
                    "steps_per_epoch": optimizer.steps_per_epoch, **m.selector.record(),
                }
                (tmp / "progress.json").write_text(json.dumps(progress))
                final = tmp.with_name(name)
                shutil.rmtree(final, ignore_errors=True)
                tmp.rename(final)
                for old in self.root(m.cell.run_id).iterdir():
                    if old != final:
                        shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()

    def load(self, folder: Path, progress: dict[str, Any], member: "Member", optimizer: GroupOptimizer, steps: Steps) -> None:
        """Every process: restore one member from ``folder``."""
        state = torch.load(folder / "state.pt", map_location="cpu", weights_only=True)
        member.head.load_state_dict(state["head"])
        optimizer.load_head_state(member.index, state["optimizer"])
        rng = folder / f"rng_{self.accelerator.process_index}.pt"
        member.stream.load_state_dict(torch.load(rng if rng.is_file() else folder / "rng_0.pt", weights_only=True))
        member.record = steps.TrainingRecord(progress["seconds"], progress["images"], list(progress["losses"]))
        member.selector.resume(progress, folder)


# ----------------------------------------------------------------------------------------------
# Memory
# ----------------------------------------------------------------------------------------------


def _optimizer_states(recipe: Any) -> int:
    """Tensors of optimizer state per parameter: AdamW 2 (moments), SGD 1 with momentum."""
    return 2 if recipe.optimizer == "adamw" else (1 if recipe.momentum > 0 else 0)


def head_training_bytes(head: nn.Module, feature_shape: tuple[int, ...], batch: int, recipe: Any) -> int:
    """Estimated memory of training ``head`` on a per-process batch of ``batch`` feature maps.

    Parameters, their gradients and optimizer states (4 bytes each element), plus ``batch`` times
    what its forward on ONE feature map keeps for the backward (each storage counted once, with
    ``saved_tensors_hooks``; parameters excluded) and its output: an upper bound of the activations
    when some saved tensors do not grow with the batch. Measured on a CPU copy of the head in
    float32, so the global random state and the head itself are left untouched.
    """
    probe = copy.deepcopy(head).cpu().float().train()
    params = {p.untyped_storage().data_ptr() for p in probe.parameters()}
    seen: set[int] = set()
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen and storage.data_ptr() not in params:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
        return t

    x = torch.randn(1, *feature_shape, generator=torch.Generator().manual_seed(0))
    with torch.random.fork_rng(devices=[]), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = probe(x)
    activations = total + out.numel() * out.element_size()
    trainable = sum(p.numel() for p in head.parameters() if p.requires_grad)
    return activations * batch + 4 * trainable * (2 + _optimizer_states(recipe))


def memory_budget(device: torch.device, reserve: int = 0) -> int:
    """Bytes a group's heads may use: ``$HEADBENCH_GROUP_MEMORY_MIB`` if set; else 80 % of the free
    CUDA memory less ``reserve`` (the frozen backbone's forward), or half the available RAM."""
    text = os.environ.get(MEMORY_ENV)
    if text:
        try:
            mib = float(text)
            if mib <= 0:
                raise ValueError
        except ValueError:
            raise UsageError(f"${MEMORY_ENV} = {text!r}: expected a positive number of MiB") from None
        return int(mib * 2**20)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return max(0, int(CUDA_SHARE * free) - reserve)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(CPU_SHARE * int(line.split()[1]) * 1024)
    except OSError:
        pass
    return 1 << 62  # unknown: no split


def split_by_memory(sizes: list[int], budget: int) -> list[list[int]]:
    """Consecutive sub-groups (indices into ``sizes``) whose summed estimates fit ``budget``; a
    head that alone exceeds it is a sub-group of its own."""
    out: list[list[int]] = []
    used = 0
    for i, size in enumerate(sizes):
        if out and used + size <= budget:
            out[-1].append(i)
            used += size
        else:
            out.append([i])
            used = size
    return out


@torch.no_grad()
def _trunk_bytes(trunk: Classifier, image_size: int, batch: int, device: torch.device) -> int:
    """Peak CUDA memory of the frozen backbone's forward on a batch (0 elsewhere)."""
    if device.type != "cuda":
        return 0
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    trunk.features(torch.zeros(batch, 3, image_size, image_size, device=device))
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


# ----------------------------------------------------------------------------------------------
# Members and the group's training
# ----------------------------------------------------------------------------------------------


@dataclass
class Member:
    """One head of a group: its cell, lock, head module, random stream, record and outcome."""

    cell: Cell
    lock: RunLock | None
    head: nn.Module
    stream: RngStream
    initial: tuple[dict[str, torch.Tensor], RngStream]  # to start again (a sub-group that ran out of memory)
    index: int = 0  # position in the trained HeadGroup
    record: Any = None  # runner.TrainingRecord: totals over epochs, carried across a resume
    selector: EpochSelector | None = None  # type: ignore[assignment]
    view: nn.Module | None = None  # the module a run of its own trains (HeadOnly or Classifier): its weights' keys
    head_view: nn.Module | None = None  # HeadOnly(head): what model selection keeps (the frozen backbone never changes)
    failure: HeadFailure | None = None
    preds: Predictions | None = None
    resume: tuple[Path, dict[str, Any]] | None = None

    def reset(self, record: Any) -> None:
        """Back to the state after initialisation, with the fresh training record ``record``."""
        self.head.load_state_dict(self.initial[0])
        self.stream = self.initial[1].copy()
        self.record, self.failure, self.preds = record, None, None


class GroupTooLarge(RuntimeError):
    """A sub-group ran out of device memory; it is split and trained again."""


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower() and isinstance(exc, RuntimeError)


def group_run_id(cells: list[Cell]) -> str:
    """The id of a pass: a hash of its members' run ids."""
    return hashlib.sha256("\x1f".join(sorted(c.run_id for c in cells)).encode()).hexdigest()[:16]


@dataclass
class Trunk:
    """What every head of the group shares: the frozen backbone (inside a head-less Classifier),
    the inputs and how a loader batch becomes the heads' features."""

    model: Classifier
    inputs: Any  # runner.Inputs
    frozen_protocol: bool

    def features(self, batch: torch.Tensor) -> torch.Tensor:
        """A prepared batch -> features [B, d, h, w]: as read (cached features) or the frozen backbone's."""
        return batch if self.frozen_protocol else self.model.features(batch)


class GroupTrainer:
    """Trains and evaluates the members of one sub-group in one pass; fills each member's record,
    predictions or failure."""

    def __init__(self, members: list[Member], trunk: Trunk, ctx: Any, first_epoch: int, steps: Steps) -> None:
        self.members, self.trunk, self.ctx, self.first_epoch, self.steps = members, trunk, ctx, first_epoch, steps
        self.accelerator = ctx.accelerator
        self.recipe = members[0].cell.recipe
        self.seed = members[0].cell.seed
        for i, m in enumerate(members):
            m.index = i
        self.group = HeadGroup([m.head for m in members], [m.stream for m in members], trunk.frozen_protocol)
        self.active = list(range(len(members)))
        self.task = None

    # -- shared pieces ---------------------------------------------------------------------------

    def _lock_refresh(self) -> None:
        for m in self.members:
            if m.lock is not None:
                m.lock.refresh()

    def _fail(self, index: int, failure: HeadFailure) -> None:
        m = self.members[index]
        if m.failure is None:
            m.failure = failure
        if index in self.active:
            self.active.remove(index)
        m.head.requires_grad_(False)  # out of the gradient all-reduce from now on

    def _share_failures(self, local: dict[int, HeadFailure], flags: torch.Tensor, where: str, step: int) -> list[int]:
        """All processes: the heads that failed on any process (``flags`` summed over processes);
        each gets its own exception where it raised, a PeerFailure naming it elsewhere."""
        failed = [i for i, f in enumerate(flags.tolist()) if f]
        if not failed:
            return []
        if self.accelerator.num_processes > 1:
            messages = gather_object([{i: f"{f.error_type}: {f.error}" for i, f in local.items()}])
        else:
            messages = [{i: f"{f.error_type}: {f.error}" for i, f in local.items()}]
        if len(self.members) > 1 and any("out of memory" in text.lower() for m in messages for text in m.values()):
            raise GroupTooLarge(next(text for m in messages for text in m.values() if "out of memory" in text.lower()))
        for i in failed:
            if i in local:
                self._fail(i, local[i])
            else:
                text = "; ".join(f"process {rank}: {m[i]}" for rank, m in enumerate(messages) if i in m)
                self._fail(i, HeadFailure.of(PeerFailure(f"another process failed at {where} {step} ({text})"), "PeerFailure\n"))
        return failed

    # -- training --------------------------------------------------------------------------------

    def train(self) -> None:
        accelerator, recipe, ctx = self.accelerator, self.recipe, self.ctx
        shuffle = torch.Generator()
        train_loader = array_loader(self.trunk.inputs.train, batch_size=recipe.batch_size, shuffle=True, generator=shuffle)
        steps_per_epoch = len(train_loader)
        optimizer = GroupOptimizer([m.head for m in self.members], [m.cell.recipe for m in self.members], steps_per_epoch)
        train_loader = accelerator.prepare(train_loader)
        self.module = _wrap(self.group, accelerator)
        loss_fn = make_loss(recipe)
        augmenter = torch.Generator()
        checkpoints = HeadCheckpoints(ctx.results_dir, accelerator)
        for m in self.members:
            if m.resume is not None:
                checkpoints.load(m.resume[0], m.resume[1], m, optimizer, self.steps)
        if self.first_epoch:
            ctx.progress.log(f"resuming a group of {len(self.members)} heads ({self.members[0].cell.describe()}, ...) "
                             f"from its checkpoint after {self.first_epoch} of {recipe.epochs} epochs")
        self.task = ctx.progress.add(f"{len(self.members)} heads together: {self._describe()}", total=recipe.epochs * steps_per_epoch)
        self.task.advance(self.first_epoch * steps_per_epoch)
        for epoch in range(self.first_epoch, recipe.epochs):
            if not self.active:
                break
            # the same shuffle and augmentation as a run of one head (bench.engine.runner._train)
            shuffle.manual_seed(self.seed * 100_003 + epoch)
            augmenter.manual_seed((self.seed * 100_003 + epoch) * 1_009 + accelerator.process_index)
            seconds, images, losses = self._epoch(train_loader, optimizer, loss_fn, augmenter, epoch * steps_per_epoch)
            for i, m in enumerate(self.members):
                if m.failure is None:
                    m.record.seconds += seconds
                    m.record.images += images
                    m.record.losses.append(losses[i])
            self._select(epoch)
            if ctx.checkpoint and epoch + 1 < recipe.epochs:
                checkpoints.save(epoch, [m for m in self.members if m.failure is None], optimizer)
        for m in self.members:
            if m.failure is None:
                m.selector.restore(m.head_view)
                m.record.selection = m.selector.result(recipe.epochs)

    def _describe(self) -> str:
        c = self.members[0].cell
        return f"{c.dataset} / {c.backbone} / seed {c.seed}"

    def _forward(self, feats: torch.Tensor, targets: torch.Tensor) -> tuple[dict[int, torch.Tensor], dict[int, HeadFailure]]:
        """Every active head's loss on the batch's features; failures by head index."""
        group = _inner(self.module)
        group.failures = {}
        with self.accelerator.autocast():
            outs = self.module(feats, list(self.active))
        losses, failures = {}, dict(group.failures)
        for i, logits in zip(list(self.active), outs):
            if logits is None:
                continue
            try:
                losses[i] = self.loss_fn(logits.float(), targets.float())
            except Exception as exc:  # noqa: BLE001 - that head's failure
                failures[i] = HeadFailure.of(exc)
        return losses, failures

    def _epoch(self, loader: Any, optimizer: GroupOptimizer, loss_fn: nn.Module, augmenter: torch.Generator, first_step: int) -> tuple[float, int, list[float]]:
        accelerator, n = self.accelerator, len(self.members)
        self.loss_fn = loss_fn
        device = accelerator.device
        self.module.train()
        self.trunk.model.eval()
        totals = torch.zeros(n, device=device)
        steps = 0
        start = time.perf_counter()
        for inputs, targets, _ignore in loader:
            snapshot = [m.stream.copy() for m in self.members] if accelerator.num_processes > 1 else None
            try:
                with accelerator.autocast():
                    feats = self.trunk.features(self.trunk.inputs.prepare_train(inputs, augmenter))
                trunk_failure = None
            except Exception as exc:  # noqa: BLE001 - fails every head of the group
                if accelerator.num_processes == 1:
                    raise
                trunk_failure, feats = HeadFailure.of(exc), None
            while True:
                if feats is not None:
                    losses, failures = self._forward(feats, targets)
                else:
                    losses, failures = {}, {i: trunk_failure for i in self.active}
                # one vector of flags per step: [not finite (n), failed (n), stop], summed over processes
                flags = torch.zeros(2 * n + 1, device=device)
                if losses:
                    index = torch.tensor(list(losses), device=device)
                    flags[index] = (~torch.isfinite(torch.stack([loss.detach() for loss in losses.values()]))).float()
                for i in failures:
                    flags[n + i] = 1.0
                flags[-1] = float(self.ctx.stop.requested)
                if accelerator.num_processes > 1:
                    flags = accelerator.reduce(flags, "sum")
                failed = self._share_failures(failures, flags[n : 2 * n], "training step", steps)
                for i in [i for i, f in enumerate(flags[:n].tolist()) if f and i in self.active]:
                    value = losses[i].item() if i in losses else float("nan")
                    self._fail(i, HeadFailure.of(NonFiniteLoss(f"training loss is {value} (on this or another process) at step {steps} of the epoch"), "NonFiniteLoss\n"))
                    failed.append(i)
                if not failed or accelerator.num_processes == 1 or not self.active:
                    break
                # several processes: DDP expects a gradient for every wrapped parameter, so rewrap
                # the survivors and redo their step from the random states it started with
                self.module = _wrap(_inner(self.module), accelerator)
                for i in self.active:
                    self.members[i].stream.cpu, self.members[i].stream.accel = snapshot[i].cpu, snapshot[i].accel
                    self.group.streams[i] = self.members[i].stream
            if self.active:
                accelerator.backward(sum(losses[i] for i in self.active))
                for i in self.active:
                    _clip(self.members[i].head, self.members[i].cell.recipe.grad_clip)
                optimizer.step(first_step + steps, self.active)
                totals[torch.tensor(self.active, device=device)] += torch.stack([losses[i].detach() for i in self.active])
            steps += 1
            self.task.advance()
            self._lock_refresh()
            if flags[-1].item():
                raise Interrupted(f"stopped by a signal after step {steps} of the epoch")
            if not self.active:
                break
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        return seconds, len(loader.dataset), (totals / max(1, steps)).tolist()

    # -- evaluation ------------------------------------------------------------------------------

    @torch.no_grad()
    def predict(self, loader: Any, prepare: Callable[[torch.Tensor], torch.Tensor]) -> dict[int, Predictions]:
        """One pass over ``loader`` for every active head: per head, the sigmoid scores of every
        sample once (padding duplicates dropped by ``gather_for_metrics``), as ``loop.predict``
        gives them for the head alone. A head that raises fails; the others go on."""
        accelerator, n = self.accelerator, len(self.members)
        device = accelerator.device
        self.module.eval()
        self.trunk.model.eval()
        group = _inner(self.module)
        columns = list(self.active)
        scores, targets, ignores = [], [], []
        start = time.perf_counter()
        for step, (inputs, target, ignore) in enumerate(loader):
            group.failures = {}
            failures: dict[int, HeadFailure] = {}
            probs = torch.zeros(len(target), len(columns), target.shape[1], device=device)
            try:
                with accelerator.autocast():
                    feats = self.trunk.features(prepare(inputs))
                    outs = self.module(feats, list(self.active))
                failures.update(group.failures)
                for i, logits in zip(list(self.active), outs):
                    if logits is not None:
                        probs[:, columns.index(i)] = torch.sigmoid(logits.float())
            except Exception as exc:  # noqa: BLE001 - the shared part failed: every head fails
                if accelerator.num_processes == 1:
                    raise
                failures = {i: HeadFailure.of(exc) for i in self.active}
            errors = torch.zeros(n, device=device)
            for i in failures:
                errors[i] = 1.0
            if accelerator.num_processes > 1:
                errors = accelerator.reduce(errors, "sum")
            self._share_failures(failures, errors, "evaluation batch", step)
            probs, target, ignore = accelerator.gather_for_metrics((probs, target, ignore))
            scores.append(probs.cpu())
            targets.append(target.cpu())
            ignores.append(ignore.cpu())
            if self.task is not None:
                self.task.advance()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        all_scores = torch.cat(scores).numpy()
        all_targets = torch.cat(targets).numpy().astype(np.uint8)
        all_ignore = torch.cat(ignores).numpy().astype(bool)
        return {
            i: Predictions(np.ascontiguousarray(all_scores[:, k]), all_targets, all_ignore, seconds)
            for k, i in enumerate(columns) if self.members[i].failure is None
        }

    def _select(self, epoch: int) -> None:
        """Model selection after ``epoch``: one pass over the selecting split for all heads."""
        selecting = [m for m in self.members if m.failure is None and m.selector.active]
        if not selecting:
            return
        mode = selecting[0].selector.mode
        items = self.trunk.inputs.val if mode == "best_val" else self.trunk.inputs.test
        if not hasattr(self, "_select_loader"):
            self._select_loader = self.accelerator.prepare(array_loader(items, batch_size=self.steps._eval_batch_size(self.recipe, self.accelerator.num_processes)))
        self.task.grow(len(self._select_loader))
        preds = self.predict(self._select_loader, self.trunk.inputs.prepare_eval)
        for i, p in preds.items():
            m = self.members[i]
            m.selector.score_epoch(epoch, p, m.head_view)

    def evaluate(self) -> None:
        """The test pass: every surviving head's predictions."""
        if not self.active:
            return
        loader = self.accelerator.prepare(array_loader(self.trunk.inputs.test, batch_size=self.steps._eval_batch_size(self.recipe, self.accelerator.num_processes)))
        self.task.grow(len(loader))
        with contextlib.ExitStack() as checks:
            # runner.finite_outputs on each head: non-finite scores fail that head's run
            for i in self.active:
                checks.enter_context(self.steps.finite_outputs(self.members[i].head, self.members[i].cell.describe()))
            preds = self.predict(loader, self.trunk.inputs.prepare_eval)
        for i, p in preds.items():
            self.members[i].preds = p
        self.task.done()


# ----------------------------------------------------------------------------------------------
# The run_grid hook: claims, plan, passes, rows
# ----------------------------------------------------------------------------------------------


def _broadcast(accelerator: Accelerator, value: Any) -> Any:
    """``value`` of the main process, on every process."""
    box = [value]
    if accelerator.num_processes > 1:
        broadcast_object_list(box, from_process=0)
    return box[0]


class HeadsTogether:
    """``run_grid``'s hook for ``[run] heads_together = true``.

    Groups are the cells of a grid sharing :func:`head_group_key` (derived heads excluded: they
    follow their source one at a time). When the grid loop reaches a group's first cell,
    :meth:`takes` claims every member, trains the claimed ones together and writes their rows; it
    returns True for each cell trained so, and False for the others, which the one-at-a-time loop
    then runs (or skips, saying why) as before.
    """

    def __init__(self, grid: Any, ctx: Any, retry_failed: bool, steps: Steps) -> None:
        self.ctx, self.grid, self.retry_failed, self.steps = ctx, grid, retry_failed, steps
        groups: dict[str, list[Cell]] = {}
        for cell in grid.cells:
            key = head_group_key(cell)
            if key is not None and cell.source_run_id is None and cell.recipe.mixed_precision != "fp16":
                groups.setdefault(key, []).append(cell)
        self.groups = {k: v for k, v in groups.items() if len(v) > 1}
        self.key_of = {c.run_id: k for k, cells in self.groups.items() for c in cells}
        self.started: set[str] = set()
        self.taken: set[str] = set()
        self._sizes: dict[str, int] = {}
        self._locks: dict[str, RunLock] = {}

    def takes(self, cell: Cell, summary: Any) -> bool:
        """Train ``cell``'s group if this is its first cell; True when ``cell`` was trained in it
        (its outcome is in ``summary``). Sets ``summary.interrupted`` on a stop signal."""
        key = self.key_of.get(cell.run_id)
        if key is None:
            return False
        if key not in self.started:
            self.started.add(key)
            self._run(self.groups[key], summary)
        return cell.run_id in self.taken

    # -- claims ----------------------------------------------------------------------------------

    def _claims(self, cells: list[Cell]) -> tuple[list[tuple[Cell, Any]], dict[str, RunLock]]:
        """Main process decides, every process learns: the members to train together, each with
        its group checkpoint to resume (or None), and (main) their locks. Members not trained
        together are released to the one-at-a-time loop."""
        ctx, acc = self.ctx, self.ctx.accelerator
        locks: dict[str, RunLock] = {}
        plan = None
        if acc.is_main_process:
            plan = []
            checkpoints = HeadCheckpoints(ctx.results_dir, acc)
            for cell in cells:
                decision, lock = self.steps._claim(cell, ctx.results_dir, self.retry_failed)
                if decision != "run":
                    plan.append(None)
                    continue
                if ctx.checkpoint and checkpoints.has_single(cell.run_id):
                    lock.release()  # it resumes its own one-at-a-time checkpoint in the loop
                    plan.append(None)
                    continue
                found = checkpoints.latest(cell.run_id) if ctx.checkpoint else None
                locks[cell.run_id] = lock
                plan.append({"resume": [str(found[0]), found[1]] if found else None})
            chosen = [p for p in plan if p is not None]
            if len(chosen) < 2 and not any(p["resume"] for p in chosen):
                for lock in locks.values():  # nothing to share: the loop runs it alone
                    lock.release()
                locks, plan = {}, [None] * len(cells)
        plan = _broadcast(acc, plan)
        together = [(cell, p["resume"]) for cell, p in zip(cells, plan) if p is not None]
        return together, locks

    # -- one group ---------------------------------------------------------------------------------

    def _run(self, cells: list[Cell], summary: Any) -> None:
        together, locks = self._claims(cells)
        if not together:
            return
        self.taken |= {cell.run_id for cell, _ in together}
        self._locks = locks
        written: set[str] = set()
        try:
            self._train_together(together, locks, summary, written)
        except Interrupted:
            summary.interrupted = True
        finally:
            for run_id, lock in locks.items():
                if run_id not in written:
                    lock.release()
            self.ctx.accelerator.free_memory()

    def _train_together(self, together: list[tuple[Cell, Any]], locks: dict[str, RunLock], summary: Any, written: set[str]) -> None:
        ctx, acc = self.ctx, self.ctx.accelerator
        setup_start = time.perf_counter()
        started = now()
        memory = PeakMemory(acc.device)
        memory.reset()
        first = together[0][0]
        recipe = first.recipe
        try:
            data = ctx.store.splits(first, ctx.progress)
            # the backbone and every head drawn as in a run of its own: set_seed, backbone, head
            set_seed(first.seed)
            backbone = build_backbone(first.backbone, first.weights)
            normalize = recipe.input_normalization == "backbone"
            trunk_model = Classifier(backbone, nn.Identity(), freeze_backbone=True, normalize=normalize)
            after_backbone = RngStream.capture(acc.device)
            members = []
            for cell, resume in together:
                after_backbone.restore()
                head = build_head(cell.head, backbone.out_channels, len(data.classes), data.context, **cell.hparams)
                stream = RngStream.capture(acc.device)
                initial = ({k: v.detach().clone() for k, v in head.state_dict().items()}, stream.copy())
                members.append(Member(cell, locks.get(cell.run_id), head, stream, initial, record=self.steps.TrainingRecord(),
                                      resume=(Path(resume[0]), resume[1]) if resume else None))
            _module, inputs = self.steps._inputs(first, trunk_model, data, ctx)
            trunk_model.to(acc.device).eval()
            trunk = Trunk(trunk_model, inputs, recipe.protocol == "frozen")
            for m in members:
                m.head_view = HeadOnly(m.head)
                m.view = m.head_view if trunk.frozen_protocol else Classifier(backbone, m.head, freeze_backbone=True, normalize=normalize)
                m.selector = self.steps._selector(m.cell, inputs, ctx)
        except DataError:
            raise
        except Exception as exc:  # noqa: BLE001 - the shared setup failed: every member's run fails
            self._write([(cell, self.steps._failed_row(cell, self.grid, acc, exc)) for cell, _ in together], summary, written)
            return
        shared = Shared(data, trunk, started, memory, time.perf_counter() - setup_start, len(members))
        queue = self._plan(members, trunk, split=True)
        while queue:
            first_epoch, sub = queue.pop(0)
            pass_start = time.perf_counter()
            try:
                trainer = GroupTrainer(sub, trunk, ctx, first_epoch, self.steps)
                trainer.train()
                trainer.evaluate()
                pass_wall = time.perf_counter() - pass_start + shared.setup_s * len(sub) / shared.members
                rows = [(m.cell, self._row(m, trainer, shared, pass_wall)) for m in sub]
            except (Interrupted, DataError):
                raise
            except Exception as exc:  # noqa: BLE001 - the pass failed (not one head): its runs fail, unless memory
                if len(sub) > 1 and (isinstance(exc, GroupTooLarge) or _is_oom(exc)):
                    acc.free_memory()
                    ctx.progress.log(f"{len(sub)} heads together ran out of memory ({str(exc)[:200]}); training them in two halves")
                    for m in sub:
                        m.reset(self.steps.TrainingRecord())
                    half = len(sub) // 2
                    queue[0:0] = self._plan(sub[:half], trunk, split=False) + self._plan(sub[half:], trunk, split=False)
                    continue
                rows = [(m.cell, self.steps._failed_row(m.cell, self.grid, acc, exc)) for m in sub]
            finally:
                acc.free_memory()
            self._write(rows, summary, written)

    def _plan(self, members: list[Member], trunk: Trunk, split: bool) -> list[tuple[int, list[Member]]]:
        """Passes to train: members grouped by the epoch they resume from (a fresh lookup of their
        checkpoints after the first plan), each split to fit the memory budget when ``split``."""
        acc = self.ctx.accelerator
        if not split:  # after an out-of-memory split: the heads' checkpoints as they are now
            found = None
            if acc.is_main_process:
                checkpoints = HeadCheckpoints(self.ctx.results_dir, acc)
                found = [checkpoints.latest(m.cell.run_id) if self.ctx.checkpoint else None for m in members]
                found = [[str(f[0]), f[1]] if f else None for f in found]
            found = _broadcast(acc, found)
            for m, f in zip(members, found):
                m.resume = (Path(f[0]), f[1]) if f else None
        by_epoch: dict[int, list[Member]] = {}
        for m in members:
            by_epoch.setdefault(m.resume[1]["epoch"] + 1 if m.resume else 0, []).append(m)
        out = []
        for first_epoch, ms in by_epoch.items():
            parts = self._memory_split(ms, trunk) if split and len(ms) > 1 else [list(range(len(ms)))]
            out += [(first_epoch, [ms[i] for i in part]) for part in parts]
        return out

    def _memory_split(self, members: list[Member], trunk: Trunk) -> list[list[int]]:
        """Main process estimates, every process learns: sub-groups that fit the memory budget."""
        acc = self.ctx.accelerator
        parts = None
        if acc.is_main_process:
            recipe = members[0].cell.recipe
            batch = max(1, recipe.batch_size // acc.num_processes)
            shape = tuple(trunk.inputs.feature_shape)
            sizes = []
            for m in members:
                if m.cell.run_id not in self._sizes:
                    self._sizes[m.cell.run_id] = head_training_bytes(m.head, shape, batch, m.cell.recipe)
                sizes.append(self._sizes[m.cell.run_id])
            if trunk.frozen_protocol:  # the batch of cached features, as read and as float
                reserve = batch * int(np.prod(shape)) * (4 + np.dtype(recipe.feature_dtype).itemsize)
            else:
                reserve = _trunk_bytes(trunk.model, recipe.image_size, batch, acc.device)
            parts = split_by_memory(sizes, memory_budget(acc.device, reserve))
            if len(parts) > 1:
                self.ctx.progress.log(f"{len(members)} heads split into {len(parts)} passes to fit the memory budget")
        return _broadcast(acc, parts)

    # -- rows --------------------------------------------------------------------------------------

    def _row(self, m: Member, trainer: GroupTrainer, shared: "Shared", pass_wall: float) -> dict[str, Any]:
        """A head's row, as ``runner.run_cell`` writes it, with ``trained_with``; ``pass_wall``: the
        pass's wall time with its share of the group's setup (the row's ``wall_s`` is its share)."""
        if m.failure is not None:
            return self._failed(m.cell, m.failure)
        ctx, acc, cell = self.ctx, self.ctx.accelerator, m.cell
        data, trunk, preds, record = shared.data, shared.trunk, m.preds, m.record
        assert preds is not None and record.selection is not None
        size = len(trainer.members)
        model = trunk.model
        row = finished_row(
            cell, self.grid.name, acc, started=shared.started, data=data, record=record, preds=preds, model=model,
            feature_shape=trunk.inputs.feature_shape,
            total_params=sum(p.numel() for p in model.backbone.parameters()) + sum(p.numel() for p in m.head.parameters()),
            backbone_flops=ctx.store.backbone_flops(cell, model), source_run_id=None,
            trained_with={"id": group_run_id([x.cell for x in trainer.members]), "size": size, "wall_s": pass_wall},
        )
        write_outputs(
            row, ctx, cell, data=data, preds=preds, head=m.head, feature_shape=trunk.inputs.feature_shape,
            state_dict=m.view.state_dict, memory=shared.memory,
        )
        row["wall_s"] = pass_wall / size
        row["finished_at"] = now()
        return row

    def _failed(self, cell: Cell, failure: HeadFailure) -> dict[str, Any]:
        """The row of a head that failed inside a pass (as ``runner._failed_row`` writes one)."""
        row = base_row(cell, self.grid.name, self.ctx.accelerator)
        row.update(status="failed", error_type=failure.error_type, error=failure.error, traceback=failure.traceback, finished_at=now())
        return row

    def _write(self, rows: list[tuple[Cell, dict[str, Any]]], summary: Any, written: set[str]) -> None:
        """Main process writes each row (and drops a finished run's checkpoints); every process
        records the outcomes; each written run's lock is released."""
        acc = self.ctx.accelerator
        for cell, row in rows:
            if acc.is_main_process:
                results.write_row(self.ctx.results_dir, row)
                if row["status"] == "finished":
                    EpochCheckpoints(self.ctx.results_dir, cell.run_id, acc).remove()
                lock = self._locks.get(cell.run_id)
                if lock is not None:
                    lock.release()
            written.add(cell.run_id)
            summary.outcomes.append(self.steps.CellOutcome(cell, row["status"], row, row.get("error", "")))


@dataclass
class Shared:
    """What every pass of one group shares: data, trunk, start time, memory meter, setup time."""

    data: Any
    trunk: Trunk
    started: str
    memory: PeakMemory
    setup_s: float
    members: int
