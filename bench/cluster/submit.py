"""Submit a grid as ``jobs`` tasks through submitit: a SLURM job array, or local jobs on this machine.

Task K of N runs ``--shard K/N`` of the grid (see :mod:`bench.cluster.task` for why a fixed share
rather than claiming the next free run). The submission is recorded in ``<logs>/submission.json``
(job ids, executor, the command that shows progress).
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import submitit

from bench.cluster.settings import SubmitSettings
from bench.cluster.task import GridTask, TaskOutcome, TaskSpec
from bench.config.grid import Cell, shard_cells
from bench.core.errors import UsageError
from bench.core.atomic import atomic_write_bytes
from bench.core.paths import PROJECT_ROOT

PORT_BASE = 29500


@dataclass
class Submission:
    """What was submitted: one job per task, in task order."""

    settings: SubmitSettings
    jobs: list[submitit.Job]
    status_command: str

    @property
    def job_ids(self) -> list[str]:
        return [job.job_id for job in self.jobs]


def shares(cells: list[Cell], jobs: int) -> list[tuple[str, ...]]:
    """The run ids of shard K/N for K = 1..N, N = ``jobs`` or the number of cell families if the
    grid has fewer (a task with an empty shard would have nothing to run)."""
    count = jobs
    while count > 1:
        try:  # shard N/N is empty exactly when the grid has fewer than N families
            shard_cells(cells, count, count)
            break
        except UsageError:
            count -= 1
    return [tuple(c.run_id for c in shard_cells(cells, k, count)) for k in range(1, count + 1)]


def task_specs(shares: list[tuple[str, ...]], run_args: list[str], results_dir: Path, settings: SubmitSettings) -> list[TaskSpec]:
    """One spec per non-empty share (``shares[k]``: the run ids of shard k+1 of len(shares))."""
    count = len(shares)
    return [
        TaskSpec(
            index=k + 1, count=count, run_args=tuple(run_args), run_ids=share, results_dir=str(results_dir),
            gpus_per_node=settings.gpus_per_node, cpus_per_task=settings.cpus_per_task, port=PORT_BASE + k % 1000,
            signal_delay_s=settings.signal_delay_s, max_requeues=settings.max_requeues, idle_requeues=settings.idle_requeues,
        )
        for k, share in enumerate(shares)
    ]


def _slurm_executor(settings: SubmitSettings) -> submitit.SlurmExecutor:
    executor = submitit.SlurmExecutor(folder=settings.logs, max_num_timeout=settings.max_requeues)
    params = {
        "job_name": settings.job_name, "time": settings.time_min, "nodes": settings.nodes, "ntasks_per_node": 1,
        "signal_delay_s": settings.signal_delay_s, "array_parallelism": settings.jobs,
        "partition": settings.partition, "cpus_per_task": settings.cpus_per_task, "account": settings.account,
        "qos": settings.qos, "constraint": settings.constraint, "setup": settings.setup or None,
        "additional_parameters": dict(settings.sbatch) or None,
    }
    if settings.gpus_per_node:
        params["gpus_per_node"] = settings.gpus_per_node
    if settings.mem_gb is not None:
        params["mem"] = f"{int(round(settings.mem_gb * 1024))}MB"
    executor.update_parameters(**{k: v for k, v in params.items() if v is not None})
    return executor


def _local_executor(settings: SubmitSettings) -> submitit.LocalExecutor:
    executor = submitit.LocalExecutor(folder=settings.logs, max_num_timeout=settings.max_requeues)
    executor.update_parameters(timeout_min=settings.time_min, signal_delay_s=settings.signal_delay_s)
    if settings.setup:
        executor.update_parameters(setup=settings.setup)
    return executor


@contextlib.contextmanager
def _output_to(path: Path) -> Iterator[None]:
    """Within the block, file descriptors 1 and 2 write to ``path``: a local job's controller
    inherits them and outlives this command, and must not hold the caller's terminal or pipe open
    (``run_bench.py --submit local | tee`` would wait for the jobs)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(path, "ab") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    try:
        yield
    finally:
        for fd, copy in zip((1, 2), saved):
            os.dup2(copy, fd)
            os.close(copy)


def submit(specs: list[TaskSpec], settings: SubmitSettings, status_command: str) -> Submission:
    """Submit one task per spec; SLURM gets them as one array (``--array=0-(N-1)%N``)."""
    # the task process imports this project's `bench` (cloudpickle stores classes by module name)
    os.environ["PYTHONPATH"] = os.pathsep.join([str(PROJECT_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    settings.logs.mkdir(parents=True, exist_ok=True)
    if settings.executor == "slurm":
        executor = _slurm_executor(settings)
        with executor.batch():  # one array; each task is the Checkpointable itself, so submitit requeues it
            pending = [executor.submit(GridTask(spec)) for spec in specs]
        jobs = list(pending)
    else:
        jobs = []
        with _output_to(settings.logs / "local-controllers.log"):
            for k, spec in enumerate(specs):
                executor = _local_executor(settings)
                gpus = settings.gpus_per_node
                executor.update_parameters(gpus_per_node=gpus, visible_gpus=tuple(range(k * gpus, (k + 1) * gpus)))
                jobs.append(executor.submit(GridTask(spec)))
    submission = Submission(settings, jobs, status_command)
    record = {
        "executor": settings.executor, "job_ids": submission.job_ids, "tasks": len(jobs), "logs": str(settings.logs),
        "status": status_command, "argv": [sys.executable, *sys.argv],
    }
    atomic_write_bytes(settings.logs / "submission.json", (json.dumps(record, indent=1) + "\n").encode())
    return submission


def wait(submission: Submission) -> tuple[list[TaskOutcome], list[str]]:
    """Block until every task ends: the outcomes of the tasks that finished and one line per task
    that did not (its error's last line; the log has the rest)."""
    outcomes, failures = [], []
    for job in submission.jobs:
        try:
            outcomes.append(job.result())
        except Exception as exc:  # noqa: BLE001 - submitit re-raises the task's error with its traceback as text
            last = [line for line in str(exc).strip().splitlines() if line.strip()]
            failures.append(f"job {job.job_id}: {last[-1] if last else type(exc).__name__} (log: {job.paths.stderr})")
    return outcomes, failures


def describe(submission: Submission) -> list[str]:
    """The lines printed after submitting: job ids, log folder, progress command."""
    ids = submission.job_ids
    where = "SLURM" if submission.settings.executor == "slurm" else "this machine (submitit local jobs)"
    head = ids[0].split("_")[0] if submission.settings.executor == "slurm" and "_" in ids[0] else None
    return [
        f"submitted {len(ids)} task(s) to {where}" + (f": array job {head}" if head else "") + f"; job ids: {' '.join(ids)}",
        f"logs: {submission.settings.logs}",
        f"progress: {submission.status_command}",
    ]


def status_command(grid_file: Path, results_dir: Path, filters: list[str]) -> str:
    return shlex.join([sys.executable, str(PROJECT_ROOT / "run_bench.py"), "status", "--results", str(results_dir), "--grid", str(grid_file), *filters])
