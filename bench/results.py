"""The results directory: one Parquet file per run, written atomically, read back as one table.

Layout of a results directory::

    runs/<run_id>.parquet       one row: the run's configuration, status, metrics, throughput
    scores/<run_id>.parquet     per test image: id, scores [C], targets [C], ignore [C]
    weights/<run_id>.safetensors   the trained model (``[run] save_weights``), for re-evaluation

Only the main process writes. Every file is written under a temporary name, fsynced and renamed
(``bench.atomic``), so a killed process never leaves a half-written file, and one file per run id
means a row cannot be duplicated: a re-run replaces its own file.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors.torch import load_file, save_file

from bench.atomic import atomic_write
from bench.errors import UsageError

RUNS = "runs"
SCORES = "scores"
WEIGHTS = "weights"


def check_writable(results_dir: str | Path) -> Path:
    """Create ``results_dir`` if needed and prove it is writable, before any training starts."""
    path = Path(results_dir)
    try:
        (path / RUNS).mkdir(parents=True, exist_ok=True)
        probe = path / RUNS / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UsageError(f"results directory {path} is not writable: {exc.strerror or exc}") from exc
    return path


def _jsonable(value: Any) -> Any:
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True)
    return value


def write_row(results_dir: str | Path, row: dict[str, Any]) -> Path:
    """Write one run's row to ``runs/<run_id>.parquet`` atomically (dicts/lists stored as JSON)."""
    path = Path(results_dir) / RUNS / f"{row['run_id']}.parquet"
    table = pa.Table.from_pylist([{k: _jsonable(v) for k, v in row.items()}])
    atomic_write(path, lambda tmp: pq.write_table(table, tmp))
    return path


def read_row(path: str | Path) -> dict[str, Any] | None:
    """The row in one run file, or None (with a warning) if the file cannot be read."""
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as exc:  # a foreign or damaged file must not stop a report
        warnings.warn(f"ignoring unreadable result file {path}: {exc}", stacklevel=2)
        return None
    return rows[0] if rows else None


def load_all(*results_dirs: str | Path) -> pd.DataFrame:
    """Every row of every results directory, one row per run id (the newest wins on a clash).

    Rows written by older versions may lack newer columns; those are NaN.
    """
    rows = []
    for folder in results_dirs:
        for path in sorted((Path(folder) / RUNS).glob("*.parquet")):
            row = read_row(path)
            if row is not None:
                rows.append(row)
    if not rows:
        return pd.DataFrame()
    frame = pd.DataFrame(rows)
    if "finished_at" in frame:
        frame = frame.sort_values("finished_at", kind="stable")
    return frame.drop_duplicates("run_id", keep="last").reset_index(drop=True)


def run_status(results_dir: str | Path, run_id: str) -> str | None:
    """The status of run ``run_id`` (``finished`` / ``failed``), or None if it has no readable row."""
    path = Path(results_dir) / RUNS / f"{run_id}.parquet"
    if not path.is_file():
        return None
    try:
        return pq.read_table(path, columns=["status"]).column("status")[0].as_py()
    except Exception:  # unreadable: treated as never run, so it is run again
        return None


def run_row(results_dir: str | Path, run_id: str) -> dict[str, Any]:
    """The row of run ``run_id``; a clear error if there is none."""
    path = Path(results_dir) / RUNS / f"{run_id}.parquet"
    row = read_row(path) if path.is_file() else None
    if row is None:
        raise UsageError(f"no result for run id {run_id!r} in {Path(results_dir) / RUNS}")
    return row


def weights_path(results_dir: str | Path, run_id: str) -> Path:
    return Path(results_dir) / WEIGHTS / f"{run_id}.safetensors"


def save_weights(results_dir: str | Path, run_id: str, state: dict[str, torch.Tensor]) -> Path:
    """Save a state dict as safetensors (no pickle), atomically."""
    path = weights_path(results_dir, run_id)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp)))
    return path


def load_weights(results_dir: str | Path, run_id: str) -> dict[str, torch.Tensor]:
    """Load the weights saved for ``run_id``; a clear error if the run saved none."""
    path = weights_path(results_dir, run_id)
    if not path.is_file():
        raise UsageError(f"run {run_id} has no saved weights at {path} (was it run with [run] save_weights = \"none\"?)")
    return load_file(str(path))


def scores_path(results_dir: str | Path, run_id: str) -> Path:
    return Path(results_dir) / SCORES / f"{run_id}.parquet"


def save_scores(
    results_dir: str | Path,
    run_id: str,
    image_ids: list[str],
    scores: np.ndarray,
    targets: np.ndarray,
    ignore: np.ndarray,
    classes: list[str],
) -> Path:
    """Keep a run's per-image test scores (for paired statistics between runs), atomically.

    Args:
        image_ids: N ids in evaluation order; scores float [N, C]; targets {0,1} [N, C];
        ignore bool [N, C]; classes: the C class names (stored in the file's metadata).
    """
    n, c = scores.shape

    def fixed(values: np.ndarray, kind: pa.DataType) -> pa.Array:
        return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1), type=kind), c)

    table = pa.table(
        {
            "image_id": pa.array(image_ids, type=pa.string()),
            "scores": fixed(scores.astype(np.float32), pa.float32()),
            "targets": fixed(targets.astype(np.uint8), pa.uint8()),
            "ignore": fixed(ignore.astype(bool), pa.bool_()),
        }
    ).replace_schema_metadata({"classes": json.dumps(classes), "run_id": run_id})
    path = scores_path(results_dir, run_id)
    atomic_write(path, lambda tmp: pq.write_table(table, tmp))
    return path


def load_scores(results_dir: str | Path, run_id: str) -> dict[str, Any]:
    """A run's per-image scores: ``{"image_ids", "scores" [N, C], "targets", "ignore", "classes"}``."""
    path = scores_path(results_dir, run_id)
    if not path.is_file():
        raise UsageError(f"run {run_id} has no per-image scores at {path}")
    table = pq.read_table(path)
    n = table.num_rows
    classes = json.loads(table.schema.metadata[b"classes"])

    def matrix(name: str) -> np.ndarray:
        return table.column(name).combine_chunks().flatten().to_numpy(zero_copy_only=False).reshape(n, len(classes))

    return {
        "image_ids": table.column("image_id").to_pylist(),
        "scores": matrix("scores"),
        "targets": matrix("targets"),
        "ignore": matrix("ignore").astype(bool),
        "classes": classes,
    }
