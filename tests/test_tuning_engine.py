"""The engine's side of ``[tune] refit = true`` (docs/tuning.md): after a tune group's points all
have rows, the chosen point (best validation mAP from the rows, ties to the earliest point) is
trained again on the whole training split; a rerun finds it finished; a refit whose points are not
all done waits; a group whose every point failed gets a failed refit row that says why.

The expected choice is computed here from the points' rows (their ``val_mAP`` and ``tune_index``),
the expected training size from the grid's own ``num_train``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from bench.api import Head, HeadContext, register_head
from bench.config.grid import Grid, load_grid
from bench.engine.outcomes import GridSummary
from bench.results.store import load_all

NUM_TRAIN = 48
GRID = f"""
seeds = [0]
[recipe]
preset = "embedded_cpu"
epochs = 2
batch_size = 16
eval_batch_size = 40
image_size = 32
protocol = "frozen"
augment = "none"
select = "best_val"
val_fraction = 0.25
[[datasets]]
name = "shapes"
num_train = {NUM_TRAIN}
num_test = 30
image_size = 32
[[backbones]]
name = "tiny_cnn"
[[heads]]
name = "{{head}}"
[tune]
lr = [0.0001, 0.3, 0.01]
refit = true
"""


@register_head("refit_probe_fails")
class AlwaysFails(Head):
    """A head whose every training step raises: every point of its tune group fails."""

    def __init__(self, in_channels: int, num_classes: int, context: HeadContext | None = None) -> None:
        super().__init__()
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("refit probe: this head cannot train")


def load(out: Path, head: str = "baseline") -> Grid:
    path = out.with_suffix(".toml")
    path.write_text(GRID.format(head=head))
    return load_grid(str(path))


def run(grid: Grid, out: Path, retry_failed: bool = False) -> GridSummary:
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    from bench.engine import runner
    from bench.engine.interrupt import StopRequest
    from bench.engine.progress import Progress

    accelerator = Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(split_batches=True))
    with StopRequest() as stop:
        return runner.run_grid(grid, out, accelerator, Progress(False), stop, retry_failed=retry_failed)


def as_dict(value: object) -> dict:
    return value if isinstance(value, dict) else json.loads(str(value))


def refit_rows(rows: pd.DataFrame) -> pd.DataFrame:
    return rows[rows["tune_refit"].fillna(False).astype(bool)]


def test_the_refit_trains_the_chosen_point_on_the_whole_training_split_and_a_rerun_does_nothing(tmp_path: Path) -> None:
    out = tmp_path / "r"
    grid = load(out)
    assert len(grid.cells) == 3 and len(grid.refits) == 1
    summary = run(grid, out)
    assert not summary.failed, [o.error for o in summary.failed]
    rows = load_all(out)
    points = rows[~rows["tune_refit"].fillna(False).astype(bool)]
    refit = refit_rows(rows)
    assert len(points) == 3 and len(refit) == 1
    refit = refit.iloc[0]
    assert refit["status"] == "finished" and refit["tune_group"] == points["tune_group"].iloc[0]
    # the choice, from the rows: the highest validation mAP, ties to the lowest tune_index
    assert points["val_mAP"].nunique() == 3  # the points differ, so a wrong choice shows
    best = points.sort_values(["val_mAP", "tune_index"], ascending=[False, True]).iloc[0]
    recipe = as_dict(refit["recipe"])
    assert recipe["lr"] == as_dict(best["recipe"])["lr"] == as_dict(refit["tune_point"])["lr"]
    assert int(refit["tune_index"]) == int(best["tune_index"])
    assert recipe["select"] == "last"
    # train + validation: every training image, where a point trained on 3/4 of them
    assert int(refit["train_images"]) == NUM_TRAIN
    assert (points["train_images"] == NUM_TRAIN - round(0.25 * NUM_TRAIN)).all()
    assert refit["run_id"] not in set(points["run_id"])
    # a rerun: the choice is the same, so is the refit's run id: nothing trains
    again = run(load(out), out)
    assert again.trained == 0 and again.count("already-finished") == 4
    assert len(load_all(out)) == 4


def test_a_refit_waits_for_points_without_a_row_then_runs(tmp_path: Path) -> None:
    out = tmp_path / "w"
    grid = load(out)
    grid.cells = grid.cells[:2]  # the third point is another launch's, not run yet
    summary = run(grid, out)
    assert [o.status for o in summary.outcomes if o.cell.tune_refit] == ["points-unfinished"]
    assert refit_rows(load_all(out)).empty
    summary = run(load(out), out)
    assert [o.status for o in summary.outcomes if o.cell.tune_refit] == ["finished"]
    assert summary.trained == 2  # the third point and the refit


def test_a_group_whose_every_point_failed_gets_a_failed_refit_that_says_why(tmp_path: Path) -> None:
    out = tmp_path / "f"
    summary = run(load(out, head="refit_probe_fails"), out)
    rows = load_all(out)
    assert (rows["status"] == "failed").all() and len(rows) == 4
    refit = refit_rows(rows).iloc[0]
    assert "no point of the tune group can win" in refit["error"] and "3 of 3 failed" in refit["error"]
    assert len(summary.failed) == 4
    # not retried without --retry-failed; retried (and failing again, for the same reason) with it
    assert run(load(out, head="refit_probe_fails"), out).count("failed-before") == 4
    retried = run(load(out, head="refit_probe_fails"), out, retry_failed=True)
    assert len(retried.failed) == 4


# SIGKILL right after the first epoch checkpoint folder is renamed into place (it appears): a
# launch killed mid-pass, with one point's checkpoint on disk and the others' not.
KILL_HOOK = """
import os, re, signal
_rename = os.rename

def rename(src, dst, *args, **kwargs):
    _rename(src, dst, *args, **kwargs)
    if re.search(r"epoch_[0-9]{4}[.]tmp$", os.fspath(src)):
        os.kill(os.getpid(), signal.SIGKILL)

os.rename = rename
"""


def test_a_killed_tuned_group_resumes_to_the_rows_of_an_uninterrupted_launch(tmp_path: Path) -> None:
    import os
    import signal

    from conftest import run_cli

    grid = tmp_path / "g.toml"
    grid.write_text(GRID.format(head="baseline"))
    reference = tmp_path / "reference"
    done = run_cli("--grid", str(grid), "--results", str(reference))
    assert done.returncode == 0, done.stderr[-3000:]
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(KILL_HOOK)
    out = tmp_path / "killed"
    env = {"PYTHONPATH": os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")])}
    killed = run_cli("--grid", str(grid), "--results", str(out), env=env)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert list(out.glob("checkpoints/*/epoch_0000")) and not list(out.glob("runs/*.parquet"))
    again = run_cli("--grid", str(grid), "--results", str(out))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "4 trained, 0 already done" in again.stdout
    mine, theirs = load_all(out).set_index("run_id"), load_all(reference).set_index("run_id")
    assert set(mine.index) == set(theirs.index) and len(mine) == 4 and (mine["status"] == "finished").all()
    assert refit_rows(mine.reset_index())["run_id"].tolist() == refit_rows(theirs.reset_index())["run_id"].tolist()
    for metric in ("mAP", "final_train_loss", "val_mAP"):
        a, b = mine.loc[theirs.index, metric], theirs[metric]
        assert ((a == b) | (a.isna() & b.isna())).all(), metric
    assert not any((out / "locks").iterdir())


def test_shards_run_each_refit_with_its_tune_group(tmp_path: Path) -> None:
    from conftest import run_cli

    grid = tmp_path / "s.toml"
    grid.write_text(GRID.format(head="baseline").replace("seeds = [0]", "seeds = [0, 1]").replace("lr = [0.0001, 0.3, 0.01]", "lr = [0.0001, 0.3]"))
    out = tmp_path / "shards"
    seen = set()
    for k in (1, 2):
        done = run_cli("--grid", str(grid), "--results", str(out), "--shard", f"{k}/2")
        assert done.returncode == 0, done.stderr[-3000:]
        assert "3 trained, 0 already done" in done.stdout and "waiting" not in done.stdout, done.stdout[-2000:]
        rows = load_all(out)
        new = rows[~rows["run_id"].isin(seen)]
        seen |= set(new["run_id"])
        assert new["seed"].nunique() == 1 and len(refit_rows(new)) == 1  # a whole tune group with its refit
    assert len(seen) == 6
