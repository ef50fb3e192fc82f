"""Model selection (recipe ``select``): the validation split, when the test split is read, which
epoch is kept, resume, and that ``last`` runs are what they were before selection existed.

A probe dataset (``counted_blocks``, registered from a temporary plugin folder) appends an event
to a log file whenever the TEST split's labels or images are read, and a probe head
(``flip_probe``) appends one for every training step. The order of the two kinds of event shows
whether a run read the test split before its training was over, whatever the image cache holds
(the labels are read on every load of the split, cache hit or not). The probe head also makes the
best validation epoch known in advance: in eval mode, once it has trained more than
``flip_after`` steps, it returns NEGATED logits (an inverted ranking), so every epoch after the
first scores far below the first, and its ``steps`` buffer, saved with the weights, tells which
epoch's weights a run kept.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file
from sklearn.metrics import average_precision_score

from bench.api import registry
from bench.api.registry import build_dataset, build_head
from bench.config.grid import config_hash, load_grid
from bench.config.recipe import resolve_recipe
from bench.core.errors import UsageError
from bench.engine.data_store import DataStore
from bench.engine.interrupt import StopRequest
from bench.engine.progress import Progress
from bench.engine.runner import run_grid
from bench.models.backbones import build_backbone
from bench.models.classifier import Classifier
from bench.results.store import load_all, load_scores

LOG_ENV = "HEADBENCH_TEST_SELECTION_LOG"

PLUGIN = '''
import os
import numpy as np
import torch
from torch import nn
from bench.api import Head, MultiLabelDataset, register_dataset, register_head

def log(event):
    path = os.environ.get("HEADBENCH_TEST_SELECTION_LOG")
    if path:
        with open(path, "a") as f:
            f.write(event + "\\n")

COLOURS = np.array([[230, 40, 40], [40, 200, 40], [40, 80, 230], [230, 220, 40]], dtype=np.float32)

@register_dataset("counted_blocks")
class CountedBlocks(MultiLabelDataset):
    """4 classes; class c draws a coloured block in quadrant c. Logs reads of the test split."""

    def __init__(self, root=None, split="train", *, num_train: int = 120, num_test: int = 40, tag: str = ""):
        self.tag = tag  # part of the fingerprint: a test gets image caches of its own
        self.split = self.check_split(split)
        self._n = num_train if split == "train" else num_test
        rng = np.random.default_rng(11 if split == "train" else 12)
        y = (rng.random((self._n, 4)) < 0.35).astype(np.uint8)
        y[np.arange(self._n), rng.integers(0, 4, self._n)] = 1
        self._targets, self._ignore = y, np.zeros(y.shape, dtype=bool)
        self._noise = rng.integers(0, 60, (self._n, 24, 24, 3)).astype(np.float32)
        self.classes = ["red", "green", "blue", "yellow"]

    def __len__(self):
        return self._n

    @property
    def targets(self):
        if self.split == "test":
            log("test-labels")
        return self._targets

    @property
    def ignore(self):
        if self.split == "test":
            log("test-labels")
        return self._ignore

    def load_image(self, i):
        if self.split == "test":
            log("test-image")
        image = self._noise[i].copy() + 60
        for c in np.flatnonzero(self._targets[i]):
            y0, x0 = 12 * (c // 2), 12 * (c % 2)
            image[y0 + 3 : y0 + 9, x0 + 3 : x0 + 9] = COLOURS[c]
        return image.clip(0, 255).astype(np.uint8)

    def fingerprint(self):
        return f"counted_blocks-v1-{self.split}-{self._n}-{self.tag}"

    def image_id(self, i):
        return f"{self.split}_{i:04d}"


@register_head("flip_probe")
class FlipProbe(Head):
    """Average pooling + linear. Logs every training step; in eval mode, once it has trained more
    than ``flip_after`` steps, returns negated logits."""

    def __init__(self, in_channels, num_classes, context=None, *, flip_after: int = 4):
        super().__init__()
        self.fc = nn.Linear(in_channels, num_classes)
        self.flip_after = flip_after
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))

    def forward(self, x):
        logits = self.fc(x.mean(dim=(2, 3)))
        if self.training:
            self.steps += 1
            log("train")
            return logits
        return -logits if int(self.steps) > self.flip_after else logits
'''

# 120 training images, val_fraction 0.1 -> 12 held out, 108 trained on: 4 steps of 32 per epoch
STEPS_PER_EPOCH = 4
PROBE_GRID = """
seeds = [0]
[recipe]
preset = "embedded_cpu"
epochs = 3
batch_size = 32
eval_batch_size = 64
image_size = 24
lr = 0.01
{recipe}
[[datasets]]
name = "counted_blocks"
tag = "{tag}"
[[backbones]]
name = "tiny_cnn"
[[heads]]
name = "flip_probe"
flip_after = 4
"""

SHAPES_GRID = """
seeds = [0, 1]
[recipe]
preset = "embedded_cpu"
epochs = 3
batch_size = 32
eval_batch_size = 64
image_size = {size}
{recipe}
[[datasets]]
name = "shapes"
num_train = 100
num_test = 48
image_size = 32
[[backbones]]
name = "tiny_cnn"
[[heads]]
name = "baseline"
pool = {pools}
"""


@pytest.fixture(scope="module", autouse=True)
def probe_plugins(tmp_path_factory: pytest.TempPathFactory) -> None:
    folder = tmp_path_factory.mktemp("selection_plugins")
    (folder / "selection_probes.py").write_text(PLUGIN)
    old = {k: os.environ.get(k) for k in ("HEADBENCH_HEADS_PATH", "HEADBENCH_DATASETS_PATH")}
    for key, value in old.items():
        os.environ[key] = os.pathsep.join(p for p in (str(folder), value) if p)
    registry.load_plugins()
    yield
    for key, value in old.items():
        if value is None:
            del os.environ[key]
        else:
            os.environ[key] = value


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> None:
    """The models here are tiny: one intra-op thread is as fast, and far faster on a busy machine."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


class StopAfterSteps:
    """A stop request that turns on once the probe head has logged ``steps`` training steps."""

    def __init__(self, log: Path, steps: int) -> None:
        self.log, self.steps = log, steps

    @property
    def requested(self) -> bool:
        return self.log.is_file() and self.log.read_text().split().count("train") >= self.steps


def write_grid(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "grid.toml"
    path.write_text(text)
    return path


def launch(grid_path: Path, results: Path, log: Path | None = None, stop: object | None = None):
    """Run a grid in this process, the probe logging to ``log``; return the summary."""
    if log is not None:
        os.environ[LOG_ENV] = str(log)
    try:
        with StopRequest() as request:
            return run_grid(load_grid(str(grid_path)), results, Accelerator(cpu=True), Progress(enabled=False), stop or request)
    finally:
        os.environ.pop(LOG_ENV, None)


def run(grid_path: Path, results: Path, log: Path | None = None) -> list[dict]:
    """Run a grid to the end; return its rows, by seed then hyper-parameters."""
    summary = launch(grid_path, results, log)
    assert not summary.failed and not summary.interrupted, [o.error for o in summary.failed]
    rows = load_all(results).to_dict("records")
    return sorted(rows, key=lambda r: (r["seed"], json.dumps(r["hparams"], sort_keys=True)))


def events(log: Path) -> list[str]:
    return log.read_text().split() if log.is_file() else []


def sklearn_map(scores: np.ndarray, targets: np.ndarray) -> float:
    """mAP over the classes with a positive (SPEC §1), by scikit-learn."""
    keep = targets.sum(axis=0) > 0
    return float(np.mean([average_precision_score(targets[:, c], scores[:, c]) for c in np.flatnonzero(keep)]))


@pytest.fixture(scope="module")
def best_val_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path, Path]:
    """One uninterrupted best_val run of the probe head: (row, results folder, probe log)."""
    folder = tmp_path_factory.mktemp("best_val")
    grid = write_grid(folder, PROBE_GRID.format(recipe='select = "best_val"', tag="best_val"))
    log = folder / "probe.log"
    (row,) = run(grid, folder / "results", log)
    return row, folder, log


# --------------------------------------------------------------------------------------------
# Recipe keys
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "table, expected",
    [
        ({"select": "best_val", "val_fraction": 0.0}, "'val_fraction' = 0.0 is out of range; expected a float > 0.0 and < 1.0"),
        ({"select": "best_val", "val_fraction": 1.0}, "'val_fraction' = 1.0 is out of range"),
        ({"select": "best_val", "val_fraction": float("nan")}, "'val_fraction' = nan is not a finite number"),
        ({"val_fraction": 0.2}, "'val_fraction' = 0.2 is used only with select = 'best_val'"),
        ({"select": "best"}, "'select' = 'best' is not allowed; expected one of 'last', 'best_val', 'best_test'"),
    ],
)
def test_bad_selection_keys_are_usage_errors_naming_the_key(table: dict, expected: str) -> None:
    with pytest.raises(UsageError) as info:
        resolve_recipe(table, "grid.toml")
    assert expected in str(info.value) and "grid.toml" in str(info.value)


def test_too_small_a_validation_split_is_refused_before_training(tmp_path: Path) -> None:
    grid = write_grid(tmp_path, PROBE_GRID.format(recipe='select = "best_val"\nval_fraction = 0.001', tag=""))
    with pytest.raises(UsageError, match=r"val_fraction = 0.001 of 120 training images holds out 0"):
        run_grid(load_grid(str(grid)), tmp_path / "results", Accelerator(cpu=True), Progress(enabled=False), StopRequest())
    assert not (tmp_path / "results" / "runs").is_dir() or not any((tmp_path / "results" / "runs").iterdir())


# --------------------------------------------------------------------------------------------
# The validation split
# --------------------------------------------------------------------------------------------


def test_validation_split_is_disjoint_from_training_and_the_same_for_every_head_seed_and_size(tmp_path: Path) -> None:
    store = DataStore(Accelerator(cpu=True))
    cells = []
    for size in (32, 48):
        text = SHAPES_GRID.format(recipe='select = "best_val"\nval_fraction = 0.15', pools='["avg", "max"]', size=size)
        cells += load_grid(str(write_grid(tmp_path / str(size), text))).cells
    assert len({(c.seed, c.hparams["pool"], c.recipe.image_size) for c in cells}) == 8

    dataset = build_dataset("shapes", None, "train", num_train=100, num_test=48, image_size=32)
    all_ids = [dataset.image_id(i) for i in range(len(dataset))]
    first = store.splits(cells[0])
    val_ids = first.val.image_ids
    assert len(val_ids) == 15  # round(0.15 * 100)
    assert not set(val_ids) & set(first.train.image_ids)
    assert sorted(val_ids + first.train.image_ids) == sorted(all_ids)
    # the labels travel with their images
    index = {image_id: i for i, image_id in enumerate(all_ids)}
    np.testing.assert_array_equal(first.val.targets, dataset.targets[[index[i] for i in val_ids]])
    np.testing.assert_array_equal(first.train.targets, dataset.targets[[index[i] for i in first.train.image_ids]])
    # the head's context counts the images it trains on only (hand co-occurrence, float64)
    kept = dataset.targets[[index[i] for i in first.train.image_ids]].astype(np.float64)
    counts = kept.T @ kept
    np.fill_diagonal(counts, 0)
    np.testing.assert_array_equal(first.context.counts, counts)
    np.testing.assert_array_equal(first.context.nums, kept.sum(axis=0))
    for cell in cells[1:]:
        assert store.splits(cell).val.image_ids == val_ids, cell.describe()


def test_a_last_run_has_no_validation_split_and_trains_on_every_image(tmp_path: Path) -> None:
    (cell,) = [c for c in load_grid(str(write_grid(tmp_path, SHAPES_GRID.format(recipe="", pools='["avg"]', size=32)))).cells if c.seed == 0]
    data = DataStore(Accelerator(cpu=True)).splits(cell)
    assert data.val is None and data.holdout is None and len(data.train.image_ids) == 100


# --------------------------------------------------------------------------------------------
# When the test split is read
# --------------------------------------------------------------------------------------------


def _assert_test_read_only_after_training(log: Path) -> None:
    seen = events(log)
    train = [i for i, e in enumerate(seen) if e == "train"]
    test = [i for i, e in enumerate(seen) if e.startswith("test")]
    assert len(train) == 3 * STEPS_PER_EPOCH  # ceil(108 / 32) = ceil(120 / 32) = 4 steps per epoch
    assert test, "the test split was never read"
    assert max(train) < min(test), f"test split read at event {min(test)}, before training step at event {max(train)}"


def test_best_val_reads_the_test_split_only_after_training(best_val_run: tuple[dict, Path, Path]) -> None:
    _row, _folder, log = best_val_run
    _assert_test_read_only_after_training(log)
    assert "test-image" in events(log)  # a fresh cache: the test images were decoded, after training


@pytest.mark.parametrize("select", ["last", "best_val"])
def test_frozen_protocol_and_last_read_the_test_split_only_after_training(select: str, tmp_path: Path) -> None:
    recipe = f'select = "{select}"\nprotocol = "frozen"\naugment = "none"'
    log = tmp_path / "probe.log"
    (row,) = run(write_grid(tmp_path, PROBE_GRID.format(recipe=recipe, tag=f"frozen_{select}")), tmp_path / "results", log)
    _assert_test_read_only_after_training(log)
    assert row["select"] == select
    assert row["train_images"] + row["val_images"] == 120 and row["val_images"] == (12 if select == "best_val" else 0)


@pytest.mark.parametrize("recipe", ['protocol = "frozen"\naugment = "none"', 'freeze_backbone = true\nselect = "best_val"'])
def test_a_group_of_heads_trained_together_reads_the_test_split_only_after_its_last_step(recipe: str, tmp_path: Path) -> None:
    """Two heads on a frozen backbone train in ONE pass (the default): the test split (labels or
    images) is read only after the last training step of both, as for a run of its own."""
    grid = write_grid(tmp_path, PROBE_GRID.format(recipe=recipe, tag=f"group_{len(recipe)}").replace("flip_after = 4", "flip_after = [4, 1000]"))
    log = tmp_path / "probe.log"
    rows = run(grid, tmp_path / "results", log)
    assert len(rows) == 2 and all(r["trained_with"]["size"] == 2 for r in rows)  # one pass of two heads
    seen = events(log)
    train = [i for i, e in enumerate(seen) if e == "train"]
    test = [i for i, e in enumerate(seen) if e.startswith("test")]
    # 2 heads x 3 epochs x steps; (the memory estimate adds one probe forward per head, before training)
    assert len(train) >= 2 * 3 * STEPS_PER_EPOCH
    assert test, "the test split was never read"
    assert max(train) < min(test), f"test split read at event {min(test)}, before training step at event {max(train)}"


def test_a_tuned_group_reads_the_test_split_only_after_every_point_trained_and_its_refit_after_the_choice(tmp_path: Path) -> None:
    """[tune] on a frozen backbone: the points of a group train in one pass and the test split is
    read only after the last step of every point (every choice of the group is made by then); the
    refit trains only after that, on all 120 training images."""
    recipe = 'select = "best_val"\nprotocol = "frozen"\naugment = "none"'
    text = PROBE_GRID.format(recipe=recipe, tag="tuned").replace("lr = 0.01\n", "") + "[tune]\nlr = [0.01, 0.1]\nrefit = true\n"
    log = tmp_path / "probe.log"
    rows = run(write_grid(tmp_path, text), tmp_path / "results", log)
    refit = [r for r in rows if r["tune_refit"]]
    assert len(rows) == 3 and len(refit) == 1 and refit[0]["train_images"] == 120
    seen = events(log)
    train = [i for i, e in enumerate(seen) if e == "train"]
    test = [i for i, e in enumerate(seen) if e.startswith("test")]
    refit_steps = 3 * STEPS_PER_EPOCH  # ceil(120 / 32) = 4 steps per epoch, a pass of one: no memory probe
    assert len(train) >= 2 * 3 * STEPS_PER_EPOCH + refit_steps
    points_last, refit_first = train[-refit_steps - 1], train[-refit_steps]
    assert test, "the test split was never read"
    assert points_last < min(test), f"test split read at event {min(test)}, before a point's training step at event {points_last}"
    assert min(test) < refit_first  # the refit trains after its group's rows are written (the choice needs them)


def test_best_test_reads_the_test_split_after_every_epoch(tmp_path: Path) -> None:
    """The positive control of the observation above: a best_test run is seen reading early."""
    log = tmp_path / "probe.log"
    (row,) = run(write_grid(tmp_path, PROBE_GRID.format(recipe='select = "best_test"', tag="best_test")), tmp_path / "results", log)
    seen = events(log)
    train = [i for i, e in enumerate(seen) if e == "train"]
    first_test = min(i for i, e in enumerate(seen) if e.startswith("test"))
    assert train[STEPS_PER_EPOCH - 1] < first_test < train[STEPS_PER_EPOCH]  # read after epoch 1, before epoch 2
    scores = row["selection_mAP"]
    assert len(scores) == 3
    assert row["selected_epoch"] == int(np.argmax(scores)) + 1 == 1  # the flipped epochs 2, 3 rank backwards
    assert row["mAP"] == pytest.approx(max(scores), abs=1e-12)
    assert math.isnan(row["val_mAP"]) and row["val_images"] == 0 and row["train_images"] == 120
    saved = load_scores(tmp_path / "results", row["run_id"])
    assert sklearn_map(saved["scores"], saved["targets"]) == pytest.approx(max(scores), abs=1e-6)
    # scoring the test split between epochs changes nothing in training: the last epoch's score is
    # the test mAP of the same run under select = "last"
    (last,) = run(write_grid(tmp_path / "last", PROBE_GRID.format(recipe="", tag="best_test")), tmp_path / "last" / "results")
    assert last["mAP"] == pytest.approx(scores[-1], abs=1e-12) and last["final_train_loss"] == row["final_train_loss"]


# --------------------------------------------------------------------------------------------
# Which epoch is kept
# --------------------------------------------------------------------------------------------


def test_best_val_keeps_the_epoch_with_the_best_validation_map(best_val_run: tuple[dict, Path, Path]) -> None:
    row, folder, _log = best_val_run
    scores = row["selection_mAP"]
    assert row["select"] == "best_val" and len(scores) == 3
    assert row["selected_epoch"] == int(np.argmax(scores)) + 1 == 1
    assert row["val_mAP"] == max(scores)
    assert row["train_images"] == 108 and row["val_images"] == 12

    # the kept weights are those after epoch 1: the head's step counter says so
    state = load_file(str(folder / "results" / "weights" / f"{row['run_id']}.safetensors"))
    assert int(state["head.steps"]) == STEPS_PER_EPOCH

    # their validation mAP, recomputed here from the held-out images with scikit-learn
    (cell,) = load_grid(str(folder / "grid.toml")).cells
    val = DataStore(Accelerator(cpu=True)).splits(cell).val
    backbone = build_backbone("tiny_cnn")
    model = Classifier(backbone, build_head("flip_probe", backbone.out_channels, 4, None, flip_after=4))
    model.load_state_dict(state)
    model.eval()
    with torch.no_grad():
        images = torch.from_numpy(np.asarray(val.images)).permute(0, 3, 1, 2).double().div(255.0).float()
        scores_val = torch.sigmoid(model(images)).double().numpy()
    assert sklearn_map(scores_val, np.asarray(val.targets)) == pytest.approx(row["val_mAP"], abs=1e-6)

    # and the row's test mAP is that of the saved per-image test scores
    saved = load_scores(folder / "results", row["run_id"])
    assert sklearn_map(saved["scores"], saved["targets"]) == pytest.approx(row["mAP"], abs=1e-6)


def test_resume_keeps_the_best_epoch_and_its_weights(best_val_run: tuple[dict, Path, Path], tmp_path: Path) -> None:
    reference, reference_folder, _log = best_val_run
    grid = write_grid(tmp_path, PROBE_GRID.format(recipe='select = "best_val"', tag="best_val"))
    log = tmp_path / "probe.log"
    # killed in epoch 3: the checkpoint after epoch 2 must carry the best epoch (1), its score and weights
    results = tmp_path / "results"
    summary = launch(grid, results, log, stop=StopAfterSteps(log, 2 * STEPS_PER_EPOCH + 1))
    assert summary.interrupted and not list(results.glob("runs/*.parquet"))
    (checkpoint,) = (results / "checkpoints").glob("*/epoch_*")
    assert checkpoint.name == "epoch_0001"
    progress = json.loads((checkpoint / "progress.json").read_text())
    assert progress["selection"]["best_epoch"] == 1 and len(progress["selection"]["scores"]) == 2
    assert int(load_file(str(checkpoint / "selection_best.safetensors"))["head.steps"]) == STEPS_PER_EPOCH

    (row,) = run(grid, results, log)
    for key in ("run_id", "selected_epoch", "val_mAP", "selection_mAP", "mAP", "CF1", "final_train_loss"):
        assert row[key] == reference[key], key
    weights = lambda r, d: load_file(str(d / "weights" / f"{r['run_id']}.safetensors"))  # noqa: E731
    ref_state, state = weights(reference, reference_folder / "results"), weights(row, results)
    assert all(torch.equal(ref_state[k], state[k]) for k in ref_state)


# --------------------------------------------------------------------------------------------
# ``last`` is unchanged
# --------------------------------------------------------------------------------------------

#: measured with the code BEFORE model selection existed (same grid, this repository's torch):
#: shapes 100/48 images at 32 px, tiny_cnn, baseline avg, seed 0, 3 epochs of embedded_cpu
BEFORE = {"mAP": 0.22775997594169634, "CF1": 0.06978417266187051, "OF1": 0.24242424242424243, "final_train_loss": 0.3891247510910034}


def test_last_rows_and_run_ids_are_unchanged(tmp_path: Path) -> None:
    grid = write_grid(tmp_path, SHAPES_GRID.format(recipe="", pools='["avg"]', size=32).replace("seeds = [0, 1]", "seeds = [0]"))
    (cell,) = load_grid(str(grid)).cells
    recipe = {k: v for k, v in cell.recipe.to_dict().items() if k not in ("select", "val_fraction")}
    # keys of the same kind (left out of the identity at their defaults), added earlier and later
    recipe = {k: v for k, v in recipe.items() if not k.startswith(("asl_", "ll_")) and k != "unknown_labels"}
    expected_id = config_hash({**cell.config(), "recipe": recipe})
    assert cell.run_id == expected_id
    best_val = load_grid(str(write_grid(tmp_path / "bv", grid.read_text().replace("epochs = 3", 'epochs = 3\nselect = "best_val"')))).cells[0]
    assert best_val.run_id != cell.run_id

    (row,) = run(grid, tmp_path / "results")
    assert row["run_id"] == expected_id
    assert row["select"] == "last" and row["selected_epoch"] == 3 and math.isnan(row["val_mAP"]) and row["selection_mAP"] is None
    assert row["train_images"] == 100 and row["val_images"] == 0
    for key, value in BEFORE.items():
        assert row[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
