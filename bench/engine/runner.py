"""Run a grid: for each cell, skip it if done, else build, train, evaluate and write its row.

Every process of an ``accelerate launch`` runs this loop in step; the main process decides what
to skip (and broadcasts it), writes rows and weights, and shows progress. Before any training,
:func:`preflight` builds each distinct dataset, backbone and head once, so a bad name, a bad
hyper-parameter value, a missing data root or a weights file that does not fit is reported
(exit status 2) before hours are spent on the cells that come first.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, set_seed
from torch import nn

from bench.api.context import HeadContext
from bench.api.registry import build_head
from bench.config.grid import Cell, Grid
from bench.core.errors import DataError, UsageError
from bench.data import image_cache
from bench.data.augment import augment, to_float
from bench.data.batched_arrays import ArrayItems, array_loader
from bench.data.feature_cache import FeatureDataset
from bench.engine.checkpoints import EpochCheckpoints
from bench.engine.data_store import DataSplits, DataStore
from bench.engine.group import HeadsTogether
from bench.engine.interrupt import Interrupted, StopRequest
from bench.engine.loop import make_loss, predict, train_epoch
from bench.engine.optim import lr_factor, make_optimizer
from bench.engine.progress import Progress, Task
from bench.engine.rows import base_row, finished_row, now, write_outputs
from bench.engine.selection import EpochSelector, SelectionResult, validation_count
from bench.eval.head_cost import PeakMemory
from bench.eval.metrics import multilabel_metrics
from bench.models.backbones import build_backbone
from bench.models.classifier import Classifier, HeadOnly
from bench.results import store as results
from bench.results.locks import RunLock


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
        if cell.recipe.select == "best_val":
            validation_count(len(store.dataset(cell, cell.train_split)), cell.recipe.val_fraction, f"{grid.path}: dataset {cell.dataset!r}")
        bs = cell.recipe.batch_size
        if bs % store.accelerator.num_processes:
            raise UsageError(
                f"{grid.path}: recipe batch_size = {bs} is global and must be divisible by the "
                f"number of processes ({store.accelerator.num_processes})"
            )


def _eval_batch_size(recipe: dict[str, Any], processes: int) -> int:
    """The recipe's evaluation batch size rounded down to a multiple of the process count."""
    return max(processes, recipe.eval_batch_size - recipe.eval_batch_size % processes)


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
    frozen = cell.recipe.freeze_backbone or cell.recipe.protocol == "frozen"
    normalize = cell.recipe.input_normalization == "backbone"
    if cell.source_run_id is None:
        return Classifier(backbone, head, freeze_backbone=frozen, normalize=normalize)
    source_row = results.run_row(results_dir, cell.source_run_id)
    if source_row.get("status") != "finished":
        raise UsageError(f"head {cell.head!r} reuses run {cell.source_run_id}, which has not finished (status {source_row.get('status')})")
    source_config = _config(source_row)["head"]
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
    selection: SelectionResult | None = None  # the kept epoch (bench.engine.selection)


@dataclass
class Inputs:
    """What the trained module sees: datasets, and how a loader batch becomes its input.

    ``test`` is built on first use, so a run reads the test split only when it evaluates it (after
    training, or after every epoch for ``select = "best_test"``); ``val``: the held-out validation
    images of ``select = "best_val"`` (else None)."""

    train: ArrayItems
    load_test: Callable[[], ArrayItems]
    prepare_train: Callable[[torch.Tensor, torch.Generator], torch.Tensor]
    prepare_eval: Callable[[torch.Tensor], torch.Tensor]
    feature_shape: tuple[int, int, int]
    val: ArrayItems | None = None

    @functools.cached_property
    def test(self) -> ArrayItems:
        return self.load_test()


def _inputs(cell: Cell, model: Classifier, data: DataSplits, ctx: RunContext) -> tuple[nn.Module, Inputs]:
    """The module to train and its inputs: the whole model on augmented cached images
    (``finetune``), or the head alone on cached backbone features (``frozen``)."""
    recipe, device = cell.recipe, ctx.accelerator.device
    if recipe.protocol == "frozen":
        train_f = ctx.store.features(cell, "train", model, ctx.progress)
        val = FeatureDataset(ctx.store.features(cell, "val", model, ctx.progress)) if data.val is not None else None
        to_device = lambda f: f.to(device)  # noqa: E731
        return HeadOnly(model.head), Inputs(
            FeatureDataset(train_f), lambda: FeatureDataset(ctx.store.features(cell, "test", model, ctx.progress)),
            lambda f, _g: to_device(f), to_device, tuple(train_f.features.shape[1:]), val,
        )

    def prepare_train(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return augment(images.to(device), recipe.augment, generator, recipe.crop_scale_min)

    feature_shape = ctx.store.feature_shape(cell, model)
    return model, Inputs(
        image_cache.CachedImages(data.train), lambda: image_cache.CachedImages(data.test), prepare_train,
        lambda images: to_float(images.to(device)), feature_shape,
        image_cache.CachedImages(data.val) if data.val is not None else None,
    )


def _selector(cell: Cell, inputs: Inputs, ctx: RunContext) -> EpochSelector:
    """The cell's model selection (recipe ``select``), scoring the validation images or the test split."""
    accelerator, mode = ctx.accelerator, cell.recipe.select
    items = {"best_val": lambda: inputs.val, "best_test": lambda: inputs.test}.get(mode)
    batch_size = _eval_batch_size(cell.recipe, accelerator.num_processes)
    make_loader = (lambda: accelerator.prepare(array_loader(items(), batch_size=batch_size))) if items is not None else None
    return EpochSelector(mode, accelerator, make_loader, inputs.prepare_eval, len(inputs.val) if inputs.val is not None else 0)


def _train(module: nn.Module, inputs: Inputs, cell: Cell, ctx: RunContext, lock: RunLock | None) -> tuple[Any, TrainingRecord, Task]:
    """Train ``module`` for the recipe's epochs, resuming from the run's last epoch checkpoint,
    and load the weights of the epoch the recipe's ``select`` keeps.

    Returns the prepared module, the training totals (with the selection), and the progress bar
    (the evaluation advances it too).
    """
    accelerator, recipe = ctx.accelerator, cell.recipe
    optimizer = make_optimizer(getattr(module, "backbone", None), module.head, recipe)
    shuffle = torch.Generator()
    train_loader = array_loader(inputs.train, batch_size=recipe.batch_size, shuffle=True, generator=shuffle)
    steps_per_epoch = len(train_loader)  # global batches: accelerate splits each across processes
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, steps_per_epoch, recipe))
    module, optimizer, train_loader, scheduler = accelerator.prepare(module, optimizer, train_loader, scheduler)
    selector = _selector(cell, inputs, ctx)
    loss_fn = make_loss(recipe)
    augmenter = torch.Generator()

    record, first_epoch = TrainingRecord(), 0
    checkpoints = EpochCheckpoints(ctx.results_dir, cell.run_id, accelerator)
    found = _broadcast(accelerator, checkpoints.latest() if accelerator.is_main_process and ctx.checkpoint else None)
    if found is not None:
        folder, saved = found
        checkpoints.load(folder)
        record = TrainingRecord(saved["seconds"], saved["images"], saved["losses"])
        selector.resume(saved, folder)
        first_epoch = saved["epoch"] + 1
        ctx.progress.log(f"resuming {cell.describe()} from its checkpoint after {first_epoch} of {recipe.epochs} epochs")

    def on_step() -> None:
        task.advance()
        if lock is not None:
            lock.refresh()

    task = ctx.progress.add(cell.describe(), total=recipe.epochs * steps_per_epoch)
    task.advance(first_epoch * steps_per_epoch)
    for epoch in range(first_epoch, recipe.epochs):
        # Each epoch's shuffle and augmentation depend only on (seed, epoch, process), so a
        # resumed run sees exactly the batches an uninterrupted one would have seen.
        shuffle.manual_seed(cell.seed * 100_003 + epoch)
        augmenter.manual_seed((cell.seed * 100_003 + epoch) * 1_009 + accelerator.process_index)
        stats = train_epoch(
            module, train_loader, optimizer, scheduler, loss_fn, accelerator, lambda x: inputs.prepare_train(x, augmenter),
            recipe.grad_clip, on_step=on_step, should_stop=lambda: ctx.stop.requested,
        )
        record.seconds += stats.seconds
        record.images += stats.images
        record.losses.append(stats.loss)
        selector.after_epoch(epoch, module, task)
        if ctx.checkpoint and epoch + 1 < recipe.epochs:
            progress = {"seconds": record.seconds, "images": record.images, "losses": record.losses, **selector.record()}
            checkpoints.save(epoch, progress, extra=selector.save)
    selector.restore(module)
    record.selection = selector.result(recipe.epochs)
    return module, record, task


def run_cell(cell: Cell, ctx: RunContext, lock: RunLock | None = None) -> dict[str, Any]:
    """Train (unless the head is derived) and evaluate one cell; return its row (written by the caller)."""
    started = now()
    wall_start = time.perf_counter()
    accelerator, recipe = ctx.accelerator, cell.recipe
    memory = PeakMemory(accelerator.device)
    memory.reset()
    data = ctx.store.splits(cell, ctx.progress)

    set_seed(cell.seed)
    model = build_model(cell, data, ctx.results_dir)
    module, inputs = _inputs(cell, model, data, ctx)
    if cell.source_run_id is None:
        module, record, task = _train(module, inputs, cell, ctx, lock)
    else:
        module = accelerator.prepare(module)
        task = ctx.progress.add(cell.describe(), total=0)
        source_epoch = results.run_row(ctx.results_dir, cell.source_run_id).get("selected_epoch")
        record = TrainingRecord(selection=_selector(cell, inputs, ctx).derived(module, source_epoch or recipe.epochs, task))
    # the test split is read from here on: after training and model selection (docs/model-selection.md)
    test_loader = accelerator.prepare(array_loader(inputs.test, batch_size=_eval_batch_size(recipe, accelerator.num_processes)))
    task.grow(len(test_loader))
    with finite_outputs(accelerator.unwrap_model(module), cell.describe()):
        preds = predict(module, test_loader, accelerator, inputs.prepare_eval, on_step=task.advance)
    task.done()

    unwrapped = accelerator.unwrap_model(module)
    row = finished_row(
        cell, ctx.grid.name, accelerator, started=started, data=data, record=record, preds=preds, model=model,
        feature_shape=inputs.feature_shape, total_params=sum(p.numel() for p in model.parameters()),
        backbone_flops=ctx.store.backbone_flops(cell, model), source_run_id=cell.source_run_id,
    )
    write_outputs(
        row, ctx, cell, data=data, preds=preds, head=unwrapped.head, feature_shape=inputs.feature_shape,
        state_dict=unwrapped.state_dict, memory=memory,
    )
    row["wall_s"] = time.perf_counter() - wall_start
    row["finished_at"] = now()
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
    if cell.source_run_id is not None:
        waiting = _source_pending(cell, results_dir)
        if waiting is not None:
            return waiting, None
    lock = RunLock(results_dir, cell.run_id)
    if not lock.acquire():
        return "claimed", None
    if results.run_status(results_dir, cell.run_id) == "finished":  # finished while we looked
        lock.release()
        return "already-finished", None
    return "run", lock


def _source_pending(cell: Cell, results_dir: Path) -> str | None:
    """Main process, for a derived head: why it cannot run now, or None when its source run has a
    row (finished; or failed, and then the derived run fails naming that status).

    ``claimed``: another launch holds the source; it runs this cell right after it (the source
    always comes just before its derived cells), so this launch leaves it to that one instead of
    recording a false failure. ``source-unfinished``: the source has no row and nobody holds it
    (its launch was stopped); the next launch of the grid runs both. The lock is looked at before
    the row: the holder writes the row before it releases the lock, so a finished source is never
    missed.
    """
    if RunLock(results_dir, cell.source_run_id).is_claimed():
        return "claimed"
    if results.run_status(results_dir, cell.source_run_id) is None:
        return "source-unfinished"
    return None


class NonFiniteScores(RuntimeError):
    """The model's outputs at evaluation hold NaN or infinite values; the run fails."""


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


def _config(row: dict[str, Any]) -> dict[str, Any]:
    """A row's resolved configuration (decoded by the row schema; JSON text in rows read raw)."""
    config = row["config"]
    return json.loads(config) if isinstance(config, str) else config


def _failed_row(cell: Cell, grid: Grid, accelerator: Accelerator, exc: BaseException) -> dict[str, Any]:
    row = base_row(cell, grid.name, accelerator)
    row.update(
        status="failed",
        error_type=type(exc).__name__,
        error=str(exc)[:2000],
        traceback=traceback.format_exc()[-4000:],
        finished_at=now(),
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
    together = None
    if grid.run.get("heads_together", True):  # frozen backbone: each cell group's heads in one pass
        together = HeadsTogether(grid, ctx, retry_failed, steps=sys.modules[__name__])  # this module's per-cell steps
    for cell in grid.cells:
        if _any_process(accelerator, stop.requested):
            summary.interrupted = True
            break
        if together is not None and (together.takes(cell, summary) or summary.interrupted):  # trained in its group's pass
            if summary.interrupted:
                break
            continue
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
        except DataError:  # bad data (e.g. a split with no readable image) fails every cell on it: exit 2
            if lock is not None:
                lock.release()
            raise
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
    cell = Cell.from_config(_config(row), root=data_root or row.get("data_root"))
    data = DataStore(accelerator).splits(cell)
    set_seed(cell.seed)  # a random-init backbone is redrawn exactly as in training
    backbone = build_backbone(cell.backbone, cell.weights)
    head = build_head(cell.head, backbone.out_channels, len(data.classes), data.context, **cell.hparams)
    model = Classifier(backbone, head, normalize=cell.recipe.input_normalization == "backbone")
    _load_trained(model, results_dir, run_id, frozen=row.get("protocol") == "frozen")
    loader = array_loader(image_cache.CachedImages(data.test), batch_size=_eval_batch_size(cell.recipe, accelerator.num_processes))
    model, loader = accelerator.prepare(model, loader)
    device = accelerator.device
    with finite_outputs(accelerator.unwrap_model(model), f"run {run_id}"):
        preds = predict(model, loader, accelerator, lambda images: to_float(images.to(device)))
    return multilabel_metrics(preds.scores, preds.targets, preds.ignore)
