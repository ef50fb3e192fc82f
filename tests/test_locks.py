"""Run locks under a real launch: the trainer refreshes its lock while it trains, a lock that
stopped being refreshed (its owner on another host) is taken over, a fresh one is respected.
``HEADBENCH_LOCK_STALE_S`` sets how old an unrefreshed lock must be to count as stale."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from conftest import ROOT, run_cli

from bench.config.grid import load_grid
from bench.results.store import load_all

GRID = """
seeds = [0]
[recipe]
preset = "embedded_cpu"
epochs = 12
batch_size = 8
[[datasets]]
name = "shapes"
num_train = 128
num_test = 51
[[backbones]]
name = "tiny_cnn"
[[heads]]
name = "baseline"
pool = ["avg", "max"]
"""


def foreign_lock(results: Path, run_id: str, age_s: float) -> Path:
    """A lock of a launch on another host, last refreshed ``age_s`` seconds ago."""
    path = results / "locks" / f"{run_id}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"host": "another-host", "pid": 1, "since": 0}))
    then = time.time() - age_s
    os.utime(path, (then, then))
    return path


def test_a_stale_lock_is_taken_over_and_the_trainer_refreshes_its_own(tmp_path: Path) -> None:
    grid = tmp_path / "g.toml"
    grid.write_text(GRID)
    avg, mx = (c.run_id for c in load_grid(str(grid)).cells)
    out = tmp_path / "results"
    foreign_lock(out, avg, age_s=60)  # older than the 1 s below: stale
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "run_bench.py"), "--grid", str(grid), "--results", str(out)],
        cwd=ROOT, env={**os.environ, "HEADBENCH_LOCK_STALE_S": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    # watch the locks while the launch trains: (run id, owner pid) -> the modification times seen,
    # and when the lock was first and last seen
    seen: dict[tuple[str, int], set[int]] = {}
    lifetime: dict[tuple[str, int], list[float]] = {}
    while proc.poll() is None:
        for path in (out / "locks").glob("*.lock"):
            try:
                owner, mtime = json.loads(path.read_text()), path.stat().st_mtime_ns
            except (OSError, ValueError):
                continue  # released (or being replaced) between the listing and the read
            key = (path.stem, owner["pid"])
            seen.setdefault(key, set()).add(mtime)
            lifetime.setdefault(key, [time.monotonic(), 0.0])[1] = time.monotonic()
        time.sleep(0.05)
    stdout, stderr = proc.communicate()
    assert proc.returncode == 0, stderr[-3000:]
    assert "2 trained, 0 already done" in stdout, stdout[-2000:]  # the stale lock's run too
    rows = load_all(out)
    assert set(rows["run_id"]) == {avg, mx} and (rows["status"] == "finished").all()
    assert not any((out / "locks").iterdir())
    mine = {key: times for key, times in seen.items() if key[1] == proc.pid}
    assert {run_id for run_id, _ in mine} <= {avg, mx} and mine, seen
    # a stale time of 1 s means a refresh at least every 0.25 s while a run trains: a lock held for
    # L seconds was touched about 4 L times (seen by polling every 0.05 s), not once per 30 s (the
    # default refresh period). Asked: a lock touched after it was taken, and at least once per second
    # held (a quarter of the expected count, for a busy machine's polling)
    held = {key: lifetime[key][1] - lifetime[key][0] for key in mine}
    # with the default 30 s period every lock would show its acquisition time alone
    assert max(len(times) for times in mine.values()) >= 2, (seen, held)
    for key, times in mine.items():
        assert len(times) >= max(1, int(held[key] / 1.0)), (key, len(times), held[key])


def test_a_fresh_lock_of_another_launch_is_respected(tmp_path: Path) -> None:
    grid = tmp_path / "g.toml"
    grid.write_text(GRID)
    avg, mx = (c.run_id for c in load_grid(str(grid)).cells)
    out = tmp_path / "results"
    lock = foreign_lock(out, mx, age_s=0)
    result = run_cli("--grid", str(grid), "--results", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "1 trained, 0 already done" in result.stdout, result.stdout[-2000:]
    assert set(load_all(out)["run_id"]) == {avg}  # the claimed run is left to its owner
    assert json.loads(lock.read_text())["host"] == "another-host"  # and its lock untouched


FROZEN = GRID.replace("seeds = [0]", "seeds = [0, 1]").replace("batch_size = 8", "batch_size = 16").replace("epochs = 12", 'epochs = 2\nprotocol = "frozen"\naugment = "none"')


def test_two_launches_on_a_frozen_grid_train_every_run_once(tmp_path: Path) -> None:
    """On a frozen backbone the heads of a (data, backbone, recipe, seed) group train together:
    two launches sharing a results directory still train each run exactly once, and every row
    is complete."""
    grid = tmp_path / "frozen.toml"
    grid.write_text(FROZEN)
    cells = load_grid(str(grid)).cells
    assert len(cells) == 4
    out = tmp_path / "results"
    launches = [
        subprocess.Popen([sys.executable, str(ROOT / "run_bench.py"), "--grid", str(grid), "--results", str(out)],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=600) for p in launches]
    assert all(p.returncode == 0 for p in launches), [o[1][-2000:] for o in outputs]
    trained = [int(o[0].split(" trained,")[0].split()[-1]) for o in outputs]
    assert sum(trained) == 4, [o[0][-1500:] for o in outputs]  # every run trained by exactly one launch
    rows = load_all(out)
    assert len(rows) == 4 and rows["run_id"].is_unique and set(rows["run_id"]) == {c.run_id for c in cells}
    assert (rows["status"] == "finished").all() and (rows["protocol"] == "frozen").all()
    for column in ("mAP", "CF1", "OF1", "final_train_loss", "trained_with", "train_images_per_s", "wall_s"):
        assert rows[column].notna().all(), column
    assert rows["mAP"].between(0, 1).all()
    assert not any((out / "locks").iterdir())
