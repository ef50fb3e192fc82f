"""Cost measurements of a run: head latency, FLOPs, parameters, peak memory.

Latency is the median of repeated timed forward passes after warm-up, synchronised on GPUs. FLOPs
are counted by ``torch.utils.flop_counter.FlopCounterMode`` (a multiply-add counts as 2 FLOPs) for
ONE image. Peak memory is CUDA's max-allocated on a GPU and the process's peak resident set size on a
CPU (reset per run through ``/proc/self/clear_refs`` where the kernel allows it).
"""

from __future__ import annotations

import resource
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def median_latency_ms(module: nn.Module, example: torch.Tensor, repeats: int = 20, warmup: int = 3) -> float:
    """Median wall time in milliseconds of ``module(example)`` in eval mode."""
    was_training = module.training
    module.eval()
    for _ in range(warmup):
        module(example)
    synchronize(example.device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        module(example)
        synchronize(example.device)
        times.append(time.perf_counter() - start)
    module.train(was_training)
    return 1000.0 * statistics.median(times)


@torch.no_grad()
def flops_per_image(module: nn.Module, example: torch.Tensor) -> int:
    """FLOPs of ``module`` on ``example[:1]`` (one image or one feature map)."""
    was_training = module.training
    module.eval()
    counter = FlopCounterMode(display=False)
    with counter:
        module(example[:1])
    module.train(was_training)
    return int(counter.get_total_flops())


def trainable_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


class PeakMemory:
    """Peak memory since :meth:`reset`, in MiB, with the kind of measurement."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.kind = "cuda_max_allocated" if device.type == "cuda" else "cpu_peak_rss"
        self._rss_resettable = Path("/proc/self/clear_refs").exists()

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self._rss_resettable:
            try:
                Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak RSS (VmHWM)
            except OSError:
                self._rss_resettable = False
                self.kind = "cpu_peak_rss_since_start"

    def peak_mib(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclass
class HeadCost:
    """Head-only cost at the run's feature-map shape."""

    latency_b1_ms: float
    latency_b64_ms: float
    flops: int
    params: int


def head_cost(head: nn.Module, feature_shape: tuple[int, int, int], device: torch.device, repeats: int = 20) -> HeadCost:
    """Latency at batch 1 and 64, FLOPs and trainable parameters of ``head`` on [B, d, h, w] inputs."""
    generator = torch.Generator().manual_seed(0)  # leave the global RNG of the run untouched
    many = torch.randn(64, *feature_shape, generator=generator).to(device)
    one = many[:1].clone()
    return HeadCost(
        latency_b1_ms=median_latency_ms(head, one, repeats),
        latency_b64_ms=median_latency_ms(head, many, repeats),
        flops=flops_per_image(head, one),
        params=trainable_parameters(head),
    )
