"""How a run fails inside a pass: the errors the trainer raises, the record a failed member keeps,
and the evaluation check that turns non-finite scores into that member's failure."""

from __future__ import annotations

import contextlib
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or infinite; the run stops at once."""


class PeerFailure(RuntimeError):
    """Another process of the launch failed in the same step; the run fails here too."""


class NoGradient(RuntimeError):
    """A member's training loss carries no gradient: its output is detached from its parameters
    (or is not a floating-point tensor), so training would leave it as initialised."""


class NonFiniteScores(RuntimeError):
    """The model's outputs at evaluation hold NaN or infinite values; the run fails."""


class PassTooLarge(RuntimeError):
    """A pass of several members ran out of device memory; it is split and trained again."""


def is_oom(exc: BaseException) -> bool:
    """Whether ``exc`` is an out-of-memory error (torch's, or a RuntimeError saying so)."""
    return isinstance(exc, torch.OutOfMemoryError) or (isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())


@dataclass
class MemberFailure:
    """Why a member left its pass: the exception's type, message and traceback as the row records them."""

    error_type: str
    error: str
    traceback: str
    exception: BaseException | None = None  # where it was raised (this process), else None

    @classmethod
    def of(cls, exc: BaseException, text: str | None = None) -> "MemberFailure":
        return cls(type(exc).__name__, str(exc)[:2000], (text or "".join(traceback.format_exception(exc)))[-4000:], exc)


@contextlib.contextmanager
def finite_outputs(module: nn.Module, what: str) -> Iterator[None]:
    """Within the block, a forward pass of ``module`` whose output (logits [B, C]) holds NaN or
    ±inf raises :class:`NonFiniteScores` naming ``what`` and the counts: a sigmoid would turn +inf
    into a score of 1 and -inf into 0, and every metric computed from them would be silently wrong."""

    def check(_module: nn.Module, _inputs: Any, output: Any) -> None:
        if isinstance(output, torch.Tensor) and output.is_floating_point() and not bool(torch.isfinite(output).all()):
            out = output.detach().float()
            nan, pos, neg = int(out.isnan().sum()), int((out == float("inf")).sum()), int((out == float("-inf")).sum())
            raise NonFiniteScores(
                f"{what}: the model's scores at evaluation are not finite ({nan} NaN, {pos} +inf, {neg} -inf "
                f"of {out.numel()} values in a batch of {out.shape[0]}); no metric can be computed from them"
            )

    handle = module.register_forward_hook(check)
    try:
        yield
    finally:
        handle.remove()
