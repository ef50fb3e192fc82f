"""The result row of a run: its configuration part, what a finished run adds (metrics, cost,
throughput) with the score and weight files it writes, the row of a failed run, and the one writer
of rows (row, then its checkpoints dropped, then its lock released). Every job writes its rows here."""

from __future__ import annotations

import functools
import socket
import subprocess
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from torch import nn

from bench.api.observe import observe_fields
from bench.api.registry import PROJECT_ROOT
from bench.config.grid import Cell
from bench.engine.data_store import DataSplits
from bench.engine.checkpoints import EpochCheckpoints
from bench.engine.failures import MemberFailure
from bench.engine.predictions import Predictions
from bench.eval.head_cost import PeakMemory, head_cost
from bench.eval.metrics import evaluated_classes, multilabel_metrics
from bench.results import store as results
from bench.results.locks import RunLock


@functools.lru_cache(maxsize=1)
def git_commit() -> str:
    """The project's commit (``-dirty`` when the tree has changes), or ``unknown``."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=10)
        if commit.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=10)
        return commit.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def now() -> str:
    """UTC time to the second, ISO 8601 (the rows' ``started_at`` / ``finished_at``)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def base_row(cell: Cell, grid_name: str, accelerator: Accelerator) -> dict[str, Any]:
    """The configuration part of a row (shared by finished and failed runs)."""
    return {
        "run_id": cell.run_id,
        "group_id": cell.group_id,
        "grid": grid_name,
        "dataset": cell.dataset,
        "train_split": cell.train_split,
        "test_split": cell.test_split,
        "dataset_options": cell.dataset_options,
        "data_root": cell.root,
        "backbone": cell.backbone,
        "weights": cell.weights,
        "head": cell.head,
        "hparams": cell.hparams,
        "seed": cell.seed,
        "protocol": cell.recipe.protocol,
        "epochs": cell.recipe.epochs,
        "image_size": cell.recipe.image_size,
        "batch_size": cell.recipe.batch_size,
        "recipe": cell.recipe.to_dict(),
        "recipe_preset": cell.recipe_preset,
        "config": cell.config(),
        **observe_fields(cell.dataset_options, None),
        **cell.tune_fields(),
        "world_size": accelerator.num_processes,
        "device": device_name(accelerator.device),
        "mixed_precision": cell.recipe.mixed_precision,
        "select": cell.recipe.select,
        "host": socket.gethostname(),
        "git_commit": git_commit(),
    }


def finished_row(
    cell: Cell,
    grid_name: str,
    accelerator: Accelerator,
    *,
    started: str,
    data: DataSplits,
    record: Any,
    preds: Predictions,
    model: Any,
    feature_shape: tuple[int, ...],
    total_params: int,
    backbone_flops: int,
    **extra: Any,
) -> dict[str, Any]:
    """The row of a finished run, without the main-process outputs (:func:`write_outputs`).

    ``record`` is the run's ``TrainingRecord`` (losses, images, seconds, selection); ``model`` the
    classifier whose backbone and input normalisation the run used; ``extra`` adds columns
    (``source_run_id``, ``trained_with``).
    """
    assert record.selection is not None
    row = base_row(cell, grid_name, accelerator)
    row.update(
        status="finished",
        started_at=started,
        num_classes=len(data.classes),
        classes=data.classes,
        train_images=len(data.train.targets),
        test_images=len(data.test.targets),
        skipped_images=len(data.train.skipped) + len(data.test.skipped),
        final_train_loss=record.losses[-1] if record.losses else float("nan"),
        train_images_per_s=record.images / record.seconds if record.seconds else float("nan"),
        eval_images_per_s=len(preds.scores) / preds.seconds if preds.seconds else float("nan"),
        total_params=total_params,
        backbone_flops=backbone_flops,
        weights_origin=model.backbone.origin,
        input_mean=model.mean.flatten().tolist(),
        input_std=model.std.flatten().tolist(),
        feature_shape=list(feature_shape),
        # classes the run can score but never learned (no positive label among its training images)
        train_classes_without_positives=int((np.asarray(data.context.nums) == 0).sum()),
        **observe_fields(cell.dataset_options, data.observed),
        **extra,
        **record.selection.row(),
    )
    return row


def write_outputs(
    row: dict[str, Any],
    ctx: Any,
    cell: Cell,
    *,
    data: DataSplits,
    preds: Predictions,
    head: nn.Module,
    feature_shape: tuple[int, ...],
    state_dict: Callable[[], dict[str, torch.Tensor]],
    memory: PeakMemory,
) -> None:
    """Complete a finished run's row: on the main process the head's cost, the SPEC §1 metrics, the
    score file and (per ``[run] save_weights``) the weights; on every process the peak memory."""
    accelerator = ctx.accelerator
    if accelerator.is_main_process:
        cost = head_cost(head, feature_shape, accelerator.device)
        row.update(head_params=cost.params, head_flops=cost.flops, head_latency_b1_ms=cost.latency_b1_ms, head_latency_b64_ms=cost.latency_b64_ms)
        row["classes_evaluated"] = int(evaluated_classes(preds.targets, preds.ignore).sum())
        row.update(multilabel_metrics(preds.scores, preds.targets, preds.ignore))
        results.save_scores(ctx.results_dir, cell.run_id, data.test.image_ids, preds.scores, preds.targets, preds.ignore, data.classes)
        save = ctx.grid.run.save_weights
        if save != "none":
            state = state_dict()
            if save == "head":
                state = {k: v for k, v in state.items() if k.startswith("head.")}
            results.save_weights(ctx.results_dir, cell.run_id, state)
    row.update(peak_memory_mib=memory.peak_mib(), peak_memory_kind=memory.kind)


def failed_row(cell: Cell, grid_name: str, accelerator: Accelerator, failure: MemberFailure | BaseException) -> dict[str, Any]:
    """The row of a run that failed: its configuration, the error's type, message and traceback."""
    if isinstance(failure, BaseException):
        failure = MemberFailure.of(failure)
    row = base_row(cell, grid_name, accelerator)
    row.update(status="failed", error_type=failure.error_type, error=failure.error, traceback=failure.traceback, finished_at=now())
    return row


def write_row(results_dir: Any, accelerator: Accelerator, row: dict[str, Any], lock: RunLock | None) -> None:
    """Main process: write the row; a finished run's checkpoints are dropped; its lock released."""
    if accelerator.is_main_process:
        results.write_row(results_dir, row)
        if row["status"] == "finished":
            EpochCheckpoints(results_dir, row["run_id"], accelerator).remove()
        if lock is not None:
            lock.release()
