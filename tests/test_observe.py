"""Observed training labels (issue 29): the dataset option ``observe``, its masks (share,
determinism, test split untouched), the run identity, the training items' fourth element, a
``folder`` manifest's own unknown labels, the row fields, and the mask staying a property of the
data (never a head's label state)."""

from __future__ import annotations

import hashlib
import inspect
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.api import registry
from bench.api.observe import Observe, observe_fields, observed_mask, split_observe
from bench.config.grid import load_grid
from bench.core.errors import UsageError
from bench.data.batched_arrays import ArrayItems, array_loader
from bench.results.schema import COLUMNS

RNG = np.random.default_rng(7)
TARGETS = (RNG.random((3000, 8)) < 0.3).astype(np.uint8)


# -- the masks -------------------------------------------------------------------------------------


@pytest.mark.parametrize("fraction", [0.5, 0.2, 0.1])
def test_fraction_observes_each_label_with_that_probability(fraction: float) -> None:
    mask = observed_mask(TARGETS, Observe("fraction", fraction, 0))
    n = mask.size
    sd = (fraction * (1 - fraction) / n) ** 0.5
    assert abs(mask.mean() - fraction) < 4 * sd  # binomial share, 4 standard deviations
    per_class = mask.mean(axis=0)  # independent of the class and of the label's value
    assert np.all(np.abs(per_class - fraction) < 4 * (fraction * (1 - fraction) / len(mask)) ** 0.5)
    pos = TARGETS > 0
    assert abs(mask[pos].mean() - mask[~pos].mean()) < 4 * (fraction * (1 - fraction) * (1 / pos.sum() + 1 / (~pos).sum())) ** 0.5


def test_fraction_masks_are_nested_and_respect_the_source_mask() -> None:
    small = observed_mask(TARGETS, Observe("fraction", 0.1, 3))
    large = observed_mask(TARGETS, Observe("fraction", 0.5, 3))
    assert np.all(large[small])  # same seed: what 10 % keeps, 50 % keeps too
    source = RNG.random(TARGETS.shape) < 0.6
    for setting in (Observe(), Observe("fraction", 0.5, 0), Observe("single_positive", 1.0, 0)):
        assert not np.any(observed_mask(TARGETS, setting, source) & ~source)
    assert np.array_equal(observed_mask(TARGETS, Observe(), source), source)
    assert observed_mask(TARGETS, Observe()).all()


def test_single_positive_keeps_one_positive_per_image_drawn_uniformly() -> None:
    mask = observed_mask(TARGETS, Observe("single_positive", 1.0, 0))
    has_positive = TARGETS.any(axis=1)
    assert np.array_equal(mask.sum(axis=1), has_positive.astype(int))  # one each; none without a positive
    assert np.all(TARGETS[mask] == 1)  # the observed label is a positive
    # uniform among the positives: one image with 4 positives, repeated 4000 times
    row = np.array([[1, 0, 1, 1, 0, 1, 0, 0]], dtype=np.uint8)
    counts = observed_mask(np.repeat(row, 4000, axis=0), Observe("single_positive", 1.0, 5)).sum(axis=0)
    assert counts[[1, 4, 6, 7]].sum() == 0
    expected, sd = 1000, (4000 * 0.25 * 0.75) ** 0.5
    assert np.all(np.abs(counts[[0, 2, 3, 5]] - expected) < 4 * sd)


def test_the_draw_depends_on_the_targets_setting_and_observe_seed_only() -> None:
    setting = Observe("fraction", 0.2, 11)
    np.random.seed(0)
    torch.manual_seed(0)
    first = observed_mask(TARGETS, setting)
    np.random.seed(1)  # the global generators (a run's seed) play no part
    torch.manual_seed(1)
    np.random.random(100)
    assert np.array_equal(observed_mask(TARGETS, setting), first)
    assert np.array_equal(observed_mask(TARGETS, {"observe": "fraction", "observe_fraction": 0.2, "observe_seed": 11}), first)
    assert not np.array_equal(observed_mask(TARGETS, Observe("fraction", 0.2, 12)), first)
    assert not np.array_equal(
        observed_mask(TARGETS, Observe("single_positive", 1.0, 0)), observed_mask(TARGETS, Observe("single_positive", 1.0, 1))
    )


def test_the_mask_is_data_not_a_head_label_state(monkeypatch: pytest.MonkeyPatch) -> None:
    """C-Tran's known labels at training time are a head's notion (head metadata, e.g.
    ``reads_label_states``); the observed mask takes no head, reads no head metadata and so is the
    same for every head and seed of a grid."""
    assert list(inspect.signature(observed_mask).parameters) == ["targets", "observe", "known"]

    def no_heads(*args, **kwargs):
        raise AssertionError("the observed mask consulted the head registry")

    monkeypatch.setattr(registry, "head_class", no_heads)
    monkeypatch.setattr(registry, "head_hparams", no_heads)
    monkeypatch.setattr(registry, "list_heads", no_heads)
    options = {"observe": "fraction", "observe_fraction": 0.2, "observe_seed": 0}
    mask = observed_mask(TARGETS, options)
    assert observe_fields(options, mask)["observed_fraction"] == pytest.approx(mask.mean())


def test_every_cell_of_a_setting_gets_the_same_mask() -> None:
    grid = load_grid("partial-embedded")
    masks: dict[str, set[bytes]] = {}
    for cell in grid.cells:
        key = json.dumps(split_observe(cell.dataset_options)[1].options(), sort_keys=True)
        masks.setdefault(key, set()).add(np.packbits(observed_mask(TARGETS, cell.dataset_options)).tobytes())
    assert len(masks) == 5  # all, fraction 0.5 / 0.2 / 0.1, single_positive
    assert all(len(found) == 1 for found in masks.values())  # every head, loss and seed: one mask
    heads = {c.head for c in grid.cells}
    assert {"baseline", "csra", "ml_gcn", "attention_fusion", "ml_decoder", "query2label"} <= heads
    assert len(grid.cells) == 5 * 3 * 2 * len(heads)
    assert {(c.recipe.loss, c.recipe.unknown_labels if c.recipe.loss == "bce" else None) for c in grid.cells} == {
        ("bce", "ignore"), ("bce", "negative"), ("ll_r", None)}


# -- identity and validation --------------------------------------------------------------------------

GRID = """
seeds = [0]
[recipe]
preset = "embedded_cpu"
[[datasets]]
name = "shapes"
num_train = 96
{options}
[[backbones]]
name = "tiny_cnn"
[[heads]]
name = "baseline"
"""


def grid_ids(tmp_path: Path, options: str) -> list[str]:
    path = tmp_path / "g.toml"
    path.write_text(GRID.format(options=options))
    return [c.run_id for c in load_grid(str(path)).cells]


def test_observe_all_leaves_run_ids_unchanged_and_other_settings_change_them(tmp_path: Path) -> None:
    """The run id is the sha256 of the canonical config JSON; written out by hand here."""
    path = tmp_path / "g.toml"
    path.write_text(GRID.format(options=""))
    cell = load_grid(str(path)).cells[0]
    config = {
        "dataset": {"name": "shapes", "options": {**registry.dataset_options("shapes"), "num_train": 96},
                    "train_split": "train", "test_split": "test"},
        "backbone": {"name": "tiny_cnn", "weights": None},
        "head": {"name": "baseline", "hparams": {"pool": "avg"}},
        "recipe": cell.recipe.identity(),
        "seed": 0,
    }
    by_hand = hashlib.sha256(json.dumps(config, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()[:16]
    assert cell.run_id == by_hand  # no observe key in the identity at the default
    assert grid_ids(tmp_path, 'observe = "all"') == [by_hand]
    fraction = grid_ids(tmp_path, 'observe = "fraction"\nobserve_fraction = 0.1')
    assert fraction != [by_hand]
    assert grid_ids(tmp_path, 'observe = "fraction"\nobserve_fraction = 0.2') != fraction
    assert grid_ids(tmp_path, 'observe = "fraction"\nobserve_fraction = 0.1\nobserve_seed = 1') != fraction
    assert grid_ids(tmp_path, 'observe = "fraction"\nobserve_fraction = 0.1\nobserve_seed = 0') == fraction  # default seed, written or not
    assert grid_ids(tmp_path, 'observe = "single_positive"') not in ([by_hand], fraction)


@pytest.mark.parametrize("options, expected", [
    ('observe = "some"', ["observe = 'some'", "'all', 'single_positive', 'fraction'"]),
    ('observe = "fraction"\nobserve_fraction = 0', ["observe_fraction = 0.0", "(0, 1]"]),
    ('observe = "fraction"\nobserve_fraction = 1.5', ["observe_fraction = 1.5", "(0, 1]"]),
    ('observe_fraction = 0.5', ["observe_fraction is used only with observe = 'fraction'"]),
    ('observe_seed = 3', ["observe_seed is used only with"]),
    ('observe = "single_positive"\nobserve_seed = -1', ["observe_seed = -1"]),
    ('observe = "fraction"\nobserve_fraction = "half"', ["observe_fraction = 'half'"]),
    ('observ = "all"', ["unknown option(s) 'observ'", "'observe'"]),
])
def test_bad_observe_options_name_the_file_key_and_allowed_values(tmp_path: Path, options: str, expected: list[str]) -> None:
    with pytest.raises(UsageError) as info:
        grid_ids(tmp_path, options)
    message = str(info.value)
    assert "g.toml" in message and "[[datasets]] 1 (shapes)" in message
    for part in expected:
        assert part in message


def test_recipe_variants_multiply_the_cells_and_reject_duplicates(tmp_path: Path) -> None:
    path = tmp_path / "g.toml"
    path.write_text(GRID.format(options="") + '[[recipes]]\nloss = "bce"\n[[recipes]]\nloss = "bce"\nunknown_labels = "negative"\n')
    cells = load_grid(str(path)).cells
    assert [c.recipe.unknown_labels for c in cells] == ["ignore", "negative"]
    assert cells[0].recipe.epochs == 8 and cells[0].recipe_preset == "embedded_cpu"  # laid over [recipe] and its preset
    assert len({c.run_id for c in cells}) == 2
    path.write_text(GRID.format(options="") + '[[recipes]]\nloss = "bce"\n[[recipes]]\nunknown_labels = "ignore"\n')
    with pytest.raises(UsageError, match=r"\[\[recipes\]\] 1 and 2 resolve to the same recipe"):
        load_grid(str(path))
    path.write_text(GRID.format(options="") + '[[recipes]]\nloss = "nope"\n')
    with pytest.raises(UsageError, match=r"\[\[recipes\]\] 1: recipe key 'loss' = 'nope'"):
        load_grid(str(path))


# -- the data: the plugin never sees the options, the test split is untouched --------------------------


def test_observe_options_never_change_a_built_split() -> None:
    plain = registry.build_dataset("shapes", None, "test", num_train=40, num_test=30, image_size=32)
    hidden = registry.build_dataset("shapes", None, "test", num_train=40, num_test=30, image_size=32,
                                    observe="fraction", observe_fraction=0.1, observe_seed=4)
    assert np.array_equal(plain.targets, hidden.targets) and np.array_equal(plain.ignore, hidden.ignore)
    assert hidden.known.all()  # the dataset's own labels: the observed mask is drawn for training only
    train = registry.build_dataset("shapes", None, "train", num_train=40, num_test=30, image_size=32, observe="single_positive")
    assert train.known.all()
    with pytest.raises(UsageError, match="observe = 'x'"):
        registry.build_dataset("shapes", None, "train", num_train=40, observe="x")


def test_training_items_carry_known_as_a_fourth_element() -> None:
    data = np.arange(5 * 2, dtype=np.float32).reshape(5, 2)
    targets = np.array([[1, 0], [0, 1], [1, 1], [0, 0], [1, 0]], dtype=np.uint8)
    ignore = np.zeros((5, 2), dtype=bool)
    known = observed_mask(targets, Observe("single_positive", 1.0, 0))
    four = list(array_loader(ArrayItems(data, targets, ignore, known), batch_size=5))
    assert len(four) == 1 and len(four[0]) == 4
    assert torch.equal(four[0][3], torch.from_numpy(known)) and four[0][3].dtype == torch.bool
    assert len(ArrayItems(data, targets, ignore, known)[2]) == 4
    three = list(array_loader(ArrayItems(data, targets, ignore), batch_size=5))
    assert len(three[0]) == 3  # evaluation items: unchanged
    with pytest.raises(ValueError, match="known"):
        ArrayItems(data, targets, ignore, known[:, :1])


def test_a_loader_with_rows_names_each_items_index_as_a_fifth_element() -> None:
    """LL-Cp keeps its corrections per training image: the shuffled batch says which rows it holds."""
    data = np.arange(7 * 2, dtype=np.float32).reshape(7, 2)
    targets = (np.arange(7 * 3).reshape(7, 3) % 2).astype(np.uint8)
    ignore = np.zeros((7, 3), dtype=bool)
    known = np.arange(7 * 3).reshape(7, 3) % 3 == 0
    loader = array_loader(ArrayItems(data, targets, ignore, known), batch_size=3, shuffle=True, generator=torch.Generator().manual_seed(1), rows=True)
    seen = []
    for x, y, _ignore, k, rows in loader:
        assert rows.dtype == torch.int64
        assert torch.equal(x, torch.from_numpy(data[rows.numpy()]))
        assert torch.equal(y, torch.from_numpy(targets[rows.numpy()]).float())
        assert torch.equal(k, torch.from_numpy(known[rows.numpy()]))
        seen += rows.tolist()
    assert sorted(seen) == list(range(7)) and seen != list(range(7))  # every row once, shuffled
    (batch,) = array_loader(ArrayItems(data, targets, ignore), batch_size=7, rows=True)
    assert len(batch) == 5 and batch[3].dtype == torch.bool and batch[3].all()  # no mask: all observed


def test_row_fields_realised_share() -> None:
    mask = np.array([[True, False, False, False], [True, True, False, False]])
    assert observe_fields({"observe": "fraction", "observe_fraction": 0.5, "observe_seed": 0, "num_train": 2}, mask) == {
        "observe": "fraction", "observe_fraction": 0.5, "observed_fraction": 3 / 8}
    assert observe_fields({"num_train": 2}, np.ones((2, 4), dtype=bool)) == {"observe": "all", "observe_fraction": None, "observed_fraction": 1.0}
    assert observe_fields({"observe": "single_positive"}, None)["observed_fraction"] is None
    assert {"observe", "observe_fraction", "observed_fraction"} <= set(COLUMNS)


# -- folder manifests mark labels unknown themselves -----------------------------------------------------


def test_folder_manifest_unknown_labels(tmp_path: Path) -> None:
    from bench.api import write_sample_images

    root = tmp_path / "data"
    root.mkdir()
    (root / "classes.txt").write_text("bird\ncat\ndog\n")
    (root / "train.csv").write_text("path,labels\na.jpg,cat;?dog\nb.jpg,bird;?\nc.jpg,dog\n")
    (root / "test.csv").write_text("path,bird,cat,dog\nd.jpg,1,?,0\ne.jpg,0,1,\n")
    (root / "val.json").write_text(json.dumps([{"path": "f.jpg", "labels": ["cat"], "unknown": ["bird"]},
                                               {"path": "g.jpg", "labels": [], "unknown": "*"}]))
    write_sample_images(root, [f"{c}.jpg" for c in "abcdefg"])
    train = registry.build_dataset("folder", root, "train")
    assert train.targets.tolist() == [[0, 1, 0], [1, 0, 0], [0, 0, 1]]
    assert train.known.tolist() == [[True, True, False], [True, False, False], [True, True, True]]
    assert np.array_equal(train.ignore, ~train.known)  # an unannotated label is not scored either
    test = registry.build_dataset("folder", root, "test")
    assert test.targets.tolist() == [[1, 0, 0], [0, 1, 0]]
    assert test.ignore.tolist() == [[False, True, False], [False, False, False]]
    val = registry.build_dataset("folder", root, "val")
    assert val.known.tolist() == [[False, True, True], [False, False, False]]
    # the observe draw never observes what the manifest leaves unknown
    assert not np.any(observed_mask(train.targets, Observe("fraction", 1.0, 0), train.known) & ~train.known)
    (root / "train.csv").write_text("path,labels\na.jpg,cat;?cat\n")
    with pytest.raises(UsageError, match="marked both positive and unknown"):
        registry.build_dataset("folder", root, "train")


def test_the_image_cache_carries_the_source_mask_of_the_readable_images(tmp_path: Path) -> None:
    from bench.api import write_sample_images
    from bench.data.image_cache import CachedImages, load_or_build

    root = tmp_path / "data"
    root.mkdir()
    (root / "train.csv").write_text("path,labels\na.jpg,cat;?dog\nbad.jpg,dog\nc.jpg,dog;?\n")
    write_sample_images(root, ["a.jpg", "c.jpg"])
    (root / "bad.jpg").write_bytes(b"not a jpeg")  # unreadable: left out of the cache
    dataset = registry.build_dataset("folder", root, "train")
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        split = load_or_build(dataset, 16, tmp_path / "cache")
    assert split.known.tolist() == [[True, False], [False, True]]  # classes cat, dog; rows a, c
    mask = observed_mask(split.targets, Observe("single_positive", 1.0, 0), split.known)
    assert mask.tolist() == [[True, False], [False, True]]
    items = CachedImages(split, known=mask)
    assert [len(items[i]) for i in range(2)] == [4, 4] and len(CachedImages(split)[0]) == 3
