"""The results directory: atomic rows, merging, finished ids, weights."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from bench.core.atomic import atomic_write
from bench.core.errors import UsageError
from bench.results import store as results

# run ids have the harness's form (16 lowercase hex digits): the store refuses any other file name
A, B, Z = "a" * 16, "b" * 16, "c" * 16


def row(run_id: str, status: str = "finished", mAP: float = 0.5, finished_at: str = "2026-01-01T00:00:00") -> dict:
    return {"run_id": run_id, "status": status, "mAP": mAP, "hparams": {"pool": "avg"}, "finished_at": finished_at}


def test_write_and_load_rows(tmp_path: Path) -> None:
    results.write_row(tmp_path, row(A))
    results.write_row(tmp_path, row(B, status="failed"))
    frame = results.load_all(tmp_path)
    assert sorted(frame["run_id"]) == [A, B]
    assert frame.set_index("run_id").loc[A, "hparams"] == {"pool": "avg"}  # JSON columns come back decoded
    assert results.run_status(tmp_path, A) == "finished" and results.run_status(tmp_path, B) == "failed"
    assert results.run_status(tmp_path, Z) is None
    assert results.run_row(tmp_path, A)["mAP"] == 0.5
    with pytest.raises(UsageError, match=f"no result for run id '{Z}'"):
        results.run_row(tmp_path, Z)


def test_rewriting_a_run_replaces_its_row(tmp_path: Path) -> None:
    results.write_row(tmp_path, row(A, status="failed"))
    results.write_row(tmp_path, row(A, mAP=0.7))
    frame = results.load_all(tmp_path)
    assert len(frame) == 1 and frame["mAP"].item() == 0.7 and frame["status"].item() == "finished"


def test_merging_directories_keeps_the_newest_row_per_run(tmp_path: Path) -> None:
    results.write_row(tmp_path / "m1", row(A, mAP=0.1, finished_at="2026-01-01T00:00:00"))
    results.write_row(tmp_path / "m2", row(A, mAP=0.2, finished_at="2026-01-02T00:00:00"))
    results.write_row(tmp_path / "m2", row(B))
    frame = results.load_all(tmp_path / "m1", tmp_path / "m2")
    assert sorted(frame["run_id"]) == [A, B]
    assert frame.set_index("run_id").loc[A, "mAP"] == 0.2


def test_a_write_that_fails_midway_keeps_the_old_file_and_leaves_no_debris(tmp_path: Path) -> None:
    path = tmp_path / "runs" / f"{A}.parquet"
    results.write_row(tmp_path, row(A, mAP=0.3))

    def broken(tmp: Path) -> None:
        tmp.write_bytes(b"PAR1 half a file")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, broken)
    assert pq.read_table(path).to_pylist()[0]["mAP"] == 0.3
    assert sorted(p.name for p in path.parent.iterdir()) == [f"{A}.parquet"]


def test_unreadable_result_file_is_skipped_with_a_warning(tmp_path: Path) -> None:
    results.write_row(tmp_path, row(A))
    (tmp_path / "runs" / "junk.parquet").write_bytes(b"not parquet")
    with pytest.warns(UserWarning, match="junk.parquet"):
        frame = results.load_all(tmp_path)
    assert list(frame["run_id"]) == [A]


def test_unwritable_results_directory_is_a_usage_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder should be")
    with pytest.raises(UsageError, match=f"results directory {blocker / 'sub'} is not writable"):
        results.check_writable(blocker / "sub")


def test_weights_round_trip_and_missing_weights(tmp_path: Path) -> None:
    state = {"head.fc.weight": torch.randn(3, 4), "head.fc.bias": torch.randn(3)}
    results.save_weights(tmp_path, A, state)
    loaded = results.load_weights(tmp_path, A)
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    with pytest.raises(UsageError, match=f"run {B} has no saved weights"):
        results.load_weights(tmp_path, B)


def test_scores_round_trip(tmp_path: Path) -> None:
    import numpy as np

    rng = np.random.default_rng(0)
    scores = rng.random((7, 3)).astype(np.float32)
    targets = (rng.random((7, 3)) > 0.5).astype(np.uint8)
    ignore = rng.random((7, 3)) > 0.8
    ids = [f"img{i}" for i in range(7)]
    results.save_scores(tmp_path, A, ids, scores, targets, ignore, ["x", "y", "z"])
    back = results.load_scores(tmp_path, A)
    assert back["image_ids"] == ids and back["classes"] == ["x", "y", "z"]
    assert np.array_equal(back["scores"], scores) and np.array_equal(back["targets"], targets)
    assert np.array_equal(back["ignore"], ignore)
    with pytest.raises(UsageError, match=f"run {B} has no per-image scores"):
        results.load_scores(tmp_path, B)
