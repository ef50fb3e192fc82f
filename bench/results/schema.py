"""The ONE schema of a result row (``runs/<run_id>.parquet``): every column, its type, and which
columns hold JSON. The writer checks a row against it and every reader gets rows decoded by it,
so adding a column is one edit here.
"""

from __future__ import annotations

import json
import math
from typing import Any

import pyarrow as pa

_STR, _INT, _FLOAT, _BOOL = pa.string(), pa.int64(), pa.float64(), pa.bool_()
#: columns whose values are dicts or lists, stored as JSON text and decoded on read
JSON = pa.string()

METRIC_COLUMNS = ("mAP", "CP", "CR", "CF1", "mF1", "OP", "OR", "OF1", "CP_top3", "CR_top3", "CF1_top3", "mF1_top3", "OP_top3", "OR_top3", "OF1_top3")

COLUMNS: dict[str, pa.DataType] = {
    # identity and configuration (bench.engine.rows.base_row)
    "run_id": _STR, "group_id": _STR, "grid": _STR,
    "dataset": _STR, "train_split": _STR, "test_split": _STR, "dataset_options": JSON, "data_root": _STR,
    "backbone": _STR, "weights": _STR, "head": _STR, "hparams": JSON, "seed": _INT,
    "protocol": _STR, "epochs": _INT, "image_size": _INT, "batch_size": _INT,
    "recipe": JSON, "recipe_preset": _STR, "config": JSON,
    "world_size": _INT, "device": _STR, "mixed_precision": _STR, "host": _STR, "git_commit": _STR,
    # outcome
    "status": _STR, "started_at": _STR, "finished_at": _STR, "source_run_id": _STR,
    "error_type": _STR, "error": _STR, "traceback": _STR,
    # data
    "num_classes": _INT, "classes": JSON, "classes_evaluated": _INT,
    "train_images": _INT, "test_images": _INT, "skipped_images": _INT,
    # classes with no positive label in the training split (bench.data.label_checks): scored, never learned
    "train_classes_without_positives": _INT,
    # training, throughput and cost
    "final_train_loss": _FLOAT, "train_images_per_s": _FLOAT, "eval_images_per_s": _FLOAT,
    "total_params": _INT, "backbone_flops": _INT, "head_params": _INT, "head_flops": _INT,
    "head_latency_b1_ms": _FLOAT, "head_latency_b64_ms": _FLOAT,
    "weights_origin": _STR, "input_mean": JSON, "input_std": JSON, "feature_shape": JSON,
    "peak_memory_mib": _FLOAT, "peak_memory_kind": _STR, "wall_s": _FLOAT,
    # heads trained in one shared pass (bench/engine/job.py, trainer.py): {"id", "size", "wall_s"}; null when alone
    "trained_with": JSON,
    # model selection (bench.engine.selection, docs/model-selection.md): the recipe's ``select``, the kept
    # epoch (1-based), its validation mAP (NaN without a validation split), the held-out image count and
    # the per-epoch mAP on the selecting split (validation for best_val, TEST for best_test; null for last)
    "select": _STR, "selected_epoch": _INT, "val_mAP": _FLOAT, "val_images": _INT, "selection_mAP": JSON,
    # observed training labels (bench.api.observe.observe_fields): the dataset option observe, its
    # observe_fraction (null unless "fraction") and the realised share of observed training entries
    "observe": _STR, "observe_fraction": _FLOAT, "observed_fraction": _FLOAT,
    # a tuned grid's point (bench/config/tune.py, Cell.tune_fields; null when untuned): its tune group, the
    # point's 0-based position in grid order, the group's budget (points), the point's values, the position
    # of the point equal to the grid's [recipe] (null: none is), and whether the row is the refit of the
    # chosen point on train + validation. Which point is chosen is not stored: bench.eval.tuning.select_points
    # computes it from val_mAP, so it never goes stale
    "tune_group": _STR, "tune_index": _INT, "tune_points": _INT, "tune_point": JSON, "tune_default": _INT, "tune_refit": _BOOL,
    # SPEC §1 metrics, fractions
    **{m: _FLOAT for m in METRIC_COLUMNS},
}
JSON_COLUMNS = frozenset(
    {"dataset_options", "hparams", "recipe", "config", "classes", "input_mean", "input_std", "feature_shape", "selection_mAP", "trained_with",
     "tune_point"}
)
ROW_SCHEMA = pa.schema([pa.field(name, kind) for name, kind in COLUMNS.items()])


class RowSchemaError(ValueError):
    """A row with a column the schema does not know, or a value of the wrong type (a bug)."""


def encode(row: dict[str, Any]) -> pa.Table:
    """One row -> a one-row table with exactly :data:`ROW_SCHEMA`'s columns (missing ones null)."""
    unknown = sorted(set(row) - set(COLUMNS))
    if unknown:
        raise RowSchemaError(f"result row has column(s) {unknown} that bench/results/schema.py does not declare")
    values = {}
    for name in COLUMNS:
        value = row.get(name)
        if name in JSON_COLUMNS and value is not None:
            value = json.dumps(value, sort_keys=True)
        elif isinstance(value, float) and COLUMNS[name] == _INT and value.is_integer():
            value = int(value)
        values[name] = [value]
    try:
        return pa.table(values, schema=ROW_SCHEMA)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise RowSchemaError(f"result row {row.get('run_id')!r}: {exc}") from exc


def decode(record: dict[str, Any]) -> dict[str, Any]:
    """A row as read back (from any version of the file): every schema column present (None when
    the file lacks it), JSON columns decoded; columns the schema no longer knows are dropped."""
    out: dict[str, Any] = {}
    for name in COLUMNS:
        value = record.get(name)
        if name in JSON_COLUMNS and isinstance(value, str):
            value = json.loads(value)
        elif isinstance(value, float) and math.isnan(value) and COLUMNS[name] in (_INT, _BOOL):
            value = None
        out[name] = value
    return out
