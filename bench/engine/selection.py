"""Model selection: which epoch's weights a run keeps (recipe key ``select``; docs/model-selection.md).

- ``last``: the weights after the final epoch (no extra evaluation).
- ``best_val``: a validation split is carved from the training split (bench.data.holdout: the fraction
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

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file
from torch import nn

from bench.core.errors import DataError
from bench.engine.predictions import Predictions
from bench.eval.metrics import average_precision, evaluated_classes

#: the best epoch's weights inside an epoch checkpoint folder (bench.engine.checkpoints)
BEST_WEIGHTS = "selection_best.safetensors"


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
    """Records the model's score on the selecting split after every epoch and keeps the best
    epoch's weights. The pass (bench.engine.trainer) predicts the selecting split: for ``best_val``
    the validation images, for ``best_test`` the test split (read only once the first epoch is
    trained). An epoch replaces the best only when its score is strictly higher: ties keep the
    earlier epoch.
    """

    mode: str
    accelerator: Accelerator
    val_images: int = 0
    scores: list[float] = field(default_factory=list)
    best_epoch: int | None = None  # 1-based
    best_state: dict[str, torch.Tensor] | None = None

    @property
    def active(self) -> bool:
        return self.mode != "last"

    def score_epoch(self, epoch: int, preds: Predictions, module: nn.Module) -> None:
        """Record 0-based ``epoch``'s predictions on the selecting split; keep ``module``'s weights
        if it is the best so far."""
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

    def derived(self, source_epoch: int, val_preds: Predictions | None) -> SelectionResult:
        """The selection of a derived (training-free) head: it keeps its source run's epoch; under
        ``best_val`` its own validation mAP is measured on ``val_preds`` (the test split is not
        read here)."""
        val_map = mean_average_precision(val_preds) if self.mode == "best_val" and val_preds is not None else float("nan")
        return SelectionResult(self.mode, int(source_epoch), val_map, self.val_images, None)

    def result(self, epochs: int) -> SelectionResult:
        """The row's selection fields after training ``epochs`` epochs."""
        if not self.active:
            return SelectionResult("last", epochs, float("nan"), 0)
        val_map = self.scores[self.best_epoch - 1] if self.mode == "best_val" and self.best_epoch is not None else float("nan")
        return SelectionResult(self.mode, self.best_epoch, val_map, self.val_images, list(self.scores))
