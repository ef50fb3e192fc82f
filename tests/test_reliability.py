"""Reliability: SIGKILL at checkpoints and during writes, clean SIGTERM, failed runs, concurrent launches, locks."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import ROOT, accelerate_launch, run_cli

from bench.results.locks import RunLock
from bench.results.store import load_all

GRID = """
seeds = [0, 1]
[recipe]
preset = "embedded_cpu"
epochs = 3
batch_size = 32
[[datasets]]
name = "shapes"
num_train = 192
num_test = 61
[[backbones]]
name = "tiny_cnn"
[[heads]]
name = "baseline"
pool = ["avg", "max"]
"""

NAN_PROBE = '''
import os
import torch
from torch import nn
from bench.api.registry import register_head

@register_head("nan_probe")
class NanProbe(nn.Module):
    """Average pooling + linear, whose logits turn NaN when $NAN_PROBE is 1."""
    def __init__(self, in_channels, num_classes, context=None):
        super().__init__()
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, x):
        logits = self.fc(x.mean(dim=(2, 3)))
        return logits * float("nan") if os.environ.get("NAN_PROBE") == "1" else logits
'''


RANK_PROBE = '''
import os
from torch import nn
from bench.api.registry import register_head

@register_head("rank_probe")
class RankProbe(nn.Module):
    """Average pooling + linear that raises on process 1 only, in training or in evaluation."""
    def __init__(self, in_channels, num_classes, context=None, *, fail_in: str = "train"):
        super().__init__()
        self.fc = nn.Linear(in_channels, num_classes)
        self.fail_in = fail_in

    def forward(self, x):
        if os.environ.get("RANK") == "1" and self.training == (self.fail_in == "train"):
            raise RuntimeError(f"probe failure on process 1 in {self.fail_in}")
        return self.fc(x.mean(dim=(2, 3)))
'''


def start(grid: Path, results: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(ROOT / "run_bench.py"), "--grid", str(grid), "--results", str(results)],
        cwd=ROOT, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def finished_files(results: Path) -> dict[str, str]:
    """run id -> sha256 of its row file, for every finished row."""
    out = {}
    for path in (results / "runs").glob("*.parquet"):
        if pq.read_table(path).column("status")[0].as_py() == "finished":
            out[path.stem] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def grid_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("grid") / "kill.toml"
    path.write_text(GRID)
    return path


@pytest.fixture(scope="module")
def reference(grid_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("reference")
    result = run_cli("--grid", str(grid_file), "--results", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


# Crash points, set in a launch through $HEADBENCH_TEST_KILL = "<point>:<n>": the launch kills
# itself (SIGKILL) at the n-th time it reaches the point. The hook wraps os.rename / os.replace
# (the last step of every atomic write), so it needs nothing from the harness's internals.
#   checkpoint_written: right after an epoch checkpoint folder is renamed into place (it appears);
#   checkpoint_writing: an epoch checkpoint folder complete but for its largest file, which is cut
#                       to half its size, before the rename (a kill inside save_state);
#   row_writing:        a result row's temporary file cut to half its size, before the rename.
CRASH_HOOK = """
import os, re, signal
_spec = os.environ.get("HEADBENCH_TEST_KILL")
if _spec:
    _point, _n = _spec.split(":")
    _seen = [0]
    _rename, _replace = os.rename, os.replace

    def _here(point):
        if point != _point:
            return False
        _seen[0] += 1
        return _seen[0] == int(_n)

    def _cut_short(path):
        os.truncate(path, os.path.getsize(path) // 2)

    def _die():
        os.kill(os.getpid(), signal.SIGKILL)

    def rename(src, dst, *args, **kwargs):
        if re.search(r"epoch_[0-9]{4}[.]tmp$", os.fspath(src)):
            if _here("checkpoint_writing"):
                files = [os.path.join(src, f) for f in os.listdir(src)]
                _cut_short(max(files, key=os.path.getsize))
                _die()
            if _here("checkpoint_written"):
                _rename(src, dst, *args, **kwargs)
                _die()
        return _rename(src, dst, *args, **kwargs)

    def replace(src, dst, *args, **kwargs):
        target = os.fspath(dst)
        if os.path.basename(os.path.dirname(target)) == "runs" and target.endswith(".parquet") and _here("row_writing"):
            _cut_short(os.fspath(src))
            _die()
        return _replace(src, dst, *args, **kwargs)

    os.rename, os.replace = rename, replace
"""

# each launch is killed at one point; the kill after a checkpoint appeared comes first, so the
# second launch must resume from it
KILL_PLAN = ("checkpoint_written:1", "checkpoint_writing:1", "checkpoint_written:2", "row_writing:1", "checkpoint_written:3", "row_writing:1")


def test_sigkill_at_checkpoints_and_writes_loses_nothing_and_trains_nothing_twice(grid_file: Path, reference: Path, tmp_path: Path) -> None:
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(CRASH_HOOK)
    out = tmp_path / "results"
    seen: dict[str, str] = {}
    resumed: list[bool] = []
    for point in KILL_PLAN:
        env = {"HEADBENCH_TEST_KILL": point, "PYTHONPATH": os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")]), "PYTHONUNBUFFERED": "1"}
        proc = start(grid_file, out, env)
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == -signal.SIGKILL, (point, proc.returncode, stderr[-2000:])  # the point was reached
        resumed.append("resuming" in stdout)
        if len(resumed) == 2:  # the launch after the first kill (on a checkpoint's appearance) resumed from it
            assert resumed[1], "no restart resumed from a checkpoint"
        now = finished_files(out) if (out / "runs").is_dir() else {}
        for run_id, digest in seen.items():
            assert now.get(run_id) == digest, f"finished row {run_id} was rewritten after a restart"
        seen = now
        for path in (out / "runs").glob("*.parquet") if (out / "runs").is_dir() else ():
            pq.read_table(path)  # never a half-written row under its final name
    final = run_cli("--grid", str(grid_file), "--results", str(out))
    assert final.returncode == 0, final.stderr[-3000:]
    assert f"{4 - len(seen)} trained, {len(seen)} already done" in final.stdout
    for run_id, digest in seen.items():
        assert finished_files(out)[run_id] == digest
    for path in (out / "runs").iterdir():
        assert path.suffix == ".parquet" and not path.name.startswith(".")  # no temp files left behind
        pq.read_table(path)  # every file reads
    mine, theirs = load_all(out).set_index("run_id"), load_all(reference).set_index("run_id")
    assert set(mine.index) == set(theirs.index) and (mine["status"] == "finished").all()
    # resuming from epoch checkpoints reproduces the uninterrupted runs exactly
    for metric in ("mAP", "CF1", "OF1", "final_train_loss"):
        assert (mine.loc[theirs.index, metric] == theirs[metric]).all(), metric
    assert not any((out / "checkpoints").iterdir()) and not any((out / "locks").iterdir())


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_sigterm_and_sigint_stop_cleanly_and_the_run_resumes(grid_file: Path, reference: Path, tmp_path: Path, signum: int) -> None:
    """Stopped on the first epoch checkpoint's appearance: the launch finishes its current step,
    writes nothing half-done, exits 128 + signal; the next launch resumes and equals an
    uninterrupted run."""
    out = tmp_path / "results"
    proc = start(grid_file, out)
    deadline = time.time() + 300
    while not list((out / "checkpoints").glob("*/epoch_0000/progress.json")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, stderr[-2000:]
    assert f"stopped by signal {int(signum)}" in stderr and "run the same command again" in stderr
    assert "Traceback" not in stderr
    rows = load_all(out) if list((out / "runs").glob("*.parquet")) else None
    assert rows is None or (rows["status"] == "finished").all()  # the stopped run left no row
    assert not any((out / "locks").iterdir())
    again = run_cli("--grid", str(grid_file), "--results", str(out))
    assert again.returncode == 0 and "resuming" in again.stdout
    mine, theirs = load_all(out).set_index("run_id"), load_all(reference).set_index("run_id")
    assert set(mine.index) == set(theirs.index) and (mine["status"] == "finished").all()
    for metric in ("mAP", "CF1", "final_train_loss"):
        assert (mine.loc[theirs.index, metric] == theirs[metric]).all(), metric


def test_failed_run_is_recorded_the_grid_goes_on_and_retry_failed_reruns_only_it(tmp_path: Path) -> None:
    plugins = tmp_path / "heads"
    plugins.mkdir()
    (plugins / "nan_probe.py").write_text(NAN_PROBE)
    grid = tmp_path / "g.toml"
    grid.write_text(GRID.replace("seeds = [0, 1]", "seeds = [0]").replace('pool = ["avg", "max"]', 'pool = ["avg"]\n[[heads]]\nname = "nan_probe"').replace("epochs = 3", "epochs = 1"))
    out = tmp_path / "results"
    env = {"HEADBENCH_HEADS_PATH": str(plugins), "NAN_PROBE": "1"}
    first = run_cli("--grid", str(grid), "--results", str(out), env=env)
    assert first.returncode == 1
    failed_lines = [line for line in first.stderr.splitlines() if line.startswith("FAILED ")]
    assert len(failed_lines) == 1 and "nan_probe" in failed_lines[0] and "training loss is nan" in failed_lines[0]
    rows = load_all(out).set_index("head")
    assert rows.loc["baseline", "status"] == "finished"
    assert rows.loc["nan_probe", "status"] == "failed" and rows.loc["nan_probe", "error_type"] == "NonFiniteLoss"
    assert "## Failed runs" in (out / "leaderboard.md").read_text()

    again = run_cli("--grid", str(grid), "--results", str(out), env=env)
    assert again.returncode == 0 and "0 trained, 1 already done, 0 failed, 1 failed before (use --retry-failed)" in again.stdout

    retry = run_cli("--grid", str(grid), "--results", str(out), "--retry-failed", env={**env, "NAN_PROBE": "0"})
    assert retry.returncode == 0, retry.stderr[-2000:]
    assert "1 trained, 1 already done, 0 failed" in retry.stdout
    rows = load_all(out)
    assert len(rows) == 2 and (rows["status"] == "finished").all()


def test_a_failure_on_one_process_fails_the_run_on_all_and_the_grid_goes_on(tmp_path: Path) -> None:
    """Without sharing the failure, process 0 would wait in DDP's all-reduce (or the evaluation
    gather) until the process group's timeout; the subprocess timeout (300 s) catches a hang."""
    plugins = tmp_path / "heads"
    plugins.mkdir()
    (plugins / "rank_probe.py").write_text(RANK_PROBE)
    grid = tmp_path / "g.toml"
    grid.write_text(
        GRID.replace("seeds = [0, 1]", "seeds = [0]").replace('pool = ["avg", "max"]', 'pool = ["avg"]').replace("epochs = 3", "epochs = 1")
        + '[[heads]]\nname = "rank_probe"\nfail_in = ["train", "eval"]\n'
    )
    out = tmp_path / "results"
    result = run_cli("--grid", str(grid), "--results", str(out), launcher=accelerate_launch(2), env={"HEADBENCH_HEADS_PATH": str(plugins)})
    assert result.returncode == 1, result.stderr[-3000:]
    failed_lines = [line for line in result.stderr.splitlines() if line.startswith("FAILED ")]
    assert len(failed_lines) == 2, result.stderr[-3000:]
    rows = load_all(out)
    assert len(rows) == 3 and (rows["world_size"] == 2).all()
    assert rows.set_index("head").loc["baseline", "status"] == "finished"
    probes = rows[rows["head"] == "rank_probe"].set_index(rows[rows["head"] == "rank_probe"]["hparams"].map(lambda h: h["fail_in"]))  # JSON columns come back decoded
    assert (probes["status"] == "failed").all() and (probes["error_type"] == "PeerFailure").all()
    assert "training step 0" in probes.loc["train", "error"] and "evaluation batch 0" in probes.loc["eval", "error"]
    for mode in ("train", "eval"):
        assert f"process 1: RuntimeError: probe failure on process 1 in {mode}" in probes.loc[mode, "error"]


def test_two_launches_on_one_results_directory(grid_file: Path, reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "results"
    first, second = start(grid_file, out), start(grid_file, out)
    outputs = [p.communicate(timeout=300) for p in (first, second)]
    assert first.returncode == 0 and second.returncode == 0, [o[1][-2000:] for o in outputs]
    trained = [int(o[0].split(" trained,")[0].split()[-1]) for o in outputs]
    assert sum(trained) == 4  # every run trained by exactly one launch
    rows = load_all(out)
    assert len(rows) == 4 and rows["run_id"].is_unique and (rows["status"] == "finished").all()
    assert set(rows["run_id"]) == set(load_all(reference)["run_id"])


def test_lock_is_exclusive_and_stale_locks_are_reclaimed(tmp_path: Path) -> None:
    a, b = RunLock(tmp_path, "r1"), RunLock(tmp_path, "r1")
    assert a.acquire() and not b.acquire()
    owner = a.owner()
    assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
    a.release()
    assert b.acquire()
    b.release()
    # an owner on this host that is no longer alive
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    lock = RunLock(tmp_path, "r2")
    lock.path.parent.mkdir(parents=True, exist_ok=True)
    lock.path.write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead), "since": 0}))
    assert lock.acquire() and lock.owner()["pid"] == os.getpid()
    # an owner on another host that stopped refreshing its lock
    other = RunLock(tmp_path, "r3", stale_after=60)
    other.path.write_text(json.dumps({"host": "elsewhere", "pid": 1, "since": 0}))
    assert not other.acquire()
    old = time.time() - 120
    os.utime(other.path, (old, old))
    assert other.acquire()
