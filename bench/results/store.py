"""The results directory: one Parquet file per run, written atomically, read back as one table.

Layout of a results directory::

    runs/<run_id>.parquet       one row: the run's configuration, status, metrics, throughput
    scores/<run_id>.parquet     per test image: id, scores [C], targets [C], ignore [C]
    weights/<run_id>.safetensors   the trained model (``[run] save_weights``), for re-evaluation

Only the main process writes. Every file is written under a temporary name, fsynced and renamed
(``bench.core.atomic``), so a killed process never leaves a half-written file, and one file per run id
means a row cannot be duplicated: a re-run replaces its own file.

Every file is checked when it is read back. A row file that cannot be read (truncated, foreign, a
value of the wrong type, a run id that is not of the harness's form) is ignored with one warning
that names it and says what to do; the run counts as never run, so the next launch of its grid runs
it again and replaces the file. A damaged score or weights file raises :class:`DamagedFile` (a
usage error) naming the file and what to do; the report leaves that run out of its comparisons.
Run ids are the only data that become file names: each is checked against :data:`RUN_ID` first, so
no row can make the harness read or write outside its results directory.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors.torch import load_file, save_file

from bench.core.atomic import atomic_write, free_bytes, host_tag, is_no_space, no_space, remove_stale_temporaries
from bench.core.errors import UsageError, format_bytes
from bench.eval.tuning import selection_flags
from bench.results import schema
from bench.results.locks import LOCKS, check_lock_folder, remove_graves, stale_after_s

RUNS = "runs"
SCORES = "scores"
WEIGHTS = "weights"
#: the form of every run id (``bench.config.grid.config_hash``): 16 lowercase hexadecimal digits
RUN_ID = re.compile(r"[0-9a-f]{16}")
STATUSES = ("finished", "failed")
#: folders of a results directory (and of a report's output) where atomic writes happen
REPORT_FOLDERS = (".", "plots", ".cache/bootstrap")
#: free space a launch needs before it trains anything: a run's row, scores, weights and epoch
#: checkpoint of the embedded grids fit well inside it (a larger model needs more: the engine
#: passes its own estimate to :func:`check_writable`)
MIN_FREE_BYTES = 16 * 2**20


class DamagedFileWarning(UserWarning):
    """A results file could not be read back; it is skipped (the message says what to do)."""


class DamagedFile(UsageError):
    """A score or weights file that exists but cannot be used. ``str()`` names the file, the
    problem and what to do."""

    def __init__(self, path: Path, problem: str, advice: str) -> None:
        super().__init__(f"{path} is damaged ({problem}); {advice}")
        self.path, self.problem, self.advice = Path(path), problem, advice

    def warn(self) -> None:
        """Say so once per file and process (as a :class:`DamagedFileWarning`)."""
        _warn_once(f"{self.path}\0{self.problem}", f"ignoring damaged file {self.path} ({self.problem}); {self.advice}")


_WARNED: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, DamagedFileWarning, stacklevel=3)


def _unreadable(exc: BaseException, path: Path) -> str:
    """A reader's exception as a short reason (pyarrow repeats the path in its messages)."""
    text = str(exc).replace(f"Could not open Parquet input source '{path}': ", "").replace(str(path), path.name)
    return f"{type(exc).__name__}: {text[:300]}"


def is_run_id(value: object) -> bool:
    """Whether ``value`` has the form of a run id (:data:`RUN_ID`)."""
    return isinstance(value, str) and RUN_ID.fullmatch(value) is not None


def check_run_id(run_id: object, what: str = "run id") -> str:
    """``run_id`` if it has the harness's form, else a :class:`UsageError` (it would be a file name)."""
    if not is_run_id(run_id):
        raise UsageError(f"{what} {run_id!r} is not a run id of this harness: expected 16 lowercase hexadecimal digits (e.g. 1a2b3c4d5e6f7a8b)")
    return run_id  # type: ignore[return-value]


def clean_temporaries(folder: str | Path) -> list[Path]:
    """Remove the temporary files a killed writer left in a results directory (or a report's
    output folder) and the stale-lock graves of a killed reclaimer; return what was removed."""
    folder = Path(folder)
    removed = remove_stale_temporaries([folder / sub for sub in (*REPORT_FOLDERS, RUNS, SCORES, WEIGHTS, LOCKS)])
    return removed + remove_graves(folder)


def check_writable(results_dir: str | Path, needed: int = MIN_FREE_BYTES) -> Path:
    """Create ``results_dir`` if needed and prove it is writable and has ``needed`` bytes free,
    before any training starts; check ``$HEADBENCH_LOCK_STALE_S`` and the lock folder; remove what
    killed writers left behind. A full disk is a :class:`~bench.core.errors.NoSpaceError` naming
    the folder and the space needed (exit status 2); nothing is left written."""
    path = Path(results_dir)
    stale_after_s()
    try:
        (path / RUNS).mkdir(parents=True, exist_ok=True)
        probe = path / RUNS / f".write-test.{host_tag()}.{os.getpid()}.probe000.tmp"  # the temporary-file form: cleaned if left
        try:
            probe.write_bytes(b"\0" * 4096)
        finally:
            probe.unlink(missing_ok=True)
    except OSError as exc:
        if is_no_space(exc):
            raise no_space(path, needed, "a first file") from None
        raise UsageError(f"results directory {path} is not writable: {exc.strerror or exc}") from exc
    clean_temporaries(path)
    check_lock_folder(path)
    free = free_bytes(path)
    if free is not None and free < needed:
        raise no_space(path, needed, f"this launch's results (a run needs up to about {format_bytes(needed)})")
    return path


def row_path(results_dir: str | Path, run_id: str) -> Path:
    return Path(results_dir) / RUNS / f"{check_run_id(run_id)}.parquet"


def write_row(results_dir: str | Path, row: dict[str, Any]) -> Path:
    """Write one run's row to ``runs/<run_id>.parquet`` atomically, in the one row schema
    (:mod:`bench.results.schema`: dicts and lists stored as JSON)."""
    path = row_path(results_dir, row.get("run_id"))
    table = schema.encode(row)
    atomic_write(path, lambda tmp: pq.write_table(table, tmp))
    return path


def _numeric(kind: pa.DataType) -> bool:
    return pa.types.is_integer(kind) or pa.types.is_floating(kind)


class _Foreign(ValueError):
    """A row file the harness did not write (its run id is not its own)."""


def _row_problem(path: Path, table: pa.Table) -> str | None:
    """Why the one-row table read from ``path`` is not a usable row, or None; raises
    :class:`_Foreign` when its run id is not of the harness's form or not its file's name."""
    if table.num_rows != 1:
        return f"it holds {table.num_rows} rows, a run file holds one"
    for name in table.column_names:
        kind, stored = schema.COLUMNS.get(name), table.schema.field(name).type
        if kind is None or stored == kind or pa.types.is_null(stored):
            continue
        # numbers of another width (older files; NaN in an integer column) are decoded by the schema
        if not (_numeric(kind) and _numeric(stored)) and not (pa.types.is_string(kind) and pa.types.is_large_string(stored)):
            return f"column {name!r} holds {stored}, expected {kind}"
    run_id = table.column("run_id")[0].as_py() if "run_id" in table.column_names else None
    if not is_run_id(run_id):
        raise _Foreign(f"its run_id {run_id!r} is not of the harness's form (16 lowercase hexadecimal digits)")
    if run_id != path.stem:
        raise _Foreign(f"it holds run {run_id} but is named {path.name}")
    status = table.column("status")[0].as_py() if "status" in table.column_names else None
    if status not in STATUSES:
        return f"its status {status!r} is not one of {', '.join(STATUSES)}"
    for name in sorted(schema.JSON_COLUMNS & set(table.column_names)):
        text = table.column(name)[0].as_py()
        try:
            if text is not None:
                json.loads(text)
        except (TypeError, ValueError) as exc:
            return f"column {name!r} is not valid JSON ({exc})"
    return None


def read_row(path: str | Path) -> dict[str, Any] | None:
    """The row in one run file, or None (with one warning naming the file and what to do) if the
    file cannot be read or does not hold a valid row."""
    path = Path(path)
    try:
        try:
            table = pq.read_table(path)
        except Exception as exc:  # noqa: BLE001 - truncated, foreign, unreadable
            raise ValueError(f"not a readable Parquet file ({_unreadable(exc, path)})") from None
        problem = _row_problem(path, table)
        if problem is None:
            return schema.decode(table.to_pylist()[0])
    except _Foreign as exc:  # no launch will replace it
        _warn_once(f"{path}\0{exc}", f"ignoring result file {path}: {exc}; the harness did not write it: delete it")
        return None
    except Exception as exc:  # noqa: BLE001 - a foreign or damaged file must not stop a report or a launch
        problem = str(exc) if isinstance(exc, ValueError) else _unreadable(exc, path)
    _warn_once(
        f"{path}\0{problem}",
        f"ignoring damaged result file {path} ({problem}); the next launch of its grid runs that run again "
        "and replaces the file (or delete it)",
    )
    return None


def internal_folder(path: str | Path) -> Path | None:
    """The results directory's own folder (``runs/``, ``scores/``, ``weights/``, ``locks/``,
    ``checkpoints/``) that ``path`` is or lies in, else None: no other file may be written there
    (a report's ``comparisons.parquet`` in ``runs/`` would be read back as a damaged run)."""
    path = Path(path).resolve()
    for folder in (path, *path.parents):
        # a results directory that happens to be named runs/ (it holds its own runs/) is not one
        if folder.name in (RUNS, SCORES, WEIGHTS, LOCKS, "checkpoints") and (folder.parent / RUNS).is_dir() and not (folder / RUNS).is_dir():
            return folder
    return None


def _not_a_run_file(path: Path) -> None:
    """Say once that ``runs/`` holds a file whose name is not a run id (a note, a report's output)."""
    _warn_once(
        f"{path}\0name",
        f"ignoring {path}: its name {path.stem!r} is not of the harness's form (a run id: 16 lowercase hexadecimal "
        "digits), so it is no run's result file and no launch replaces it; runs/ holds only the harness's "
        "<run_id>.parquet files: move it out of that folder",
    )


def load_all(*results_dirs: str | Path) -> pd.DataFrame:
    """Every row of every results directory, one row per run id (the newest wins on a clash).

    Every column of the row schema is present (None / NaN where a row lacks it); JSON columns
    are decoded (dicts and lists). Damaged files are skipped with a warning (:func:`read_row`).
    """
    rows = []
    for folder in results_dirs:
        for path in sorted((Path(folder) / RUNS).glob("*.parquet")):
            if not is_run_id(path.stem):
                _not_a_run_file(path)
                continue
            row = read_row(path)
            if row is not None:
                rows.append(row)
    if not rows:
        return pd.DataFrame()
    frame = pd.DataFrame(rows, columns=list(schema.COLUMNS))
    if "finished_at" in frame:
        frame = frame.sort_values("finished_at", kind="stable")
    frame = frame.drop_duplicates("run_id", keep="last").reset_index(drop=True)
    # a tuned grid's choice (docs/tuning.md): derived from val_mAP on every read, never stored
    frame["tune_selected"] = selection_flags(frame.to_dict("records"))
    return frame


def run_status(results_dir: str | Path, run_id: str) -> str | None:
    """The status of run ``run_id`` (``finished`` / ``failed``), or None if it has no readable row
    (a damaged row is reported once and counts as never run, so the run is run again)."""
    path = row_path(results_dir, run_id)
    if not path.is_file():
        return None
    row = read_row(path)
    return None if row is None else row["status"]


def run_row(results_dir: str | Path, run_id: str) -> dict[str, Any]:
    """The row of run ``run_id``; a clear error if there is none."""
    path = row_path(results_dir, run_id)
    row = read_row(path) if path.is_file() else None
    if row is None:
        raise UsageError(f"no result for run id {run_id!r} in {Path(results_dir) / RUNS}")
    return row


def _redo(results_dir: str | Path, run_id: str) -> str:
    return f"delete it and {row_path(results_dir, run_id)}, then run the grid again to recompute run {run_id}"


def weights_path(results_dir: str | Path, run_id: str) -> Path:
    return Path(results_dir) / WEIGHTS / f"{check_run_id(run_id)}.safetensors"


def save_weights(results_dir: str | Path, run_id: str, state: dict[str, torch.Tensor]) -> Path:
    """Save a state dict as safetensors (no pickle), atomically."""
    path = weights_path(results_dir, run_id)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp)))
    return path


def load_weights(results_dir: str | Path, run_id: str) -> dict[str, torch.Tensor]:
    """Load the weights saved for ``run_id``; a clear error if the run saved none or the file is
    damaged (:class:`DamagedFile`)."""
    path = weights_path(results_dir, run_id)
    if not path.is_file():
        raise UsageError(f"run {run_id} has no saved weights at {path} (was it run with [run] save_weights = \"none\"?)")
    try:
        return load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise DamagedFile(path, f"not a readable safetensors file ({_unreadable(exc, path)})", _redo(results_dir, run_id)) from None


def scores_path(results_dir: str | Path, run_id: str) -> Path:
    return Path(results_dir) / SCORES / f"{check_run_id(run_id)}.parquet"


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


def _matrix(table: pa.Table, name: str, n: int, c: int, kind: pa.DataType) -> np.ndarray:
    """Column ``name`` (fixed-size lists of ``c`` values of ``kind``) as an array [n, c]."""
    field_type = table.schema.field(name).type
    if not (pa.types.is_fixed_size_list(field_type) and field_type.list_size == c and field_type.value_type == kind):
        raise ValueError(f"column {name!r} is {field_type}, expected fixed_size_list<{kind}>[{c}]")
    column = table.column(name).combine_chunks()
    if column.null_count:
        raise ValueError(f"column {name!r} has {column.null_count} missing value(s)")
    values = column.flatten()
    if len(values) != n * c or values.null_count:
        raise ValueError(f"column {name!r} has missing values")
    return values.to_numpy(zero_copy_only=False).reshape(n, c)


def load_scores(results_dir: str | Path, run_id: str) -> dict[str, Any]:
    """A run's per-image scores: ``{"image_ids", "scores" [N, C], "targets", "ignore", "classes"}``.

    Raises :class:`UsageError` when the run has none, :class:`DamagedFile` when the file cannot be
    read or is inconsistent (columns, classes, an image listed twice, non-finite scores).
    """
    path = scores_path(results_dir, run_id)
    if not path.is_file():
        raise UsageError(f"run {run_id} has no per-image scores at {path}")
    try:
        try:
            table = pq.read_table(path)
        except Exception as exc:  # noqa: BLE001 - truncated, foreign, unreadable
            raise ValueError(f"not a readable Parquet file ({_unreadable(exc, path)})") from None
        metadata = table.schema.metadata or {}
        if b"classes" not in metadata:
            raise ValueError("its metadata has no class list")
        classes = json.loads(metadata[b"classes"])
        if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
            raise ValueError("its metadata's class list is not a non-empty list of names")
        stored_id = metadata.get(b"run_id", run_id.encode()).decode()
        if stored_id != run_id:
            raise ValueError(f"it holds the scores of run {stored_id}")
        n, c = table.num_rows, len(classes)
        if n == 0:
            raise ValueError("it holds no image")
        if "image_id" not in table.column_names or not pa.types.is_string(table.schema.field("image_id").type):
            raise ValueError("it has no image_id column of strings")
        image_ids = table.column("image_id").to_pylist()
        scores = _matrix(table, "scores", n, c, pa.float32())
        targets = _matrix(table, "targets", n, c, pa.uint8())
        ignore = _matrix(table, "ignore", n, c, pa.bool_()).astype(bool)
    except Exception as exc:  # noqa: BLE001 - pyarrow, JSON and our own checks: all mean "damaged"
        raise DamagedFile(path, str(exc) if isinstance(exc, ValueError) else _unreadable(exc, path), _redo(results_dir, run_id)) from None
    if None in image_ids or len(set(image_ids)) != n:
        seen: dict[str, int] = {}
        twice = next(i for i, x in enumerate(image_ids) if x is None or seen.setdefault(x, i) != i)
        first = seen.get(image_ids[twice], twice)
        raise DamagedFile(
            path,
            f"image {image_ids[twice]!r} is listed twice (rows {first + 1} and {twice + 1}), so its scores cannot be paired with another run's",
            f"the test split of run {run_id} lists that image twice: fix the dataset's manifest, then {_redo(results_dir, run_id)}",
        )
    if not (np.isfinite(scores.min()) and np.isfinite(scores.max())):
        raise DamagedFile(path, f"{int((~np.isfinite(scores)).sum())} score(s) are NaN or infinite", _redo(results_dir, run_id))
    if targets.max() > 1:
        raise DamagedFile(path, "targets other than 0 and 1", _redo(results_dir, run_id))
    return {"image_ids": image_ids, "scores": scores, "targets": targets, "ignore": ignore, "classes": classes}
