"""Run a grid: for each cell, skip it if done, else build, train, evaluate and write its row.

Every process of an ``accelerate launch`` runs this loop in step; the main process decides what
to skip (and broadcasts it), writes rows and weights, and shows progress. Before any training,
:func:`preflight` builds each distinct dataset, backbone and head once, so a bad name, a bad
hyper-parameter value, a missing data root or a weights file that does not fit is reported
(exit status 2) before hours are spent on the cells that come first.
"""

from __future__ import annotations

import functools
import gc
import json
import socket
import subprocess
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, set_seed
from torch import nn

from bench import image_cache, results
from bench.array_items import ArrayItems, array_loader
from bench.augment import augment, to_float
from bench.backbones import build_backbone
from bench.checkpoints import EpochCheckpoints
from bench.context import HeadContext
from bench.data_store import DataSplits, DataStore
from bench.errors import UsageError
from bench.features import FeatureDataset
from bench.grid import Cell, Grid
from bench.interrupt import Interrupted, StopRequest
from bench.locks import RunLock
from bench.metrics import evaluated_classes, multilabel_metrics
from bench.progress import Progress, Task
from bench.registry import PROJECT_ROOT, build_head
from bench.throughput import PeakMemory, head_cost
from bench.train import Classifier, HeadOnly, lr_factor, make_loss, make_optimizer, predict, train_epoch


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


def _broadcast(accelerator: Accelerator, value: Any) -> Any:
    box = [value]
    if accelerator.num_processes > 1:
        broadcast_object_list(box, from_process=0)
    return box[0]


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
        bs = cell.recipe["batch_size"]
        if bs % store.accelerator.num_processes:
            raise UsageError(
                f"{grid.path}: recipe batch_size = {bs} is global and must be divisible by the "
                f"number of processes ({store.accelerator.num_processes})"
            )


def _eval_batch_size(recipe: dict[str, Any], processes: int) -> int:
    """The recipe's evaluation batch size rounded down to a multiple of the process count."""
    return max(processes, recipe["eval_batch_size"] - recipe["eval_batch_size"] % processes)


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
        "protocol": cell.recipe["protocol"],
        "epochs": cell.recipe["epochs"],
        "image_size": cell.recipe["image_size"],
        "batch_size": cell.recipe["batch_size"],
        "recipe": cell.recipe,
        "recipe_preset": cell.recipe_preset,
        "config": cell.config(),
        "world_size": accelerator.num_processes,
        "device": _device_name(accelerator.device),
        "mixed_precision": cell.recipe["mixed_precision"],
        "host": socket.gethostname(),
        "git_commit": git_commit(),
    }


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


@dataclass
class CellOutcome:
    """What happened to one cell in this launch: ``finished`` or ``failed`` (with the error), or
    the reason it was skipped (see :func:`_claim`)."""

    cell: Cell
    status: str
    row: dict[str, Any] | None = None
    error: str = ""


@dataclass
class GridSummary:
    """Outcomes of all cells of a grid, in grid order; ``interrupted`` if a signal stopped it."""

    outcomes: list[CellOutcome] = field(default_factory=list)
    interrupted: bool = False

    @property
    def trained(self) -> int:
        """Cells run (trained or evaluated) by this launch that finished."""
        return self.count("finished")

    @property
    def failed(self) -> list[CellOutcome]:
        return [o for o in self.outcomes if o.status == "failed"]

    def count(self, status: str) -> int:
        return sum(o.status == status for o in self.outcomes)


def _load_trained(model: Classifier, results_dir: Path, run_id: str, frozen: bool) -> None:
    """Load the weights saved for ``run_id`` into ``model`` (backbone weights may be absent only
    for a frozen backbone, which is rebuilt from its own file)."""
    state = results.load_weights(results_dir, run_id)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or (missing and not (frozen and all(k.startswith("backbone.") for k in missing))):
        raise UsageError(f"saved weights of run {run_id} do not fit its model (missing: {missing[:5]}, unexpected: {unexpected[:5]})")


def build_model(cell: Cell, data: DataSplits, results_dir: Path) -> Classifier:
    """The cell's model: backbone + head, or, for a derived head, the source run's trained model
    with its head replaced by the derived one (``head.adopt(source_head)``)."""
    backbone = build_backbone(cell.backbone, cell.weights)
    head = build_head(cell.head, backbone.out_channels, len(data.classes), data.context, **cell.hparams)
    frozen = cell.recipe["freeze_backbone"] or cell.recipe["protocol"] == "frozen"
    normalize = cell.recipe["input_normalization"] == "backbone"
    if cell.source_run_id is None:
        return Classifier(backbone, head, freeze_backbone=frozen, normalize=normalize)
    source_row = results.run_row(results_dir, cell.source_run_id)
    if source_row.get("status") != "finished":
        raise UsageError(f"head {cell.head!r} reuses run {cell.source_run_id}, which has not finished (status {source_row.get('status')})")
    source_config = json.loads(source_row["config"])["head"]
    source_head = build_head(source_config["name"], backbone.out_channels, len(data.classes), data.context, **source_config["hparams"])
    model = Classifier(backbone, source_head, freeze_backbone=frozen, normalize=normalize)
    _load_trained(model, results_dir, cell.source_run_id, frozen)
    head.adopt(source_head)
    model.head = head
    return model


@dataclass
class RunContext:
    """What every cell of one grid launch shares."""

    grid: Grid
    store: DataStore
    accelerator: Accelerator
    progress: Progress
    results_dir: Path
    stop: StopRequest
    checkpoint: bool = True


@dataclass
class TrainingRecord:
    """Totals over all epochs of a run, carried across a resume."""

    seconds: float = 0.0
    images: int = 0
    losses: list[float] = field(default_factory=list)


@dataclass
class Inputs:
    """What the trained module sees: datasets, and how a loader batch becomes its input."""

    train: ArrayItems
    test: ArrayItems
    prepare_train: Callable[[torch.Tensor, torch.Generator], torch.Tensor]
    prepare_eval: Callable[[torch.Tensor], torch.Tensor]
    feature_shape: tuple[int, int, int]


def _inputs(cell: Cell, model: Classifier, data: DataSplits, ctx: RunContext) -> tuple[nn.Module, Inputs]:
    """The module to train and its inputs: the whole model on augmented cached images
    (``finetune``), or the head alone on cached backbone features (``frozen``)."""
    recipe, device = cell.recipe, ctx.accelerator.device
    if recipe["protocol"] == "frozen":
        train_f, test_f = (ctx.store.features(cell, split, model, ctx.progress) for split in ("train", "test"))
        to_device = lambda f: f.to(device)  # noqa: E731
        return HeadOnly(model.head), Inputs(
            FeatureDataset(train_f), FeatureDataset(test_f), lambda f, _g: to_device(f), to_device, tuple(train_f.features.shape[1:])
        )

    def prepare_train(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return augment(images.to(device), recipe["augment"], generator, recipe["crop_scale_min"])

    feature_shape = ctx.store.feature_shape(cell, model)
    return model, Inputs(
        image_cache.CachedImages(data.train), image_cache.CachedImages(data.test), prepare_train,
        lambda images: to_float(images.to(device)), feature_shape,
    )


def _train(module: nn.Module, inputs: Inputs, test_loader: Any, cell: Cell, ctx: RunContext, lock: RunLock | None) -> tuple[Any, Any, TrainingRecord, Task]:
    """Train ``module`` for the recipe's epochs, resuming from the run's last epoch checkpoint.

    Returns the prepared module and test loader, the training totals, and the progress bar (the
    evaluation advances it too).
    """
    accelerator, recipe = ctx.accelerator, cell.recipe
    optimizer = make_optimizer(getattr(module, "backbone", None), module.head, recipe)
    shuffle = torch.Generator()
    train_loader = array_loader(inputs.train, batch_size=recipe["batch_size"], shuffle=True, generator=shuffle)
    steps_per_epoch = len(train_loader)  # global batches: accelerate splits each across processes
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, steps_per_epoch, recipe))
    module, optimizer, train_loader, test_loader, scheduler = accelerator.prepare(module, optimizer, train_loader, test_loader, scheduler)
    loss_fn = make_loss(recipe)
    augmenter = torch.Generator()

    record, first_epoch = TrainingRecord(), 0
    checkpoints = EpochCheckpoints(ctx.results_dir, cell.run_id, accelerator)
    found = _broadcast(accelerator, checkpoints.latest() if accelerator.is_main_process and ctx.checkpoint else None)
    if found is not None:
        folder, saved = found
        checkpoints.load(folder)
        record = TrainingRecord(saved["seconds"], saved["images"], saved["losses"])
        first_epoch = saved["epoch"] + 1
        ctx.progress.log(f"resuming {cell.describe()} from its checkpoint after {first_epoch} of {recipe['epochs']} epochs")

    def on_step() -> None:
        task.advance()
        if lock is not None:
            lock.refresh()

    task = ctx.progress.add(cell.describe(), total=recipe["epochs"] * steps_per_epoch + len(test_loader))
    task.advance(first_epoch * steps_per_epoch)
    for epoch in range(first_epoch, recipe["epochs"]):
        # Each epoch's shuffle and augmentation depend only on (seed, epoch, process), so a
        # resumed run sees exactly the batches an uninterrupted one would have seen.
        shuffle.manual_seed(cell.seed * 100_003 + epoch)
        augmenter.manual_seed((cell.seed * 100_003 + epoch) * 1_009 + accelerator.process_index)
        stats = train_epoch(
            module, train_loader, optimizer, scheduler, loss_fn, accelerator, lambda x: inputs.prepare_train(x, augmenter),
            recipe["grad_clip"], on_step=on_step, should_stop=lambda: ctx.stop.requested,
        )
        record.seconds += stats.seconds
        record.images += stats.images
        record.losses.append(stats.loss)
        if ctx.checkpoint and epoch + 1 < recipe["epochs"]:
            checkpoints.save(epoch, {"seconds": record.seconds, "images": record.images, "losses": record.losses})
    return module, test_loader, record, task


def run_cell(cell: Cell, ctx: RunContext, lock: RunLock | None = None) -> dict[str, Any]:
    """Train (unless the head is derived) and evaluate one cell; return its row (written by the caller)."""
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    wall_start = time.perf_counter()
    accelerator, recipe = ctx.accelerator, cell.recipe
    memory = PeakMemory(accelerator.device)
    memory.reset()
    data = ctx.store.splits(cell, ctx.progress)

    set_seed(cell.seed)
    model = build_model(cell, data, ctx.results_dir)
    module, inputs = _inputs(cell, model, data, ctx)
    test_loader = array_loader(inputs.test, batch_size=_eval_batch_size(recipe, accelerator.num_processes))
    if cell.source_run_id is None:
        module, test_loader, record, task = _train(module, inputs, test_loader, cell, ctx, lock)
    else:
        module, test_loader = accelerator.prepare(module, test_loader)
        record = TrainingRecord()
        task = ctx.progress.add(cell.describe(), total=len(test_loader))
    preds = predict(module, test_loader, accelerator, inputs.prepare_eval, on_step=task.advance)
    task.done()

    row = base_row(cell, ctx.grid.name, accelerator)
    unwrapped = accelerator.unwrap_model(module)
    row.update(
        status="finished",
        started_at=started,
        source_run_id=cell.source_run_id,
        num_classes=len(data.classes),
        classes=data.classes,
        train_images=len(data.train.targets),
        test_images=len(data.test.targets),
        skipped_images=len(data.train.skipped) + len(data.test.skipped),
        final_train_loss=record.losses[-1] if record.losses else float("nan"),
        train_images_per_s=record.images / record.seconds if record.seconds else float("nan"),
        eval_images_per_s=len(preds.scores) / preds.seconds if preds.seconds else float("nan"),
        total_params=sum(p.numel() for p in model.parameters()),
        backbone_flops=ctx.store.backbone_flops(cell, model),
        weights_origin=model.backbone.origin,
        input_mean=model.mean.flatten().tolist(),
        input_std=model.std.flatten().tolist(),
        feature_shape=list(inputs.feature_shape),
    )
    if accelerator.is_main_process:
        cost = head_cost(unwrapped.head, inputs.feature_shape, accelerator.device)
        row.update(head_params=cost.params, head_flops=cost.flops, head_latency_b1_ms=cost.latency_b1_ms, head_latency_b64_ms=cost.latency_b64_ms)
        row["classes_evaluated"] = int(evaluated_classes(preds.targets, preds.ignore).sum())
        row.update(multilabel_metrics(preds.scores, preds.targets, preds.ignore))
        results.save_scores(ctx.results_dir, cell.run_id, data.test.image_ids, preds.scores, preds.targets, preds.ignore, data.classes)
        save = ctx.grid.run.get("save_weights", "all")
        if save != "none":
            state = unwrapped.state_dict()
            if save == "head":
                state = {k: v for k, v in state.items() if k.startswith("head.")}
            results.save_weights(ctx.results_dir, cell.run_id, state)
    row.update(peak_memory_mib=memory.peak_mib(), peak_memory_kind=memory.kind)
    row["wall_s"] = time.perf_counter() - wall_start
    row["finished_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return row


def _claim(cell: Cell, results_dir: Path, retry_failed: bool) -> tuple[str, RunLock | None]:
    """Main process: decide what to do with a cell — ``run`` (with its lock held), or a reason to
    skip: ``already-finished``, ``failed-before`` (not retried without ``--retry-failed``), ``not-failed``
    (with ``--retry-failed``), or ``claimed`` (another launch is training it)."""
    status = results.run_status(results_dir, cell.run_id)
    if status == "finished":
        return "already-finished", None
    if retry_failed and status != "failed":
        return "not-failed", None
    if status == "failed" and not retry_failed:
        return "failed-before", None
    lock = RunLock(results_dir, cell.run_id)
    if not lock.acquire():
        return "claimed", None
    if results.run_status(results_dir, cell.run_id) == "finished":  # finished while we looked
        lock.release()
        return "already-finished", None
    return "run", lock


def _failed_row(cell: Cell, grid: Grid, accelerator: Accelerator, exc: BaseException) -> dict[str, Any]:
    row = base_row(cell, grid.name, accelerator)
    row.update(
        status="failed",
        error_type=type(exc).__name__,
        error=str(exc)[:2000],
        traceback=traceback.format_exc()[-4000:],
        finished_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    return row


def _any_process(accelerator: Accelerator, flag: bool) -> bool:
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
    """Run every cell of ``grid`` that is neither finished nor claimed by another launch.

    A cell that raises is recorded as a ``failed`` row and the grid goes on; a stop signal ends
    the grid after the current training step (``summary.interrupted``), leaving the run's last
    epoch checkpoint for the next launch.
    """
    store = DataStore(accelerator)
    if accelerator.is_main_process:
        results.check_writable(results_dir)
    preflight(grid, store)
    # accelerator.free_memory() after each cell runs gc.collect(); moving the long-lived objects
    # (modules, imported libraries, datasets' label arrays) out of the collector's generations
    # makes that a sweep of one cell's garbage instead of ~0.2 s over everything.
    gc.freeze()
    ctx = RunContext(grid, store, accelerator, progress, results_dir, stop, grid.run.get("checkpoint", "epoch") == "epoch")
    summary = GridSummary()
    for cell in grid.cells:
        if _any_process(accelerator, stop.requested):
            summary.interrupted = True
            break
        decision, lock = _claim(cell, results_dir, retry_failed) if accelerator.is_main_process else ("", None)
        decision = _broadcast(accelerator, decision)
        if decision != "run":
            summary.outcomes.append(CellOutcome(cell, decision))
            continue
        try:
            row = run_cell(cell, ctx, lock)
        except Interrupted:
            summary.interrupted = True
            break
        except Exception as exc:  # noqa: BLE001 - any failure of one run is recorded, the grid goes on
            row = _failed_row(cell, grid, accelerator, exc)
        finally:
            accelerator.free_memory()
            if lock is not None and summary.interrupted:
                lock.release()
        if accelerator.is_main_process:
            results.write_row(results_dir, row)
            if row["status"] == "finished":
                EpochCheckpoints(results_dir, cell.run_id, accelerator).remove()
            if lock is not None:
                lock.release()
        summary.outcomes.append(CellOutcome(cell, row["status"], row, row.get("error", "")))
    return summary


def evaluate_run(run_id: str, results_dir: Path, accelerator: Accelerator, data_root: str | None = None) -> dict[str, float]:
    """Re-evaluate a finished run's saved weights on its test split; return the metrics."""
    row = results.run_row(results_dir, run_id)
    cell = Cell.from_config(json.loads(row["config"]), root=data_root or row.get("data_root"))
    data = DataStore(accelerator).splits(cell)
    set_seed(cell.seed)  # a random-init backbone is redrawn exactly as in training
    backbone = build_backbone(cell.backbone, cell.weights)
    head = build_head(cell.head, backbone.out_channels, len(data.classes), data.context, **cell.hparams)
    model = Classifier(backbone, head, normalize=cell.recipe.get("input_normalization", "backbone") == "backbone")
    _load_trained(model, results_dir, run_id, frozen=row.get("protocol") == "frozen")
    loader = array_loader(image_cache.CachedImages(data.test), batch_size=_eval_batch_size(cell.recipe, accelerator.num_processes))
    model, loader = accelerator.prepare(model, loader)
    device = accelerator.device
    preds = predict(model, loader, accelerator, lambda images: to_float(images.to(device)))
    return multilabel_metrics(preds.scores, preds.targets, preds.ignore)
