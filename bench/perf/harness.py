"""The harness's training epoch as the speed benchmarks time it: a pass of the one trainer
(bench.engine.trainer), built through its public seams."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from bench.config.grid import Cell
from bench.engine.inputs import Inputs
from bench.engine.interrupt import StopRequest
from bench.engine.launch import RunContext
from bench.engine.progress import Progress
from bench.engine.trainer import Trainer, trainer_of_one


def quiet_context(accelerator: Accelerator, grid: Any = None, store: Any = None) -> RunContext:
    """A launch context that shows no progress and writes no checkpoint."""
    return RunContext(grid, store, accelerator, Progress(enabled=False), Path(tempfile.gettempdir()), StopRequest(), checkpoint=False)


def harness_trainer(cell: Cell, model: torch.nn.Module, train: Any, prepare: Callable[..., torch.Tensor], accelerator: Accelerator) -> Trainer:
    """A pass of one member training ``model`` whole on ``train`` (items of a loader batch ->
    ``prepare(batch)`` or ``prepare(batch, generator)`` -> model input), as a finetuned cell's job."""
    takes_generator = prepare.__code__.co_argcount >= 2 if hasattr(prepare, "__code__") else False
    prepare_train = prepare if takes_generator else (lambda x, _g: prepare(x))
    prepare_eval = (lambda x: prepare(x, torch.Generator())) if takes_generator else prepare
    inputs = Inputs(train, lambda: train, prepare_train, prepare_eval, (0, 0, 0))
    return trainer_of_one(cell, model, inputs, quiet_context(accelerator))
