"""Baseline head (SPEC §2): global average or max pooling, then a linear classifier."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

from bench.api import Head, HeadContext, register_head

POOLS = ("avg", "max")


@register_head("baseline")
class BaselineHead(Head):
    """[B, d, h, w] -> pool over the h*w positions -> [B, d] -> linear (with bias) -> [B, C].

    ``pool="max"`` is ML-GCN's own baseline, much stronger than average pooling on multi-label data.
    """

    #: the average-pooling baseline is the reference every other head is compared with
    reference = {"pool": "avg"}
    sweep = ({"pool": ["avg", "max"]},)

    def __init__(
        self, in_channels: int, num_classes: int, context: HeadContext | None = None, *, pool: Literal["avg", "max"] = "avg"
    ) -> None:
        super().__init__()
        if pool not in POOLS:
            raise ValueError(f"pool = {pool!r} is not one of {POOLS}")
        self.pool = pool
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(2)  # [B, d, h*w]
        pooled = flat.mean(dim=2) if self.pool == "avg" else flat.amax(dim=2)
        return self.fc(pooled)

    @staticmethod
    def describe_hparams(hparams: dict[str, Any]) -> str:
        return f"{hparams.get('pool', 'avg')} pool"
