"""Model selection: which epoch's weights a run keeps (recipe key ``select``; docs/model-selection.md).

- ``last``: the weights after the final epoch (no extra evaluation).
- ``best_val``: a validation split is carved from the training split (:func:`holdout`: the fraction
  ``val_fraction`` of its images, chosen from the images' ids alone, so every head and seed of a
  dataset holds out the same images and runs stay paired); those images are removed from training.
  After every epoch the model is scored on them (mAP, SPEC §1) and the weights of the epoch with the
  best validation mAP are kept; the test split is read once, after training.
- ``best_test``: after every epoch the model is scored on the TEST split and the best epoch is kept,
  as the papers' released code did. Allowed so their numbers can be reproduced; the selection has
  seen the test labels, so the reported test mAP is optimistic.

:class:`EpochSelector` does the per-epoch scoring and keeps the best weights; its record (scores so
far, best epoch) and the best weights are saved with every epoch checkpoint, so a killed run
resumes with them.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file
from torch import nn

from bench.core.errors import DataError
from bench.data.feature_cache import FeatureSplit
from bench.data.image_cache import CachedSplit
from bench.engine.loop import Predictions, predict
from bench.eval.metrics import average_precision, evaluated_classes

#: the best epoch's weights inside an epoch checkpoint folder (bench.engine.checkpoints)
BEST_WEIGHTS = "selection_best.safetensors"


# ----------------------------------------------------------------------------------------------
# The validation split
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Holdout:
    """Rows of a training split (indices into its readable images): the ones kept for training and
    the ones held out for validation. Both ascending, disjoint, together every row."""

    train_rows: np.ndarray  # int64 [N - V]
    val_rows: np.ndarray  # int64 [V]


def validation_count(n: int, fraction: float, where: str) -> int:
    """``round(fraction * n)`` held-out images; an error when that leaves no image on one side."""
    count = int(math.floor(fraction * n + 0.5))
    if not 1 <= count <= n - 1:
        raise DataError(
            f"{where}: val_fraction = {fraction} of {n} training images holds out {count}; it must leave at least "
            f"one image for validation and one for training (choose val_fraction in [{1 / n:.3g}, {1 - 1 / n:.3g}])"
        )
    return count


def holdout(dataset: str, split: str, image_ids: list[str], fraction: float) -> Holdout:
    """The validation rows of a training split.

    Every image is ranked by ``sha256(dataset, split, image id)`` and the first
    ``round(fraction * N)`` are held out. The choice depends on nothing else: not the run's seed,
    the head, the image size, the dataset's options or the files' modification times, so every run
    on the dataset holds out the same images (and a copy of the data on another machine too).

    Args:
        dataset: the registered dataset name; split: the training split's name.
        image_ids: the ids of the split's readable images, in row order (length N).
        fraction: the recipe's ``val_fraction``, in (0, 1).
    """
    n = len(image_ids)
    count = validation_count(n, fraction, f"dataset {dataset!r} split {split!r}")
    prefix = f"{dataset}\x1f{split}\x1f".encode()
    ranks = [hashlib.sha256(prefix + image_id.encode()).digest() for image_id in image_ids]
    order = sorted(range(n), key=lambda i: (ranks[i], image_ids[i]))
    val = np.sort(np.asarray(order[:count], dtype=np.int64))
    train = np.setdiff1d(np.arange(n, dtype=np.int64), val)
    return Holdout(train, val)


class RowView:
    """Rows ``rows`` of an array [N, ...] (typically a memory map of cached images or features),
    read through without copying the whole subset: ``view[i]`` is ``base[rows[i]]``.

    Supports what the loaders and caches use: ``len``, ``shape``, ``dtype``, ``ndim`` and indexing
    by an int, a slice or an integer array (the result is a NumPy array, as for the base).
    """

    def __init__(self, base: Any, rows: np.ndarray) -> None:
        self.base, self.rows = base, np.asarray(rows, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.rows), *self.base.shape[1:])

    @property
    def dtype(self) -> np.dtype:
        return self.base.dtype

    @property
    def ndim(self) -> int:
        return self.base.ndim

    def __getitem__(self, index: Any) -> np.ndarray:
        if isinstance(index, (int, np.integer)):
            return self.base[int(self.rows[index])]
        return self.base[self.rows[index]]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self.base[self.rows]
        return out if dtype is None else out.astype(dtype)


def cached_rows(split: CachedSplit, rows: np.ndarray, keep_skipped: bool) -> CachedSplit:
    """The images ``rows`` of a cached split (a view; ``skipped`` kept only where asked, so the
    split's unreadable images are counted once)."""
    return CachedSplit(
        images=RowView(split.images, rows),  # type: ignore[arg-type]
        targets=np.asarray(split.targets)[rows],
        ignore=np.asarray(split.ignore)[rows],
        image_ids=[split.image_ids[i] for i in rows],
        skipped=list(split.skipped) if keep_skipped else [],
    )


def feature_rows(split: FeatureSplit, rows: np.ndarray) -> FeatureSplit:
    """The features of images ``rows`` (a view of the cached feature file)."""
    return FeatureSplit(
        features=RowView(split.features, rows),  # type: ignore[arg-type]
        targets=np.asarray(split.targets)[rows],
        ignore=np.asarray(split.ignore)[rows],
        image_ids=[split.image_ids[i] for i in rows],
    )


def check_validation_labels(val: CachedSplit, dataset: str, fraction: float) -> None:
    """A validation split without any positive label cannot rank epochs: say so before training."""
    if not evaluated_classes(val.targets, val.ignore).any():
        raise DataError(
            f"dataset {dataset!r}: the {len(val.targets)} validation images (val_fraction = {fraction}) hold no "
            f"positive label, so their mAP is undefined; raise val_fraction"
        )


# ----------------------------------------------------------------------------------------------
# Per-epoch selection
# ----------------------------------------------------------------------------------------------


def mean_average_precision(preds: Predictions) -> float:
    """SPEC §1 mAP: mean AP over the classes with a positive, non-ignored target (without the
    per-call warning of :func:`bench.eval.metrics.multilabel_metrics`, which would repeat every epoch)."""
    evaluated = evaluated_classes(preds.targets, preds.ignore)
    if not evaluated.any():
        return float("nan")
    return float(average_precision(preds.scores, preds.targets, preds.ignore)[evaluated].mean())


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in module.state_dict().items()}


@dataclass
class SelectionResult:
    """What a row records about the selection (see bench/results/schema.py)."""

    select: str
    selected_epoch: int | None  # 1-based
    val_mAP: float
    val_images: int
    selection_mAP: list[float] | None = None

    def row(self) -> dict[str, Any]:
        return {
            "select": self.select, "selected_epoch": self.selected_epoch, "val_mAP": self.val_mAP,
            "val_images": self.val_images, "selection_mAP": self.selection_mAP,
        }


@dataclass
class EpochSelector:
    """Scores the model on the selecting split after every epoch and keeps the best epoch's weights.

    ``make_loader`` builds the (prepared) loader of the selecting split the first time it is needed:
    for ``best_val`` the validation images, for ``best_test`` the test split (so that a
    ``best_test`` run reads the test split only once its first epoch is trained, and a ``last`` or
    ``best_val`` run never through this class). An epoch replaces the best only when its score is
    strictly higher: ties keep the earlier epoch.
    """

    mode: str
    accelerator: Accelerator
    make_loader: Callable[[], Any] | None = None
    prepare_eval: Callable[[torch.Tensor], torch.Tensor] | None = None
    val_images: int = 0
    scores: list[float] = field(default_factory=list)
    best_epoch: int | None = None  # 1-based
    best_state: dict[str, torch.Tensor] | None = None
    _loader: Any = None

    @property
    def active(self) -> bool:
        return self.mode != "last"

    def after_epoch(self, epoch: int, module: nn.Module, task: Any = None) -> None:
        """Score ``module`` after 0-based ``epoch``; keep its weights (on the CPU) if it is the best."""
        if not self.active:
            return
        if len(self.scores) != epoch:
            raise RuntimeError(f"selection has {len(self.scores)} epoch scores before epoch {epoch + 1} (a bug)")
        if self._loader is None:
            self._loader = self.make_loader()
        if task is not None:
            task.grow(len(self._loader))
        preds = predict(module, self._loader, self.accelerator, self.prepare_eval, on_step=task.advance if task is not None else None)
        self.score_epoch(epoch, preds, module)

    def score_epoch(self, epoch: int, preds: Predictions, module: nn.Module) -> None:
        """Record 0-based ``epoch``'s predictions on the selecting split; keep ``module``'s weights
        if it is the best so far (also used by bench.engine.group, which predicts for all heads of
        a group in one pass)."""
        if len(self.scores) != epoch:
            raise RuntimeError(f"selection has {len(self.scores)} epoch scores before epoch {epoch + 1} (a bug)")
        # every process holds the gathered predictions, so all take the same decision
        score = mean_average_precision(preds)
        self.scores.append(score)
        best = self.scores[self.best_epoch - 1] if self.best_epoch is not None else -math.inf
        if score > best:
            self.best_epoch = epoch + 1
            self.best_state = _snapshot(self.accelerator.unwrap_model(module))

    def restore(self, module: nn.Module) -> None:
        """Load the best epoch's weights into ``module`` (nothing for ``last``)."""
        if self.active and self.best_state is not None:
            self.accelerator.unwrap_model(module).load_state_dict(self.best_state)

    # -- epoch checkpoints ---------------------------------------------------------------------

    def record(self) -> dict[str, Any]:
        """The JSON-able part saved in the checkpoint's progress record."""
        return {"selection": {"select": self.mode, "scores": self.scores, "best_epoch": self.best_epoch}} if self.active else {}

    def save(self, folder: Path) -> None:
        """Write the best weights into a checkpoint folder being saved (main process)."""
        if self.active and self.best_state is not None:
            save_file(self.best_state, str(Path(folder) / BEST_WEIGHTS))

    def resume(self, progress: dict[str, Any], folder: Path) -> None:
        """Take up the scores, best epoch and best weights saved with a checkpoint (every process)."""
        if not self.active:
            return
        saved = progress.get("selection")
        if not saved or saved.get("select") != self.mode:
            raise DataError(f"epoch checkpoint {folder} has no model-selection record for select = {self.mode!r}; delete it to retrain")
        self.scores = [float(s) for s in saved["scores"]]
        self.best_epoch = saved["best_epoch"]
        if self.best_epoch is not None:
            path = Path(folder) / BEST_WEIGHTS
            if not path.is_file():
                raise DataError(f"epoch checkpoint {folder} lacks the best epoch's weights ({BEST_WEIGHTS}); delete it to retrain")
            self.best_state = load_file(str(path))

    def derived(self, module: nn.Module, source_epoch: int, task: Any = None) -> SelectionResult:
        """The selection of a derived (training-free) head: it keeps its source run's epoch; under
        ``best_val`` its own validation mAP is measured (the test split is not read here)."""
        val_map = float("nan")
        if self.mode == "best_val":
            loader = self.make_loader()
            if task is not None:
                task.grow(len(loader))
            preds = predict(module, loader, self.accelerator, self.prepare_eval, on_step=task.advance if task is not None else None)
            val_map = mean_average_precision(preds)
        return SelectionResult(self.mode, int(source_epoch), val_map, self.val_images, None)

    def result(self, epochs: int) -> SelectionResult:
        """The row's selection fields after training ``epochs`` epochs."""
        if not self.active:
            return SelectionResult("last", epochs, float("nan"), 0)
        val_map = self.scores[self.best_epoch - 1] if self.mode == "best_val" and self.best_epoch is not None else float("nan")
        return SelectionResult(self.mode, self.best_epoch, val_map, self.val_images, list(self.scores))
