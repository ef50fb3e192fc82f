"""The CLI end to end on the embedded dataset: one process, two processes (gloo), resume, re-evaluation."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import accelerate_launch, run_cli

from bench.results.store import load_all

REQUIRED_COLUMNS = [
    "run_id", "status", "started_at", "git_commit", "dataset", "backbone", "head", "hparams", "seed", "epochs",
    "image_size", "batch_size", "world_size", "device", "train_images_per_s", "eval_images_per_s", "head_params",
    "total_params", "wall_s",
]


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from conftest import TINY_GRID

    folder = tmp_path_factory.mktemp("e2e")
    grid = folder / "tiny.toml"
    grid.write_text(TINY_GRID)
    out = folder / "results"
    result = run_cli("--grid", str(grid), "--results", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    return grid, out


def test_one_process_run_writes_one_complete_row_per_cell(one_process_run: tuple[Path, Path]) -> None:
    grid, out = one_process_run
    rows = load_all(out)
    assert len(rows) == 2 and set(rows["status"]) == {"finished"}
    assert set(h["pool"] for h in rows["hparams"]) == {"avg", "max"}  # JSON columns come back decoded
    for column in REQUIRED_COLUMNS:
        assert column in rows and rows[column].notna().all(), column
    metric_keys = ["mAP", "CP", "CR", "CF1", "mF1", "OP", "OR", "OF1"]
    metric_keys += [f"{k}_top3" for k in metric_keys[1:]]
    for key in metric_keys:
        assert rows[key].between(0, 1).all(), key
    assert (rows["world_size"] == 1).all()
    board = (out / "leaderboard.md").read_text()
    assert "## shapes · tiny_cnn · finetune" in board and "avg pool" in board and "max pool" in board


def test_rerunning_a_finished_grid_trains_nothing(one_process_run: tuple[Path, Path]) -> None:
    grid, out = one_process_run
    before = {p.name: p.stat().st_mtime_ns for p in (out / "runs").iterdir()}
    result = run_cli("--grid", str(grid), "--results", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "0 trained, 2 already done" in result.stdout
    assert {p.name: p.stat().st_mtime_ns for p in (out / "runs").iterdir()} == before


@pytest.fixture(scope="module")
def two_process_run(one_process_run: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny grid, unsharded, on two processes (gloo)."""
    grid, _ = one_process_run
    out = tmp_path_factory.mktemp("e2e2") / "results"
    result = run_cli("--grid", str(grid), "--results", str(out), launcher=accelerate_launch(2))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_two_processes_write_one_row_per_cell(two_process_run: Path) -> None:
    rows = load_all(two_process_run)
    assert len(rows) == 2 and set(rows["status"]) == {"finished"}
    assert (rows["world_size"] == 2).all()  # a real 2-process gloo group, not two lone processes


def test_the_cpu_launcher_command_runs_the_grid(tmp_path: Path, tiny_grid: Path) -> None:
    """``accelerate launch --cpu --num_processes 2``: accelerate's launcher for ``--cpu`` starts one
    process unless given an MPI host file (README, docs/distributed.md); the grid must still run and
    write one row per cell. Two CPU processes in a gloo group are the test above (``--multi_gpu``)."""
    launcher = [str(Path(sys.executable).parent / "accelerate"), "launch", "--cpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    result = run_cli("--grid", str(tiny_grid), "--results", str(tmp_path), launcher=launcher)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = load_all(tmp_path)
    assert len(rows) == 2 and set(rows["status"]) == {"finished"}
    assert (rows["world_size"] == 1).all() and (rows["device"] == "cpu").all()


def test_evaluation_on_two_processes_equals_one_process(one_process_run: tuple[Path, Path]) -> None:
    """Same weights, 1 vs 2 processes: padded duplicates must not change any metric."""
    _grid, out = one_process_run
    row = load_all(out).iloc[0]
    outputs = []
    for launcher in (None, accelerate_launch(2)):
        result = run_cli("evaluate", "--run-id", row["run_id"], "--results", str(out), launcher=launcher)
        assert result.returncode == 0, result.stderr[-3000:]
        outputs.append(json.loads(result.stdout.strip().splitlines()[-1]))
    one, two = outputs
    assert one.keys() == two.keys()
    for key in one:
        assert one[key] == pytest.approx(two[key], abs=1e-9), key
        assert one[key] == pytest.approx(row[key], abs=1e-9), key  # and equal to the metrics at training time


def test_two_shards_on_two_processes_each_equal_one_unsharded_run(one_process_run: tuple[Path, Path], two_process_run: Path, tmp_path: Path) -> None:
    """Each shard trains its own share (one of the two cells), and the two shards together equal
    the unsharded run on two processes, run by run. (Not the one-process run: tiny_cnn's
    BatchNorm sees each process's half of the batch.)"""
    grid, _ = one_process_run
    reference = two_process_run
    shared = tmp_path / "results"
    seen: set[str] = set()
    for shard in ("1/2", "2/2"):
        result = run_cli("--grid", str(grid), "--results", str(shared), "--shard", shard, launcher=accelerate_launch(2))
        assert result.returncode == 0, result.stderr[-3000:]
        assert f"(shard {shard})" in result.stdout
        assert "1 trained, 0 already done, 0 failed" in result.stdout, result.stdout[-2000:]
        now = set(load_all(shared)["run_id"])
        assert len(now - seen) == 1 and seen < now  # this shard's one cell, nothing of the other's
        seen = now
    merged = run_cli("report", "--results", str(shared))
    assert merged.returncode == 0, merged.stderr[-3000:]
    mine, theirs = load_all(shared).set_index("run_id"), load_all(reference).set_index("run_id")
    assert set(mine.index) == set(theirs.index) and (mine["world_size"] == 2).all()
    for run_id in theirs.index:
        assert mine.loc[run_id, "hparams"] == theirs.loc[run_id, "hparams"]
        for metric in ("mAP", "CF1", "OF1", "final_train_loss"):
            assert mine.loc[run_id, metric] == theirs.loc[run_id, metric], (run_id, metric)
    board = (shared / "leaderboard.md").read_text()
    assert "avg pool" in board and "max pool" in board


def test_frozen_features_built_by_two_processes_equal_one_process(tiny_grid: Path, tmp_path: Path) -> None:
    text = tiny_grid.read_text().replace('preset = "embedded_cpu"', 'preset = "embedded_cpu"\nprotocol = "frozen"\naugment = "none"')
    tiny_grid.write_text(text)
    built = []
    for processes in (1, 2):
        cache = tmp_path / f"cache{processes}"
        result = run_cli(
            "--grid", str(tiny_grid), "--results", str(tmp_path / f"r{processes}"),
            launcher=accelerate_launch(processes), env={"HEADBENCH_CACHE": str(cache)},
        )
        assert result.returncode == 0, result.stderr[-3000:]
        files = sorted((cache / "features").glob("*.npy"))
        assert len(files) == 2  # train and test, shared by both heads
        built.append([np.load(f) for f in files])
    for one, two in zip(*built):
        # each process writes its own rows of one file: every row must land in its place. Rows
        # may differ in the last bit: a CPU convolution's result depends on the batch size it
        # runs in, and the two launches batch the images differently.
        assert (np.abs(one.astype(np.float32)).reshape(len(one), -1).max(1) > 0).all()  # no row left unwritten
        assert np.allclose(one.astype(np.float32), two.astype(np.float32), rtol=1e-3, atol=1e-5)
    rows = load_all(tmp_path / "r2")
    assert set(rows["protocol"]) == {"frozen"} and (rows["world_size"] == 2).all()


def test_a_cell_gives_the_same_result_whatever_ran_before_it_in_the_process(one_process_run: tuple[Path, Path], tmp_path: Path) -> None:
    """Nothing leaks from one cell to the next (model state, BatchNorm statistics, RNG)."""
    grid, reference = one_process_run
    alone = tmp_path / "max_only.toml"
    alone.write_text(grid.read_text().replace('pool = ["avg", "max"]', 'pool = ["max"]'))
    result = run_cli("--grid", str(alone), "--results", str(tmp_path / "r"))
    assert result.returncode == 0, result.stderr[-3000:]
    mine = load_all(tmp_path / "r").set_index("run_id")
    theirs = load_all(reference).set_index("run_id").loc[mine.index]  # there, the max cell ran second
    for metric in ("mAP", "CF1", "final_train_loss"):
        assert (mine[metric] == theirs[metric]).all(), metric
