"""What the one trainer hands to heads and losses: label states (label mask training) only to heads
that read them and only in training; the observed-label mask and the 1-based epoch to the loss;
tuning points of every head in one pass with their own optimizer settings and tune columns.

Each check is made against values computed here from the data (or from the rows' own recipes),
never against a stored output of the code under test.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from bench.api import Head, HeadContext, build_dataset, register_head
from bench.api.observe import observed_mask
from bench.config.grid import load_grid
from bench.eval.tuning import select_points
from bench.results.store import load_all

GRID = """
seeds = [0]
[recipe]
preset = "embedded_cpu"
epochs = 2
batch_size = 16
eval_batch_size = 40
image_size = 32
protocol = "frozen"
augment = "none"
{recipe}
[[datasets]]
name = "shapes"
num_train = 48
num_test = 30
image_size = 32
{dataset}
[[backbones]]
name = "tiny_cnn"
{heads}
{tune}
"""

SEEN: list[tuple[bool, torch.Tensor | None, int]] = []  # (training, label_state, batch size)


@register_head("probe_label_reader")
class ProbeLabelReader(Head):
    """A linear head that reads label states and records what it was given."""

    reads_label_states = True

    def __init__(self, in_channels: int, num_classes: int, context: HeadContext | None = None, *, scale: float = 1.0) -> None:
        super().__init__()
        self.fc = nn.Linear(in_channels, num_classes)
        self.scale = scale

    def forward(self, x: torch.Tensor, label_state: torch.Tensor | None = None) -> torch.Tensor:
        SEEN.append((self.training, None if label_state is None else label_state.detach().clone(), x.shape[0]))
        out = self.fc(x.mean(dim=(2, 3))) * self.scale
        if label_state is not None:
            out = out + (label_state == 1).float()  # a known positive raises its logit
        return out


def run(grid_text: str, out: Path) -> pd.DataFrame:
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    from bench.engine import runner
    from bench.engine.interrupt import StopRequest
    from bench.engine.progress import Progress

    path = out.with_suffix(".toml")
    path.write_text(grid_text)
    grid = load_grid(str(path))
    accelerator = Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(split_batches=True))
    with StopRequest() as stop:
        summary = runner.run_grid(grid, out, accelerator, Progress(False), stop)
    assert not summary.failed, [o.error for o in summary.failed]
    return load_all(out)


def test_label_states_reach_only_the_heads_that_read_them_and_only_in_training(tmp_path: Path) -> None:
    SEEN.clear()
    heads = '[[heads]]\nname = "probe_label_reader"\n[[heads]]\nname = "baseline"\n'  # baseline(x) takes no label state
    rows = run(GRID.format(recipe="", dataset="", heads=heads, tune=""), tmp_path / "r")
    assert (rows["status"] == "finished").all() and len(rows) == 2
    # training steps see batches of 16 (the memory estimate probes a copy of the head on 1-2 maps)
    training = [s for t, s, b in SEEN if t and b > 2]
    evaluation = [s for t, s, _ in SEEN if not t]
    assert len(training) == 2 * math.ceil(48 / 16) and evaluation
    assert all(s is not None for s in training), "a head that reads label states trains with them"
    assert all(s is None for s in evaluation), "evaluation never shows labels"
    states = torch.cat(training)
    assert set(states.unique().tolist()) <= {-1, 0, 1}
    c = states.shape[1]
    known = (states != -1).sum(dim=1)
    assert int(known.max()) <= math.floor(0.75 * c)  # the release's draw: 0 .. floor(0.75 C) known
    assert (known == 0).any() and (known > 0).any()


def test_label_states_are_the_same_alone_and_together(tmp_path: Path) -> None:
    """The draw comes from a stream of its own: a second head in the pass changes nothing."""
    SEEN.clear()
    run(GRID.format(recipe="", dataset="", heads='[[heads]]\nname = "probe_label_reader"\n', tune=""), tmp_path / "alone")
    alone = [s for t, s, b in SEEN if t and b > 2]
    SEEN.clear()
    heads = '[[heads]]\nname = "probe_label_reader"\n[[heads]]\nname = "baseline"\npool = ["avg", "max"]\n'
    run(GRID.format(recipe="", dataset="", heads=heads, tune=""), tmp_path / "together")
    together = [s for t, s, b in SEEN if t and b > 2]
    assert len(alone) == len(together)
    for a, b in zip(alone, together):
        assert torch.equal(a, b)


def expected_single_positive_share(seed_rows: int = 48) -> float:
    """The share of observed training entries at single-positive labels, from the data itself:
    one label per training image that has a positive (the holdout is off here)."""
    train = build_dataset("shapes", None, "train", num_train=48, num_test=30, image_size=32)
    targets = np.asarray(train.targets)
    return float((targets.sum(axis=1) > 0).sum()) / targets.size


def test_the_observed_mask_reaches_the_loss_and_the_row(tmp_path: Path) -> None:
    heads = '[[heads]]\nname = "baseline"\n'
    losses = {}
    for observe in ("all", "single_positive"):
        for unknown in ("ignore", "negative"):
            dataset = "" if observe == "all" else f'observe = "{observe}"'
            rows = run(GRID.format(recipe=f'unknown_labels = "{unknown}"', dataset=dataset, heads=heads, tune=""), tmp_path / f"{observe}_{unknown}")
            row = rows.iloc[0]
            losses[observe, unknown] = row["final_train_loss"]
            assert row["observe"] == observe
            if observe == "all":
                assert row["observed_fraction"] == pytest.approx(1.0)
            else:
                assert row["observed_fraction"] == pytest.approx(expected_single_positive_share())
    # all labels observed: the two treatments of unknown labels are one loss
    assert losses["all", "ignore"] == pytest.approx(losses["all", "negative"], rel=1e-6)
    # one positive per image: ignoring the unknowns is another loss than calling them negative
    assert abs(losses["single_positive", "ignore"] - losses["single_positive", "negative"]) > 1e-3


def test_the_observed_mask_is_what_the_mask_function_draws_from_the_training_targets() -> None:
    train = build_dataset("shapes", None, "train", num_train=48, num_test=30, image_size=32)
    mask = observed_mask(np.asarray(train.targets), {"observe": "single_positive"}, None)
    targets = np.asarray(train.targets, dtype=bool)
    assert (mask.sum(axis=1) == (targets.sum(axis=1) > 0)).all()
    assert targets[mask].all()  # what is observed is a positive


def test_tuning_points_of_every_head_train_in_one_pass_with_their_own_optimizer(tmp_path: Path) -> None:
    heads = '[[heads]]\nname = "baseline"\npool = ["avg", "max"]\n'
    tune = '[tune]\nlr = [0.001, 0.05]\noptimizer = ["adamw", "sgd"]\n'
    rows = run(GRID.format(recipe='select = "best_val"\nval_fraction = 0.25', dataset="", heads=heads, tune=tune), tmp_path / "t")
    assert len(rows) == 2 * 4 and (rows["status"] == "finished").all()
    passes = {json.dumps(t, sort_keys=True) for t in rows["trained_with"].map(lambda t: {"id": t["id"], "size": t["size"]})}
    assert len(passes) == 1 and json.loads(passes.pop())["size"] == 8  # one pass: 2 heads x 4 points
    for _, row in rows.iterrows():
        point = row["tune_point"] if isinstance(row["tune_point"], dict) else json.loads(row["tune_point"])
        recipe = row["recipe"] if isinstance(row["recipe"], dict) else json.loads(row["recipe"])
        assert (recipe["lr"], recipe["optimizer"]) == (point["lr"], point["optimizer"])
        assert row["tune_points"] == 4 and isinstance(row["tune_group"], str)
        assert np.isfinite(row["val_mAP"])
    assert rows.groupby("tune_group").size().tolist() == [4, 4]
    chosen = select_points(rows.to_dict("records"))
    for group, part in rows.groupby("tune_group"):
        best = part.sort_values(["val_mAP", "tune_index"], ascending=[False, True]).iloc[0]
        assert chosen[group].run_id == best["run_id"]
    # the points differ: an optimizer setting that were ignored would give identical weights
    assert rows.groupby("tune_group")["final_train_loss"].nunique().min() == 4


def test_a_full_disk_while_checkpointing_stops_the_launch_with_nothing_half_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ENOSPC inside an epoch checkpoint: a usage error naming the folder (exit 2 at the CLI), no
    temporary checkpoint folder, no failed row recorded for a run that did nothing wrong, no lock left."""
    import errno

    from bench.core.errors import NoSpaceError
    from bench.engine import checkpoints

    real_save = torch.save

    def full_disk(obj, path, *args, **kwargs):
        if str(path).endswith("state.pt"):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(checkpoints.torch, "save", full_disk)
    with pytest.raises(NoSpaceError, match="no space left in .*checkpoints"):
        run(GRID.format(recipe="", dataset="", heads='[[heads]]\nname = "baseline"\n', tune=""), tmp_path / "r")
    out = tmp_path / "r"
    assert not list(out.glob("checkpoints/*/*.tmp")), "a half-written checkpoint was left"
    assert not list(out.glob("runs/*.parquet")), "a run that did nothing wrong was recorded as failed"
    assert not [p for p in out.glob("locks/*") if p.is_file()], "the run's lock was not released"
