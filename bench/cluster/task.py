"""One array task: ``accelerate launch run_bench.py ... --shard K/N`` inside its allocation,
checkpointed and requeued through submitit when SLURM signals a time limit or a preemption.

The task process is submitit's (``python -m submitit.core._submit``); it starts the launch as a
child in a session of its own and polls it. SLURM sends its warning signal (``USR2`` unless
``$SUBMITIT_PREEMPT_SIGNAL`` says otherwise) to every process of the step; the launch's processes
ignore it (set before the launch starts, inherited through exec), and the task's handler, which
submitit installs, calls :meth:`GridTask.checkpoint`: it stops the launch with SIGTERM (the
harness finishes the current step, keeps the run's last epoch checkpoint and releases its lock),
then hands submitit the same task to requeue. The next attempt skips finished runs and resumes
the interrupted one from its epoch checkpoint.

A task requeues at most ``max_requeues`` times, and stops requeuing after ``idle_requeues``
attempts in a row in which none of its runs wrote a row or an epoch checkpoint (a run whose one
epoch never fits in the time limit would otherwise requeue forever). A run that fails inside the
harness is recorded as a ``failed`` row as in any launch and never causes a requeue.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import submitit
from submitit.core.utils import DelayedSubmission

from bench.core.paths import PROJECT_ROOT

#: the CLI writes its exit status to this file (main process only): the launcher turns every
#: non-zero status into 1, and the task must tell failed runs (1) from a usage error (2)
STATUS_FILE_ENV = "HEADBENCH_EXIT_STATUS_FILE"
POLL_S = 0.5


@dataclass(frozen=True)
class TaskSpec:
    """What array task ``index`` of ``count`` runs (pickled into the submission)."""

    index: int  # 1-based: the task's shard is index/count
    count: int
    run_args: tuple[str, ...]  # run_bench.py arguments, without --shard
    run_ids: tuple[str, ...]  # the runs of this shard (to measure progress)
    results_dir: str
    gpus_per_node: int
    cpus_per_task: int | None
    port: int
    signal_delay_s: int
    max_requeues: int
    idle_requeues: int


@dataclass(frozen=True)
class TaskOutcome:
    """What a finished task reports: the harness's exit status (0 all done, 1 some runs failed
    and are recorded as failed) and how many attempts it took."""

    index: int
    count: int
    status: int
    attempts: int

    def describe(self) -> str:
        what = "every run finished" if self.status == 0 else "some runs failed (recorded as failed rows)"
        return f"task {self.index}/{self.count}: {what} after {self.attempts} attempt(s)"


class TaskError(RuntimeError):
    """The launch ended without finishing its shard (usage error, crash, or a stop it did not ask for)."""


def launch_command(spec: TaskSpec, nodes: int, node_rank: int, main_host: str, cpus: int | None, python: str = sys.executable) -> list[str]:
    """``accelerate launch`` over ``nodes`` nodes with ``gpus_per_node`` processes each (one on a
    CPU), then ``run_bench.py <run_args> --shard index/count``."""
    per_node = max(spec.gpus_per_node, 1)
    processes = nodes * per_node
    cmd = [python, "-m", "accelerate.commands.launch", "--num_machines", str(nodes), "--num_processes", str(processes),
           "--mixed_precision", "no", "--dynamo_backend", "no"]
    if cpus:
        cmd += ["--num_cpu_threads_per_process", str(max(1, cpus // per_node))]
    if processes > 1:
        cmd += ["--multi_gpu", "--main_process_port", str(spec.port)]
    if nodes > 1:
        cmd += ["--machine_rank", str(node_rank), "--main_process_ip", main_host]
    return [*cmd, str(PROJECT_ROOT / "run_bench.py"), *spec.run_args, "--shard", f"{spec.index}/{spec.count}"]


def progress(results_dir: str | Path, run_ids: tuple[str, ...]) -> tuple[int, float]:
    """(rows written, newest epoch-checkpoint file time) over the task's runs: a change between two
    moments means the task got somewhere. The layout (``runs/<run_id>.parquet``,
    ``checkpoints/<run_id>/``, docs/distributed.md) is read here without bench.results.store, so
    the task process, which only waits on its launch, does not import torch (seconds per attempt)."""
    rows = sum((Path(results_dir) / "runs" / f"{r}.parquet").exists() for r in run_ids)
    newest = 0.0
    for run_id in run_ids:
        folder = Path(results_dir) / "checkpoints" / run_id
        if folder.is_dir():
            for path in folder.rglob("*"):
                try:
                    newest = max(newest, path.stat().st_mtime)
                except OSError:
                    continue
    return rows, newest


def preempt_signal() -> signal.Signals:
    """The signal submitit asks SLURM (and its local controller) to send before a time limit."""
    return signal.Signals[f"SIG{submitit.JobEnvironment.USR_SIG}"]


class GridTask(submitit.helpers.Checkpointable):
    """The callable submitit runs in each array task (and pickles again to requeue it)."""

    def __init__(self, spec: TaskSpec) -> None:
        self.spec = spec
        self.attempts = 0
        self.idle = 0  # attempts in a row without progress
        self._process: subprocess.Popen | None = None
        self._before: tuple[int, float] = (0, 0.0)

    def __getstate__(self) -> dict:
        return {"spec": self.spec, "attempts": self.attempts, "idle": self.idle}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._process = None
        self._before = (0, 0.0)

    def begin_attempt(self) -> None:
        """Count this attempt and note where the task's runs stand (for the progress rule)."""
        self.attempts += 1
        self._before = progress(self.spec.results_dir, self.spec.run_ids)

    def __call__(self) -> TaskOutcome:
        env = submitit.JobEnvironment()
        self.begin_attempt()
        cpus = self.spec.cpus_per_task or int(os.environ.get("SLURM_CPUS_PER_TASK", 0)) or None
        cmd = launch_command(self.spec, env.num_nodes, env.node, env.hostnames[0], cpus)
        status_file = env.paths.folder / f"{env.job_id}_{env.global_rank}_exit_status"
        status_file.unlink(missing_ok=True)
        print(f"headbench task {self.spec.index}/{self.spec.count} (job {env.job_id}), attempt {self.attempts}: {shlex.join(cmd)}", flush=True)
        sig = preempt_signal()
        previous = signal.signal(sig, signal.SIG_IGN)  # inherited by the launch: only this process acts on it
        try:
            self._process = subprocess.Popen(cmd, start_new_session=True, env={**os.environ, STATUS_FILE_ENV: str(status_file)})
        finally:
            signal.signal(sig, previous)
        try:
            while self._process.poll() is None:
                time.sleep(POLL_S)
        finally:
            self.stop_launch(grace_s=30)
        code = self._process.returncode
        harness = int(status_file.read_text()) if status_file.is_file() else None
        status_file.unlink(missing_ok=True)
        if env.global_rank != 0 or harness in (0, 1):
            return TaskOutcome(self.spec.index, self.spec.count, harness if harness is not None else code, self.attempts)
        if harness == 2:
            raise TaskError(f"task {self.spec.index}/{self.spec.count}: usage error (exit status 2); the message is in this task's log")
        if harness is not None and harness > 128:
            raise TaskError(f"task {self.spec.index}/{self.spec.count}: stopped by signal {harness - 128} without a requeue request; "
                            "its runs resume from their epoch checkpoints when the task runs again")
        raise TaskError(f"task {self.spec.index}/{self.spec.count}: accelerate launch exited with status {code} before the harness finished")

    def stop_launch(self, grace_s: float) -> None:
        """SIGTERM to the launch's whole session (a clean stop between steps); SIGKILL after ``grace_s``."""
        process = self._process
        if process is None or process.poll() is not None:
            return
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace_s
        while process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        if process.poll() is None:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait()

    def checkpoint(self, *args: object, **kwargs: object) -> DelayedSubmission | None:
        """Called by submitit's handler of the time-limit / preemption signal: stop the launch
        cleanly, then requeue this task (None: no requeue; submitit then records the task as
        failed with the reason)."""
        self.stop_launch(grace_s=max(5.0, self.spec.signal_delay_s - 30.0))
        moved = progress(self.spec.results_dir, self.spec.run_ids) != self._before
        self.idle = 0 if moved else self.idle + 1
        label = f"task {self.spec.index}/{self.spec.count}"
        if self.attempts > self.spec.max_requeues:
            print(f"{label}: not requeued: {self.attempts - 1} requeue(s) already (max_requeues = {self.spec.max_requeues})", flush=True)
            return None
        if self.idle > self.spec.idle_requeues:
            print(f"{label}: not requeued: {self.idle} attempt(s) in a row wrote no row and no epoch checkpoint "
                  f"(idle_requeues = {self.spec.idle_requeues}); give it more time per task", flush=True)
            return None
        print(f"{label}: requeued after attempt {self.attempts}", flush=True)
        return super().checkpoint(*args, **kwargs)
