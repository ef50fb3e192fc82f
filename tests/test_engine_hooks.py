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

from bench.api import Head, HeadContext, build_dataset, register_head, register_loss
from bench.api.observe import observed_mask
from bench.config.grid import load_grid
from bench.eval.tuning import select_points
from bench.models.losses import LargeLossCorrectionPermanent
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


# -- LL-Cp: permanent correction (Kim et al., CVPR 2022) through the trainer ---------------------------

LLCP_CALLS: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor, float]] = []  # what the loss got
LLCP_BATCHES: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (rows, targets, known) from the loader


@register_loss("probe_ll_cp")
class ProbeLLCp(LargeLossCorrectionPermanent):
    """LL-Cp with δ = 0.1 that records every call (logits, targets and mask as given, the value)."""

    def __init__(self, delta_rel: float = 0.1) -> None:
        super().__init__(delta_rel)

    def forward(self, logits, targets, known=None, epoch=1):
        value = super().forward(logits, targets, known=known, epoch=epoch)
        LLCP_CALLS.append((epoch, logits.detach().double().clone(), targets.detach().clone(), known.clone(), value.item()))
        return value


@register_head("probe_noisy_logits")
class ProbeNoisyLogits(Head):
    """A linear head whose training logits get a large seeded noise, so which unknown losses are
    largest changes from step to step (an entry flipped at epoch 2 may be small at epoch 3)."""

    def __init__(self, in_channels: int, num_classes: int, context: HeadContext | None = None) -> None:
        super().__init__()
        self.fc = nn.Linear(in_channels, num_classes)
        self.noise = torch.Generator().manual_seed(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.fc(x.mean(dim=(2, 3)))
        if self.training and x.shape[0] > 2:  # not the memory probe's forward
            out = out + 3.0 * torch.randn(out.shape, generator=self.noise)
        return out


def record_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    from bench.engine.trainer import Trainer

    real = Trainer.losses

    def losses(self, feats, targets, known=None, label_state=None, rows=None):
        LLCP_BATCHES.append((rows.clone(), targets.clone(), known.clone()))
        return real(self, feats, targets, known, label_state, rows)

    monkeypatch.setattr(Trainer, "losses", losses)


def llcp_reference(delta: float = 0.1) -> tuple[int, int]:
    """Replays every recorded step with the paper's rule in float64: the entries flipped so far are
    observed positives; from epoch 2 the k = ceil(B·C·(1 − clean_rate)) largest losses among the
    other unknowns (ties included) are flipped and stay positive. Checks what the loss was given
    and its value; returns (entries flipped at epoch 2, of them those seen at epoch 3 as positives
    whose loss as a negative was below that step's threshold)."""
    assert len(LLCP_CALLS) == len(LLCP_BATCHES) > 0
    corrected: dict[tuple[int, int], int] = {}  # (row, class) -> epoch it was flipped
    flipped_at_2, small_later = 0, 0
    for (epoch, x, t_given, k_given, value), (rows, t0, k0) in zip(LLCP_CALLS, LLCP_BATCHES):
        b_n, c_n = x.shape
        known = [[bool(k0[b, c]) or (int(rows[b]), c) in corrected for c in range(c_n)] for b in range(b_n)]
        target = [[1.0 if (int(rows[b]), c) in corrected else float(t0[b, c]) * bool(k0[b, c]) for c in range(c_n)] for b in range(b_n)]
        for b in range(b_n):
            for c in range(c_n):
                assert bool(k_given[b, c]) == known[b][c]
                if known[b][c]:
                    assert float(t_given[b, c]) == target[b][c]
        loss = {(b, c): bce(float(x[b, c]), target[b][c] if known[b][c] else 0.0) for b in range(b_n) for c in range(c_n)}
        unknown = [e for e in loss if not known[e[0]][e[1]]]
        rate = 1.0
        for _ in range(epoch - 1):
            rate -= delta
        flips: list[tuple[int, int]] = []
        threshold = math.inf
        if rate != 1 and unknown:
            k = min(math.ceil(b_n * c_n * (1 - rate)), len(unknown))
            threshold = sorted((loss[e] for e in unknown), reverse=True)[k - 1]
            flips = [e for e in unknown if loss[e] >= threshold]
        total = sum(bce(float(x[e]), 1.0) if e in flips else loss[e] for e in loss)
        assert value == pytest.approx(total / (b_n * c_n), rel=1e-5, abs=1e-6)
        if epoch == 3:
            small_later += sum(1 for (b, c) in loss if corrected.get((int(rows[b]), c)) == 2 and bce(float(x[b, c]), 0.0) < threshold)
        for b, c in flips:
            corrected[(int(rows[b]), c)] = epoch
            flipped_at_2 += epoch == 2
    return flipped_at_2, small_later


def bce(x: float, y: float) -> float:
    """-[y log σ(x) + (1 - y) log(1 - σ(x))], float64."""
    p = 1.0 / (1.0 + math.exp(-x))
    return -(y * math.log(p) + (1 - y) * math.log(1 - p))


LLCP_GRID = GRID.replace("epochs = 2", "epochs = 3")
LLCP_DATASET = 'observe = "fraction"\nobserve_fraction = 0.5'


def test_ll_cp_flips_the_largest_unknown_losses_for_good(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    LLCP_CALLS.clear()
    LLCP_BATCHES.clear()
    record_batches(monkeypatch)
    run(LLCP_GRID.format(recipe='loss = "probe_ll_cp"', dataset=LLCP_DATASET, heads='[[heads]]\nname = "probe_noisy_logits"\n',
                         tune=""), tmp_path / "r")
    flipped_at_2, small_later = llcp_reference()
    assert flipped_at_2 > 0, "epoch 2 flips the largest unknown losses"
    assert small_later > 0, "at epoch 3 an entry flipped at epoch 2 is a positive although its loss as a negative is small"


LLCP_RECIPE = 'loss = "ll_cp"\nll_cp_delta_rel = 0.1'


def test_ll_cp_corrections_survive_a_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stopped before epoch 3, the run resumes from the checkpoint after epoch 2, which carries the
    flipped entries: its row and weights are those of the uninterrupted run."""
    from bench.engine.interrupt import Interrupted
    from bench.engine.trainer import Trainer
    from bench.results.store import load_weights

    grid = LLCP_GRID.format(recipe=LLCP_RECIPE, dataset=LLCP_DATASET, heads='[[heads]]\nname = "baseline"\n', tune="")
    reference = run(grid, tmp_path / "reference").iloc[0]
    real = Trainer.run_epoch

    def stop_before_epoch_3(self, *args, **kwargs):
        if self.epoch == 2:
            raise Interrupted("stopped by the test before epoch 3")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "run_epoch", stop_before_epoch_3)
    out = tmp_path / "resumed"
    assert run(grid, out).empty
    (folder,) = (out / "checkpoints").glob("*/epoch_0001")
    corrected = torch.load(folder / "state.pt", weights_only=True)["corrected"]
    assert corrected.dtype == torch.bool and corrected.shape == (48, 14) and corrected.any()
    monkeypatch.setattr(Trainer, "run_epoch", real)
    resumed = run(grid, out).iloc[0]
    assert resumed["run_id"] == reference["run_id"]
    for key in ("final_train_loss", "mAP", "CF1"):
        assert resumed[key] == reference[key], key
    a, b = load_weights(out, resumed["run_id"]), load_weights(tmp_path / "reference", reference["run_id"])
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_ll_cp_heads_together_equal_heads_alone(tmp_path: Path) -> None:
    """Each head keeps its own corrections: two ll_cp heads in one pass give what each gives alone."""
    heads = '[[heads]]\nname = "baseline"\npool = ["avg", "max"]\n'
    rows = {}
    for together in (True, False):
        grid = LLCP_GRID.format(recipe=LLCP_RECIPE, dataset=LLCP_DATASET, heads=heads,
                                tune=f"[run]\nheads_together = {str(together).lower()}")
        rows[together] = run(grid, tmp_path / f"together_{together}").set_index("run_id").sort_index()
    assert len(rows[True]) == 2 and list(rows[True].index) == list(rows[False].index)
    for key in ("final_train_loss", "mAP", "CF1"):
        np.testing.assert_allclose(rows[True][key].to_numpy(float), rows[False][key].to_numpy(float), rtol=1e-6, atol=1e-7, err_msg=key)
    # and the two heads differ, so a shared correction table could not pass unnoticed
    assert rows[True]["final_train_loss"].iloc[0] != rows[True]["final_train_loss"].iloc[1]
