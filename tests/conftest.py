"""Shared fixtures: a private cache folder, a tiny grid file, and a helper to run the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"

TINY_GRID = """
seeds = [0]
[recipe]
preset = "embedded_cpu"
epochs = 1
batch_size = 32
eval_batch_size = 50
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


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every test (and every subprocess it starts) caches generated data in one temp folder."""
    cache = tmp_path_factory.mktemp("cache")
    os.environ["HEADBENCH_CACHE"] = str(cache)
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # tests never depend on a GPU
    return cache


@pytest.fixture
def shared_data() -> Path:
    """``../shared/data`` (genuine VOC2007 labels, ML-GCN files); skips when it is absent."""
    data = SHARED / "data"
    if not data.is_dir():
        pytest.skip(f"{data} is absent: the genuine VOC2007 / ML-GCN test files live beside the project")
    return data


@pytest.fixture
def tiny_grid(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(TINY_GRID)
    return path


def run_cli(*args: str, launcher: list[str] | None = None, env: dict[str, str] | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``run_bench.py`` in a subprocess (optionally under ``accelerate launch``)."""
    command = [*(launcher or [sys.executable]), str(ROOT / "run_bench.py"), *args]
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(command, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)


def accelerate_launch(processes: int) -> list[str]:
    """``accelerate launch`` with N CPU processes in a gloo group (torchrun launcher)."""
    bin_dir = Path(sys.executable).parent
    flags = ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--num_processes", str(processes)]
    if processes > 1:
        flags.append("--multi_gpu")  # torchrun launcher; without a GPU the harness picks gloo on the CPU
    return [str(bin_dir / "accelerate"), "launch", *flags]
