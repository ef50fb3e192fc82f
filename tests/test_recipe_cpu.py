"""Recipe promises on the CPU, through the command line: bf16 mixed precision trains (and is not
silently fp32), fp16 is refused before training, and a val_fraction that leaves no training image
is a usage error before training."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import TINY_GRID, run_cli

from bench.cli import main
from bench.results.store import load_all

ONE_HEAD = TINY_GRID.replace('pool = ["avg", "max"]', 'pool = ["avg"]')


def grid(tmp_path: Path, recipe: str, name: str = "g.toml") -> Path:
    path = tmp_path / name
    path.write_text(ONE_HEAD.replace("epochs = 1", f"epochs = 1\n{recipe}"))
    return path


def test_bf16_trains_on_the_cpu_and_differs_from_fp32_only_by_rounding(tmp_path: Path) -> None:
    rows = {}
    for precision in ("no", "bf16"):
        out = tmp_path / precision
        result = run_cli("--grid", str(grid(tmp_path, f'mixed_precision = "{precision}"', f"{precision}.toml")), "--results", str(out))
        assert result.returncode == 0, result.stderr[-3000:]
        rows[precision] = load_all(out).iloc[0]
    bf16, fp32 = rows["bf16"], rows["no"]
    assert bf16["status"] == "finished" and bf16["mixed_precision"] == "bf16" and fp32["mixed_precision"] == "no"
    assert bf16["run_id"] != fp32["run_id"]  # the precision is part of the run's identity
    # bf16 autocast rounds the forward pass to 8 mantissa bits: the loss moves, but not far
    assert bf16["final_train_loss"] != fp32["final_train_loss"]
    assert bf16["final_train_loss"] == pytest.approx(fp32["final_train_loss"], rel=0.05)
    assert 0.0 <= bf16["mAP"] <= 1.0


def test_fp16_on_the_cpu_is_refused_before_training(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "r"
    status = main(["--grid", str(grid(tmp_path, 'mixed_precision = "fp16"')), "--results", str(out)])
    err = capsys.readouterr().err
    assert status == 2, err
    assert err.startswith("error: ") and "mixed_precision = 'fp16' needs a CUDA GPU" in err and "'bf16'" in err
    assert not (out / "runs").is_dir() or not any((out / "runs").iterdir())


@pytest.mark.parametrize("fraction", [0.999, 0.995])
def test_a_val_fraction_that_leaves_no_training_image_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture, fraction: float) -> None:
    """96 training images: 0.999 and 0.995 hold out round(95.9) = round(95.5) = 96, none left to train on."""
    out = tmp_path / "r"
    path = grid(tmp_path, f'select = "best_val"\nval_fraction = {fraction}')
    status = main(["--grid", str(path), "--results", str(out)])
    captured = capsys.readouterr()
    assert status == 2, captured.err
    assert captured.err.startswith("error: ") and "Traceback" not in captured.err
    assert f"val_fraction = {fraction} of 96 training images holds out 96" in captured.err
    assert "one for training" in captured.err
    assert not (out / "runs").is_dir() or not any((out / "runs").iterdir())  # nothing trained
