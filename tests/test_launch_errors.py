"""A usage error under ``accelerate launch`` (issue 28, item 1).

accelerate's launchers report any failing child as exit status 1 with a traceback (one process:
``CalledProcessError``; several: torchrun's ``ChildFailedError`` summary), so the harness's status 2
cannot get through them. ``make bench`` and the documented commands therefore run
``run_bench.py --validate`` first: the error is our one message and status 2, and the launcher
never starts.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, accelerate_launch, run_cli

BIN = str(Path(sys.executable).parent)
CRASH_MARKERS = ("Traceback", "CalledProcessError", "ChildFailedError", "FAILED")


def make_bench(*variables: str, dry: bool = False) -> subprocess.CompletedProcess:
    """``make bench`` with this interpreter's environment (``-o``: never (re)create .venv here)."""
    command = ["make", "--no-print-directory", *(["-n"] if dry else []), "-o", ".venv/.installed", "bench", f"BIN={BIN}", *variables]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ})


@pytest.mark.parametrize("processes", [1, 2])
def test_make_bench_with_a_bad_grid_prints_our_message_once_and_exits_2(processes: int, tmp_path: Path) -> None:
    result = make_bench("GRID=no-such-grid", f"RESULTS={tmp_path / 'r'}", f"NPROC={processes}")
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.count("error: grid 'no-such-grid' not found") == 1, result.stderr
    assert not any(marker in result.stderr + result.stdout for marker in CRASH_MARKERS), result.stderr
    assert "accelerate launch" not in result.stdout  # the launcher never started


@pytest.mark.parametrize("processes", [1, 2])
def test_make_bench_validates_then_launches(processes: int) -> None:
    lines = make_bench("GRID=smoke", f"NPROC={processes}", dry=True).stdout.splitlines()
    validate = next(i for i, line in enumerate(lines) if "run_bench.py --grid smoke --results results --validate" in line)
    launch = next(i for i, line in enumerate(lines) if "accelerate launch" in line and "run_bench.py --grid smoke" in line)
    assert validate < launch and f"--num_processes {processes}" in lines[launch]


def test_validate_passes_a_good_grid_and_trains_nothing(tiny_grid: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from bench.cli import main

    assert main(["--grid", str(tiny_grid), "--results", str(tmp_path), "--validate"]) == 0
    assert "tiny: 2 cells; every dataset, backbone and head builds; ready to launch" in capsys.readouterr().out
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


@pytest.mark.parametrize(("args", "message"), [
    (["--grid", "no-such-grid"], "error: grid 'no-such-grid' not found"),
    (["--shard", "3/2"], "error: --shard expects K/N with 1 <= K <= N"),
    (["--data-root", "nonsense"], "error: --data-root expects NAME=PATH"),
])
def test_validate_reports_usage_errors_with_status_2(
    tiny_grid: Path, tmp_path: Path, capsys: pytest.CaptureFixture, args: list[str], message: str
) -> None:
    from bench.cli import main

    assert main(["--grid", str(tiny_grid), "--results", str(tmp_path), *args, "--validate"]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("processes", [1, 2])
def test_usage_error_under_the_bare_launcher_shows_our_message_and_a_failing_status(processes: int, tmp_path: Path) -> None:
    """What README says of the bare launcher: our message is there, the status is the launcher's 1."""
    result = run_cli("--grid", "no-such-grid", "--results", str(tmp_path), launcher=accelerate_launch(processes), timeout=180)
    assert "error: grid 'no-such-grid' not found" in result.stderr
    assert result.returncode == 1  # accelerate: any failing child -> 1 (if this changes, README's note changes too)


def test_validate_builds_the_heads_so_a_bad_hyper_parameter_is_caught_before_the_launcher(
    tiny_grid: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from bench.cli import main

    grid = tmp_path / "bad.toml"
    grid.write_text(tiny_grid.read_text().replace('pool = ["avg", "max"]', 'pool = ["median"]'))
    assert main(["--grid", str(grid), "--results", str(tmp_path / "r"), "--validate"]) == 2
    assert "hyper-parameter 'pool' = 'median' is not allowed" in capsys.readouterr().err
