"""The memory split: how many members of a frozen-backbone job train in one pass.

A member's estimate is its parameters, gradients and optimizer states plus the activations its
forward keeps for the backward at the per-process batch size (measured once on a CPU copy of the
head with ``saved_tensors_hooks``); the budget is 80 % of the device's free memory less the frozen
backbone's own forward (CUDA), or half the available RAM (CPU), or ``$HEADBENCH_GROUP_MEMORY_MIB``.
Members are packed greedily, in order, into passes whose summed estimates fit the budget. A pass
that still runs out of device memory is halved and retried (bench.engine.job).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import torch
from torch import nn

from bench.core.env import env_number
from bench.config.recipe import Recipe
from bench.engine.optim import optimizer_states
from bench.models.classifier import Classifier

MEMORY_ENV = "HEADBENCH_GROUP_MEMORY_MIB"
#: share of the free device memory (CUDA) / available RAM (CPU) a job may plan to use
CUDA_SHARE, CPU_SHARE = 0.8, 0.5


def _activation_bytes(head: nn.Module, feature_shape: tuple[int, ...], maps: int) -> int:
    """Bytes a training forward of a CPU float32 copy of ``head`` on ``maps`` feature maps keeps
    for the backward (each storage once, parameters excluded), plus its output."""
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

    x = torch.randn(maps, *feature_shape, generator=torch.Generator().manual_seed(0))
    with torch.random.fork_rng(devices=[]), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = probe(x)
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"the head returned {type(out).__name__}, not a logits tensor")
    return total + out.numel() * out.element_size()


def head_training_bytes(head: nn.Module, feature_shape: tuple[int, ...], batch: int, recipe: Recipe) -> int:
    """Estimated memory of training ``head`` on a per-process batch of ``batch`` feature maps.

    Parameters, their gradients and optimizer states (4 bytes each element), plus ``batch`` times
    what its forward on ONE feature map keeps for the backward and its output: an upper bound of
    the activations when some saved tensors do not grow with the batch. A head that cannot run a
    training forward on one map (BatchNorm over the batch) is measured on two, per map. Measured on
    a CPU copy in float32, so the global random state and the head itself are left untouched; a
    head whose forward raises on both is estimated by its parameters alone (its training then
    fails on its own, in the pass: bench.engine.trainer).
    """
    trainable = sum(p.numel() for p in head.parameters() if p.requires_grad)
    states = 4 * trainable * (2 + optimizer_states(recipe))
    try:
        per_map = _activation_bytes(head, feature_shape, 1)
    except Exception:  # noqa: BLE001 - e.g. BatchNorm1d needs more than one value per channel
        try:
            per_map = math.ceil(_activation_bytes(head, feature_shape, 2) / 2)
        except Exception:  # noqa: BLE001 - the head's own failure, recorded when it trains
            per_map = 0
    return per_map * batch + states


def memory_budget(device: torch.device, reserve: int = 0) -> int:
    """Bytes a pass's members may use: ``$HEADBENCH_GROUP_MEMORY_MIB`` if set; else 80 % of the free
    CUDA memory less ``reserve`` (the frozen backbone's forward), or half the available RAM."""
    mib = env_number(MEMORY_ENV, None, 1.0, 2.0**30, "MiB")
    if mib is not None:
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
    """Consecutive passes (indices into ``sizes``) whose summed estimates fit ``budget``; a member
    that alone exceeds it is a pass of its own."""
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
def trunk_bytes(trunk: Classifier, image_size: int, batch: int, device: torch.device) -> int:
    """Peak CUDA memory of the frozen backbone's forward on a batch (0 elsewhere)."""
    if device.type != "cuda":
        return 0
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    trunk.features(torch.zeros(batch, 3, image_size, image_size, device=device))
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before
