"""``run_bench.py --submit slurm|local`` (issue 27): local jobs give the plain launch's runs and
metrics, a fake ``sbatch`` shows what a SLURM array asks for, and a task signalled before its time
limit requeues and finishes with the metrics of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import ROOT, TINY_GRID, run_cli
from submitit.core.utils import DelayedSubmission

from bench.cli import main
from bench.cluster.task import GridTask, TaskSpec, launch_command
from bench.config.grid import load_grid, shard_cells
from bench.results.store import load_all

GRID = TINY_GRID.replace("epochs = 1", "epochs = 2")
METRICS = ("mAP", "CF1", "OF1", "final_train_loss")
# the CPU's thread count changes the last digits of a convolution: every launch here uses one
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def grid_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("grid") / "two.toml"
    path.write_text(GRID)
    return path


@pytest.fixture(scope="module")
def reference(grid_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One plain launch of the grid."""
    out = tmp_path_factory.mktemp("plain")
    result = run_cli("--grid", str(grid_file), "--results", str(out), env=ONE_THREAD)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def same_runs_and_metrics(mine: Path, theirs: Path) -> None:
    a, b = load_all(mine).set_index("run_id"), load_all(theirs).set_index("run_id")
    assert sorted(a.index) == sorted(b.index) and len(a) == 2
    assert (a["status"] == "finished").all()
    for metric in METRICS:
        assert (a.loc[b.index, metric] == b[metric]).all(), metric


def task_logs(logs: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(logs.glob("*_log.out"))}


def test_two_local_jobs_one_signalled_before_its_time_limit_give_the_runs_and_metrics_of_one_plain_launch(
    grid_file: Path, reference: Path, tmp_path: Path
) -> None:
    """``--submit local --jobs 2 --wait``: each job trains its shard; job 1 gets the signal SLURM
    sends before a time limit in the middle of its run, requeues and resumes from the epoch
    checkpoint; the report is built at the end. One submission for all of it (the suite's time)."""
    out = tmp_path / "results"
    printed = tmp_path / "submit.out"
    with open(printed, "w") as sink:
        cli = subprocess.Popen(
            [sys.executable, str(ROOT / "run_bench.py"), "--grid", str(grid_file), "--results", str(out),
             "--submit", "local", "--jobs", "2", "--cpus-per-task", "1", "--wait"],
            cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT, text=True,
        )
        first_run = shard_cells(load_grid(str(grid_file)).cells, 1, 2)[0].run_id
        deadline = time.time() + 240
        while not (out / "checkpoints" / first_run / "epoch_0000" / "progress.json").exists() and time.time() < deadline:
            assert cli.poll() is None, printed.read_text()[-3000:]
            time.sleep(0.1)
        controller = psutil.Process(int(json.loads((out / "submitit" / "submission.json").read_text())["job_ids"][0]))
        # SLURM sends its warning signal to every process of the job step: the task and its launch
        task = controller.children()[0]
        for proc in [task, *task.children(recursive=True)]:
            try:
                proc.send_signal(signal.SIGUSR2)
            except psutil.NoSuchProcess:  # a short-lived helper of the launcher
                pass
        assert cli.wait(timeout=300) == 0, printed.read_text()[-3000:]
    text = printed.read_text()
    ids = next(line for line in text.splitlines() if "job ids:" in line).split("job ids:")[1].split()
    assert len(ids) == 2
    assert f"logs: {out / 'submitit'}" in text and "progress: " in text and " status --results " in text
    assert "task 1/2: every run finished after 2 attempt(s)" in text and "task 2/2: every run finished after 1 attempt(s)" in text
    assert (out / "leaderboard.md").is_file()
    same_runs_and_metrics(out, reference)
    first, second = (task_logs(out / "submitit")[f"{job}_0_log.out"] for job in ids)
    # each job trained its own share: an ignored --shard would give one job both runs
    assert "grid two (shard 1/2): 1 cells" in first and "grid two (shard 2/2): 1 cells" in second
    assert "1 trained, 0 already done, 0 failed;" in second
    # job 1: stopped cleanly between steps (its launch ignores USR2), requeued, resumed from the checkpoint
    assert "requeued after attempt 1" in first and "attempt 2:" in first
    assert "stopped by signal 15" in (out / "submitit" / f"{ids[0]}_0_log.err").read_text()
    assert "resuming" in first and "from its checkpoint" in first
    assert "1 trained, 0 already done, 0 failed;" in first.split("attempt 2:")[1]


FAKE_SBATCH = """#!/bin/sh
# a fake sbatch: records its arguments and the script it is given, answers like SLURM
echo "ARGS: $*" >> "$FAKE_SBATCH_RECORD"
cat "$1" >> "$FAKE_SBATCH_RECORD"
echo "Submitted batch job 4242"
"""


@pytest.fixture
def fake_sbatch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fake ``sbatch`` (and ``srun``, which submitit looks for) first on PATH; returns its record."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(FAKE_SBATCH)
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    for tool in ("sbatch", "srun"):
        (bin_dir / tool).chmod(0o755)
    record = tmp_path / "sbatch.txt"
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SBATCH_RECORD", str(record))
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))  # submit() prepends the project: restored after
    return record


def test_fake_sbatch_receives_the_array_the_resources_and_the_requeue_signal(
    fake_sbatch: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    record = fake_sbatch
    grid = tmp_path / "lab.toml"
    grid.write_text(GRID + '\n[submit]\nconstraint = "a100"\nsetup = ["module load cuda/12.4"]\nsignal_delay_s = 180\njobs = 5\n')
    out = tmp_path / "results"
    status = main([
        "--grid", str(grid), "--results", str(out), "--submit", "slurm", "--jobs", "2", "--partition", "gpu", "--time", "2:00:00",
        "--gpus-per-node", "4", "--cpus-per-task", "16", "--mem-gb", "64", "--account", "lab", "--qos", "high", "--sbatch=--mail-type=END",
    ])
    printed = capsys.readouterr().out
    assert status == 0
    assert "array job 4242; job ids: 4242_0 4242_1" in printed and f"logs: {out / 'submitit'}" in printed
    lines = record.read_text().splitlines()
    sbatch = {line for line in lines if line.startswith("#SBATCH")}
    assert {
        "#SBATCH --array=0-1%2",  # --jobs 2 wins over the table's jobs = 5
        "#SBATCH --partition=gpu", "#SBATCH --time=120", "#SBATCH --nodes=1", "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gpus-per-node=4", "#SBATCH --cpus-per-task=16", "#SBATCH --mem=65536MB", "#SBATCH --account=lab",
        "#SBATCH --qos=high", "#SBATCH --mail-type=END", "#SBATCH --constraint=a100",
        "#SBATCH --signal=USR2@180",  # the requeue signal, 180 s before the time limit ([submit] signal_delay_s)
    } <= sbatch, sorted(sbatch)
    assert "module load cuda/12.4" in lines
    assert any(line.startswith("srun ") and "-m submitit.core._submit" in line for line in lines)
    # each array task is the requeueable task for its shard, launching 4 processes on its node
    cells = load_grid(str(grid)).cells
    for k in (1, 2):
        delayed = DelayedSubmission.load(out / "submitit" / f"4242_{k - 1}_submitted.pkl")
        spec = delayed.function.spec
        assert isinstance(delayed.function, GridTask) and (spec.index, spec.count) == (k, 2)
        assert spec.run_ids == tuple(c.run_id for c in shard_cells(cells, k, 2))
        cmd = launch_command(spec, nodes=1, node_rank=0, main_host="n1", cpus=16)
        assert cmd[cmd.index("--num_processes") + 1] == "4" and "--multi_gpu" in cmd
        assert cmd[cmd.index("--num_cpu_threads_per_process") + 1] == "4" and cmd[-2:] == ["--shard", f"{k}/2"]


def test_more_jobs_than_cell_families_submits_one_task_per_family(fake_sbatch: Path, grid_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["--grid", str(grid_file), "--results", str(tmp_path / "r"), "--submit", "slurm", "--jobs", "5"]) == 0
    assert "the grid has 2 job(s) (cell families) to deal out: submitting 2 task(s), not 5" in capsys.readouterr().out
    assert "#SBATCH --array=0-1%2" in fake_sbatch.read_text().splitlines()
    specs = [DelayedSubmission.load(tmp_path / "r" / "submitit" / f"4242_{k}_submitted.pkl").function.spec for k in (0, 1)]
    assert [(s.index, s.count, len(s.run_ids)) for s in specs] == [(1, 2, 1), (2, 2, 1)]


def test_a_task_over_two_nodes_launches_one_machine_rank_per_node() -> None:
    spec = TaskSpec(1, 3, ("--grid", "g.toml"), ("0" * 16,), "/r", gpus_per_node=4, cpus_per_task=None, port=29501,
                    signal_delay_s=120, max_requeues=5, idle_requeues=1)
    cmd = launch_command(spec, nodes=2, node_rank=1, main_host="node07", cpus=None, python="py")
    flag = {name: cmd[cmd.index(name) + 1] for name in ("--num_machines", "--num_processes", "--machine_rank", "--main_process_ip", "--main_process_port")}
    assert flag == {"--num_machines": "2", "--num_processes": "8", "--machine_rank": "1", "--main_process_ip": "node07", "--main_process_port": "29501"}
    assert cmd[-4:] == ["--grid", "g.toml", "--shard", "1/3"]


def test_a_task_stops_requeuing_when_attempts_make_no_progress_and_after_max_requeues(tmp_path: Path) -> None:
    run_id = "ab" * 8
    spec = TaskSpec(1, 1, (), (run_id,), str(tmp_path), gpus_per_node=0, cpus_per_task=None, port=29500,
                    signal_delay_s=60, max_requeues=4, idle_requeues=1)
    task = GridTask(spec)
    task.begin_attempt()
    assert isinstance(task.checkpoint(), DelayedSubmission)  # first idle attempt: allowed (idle_requeues = 1)
    task.begin_attempt()
    epoch = tmp_path / "checkpoints" / run_id / "epoch_0000"
    epoch.mkdir(parents=True)
    (epoch / "progress.json").write_text("{}")
    assert isinstance(task.checkpoint(), DelayedSubmission) and task.idle == 0  # an epoch checkpoint is progress
    task.begin_attempt()
    assert isinstance(task.checkpoint(), DelayedSubmission) and task.idle == 1
    task.begin_attempt()
    assert task.checkpoint() is None and task.idle == 2  # two idle attempts in a row: no requeue
    busy = GridTask(spec)
    for attempt in range(1, 6):
        busy.begin_attempt()
        os.utime(epoch / "progress.json", (time.time() + attempt, time.time() + attempt))
        again = busy.checkpoint()
        assert (again is None) == (attempt > 4), attempt  # max_requeues = 4


def test_submit_without_submitit_says_how_to_install_it(tiny_grid: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "blocked" / "submitit"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text('raise ImportError("No module named submitit")\n')
    result = run_cli("--grid", str(tiny_grid), "--results", str(tmp_path / "r"), "--submit", "local",
                     env={"PYTHONPATH": str(blocker.parent)})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "pip install -e '.[cluster]'" in result.stderr


@pytest.mark.parametrize(("table", "flags", "message"), [
    ('[submit]\ntime = "2 hours"\n', [], "[submit]: time = '2 hours'; expected minutes"),
    ("[submit]\ngpu = 4\n", [], "[submit]: unknown key 'gpu'; valid: 'partition'"),
    ("[submit]\nnodes = 0\n", [], "[submit]: nodes = 0; expected an integer >= 1"),
    ("", ["--jobs", "0"], "--jobs: jobs = 0; expected an integer >= 1"),
    ("", ["--sbatch", "mail type"], "--sbatch: sbatch entry 'mail type'"),
    ("", ["--nodes", "2"], "--submit local runs on this machine: nodes = 2"),
    ("", ["--shard", "1/2"], "leave out --shard"),
])
def test_bad_submit_settings_are_usage_errors_naming_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture, table: str, flags: list[str], message: str
) -> None:
    grid = tmp_path / "g.toml"
    grid.write_text(GRID + "\n" + table)
    assert main(["--grid", str(grid), "--results", str(tmp_path / "r"), "--submit", "local", *flags]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert not (tmp_path / "r" / "submitit").exists()  # nothing submitted
