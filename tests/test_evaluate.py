"""``run_bench.py evaluate`` (bench/engine/evaluate.py): a finished run re-evaluated from its saved
weights gives the scores and metrics of its row, on every protocol; a failed run is refused saying
that it failed (issue 26, item 8)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator

from bench.config.grid import load_grid
from bench.core.errors import UsageError
from bench.engine.evaluate import evaluate_run, predict_run
from bench.engine.interrupt import StopRequest
from bench.engine.progress import Progress
from bench.engine.rows import failed_row, write_row
from bench.engine.runner import run_grid
from bench.results import store as results

GRID = """
seeds = [0]
[recipe]
preset = "embedded_cpu"
epochs = 2
batch_size = 16
eval_batch_size = 32
image_size = 32
{recipe}
[[datasets]]
name = "shapes"
num_train = 48
num_test = 40
image_size = 32
[[backbones]]
name = "tiny_cnn"
[[heads]]
name = "baseline"
pool = "avg"
{run}
"""


@pytest.fixture(autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def train(tmp_path: Path, recipe: str, run: str = "") -> tuple[dict, Path]:
    path = tmp_path / "grid.toml"
    path.write_text(GRID.format(recipe=recipe, run=run))
    out = tmp_path / "results"
    with StopRequest() as stop:
        summary = run_grid(load_grid(str(path)), out, Accelerator(cpu=True), Progress(False), stop)
    assert not summary.failed, [o.error for o in summary.failed]
    (row,) = results.load_all(out).to_dict("records")
    return row, out


METRICS = ("mAP", "CP", "CR", "CF1", "mF1", "OP", "OR", "OF1")


@pytest.mark.parametrize(
    "recipe, run",
    [
        ('protocol = "frozen"\naugment = "none"', ""),  # scored on the cached float16 features in training
        ("freeze_backbone = true", '[run]\nsave_weights = "head"'),  # only the head saved: the backbone is rebuilt
        ("", ""),  # finetuned: the whole model saved
    ],
    ids=["frozen-protocol", "frozen-backbone-head-weights", "finetune"],
)
def test_evaluate_gives_the_rows_scores_and_metrics(tmp_path: Path, recipe: str, run: str) -> None:
    row, out = train(tmp_path, recipe, run)
    saved = results.load_scores(out, row["run_id"])
    preds = predict_run(row["run_id"], out, Accelerator(cpu=True))
    np.testing.assert_array_equal(preds.scores, saved["scores"])  # the same numbers, not merely close
    metrics = evaluate_run(row["run_id"], out, Accelerator(cpu=True))
    for key in METRICS:
        assert metrics[key] == row[key], key


def test_evaluate_refuses_a_failed_run_saying_it_failed(tmp_path: Path) -> None:
    path = tmp_path / "grid.toml"
    path.write_text(GRID.format(recipe="", run=""))
    (cell,) = load_grid(str(path)).cells
    out = tmp_path / "results"
    accelerator = Accelerator(cpu=True)
    write_row(out, accelerator, failed_row(cell, "g", accelerator, RuntimeError("probe: the loss exploded")), None)
    with pytest.raises(UsageError) as info:
        evaluate_run(cell.run_id, out, accelerator)
    text = str(info.value)
    assert "status 'failed'" in text and "probe: the loss exploded" in text and "save_weights" not in text
