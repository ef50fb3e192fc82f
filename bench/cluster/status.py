"""``run_bench.py status``: what a results directory holds, per job and per run, whatever launched
the runs (SLURM tasks, local jobs, a hand loop, one launch).

A run is ``finished`` or ``failed`` (its row), ``running`` (a live lock: whose, since when), or
``pending`` (nothing yet; or an epoch checkpoint to resume from; or a lock whose owner is gone).
With a grid, the runs are grouped into its jobs — a trained cell with the derived cells that reuse
it, or on a frozen backbone the head group that trains in one pass (the families that ``--shard``
deals out, :func:`bench.config.grid.shard_cells`) — and runs without a file yet are listed as
pending. Without one, only the runs that left a file are known.
"""

from __future__ import annotations

import re
import socket
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from bench.config.grid import Cell, head_group_key
from bench.results.locks import LOCKS, RunLock
from bench.results.store import load_all, run_status

STATES = ("finished", "running", "failed", "pending")
_EPOCH = re.compile(r"epoch_(\d+)$")


@dataclass
class RunState:
    run_id: str
    label: str
    state: str  # one of STATES
    detail: str = ""


@dataclass
class JobState:
    label: str
    runs: list[RunState] = field(default_factory=list)

    def counts(self) -> Counter:
        return Counter(r.state for r in self.runs)

    @property
    def state(self) -> str:
        """The job's state: running if any run is, else pending if any is, else failed if any is."""
        states = {r.state for r in self.runs}
        return next((s for s in ("running", "pending", "failed") if s in states), "finished")


def _ago(since: float, now: float) -> str:
    minutes = max(0, int(now - since) // 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes} min"


def _checkpoint_epoch(results_dir: Path, run_id: str) -> int | None:
    """The newest completed epoch checkpoint of a run (``checkpoints/<run_id>/[group_]epoch_NNNN``)."""
    folder = results_dir / "checkpoints" / run_id
    epochs = [int(m.group(1)) for p in folder.glob("*epoch_*") if p.is_dir() and (m := _EPOCH.search(p.name))]
    return max(epochs) if epochs else None


def run_state(results_dir: Path, run_id: str, label: str, error: str | None = None, now: float | None = None) -> RunState:
    """One run's state from its row, its lock and its epoch checkpoints."""
    now = time.time() if now is None else now
    status = run_status(results_dir, run_id)
    if status == "finished":
        return RunState(run_id, label, "finished")
    if status == "failed":
        return RunState(run_id, label, "failed", (error or "").strip().splitlines()[0][:160] if error else "")
    epoch = _checkpoint_epoch(results_dir, run_id)
    saved = f"checkpoint after epoch {epoch + 1}" if epoch is not None else ""
    resume = f"resumes from its {saved}" if saved else ""
    lock = RunLock(results_dir, run_id)
    owner = lock.owner()
    if lock.path.exists():
        who = f"{owner['host']}:{owner['pid']}" if owner else "unreadable lock"
        since = owner.get("since") if owner else None
        when = f" since {time.strftime('%Y-%m-%d %H:%M', time.localtime(since))} ({_ago(since, now)})" if isinstance(since, (int, float)) else ""
        if lock.is_claimed():
            return RunState(run_id, label, "running", f"lock {who}{when}" + (f"; {saved}" if saved else ""))
        gone = "owner gone" if owner and owner["host"] == socket.gethostname() else "lock not refreshed"
        return RunState(run_id, label, "pending", f"stale lock {who}{when} ({gone}; the next launch takes it over)" + (f"; {resume}" if resume else ""))
    return RunState(run_id, label, "pending", resume)


def grid_jobs(cells: list[Cell], results_dir: Path) -> list[JobState]:
    """The grid's jobs in expansion order, each with its runs' states."""
    families: dict[str, list[Cell]] = {}
    for cell in cells:
        families.setdefault(head_group_key(cell) or cell.source_run_id or cell.run_id, []).append(cell)
    errors = _errors(results_dir)
    jobs = []
    for family in families.values():
        first = family[0]
        if len(family) > 1:
            label = f"{first.dataset} / {first.backbone} / seed {first.seed}: {len(family)} runs ({', '.join(dict.fromkeys(c.head for c in family))})"
        else:
            label = first.describe()
        runs = [run_state(results_dir, c.run_id, f"{c.head}({', '.join(f'{k}={v}' for k, v in c.hparams.items())})", errors.get(c.run_id)) for c in family]
        jobs.append(JobState(label, runs))
    return jobs


def _errors(results_dir: Path) -> dict[str, str]:
    rows = load_all(results_dir) if (results_dir / "runs").is_dir() else None
    if rows is None or rows.empty:
        return {}
    failed = rows[rows["status"] == "failed"]
    return {r: str(e) for r, e in zip(failed["run_id"], failed["error"])}


def directory_jobs(results_dir: Path) -> list[JobState]:
    """Without a grid: every run that left a row, a lock or an epoch checkpoint, one job each."""
    rows = load_all(results_dir) if (results_dir / "runs").is_dir() else None
    labels, errors = {}, {}
    if rows is not None and not rows.empty:
        for row in rows.itertuples(index=False):
            hp = ", ".join(f"{k}={v}" for k, v in (row.hparams or {}).items())
            labels[row.run_id] = f"{row.dataset} / {row.backbone} / {row.head}({hp}) / seed {row.seed}"
            errors[row.run_id] = row.error
    ids = set(labels)
    ids |= {p.name.removesuffix(".lock") for p in (results_dir / LOCKS).glob("*.lock")}
    ids |= {p.name for p in (results_dir / "checkpoints").glob("*") if p.is_dir()}
    return [JobState(labels.get(r, r), [run_state(results_dir, r, labels.get(r, "(no row yet)"), errors.get(r))]) for r in sorted(ids)]


def format_status(jobs: list[JobState], title: str) -> list[str]:
    """The printed view: a summary line, then per job its state and per run its state and detail."""
    counts = Counter(r.state for job in jobs for r in job.runs)
    job_counts = Counter(job.state for job in jobs)
    lines = [
        title,
        f"runs: {sum(counts.values())}: " + ", ".join(f"{counts[s]} {s}" for s in STATES),
        f"jobs: {len(jobs)}: " + ", ".join(f"{job_counts[s]} {s}" for s in STATES),
    ]
    for i, job in enumerate(jobs, 1):
        c = job.counts()
        lines.append(f"job {i} [{job.state}] {job.label}  (" + ", ".join(f"{c[s]} {s}" for s in STATES if c[s]) + ")")
        for run in job.runs:
            lines.append(f"  {run.run_id}  {run.state:<8}  {run.label}" + (f"  {run.detail}" if run.detail else ""))
    return lines
