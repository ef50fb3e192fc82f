"""Run a grid: check everything a launch needs before any training, plan the jobs, run each.

Every process of an ``accelerate launch`` runs this loop in step. Before any training,
:func:`preflight` builds each distinct dataset, backbone and head once, so a bad name, a bad
hyper-parameter value, a missing data root or a weights file that does not fit is reported (exit
status 2) before hours are spent on the jobs that come first. The grid is then planned into jobs
(bench.engine.jobs) and each job runs start to end (bench.engine.job): claim, build, train in
passes (bench.engine.trainer), write rows, evaluate derived heads. A tuned grid's refits run last,
each once its tune group's points all have rows (bench.engine.refits).
"""

from __future__ import annotations

import gc
import json
from pathlib import Path

import torch
from accelerate import Accelerator

from bench.api.context import HeadContext
from bench.api.registry import build_head
from bench.config.grid import Grid
from bench.core.errors import UsageError
from bench.data.holdout import validation_count
from bench.engine.data_store import DataStore
from bench.engine.evaluate import evaluate_run
from bench.engine.interrupt import StopRequest
from bench.engine.job import JobRun
from bench.engine.jobs import Job, plan_jobs
from bench.engine.launch import RunContext, broadcast
from bench.engine.outcomes import CellOutcome, GridSummary
from bench.engine.progress import Progress
from bench.engine.refits import NoPointCanWin, plan_refit
from bench.models.backbones import build_backbone
from bench.results import store as results

__all__ = ["CellOutcome", "GridSummary", "evaluate_run", "preflight", "run_grid"]  # evaluate_run: for run_bench.py evaluate


def preflight(grid: Grid, store: DataStore) -> None:
    """Build every distinct dataset, backbone and head of the grid once (no training)."""
    backbone_channels: dict[tuple[str, str | None], int] = {}
    built_heads: set[str] = set()
    for cell in grid.cells:
        for split in (cell.train_split, cell.test_split):
            store.dataset(cell, split)
        key = (cell.backbone, cell.weights)
        if key not in backbone_channels:
            backbone_channels[key] = build_backbone(cell.backbone, cell.weights).out_channels
        head_key = json.dumps([cell.dataset, cell.dataset_options, cell.root, key, cell.head, cell.hparams], sort_keys=True, default=str)
        if head_key not in built_heads:
            train = store.dataset(cell, cell.train_split)
            context = HeadContext.from_labels(train.classes, train.targets, train.ignore)
            build_head(cell.head, backbone_channels[key], len(train.classes), context, **cell.hparams)
            built_heads.add(head_key)
        if cell.recipe.select == "best_val":
            validation_count(len(store.dataset(cell, cell.train_split)), cell.recipe.val_fraction, f"{grid.path}: dataset {cell.dataset!r}")
        bs = cell.recipe.batch_size
        if bs % store.accelerator.num_processes:
            raise UsageError(
                f"{grid.path}: recipe batch_size = {bs} is global and must be divisible by the "
                f"number of processes ({store.accelerator.num_processes})"
            )


def any_process(accelerator: Accelerator, flag: bool) -> bool:
    """Whether ``flag`` is set on any process."""
    if accelerator.num_processes == 1:
        return flag
    value = torch.tensor([float(flag)], device=accelerator.device)
    return bool(accelerator.reduce(value, "sum").item())


def run_grid(
    grid: Grid,
    results_dir: Path,
    accelerator: Accelerator,
    progress: Progress,
    stop: StopRequest,
    retry_failed: bool = False,
) -> GridSummary:
    """Run every job of ``grid`` (its runs that are neither finished nor claimed by another launch).

    A run that raises is recorded as a ``failed`` row and the grid goes on; a stop signal ends the
    grid after the current training step (``summary.interrupted``), leaving each run's last epoch
    checkpoint for the next launch.
    """
    store = DataStore(accelerator)
    if accelerator.is_main_process:
        results.check_writable(results_dir)
    preflight(grid, store)
    # accelerator.free_memory() after each job runs gc.collect(); moving the long-lived objects
    # (modules, imported libraries, datasets' label arrays) out of the collector's generations
    # makes that a sweep of one job's garbage instead of ~0.2 s over everything.
    gc.freeze()
    ctx = RunContext(grid, store, accelerator, progress, results_dir, stop, grid.run.checkpoint == "epoch")
    summary = GridSummary()
    for job in plan_jobs(grid):
        if any_process(accelerator, stop.requested):
            summary.interrupted = True
            break
        JobRun(job, ctx, retry_failed, summary).run()
        if summary.interrupted:
            break
    if not summary.interrupted:
        run_refits(grid, ctx, retry_failed, summary)
    return summary


def run_refits(grid: Grid, ctx: RunContext, retry_failed: bool, summary: GridSummary) -> None:
    """``[tune] refit = true``: each refit of ``grid`` after the jobs of its points, one at a time
    (bench.engine.refits). With ``--retry-failed`` a refit runs when its effective run failed, or
    has no row yet (its choice changed since: a retried point now wins)."""
    accelerator = ctx.accelerator
    points = {cell.run_id: cell for cell in grid.cells if cell.tuned and not cell.tune_refit}
    for refit in grid.refits:
        if any_process(accelerator, ctx.stop.requested):
            summary.interrupted = True
            return
        plan, retry = None, retry_failed
        if accelerator.is_main_process:
            plan = plan_refit(refit, points, ctx.results_dir)
            retry = retry_failed and results.run_status(ctx.results_dir, plan.cell.run_id) is not None
        plan, retry = broadcast(accelerator, (plan, retry))
        if plan.action == "wait":
            summary.add(plan.cell, plan.reason)
            continue
        job = JobRun(Job(f"refit:{plan.cell.run_id}", cells=[plan.cell]), ctx, retry, summary)
        if plan.action == "fail":
            job.fail_unrun(NoPointCanWin(plan.error))
        else:
            job.run()
        if summary.interrupted:
            return
