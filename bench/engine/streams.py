"""Each trained member's own torch random streams, so members trained in one pass draw exactly
what they draw in a pass of their own (dropout and any other random op of their forward)."""

from __future__ import annotations

from typing import Any

import torch


def device_rng(device: torch.device) -> Any:
    """``torch.cuda`` for a CUDA device (whose generator draws a member's dropout there), else None."""
    return torch.cuda if device.type == "cuda" else None


class RngStream:
    """One member's torch random streams: the CPU generator's state and the accelerator device's.
    ``with stream:`` makes them the global generators' states and saves them back after, restoring
    the states that were there before."""

    def __init__(self, device: torch.device, cpu: torch.Tensor, accel: torch.Tensor | None) -> None:
        self.device, self.cpu, self.accel = device, cpu, accel
        self.outer: tuple[torch.Tensor, torch.Tensor | None] | None = None

    @classmethod
    def capture(cls, device: torch.device) -> "RngStream":
        """The global generators' current states."""
        accel = device_rng(device)
        return cls(device, torch.get_rng_state(), accel.get_rng_state(device) if accel is not None else None)

    def copy(self) -> "RngStream":
        return RngStream(self.device, self.cpu.clone(), None if self.accel is None else self.accel.clone())

    def restore(self) -> None:
        """Set the global generators to this stream's states (without saving them back later)."""
        torch.set_rng_state(self.cpu)
        accel = device_rng(self.device)
        if accel is not None and self.accel is not None:
            accel.set_rng_state(self.accel, self.device)

    def take(self, other: "RngStream") -> None:
        """Continue from ``other``'s states (a step redone from a snapshot)."""
        self.cpu, self.accel = other.cpu, other.accel

    def __enter__(self) -> "RngStream":
        outer = RngStream.capture(self.device)
        self.outer = (outer.cpu, outer.accel)
        self.restore()
        return self

    def __exit__(self, *exc: object) -> None:
        mine = RngStream.capture(self.device)
        self.cpu, self.accel = mine.cpu, mine.accel
        assert self.outer is not None
        RngStream(self.device, *self.outer).restore()
        self.outer = None

    def state_dict(self) -> dict[str, torch.Tensor | None]:
        return {"cpu": self.cpu, "accel": self.accel}

    def load_state_dict(self, state: dict[str, torch.Tensor | None]) -> None:
        self.cpu = state["cpu"]
        if state.get("accel") is not None and device_rng(self.device) is not None:
            self.accel = state["accel"]
