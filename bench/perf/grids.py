"""Grids as the speed benchmarks run them: a private cache, a changed copy of a shipped grid, a
timed launch."""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd
from accelerate import Accelerator

from bench.config.grid import Cell, Grid, with_sources
from bench.engine.interrupt import StopRequest
from bench.engine.progress import Progress
from bench.engine.runner import run_grid
from bench.results.store import load_all


@contextmanager
def scratch_cache() -> Iterator[Path]:
    """A private ``$HEADBENCH_CACHE`` for the duration of a measurement."""
    old = os.environ.get("HEADBENCH_CACHE")
    folder = Path(tempfile.mkdtemp(prefix="headbench-perf-"))
    os.environ["HEADBENCH_CACHE"] = str(folder)
    try:
        yield folder
    finally:
        if old is None:
            del os.environ["HEADBENCH_CACHE"]
        else:
            os.environ["HEADBENCH_CACHE"] = old
        shutil.rmtree(folder, ignore_errors=True)


def changed(grid: Grid, change: Callable[[Cell], None], together: bool = False) -> Grid:
    """A copy of ``grid`` with ``change`` applied to every cell (run ids and sources recomputed),
    its heads trained one at a time unless ``together`` (``[run] heads_together``)."""
    grid = copy.deepcopy(grid)
    for cell in grid.cells:
        change(cell)
        cell.source_run_id = None
    grid.cells = with_sources(grid.cells)
    # weights are kept: a derived head reuses its source's
    grid.run = grid.run.replace(checkpoint="none", heads_together=together)
    return grid


def with_recipe(grid: Grid, **changes: Any) -> Grid:
    def change(cell: Cell) -> None:
        cell.recipe = cell.recipe.replace(**changes)

    return changed(grid, change)


def run_timed(grid: Grid, accelerator: Accelerator) -> tuple[float, int, pd.DataFrame]:
    """Run ``grid`` into a scratch results folder: its wall time (s), the number of runs trained,
    and its rows (read after the clock stops). Any failed run is an error."""
    results_dir = Path(tempfile.mkdtemp(prefix="headbench-perf-results-"))
    try:
        start = time.perf_counter()
        with StopRequest() as stop:
            summary = run_grid(grid, results_dir, accelerator, Progress(enabled=False), stop)
        seconds = time.perf_counter() - start
        rows = load_all(results_dir)
    finally:
        shutil.rmtree(results_dir, ignore_errors=True)
    if summary.failed:
        raise RuntimeError(f"{len(summary.failed)} runs failed: {summary.failed[0].error}")
    return seconds, summary.trained, rows


def timed_grid(grid: Grid, accelerator: Accelerator) -> tuple[float, int]:
    """:func:`run_timed` without the rows: wall time (s) and runs trained."""
    seconds, trained, _ = run_timed(grid, accelerator)
    return seconds, trained


def grid_warmup(grid: Grid) -> Grid:
    """A one-cell, one-epoch copy of ``grid`` that fills the image cache."""
    warm = with_recipe(grid, epochs=1, augment="none", protocol="finetune", freeze_backbone=True)
    warm.cells = warm.cells[:1]
    return warm
