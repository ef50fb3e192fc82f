"""A run's model rebuilt from its configuration and saved weights: for a derived head (which
reuses its source run's trained model) and for re-evaluating a finished run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench.api.registry import build_head
from bench.config.grid import Cell
from bench.core.errors import UsageError
from bench.engine.data_store import DataSplits
from bench.models.backbones import build_backbone
from bench.models.classifier import Classifier
from bench.results import store as results


def run_config(row: dict[str, Any]) -> dict[str, Any]:
    """A row's resolved configuration (decoded by the row schema; JSON text in rows read raw)."""
    config = row["config"]
    return json.loads(config) if isinstance(config, str) else config


def frozen_backbone(cell: Cell) -> bool:
    """Whether the cell's backbone is frozen (``protocol = "frozen"`` or ``freeze_backbone = true``)."""
    return cell.recipe.protocol == "frozen" or cell.recipe.freeze_backbone


def load_trained(model: Classifier, results_dir: Path, run_id: str, frozen: bool) -> None:
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
    frozen = frozen_backbone(cell)
    normalize = cell.recipe.input_normalization == "backbone"
    if cell.source_run_id is None:
        return Classifier(backbone, head, freeze_backbone=frozen, normalize=normalize)
    source_row = results.run_row(results_dir, cell.source_run_id)
    if source_row.get("status") != "finished":
        raise UsageError(f"head {cell.head!r} reuses run {cell.source_run_id}, which has not finished (status {source_row.get('status')})")
    source_config = run_config(source_row)["head"]
    source_head = build_head(source_config["name"], backbone.out_channels, len(data.classes), data.context, **source_config["hparams"])
    model = Classifier(backbone, source_head, freeze_backbone=frozen, normalize=normalize)
    load_trained(model, results_dir, cell.source_run_id, frozen)
    head.adopt(source_head)
    model.head = head
    return model
