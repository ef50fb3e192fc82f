"""``run_bench.py status`` (issue 27): per job and per run, finished / running (whose lock, since
when) / failed / pending, from the results directory alone, with or without the grid."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

from bench.cli import main
from bench.config.grid import load_grid
from bench.results.store import write_row

GRID = """
seeds = [0, 1, 2]
[recipe]
preset = "embedded_cpu"
epochs = 3
[[datasets]]
name = "shapes"
num_train = 96
num_test = 51
[[backbones]]
name = "tiny_cnn"
[[heads]]
name = "baseline"
pool = ["avg", "max"]
"""

HOLD = """
import os, sys
from bench.results.locks import RunLock
lock = RunLock(sys.argv[1], sys.argv[2])
assert lock.acquire()
print("held", flush=True)
if sys.argv[3] == "die":
    os._exit(0)  # killed: the lock stays behind with a dead owner
sys.stdin.read()  # hold it until the test closes stdin
"""


def hold_lock(results: Path, run_id: str, mode: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(results), run_id, mode], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def epoch_checkpoint(results: Path, run_id: str, epoch: int) -> None:
    folder = results / "checkpoints" / run_id / f"epoch_{epoch:04d}"
    folder.mkdir(parents=True)
    (folder / "progress.json").write_text("{}")


def states(printed: str) -> dict[str, tuple[str, str]]:
    """run id -> (state, rest of its line), from the per-run lines of the status view."""
    out = {}
    for line in printed.splitlines():
        parts = line.split()
        if line.startswith("  ") and len(parts) >= 2 and len(parts[0]) == 16:
            out[parts[0]] = (parts[1], line)
    return out


@pytest.fixture
def results(tmp_path: Path) -> tuple[Path, Path, list[str], subprocess.Popen]:
    """Six runs: finished, failed, running (a live lock), stale lock + checkpoint, checkpoint only, nothing."""
    grid = tmp_path / "six.toml"
    grid.write_text(GRID)
    ids = [c.run_id for c in load_grid(str(grid)).cells]
    out = tmp_path / "results"
    write_row(out, {"run_id": ids[0], "status": "finished", "dataset": "shapes", "backbone": "tiny_cnn", "head": "baseline", "seed": 0, "hparams": {"pool": "avg"}})
    write_row(out, {"run_id": ids[1], "status": "failed", "error": "RuntimeError: boom in epoch 2\nsecond line"})
    live = hold_lock(out, ids[2], "hold")
    dead = hold_lock(out, ids[3], "die")
    dead.wait()
    epoch_checkpoint(out, ids[3], 1)
    epoch_checkpoint(out, ids[4], 0)
    yield grid, out, ids, live
    live.stdin.close()
    live.wait()


def test_status_with_the_grid_shows_every_run_and_job(results, capsys: pytest.CaptureFixture) -> None:
    grid, out, ids, live = results
    assert main(["status", "--results", str(out), "--grid", str(grid)]) == 0
    printed = capsys.readouterr().out
    got = states(printed)
    assert {r: s for r, (s, _) in got.items()} == {
        ids[0]: "finished", ids[1]: "failed", ids[2]: "running", ids[3]: "pending", ids[4]: "pending", ids[5]: "pending",
    }
    assert "boom in epoch 2" in got[ids[1]][1] and "second line" not in got[ids[1]][1]
    assert f"lock {socket.gethostname()}:{live.pid} since " in got[ids[2]][1]
    assert "stale lock" in got[ids[3]][1] and "owner gone" in got[ids[3]][1] and "resumes from its checkpoint after epoch 2" in got[ids[3]][1]
    assert got[ids[4]][1].endswith("resumes from its checkpoint after epoch 1")
    assert "runs: 6: 1 finished, 1 running, 1 failed, 3 pending" in printed
    assert "jobs: 6: 1 finished, 1 running, 1 failed, 3 pending" in printed  # finetune: one run per job


def test_status_without_a_grid_shows_the_runs_that_left_a_file(results, capsys: pytest.CaptureFixture) -> None:
    _grid, out, ids, _live = results
    assert main(["status", "--results", str(out)]) == 0
    printed = capsys.readouterr().out
    assert {r: s for r, (s, _) in states(printed).items()} == {
        ids[0]: "finished", ids[1]: "failed", ids[2]: "running", ids[3]: "pending", ids[4]: "pending",
    }
    assert "shapes / tiny_cnn / baseline(pool=avg) / seed 0" in printed  # read from the row
    assert "runs: 5: 1 finished, 1 running, 1 failed, 2 pending" in printed


def test_a_frozen_head_group_is_one_job(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    grid = tmp_path / "frozen.toml"
    grid.write_text(GRID.replace('preset = "embedded_cpu"', 'preset = "embedded_cpu"\nprotocol = "frozen"\naugment = "none"'))
    out = tmp_path / "results"
    out.mkdir()
    cells = load_grid(str(grid)).cells
    write_row(out, {"run_id": cells[0].run_id, "status": "finished"})
    assert main(["status", "--results", str(out), "--grid", str(grid)]) == 0
    printed = capsys.readouterr().out
    # 3 seeds, each a pass of 2 heads over the same features: 3 jobs of 2 runs
    assert "runs: 6: 1 finished, 0 running, 0 failed, 5 pending" in printed
    assert "jobs: 3: 0 finished, 0 running, 0 failed, 3 pending" in printed
    assert printed.count("(1 finished, 1 pending)") == 1 and printed.count("(2 pending)") == 2


def test_status_of_a_missing_directory_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["status", "--results", str(tmp_path / "nowhere")]) == 2
    assert "results directory not found" in capsys.readouterr().err

