"""Issue 12's promise, tried as a new user would: a head file copied into ``heads/`` of a copy of
the project, with no other edit, is in both full grids, trains with ``--heads NAME`` on a grid
that does not list it, appears in the leaderboard, and is covered by the contract test."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, TINY_GRID

NEW_HEAD = '''
"""A user's head: generalised-mean pooling, then a linear classifier."""
from typing import Literal

import torch
from torch import nn

from bench.api import Head, HeadContext, register_head


@register_head("gem_probe")
class GeMHead(Head):
    sweep = ({"p": [1.0, 3.0]},)

    def __init__(self, in_channels: int, num_classes: int, context: HeadContext | None = None, *,
                 p: float = 3.0, norm: Literal["none", "l2"] = "none") -> None:
        super().__init__()
        self.p, self.norm = p, norm
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, d, h, w] -> [B, C]
        pooled = x.clamp(min=1e-6).pow(self.p).mean(dim=(2, 3)).pow(1.0 / self.p)
        if self.norm == "l2":
            pooled = nn.functional.normalize(pooled, dim=1)
        return self.fc(pooled)
'''


@pytest.fixture(scope="module")
def clone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the project's tracked layout with one more file in heads/."""
    copy = tmp_path_factory.mktemp("clone")
    for folder in ("bench", "heads", "datasets", "configs"):
        shutil.copytree(ROOT / folder, copy / folder, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "run_bench.py", copy / "run_bench.py")
    (copy / "heads" / "gem_probe.py").write_text(NEW_HEAD)
    return copy


def run(clone: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HEADBENCH_ROOT_") and k != "HEADBENCH_HEADS_PATH"}
    env["PYTHONPATH"] = str(clone)  # the copy's bench/, not the installed one
    return subprocess.run([sys.executable, str(clone / "run_bench.py"), *args], cwd=clone, env=env, capture_output=True, text=True, timeout=600)


def test_dropped_head_is_in_both_full_grids(clone: Path) -> None:
    full = run(clone, "--grid", "full", "--dry-run")
    assert full.returncode == 0, full.stderr[-2000:]
    assert "gem_probe x2" in " ".join(full.stdout.split())
    embedded = run(clone, "--grid", "full-embedded", "--dry-run", "--heads", "gem_probe")
    assert embedded.returncode == 0, embedded.stderr[-2000:]
    listed = [line for line in embedded.stdout.splitlines() if "/ gem_probe(" in line]
    assert len(listed) == 4 and all("p=1.0" in line or "p=3.0" in line for line in listed)  # 2 configurations x 2 seeds


def test_dropped_head_trains_from_a_grid_that_does_not_list_it(clone: Path) -> None:
    grid = clone / "configs" / "tiny.toml"
    grid.write_text(TINY_GRID)
    out = clone / "results"
    result = run(clone, "--grid", "tiny", "--heads", "gem_probe,baseline", "--results", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    board = (out / "leaderboard.md").read_text()
    assert board.count("gem_probe") >= 2  # both configurations of its declared sweep are ranked


def test_no_grid_root_is_a_usage_error_that_names_the_roots_and_the_embedded_grid(clone: Path) -> None:
    result = run(clone, "--grid", "full")
    assert result.returncode == 2
    text = " ".join(result.stderr.split())
    assert "--data-root voc2007=PATH" in text and "--data-root coco2014=PATH" in text and "full-embedded" in text
    assert "Traceback" not in result.stderr
