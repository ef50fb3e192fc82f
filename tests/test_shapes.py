"""Tests of the embedded ``shapes`` dataset plugin (datasets/shapes.py)."""

from __future__ import annotations

import os
import re
import sys
import warnings

import numpy as np
import pytest
import torch

from bench.api.registry import build_dataset, dataset_class, dataset_options
from bench.core.errors import UsageError

SMALL = {"num_train": 200, "num_test": 100}

# What each colour name means, as loose RGB predicates (independent of the generator's table; they
# leave room for the per-object colour jitter and the pixel noise).
COLOUR_TESTS = {
    "red": lambda r, g, b: (r > 150) & (g < 120) & (b < 120),
    "green": lambda r, g, b: (g > 120) & (r < 120) & (b < 140),
    "blue": lambda r, g, b: (b > 160) & (r < 120) & (g < 150),
    "yellow": lambda r, g, b: (r > 160) & (g > 150) & (b < 120),
    "magenta": lambda r, g, b: (r > 150) & (b > 150) & (g < 130),
    "cyan": lambda r, g, b: (g > 140) & (b > 140) & (r < 120),
}


def shapes(tmp_path, split="train", **options):
    return build_dataset("shapes", root=tmp_path, split=split, **{**SMALL, **options})


def module():
    return sys.modules[dataset_class("shapes").__module__]


def colour_of(name: str) -> str:
    return name.split("_")[0]


def test_registered_with_documented_options():
    options = dataset_options("shapes")
    for name, default in {"seed": 0, "image_size": 64, "num_train": 4000, "num_test": 1000}.items():
        assert options[name] == default
    cls = dataset_class("shapes")
    assert cls.splits == ("train", "test")
    assert cls.train_split == "train" and cls.test_split == "test"


def test_items_shapes_and_dtypes(tmp_path):
    ds = shapes(tmp_path)
    assert len(ds) == 200
    assert len(shapes(tmp_path, "test")) == 100
    num_classes = len(ds.classes)
    image, target, ignore = ds[7]
    assert image.dtype == torch.float32 and tuple(image.shape) == (3, 64, 64)
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    assert float(image.std()) > 0.0
    assert target.dtype == torch.float32 and tuple(target.shape) == (num_classes,)
    assert ignore.dtype == torch.bool and tuple(ignore.shape) == (num_classes,) and not ignore.any()
    raw = ds.load_image(7)
    assert raw.dtype == np.uint8 and raw.shape == (64, 64, 3)
    assert ds.targets.dtype == np.uint8 and ds.targets.shape == (200, num_classes)
    assert ds.ignore.dtype == bool and ds.ignore.shape == (200, num_classes) and not ds.ignore.any()
    assert ds.image_id(3) != ds.image_id(4)
    small = shapes(tmp_path, image_size=32)
    assert small.load_image(0).shape == (32, 32, 3)


def test_classes_are_many_readable_and_distinct(tmp_path):
    ds = shapes(tmp_path)
    assert len(ds.classes) >= 12
    assert len(set(ds.classes)) == len(ds.classes)
    for name in ds.classes:
        assert re.fullmatch(r"[a-z]+_[a-z]+", name), name
        assert colour_of(name) in COLOUR_TESTS
    # a class is a conjunction: no colour and no form alone is a class
    colours = {colour_of(n) for n in ds.classes}
    forms = {n.split("_")[1] for n in ds.classes}
    assert len(ds.classes) < len(colours) * len(forms)
    assert all(sum(colour_of(n) == c for n in ds.classes) >= 2 for c in colours)


def test_one_to_five_labels_per_image(tmp_path):
    for split in ("train", "test"):
        targets = shapes(tmp_path, split).targets
        assert set(np.unique(targets)) <= {0, 1}
        per_image = targets.sum(axis=1)
        assert per_image.min() >= 1 and per_image.max() <= 5
        assert len(set(per_image.tolist())) >= 4  # the count varies


def test_same_seed_is_identical_and_different_seed_differs(tmp_path):
    a = shapes(tmp_path / "a", seed=3)
    b = shapes(tmp_path / "b", seed=3)
    c = shapes(tmp_path / "c", seed=4)
    assert np.array_equal(np.asarray(a.images), np.asarray(b.images))
    assert np.array_equal(a.targets, b.targets)
    assert not np.array_equal(np.asarray(a.images), np.asarray(c.images))
    assert not np.array_equal(a.targets, c.targets)
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()


def test_train_and_test_differ(tmp_path):
    train, test = shapes(tmp_path, "train"), shapes(tmp_path, "test")
    assert not np.array_equal(np.asarray(train.images[:100]), np.asarray(test.images))


def test_test_split_does_not_depend_on_num_train(tmp_path):
    a = build_dataset("shapes", root=tmp_path, split="test", num_train=200, num_test=100)
    b = build_dataset("shapes", root=tmp_path / "other", split="test", num_train=3000, num_test=100)
    assert np.array_equal(np.asarray(a.images), np.asarray(b.images))
    assert np.array_equal(a.targets, b.targets)
    # and a larger split starts with the smaller one
    c = build_dataset("shapes", root=tmp_path, split="test", num_train=200, num_test=300)
    assert np.array_equal(np.asarray(c.images[:100]), np.asarray(a.images))
    assert np.array_equal(c.targets[:100], a.targets)


def test_cache_is_reused_without_regenerating(tmp_path, monkeypatch):
    first = shapes(tmp_path)
    files = sorted(tmp_path.glob("*.npy"))
    assert len(files) == 2
    mtimes = [f.stat().st_mtime_ns for f in files]

    def refuse(*args, **kwargs):
        raise AssertionError("the cache should have been reused")

    monkeypatch.setattr(module(), "generate_split", refuse)
    second = shapes(tmp_path)
    assert [f.stat().st_mtime_ns for f in files] == mtimes
    assert isinstance(second.images, np.memmap)
    assert np.array_equal(np.asarray(first.images), np.asarray(second.images))
    assert np.array_equal(first.targets, second.targets)
    # no pickle in the cache: both files load with allow_pickle=False, as uint8
    for f in files:
        assert np.load(f, allow_pickle=False).dtype == np.uint8


def test_changing_an_option_regenerates_under_a_new_name(tmp_path):
    shapes(tmp_path)
    names = {f.name for f in tmp_path.glob("*.npy")}
    fingerprints = {shapes(tmp_path).fingerprint()}
    changes = ({"seed": 1}, {"image_size": 48}, {"num_train": 201}, {"distractors": 2}, {"min_object": 0.12})
    for option in changes:
        ds = shapes(tmp_path, **option)
        new = {f.name for f in tmp_path.glob("*.npy")} - names
        assert len(new) == 2, option
        names |= new
        fingerprints.add(ds.fingerprint())
    assert len(fingerprints) == 6
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("which", ["images", "labels"])
@pytest.mark.parametrize("damage", ["truncate", "garbage", "delete"])
def test_damaged_cache_is_regenerated_with_a_warning(tmp_path, which, damage):
    good = shapes(tmp_path)
    expected_images, expected_targets = np.array(good.images), good.targets.copy()
    del good
    (path,) = tmp_path.glob(f"*_{which}.npy")
    if damage == "truncate":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(b"this is not a numpy file")
    else:
        path.unlink()
    with pytest.warns(RuntimeWarning, match="regenerat"):
        again = shapes(tmp_path)
    assert np.array_equal(np.asarray(again.images), expected_images)
    assert np.array_equal(again.targets, expected_targets)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        shapes(tmp_path)  # repaired: loads quietly


def test_killed_write_leaves_no_cache(tmp_path, monkeypatch):
    def killed(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        shapes(tmp_path)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    assert len(shapes(tmp_path)) == 200


def test_default_root_follows_headbench_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HEADBENCH_CACHE", str(tmp_path))
    ds = build_dataset("shapes", split="test", **SMALL)
    assert len(list((tmp_path / "shapes").glob("*.npy"))) == 2
    assert len(ds) == 100


def test_bad_options_are_usage_errors(tmp_path):
    for bad in ({"num_train": 0}, {"image_size": 4}, {"seed": -1}, {"min_object": 0.3}, {"seed": 1.5}):
        with pytest.raises(UsageError):
            shapes(tmp_path, **bad)
    with pytest.raises(UsageError):
        build_dataset("shapes", root=tmp_path, split="val")


def test_labelled_objects_are_drawn_in_their_colour(tmp_path):
    """Each labelled object's box holds many pixels of the colour its class name says."""
    mod = module()
    ds = shapes(tmp_path, seed=5, min_object=0.1)
    images, targets, layout = mod.generate_chunk(
        mod.chunk_rng(5, "train", 0), mod.CHUNK, 64, 6, 0.1, 0.25
    )
    # the layout describes the dataset's own images
    assert np.array_equal(images[:200], np.asarray(ds.images))
    assert np.array_equal(targets[:200], ds.targets)
    checked = 0
    for i in range(200):
        objects = [k for k in range(layout["class"].shape[1]) if layout["class"][i, k] >= 0]
        drawn = {int(layout["class"][i, k]) for k in objects}
        assert drawn == set(np.nonzero(ds.targets[i])[0].tolist())
        for k in objects:
            name = ds.classes[layout["class"][i, k]]
            cy, cx, r = layout["cy"][i, k], layout["cx"][i, k], layout["radius"][i, k]
            box = ds.load_image(i)[
                max(int(cy - r), 0) : int(np.ceil(cy + r)), max(int(cx - r), 0) : int(np.ceil(cx + r))
            ].astype(int)
            match = COLOUR_TESTS[colour_of(name)](box[..., 0], box[..., 1], box[..., 2])
            assert match.mean() >= 0.12 and match.sum() >= 4, (i, name, match.mean())
            checked += 1
    assert checked >= 300


def test_forms_are_drawn_as_named(tmp_path, monkeypatch):
    """Without clutter, filled forms cover their centre, a ring does not, and objects are small."""
    mod = module()
    monkeypatch.setattr(mod, "NUM_LINES", (0, 0))
    monkeypatch.setattr(mod, "BACKGROUND_LEVEL", (20.0, 20.0))  # dark, so no colour can come from it
    monkeypatch.setattr(mod, "TEXTURE_STD", 5.0)
    images, _, layout = mod.generate_chunk(np.random.default_rng(0), 200, 64, 0, 0.1, 0.25)
    seen = set()
    for i in range(200):
        for k in np.nonzero(layout["class"][i] >= 0)[0]:
            name = mod.CLASSES[layout["class"][i, k]]
            colour, form = name.split("_")
            r = layout["radius"][i, k]
            assert 0.1 * 64 / 2 - 1e-9 <= r <= 0.25 * 64 / 2 + 1e-9
            pixel = images[i, int(layout["cy"][i, k]), int(layout["cx"][i, k])].astype(int)
            centre_has_colour = bool(COLOUR_TESTS[colour](*pixel))
            if form == "ring":
                assert not centre_has_colour, (i, name)
            elif form in ("circle", "square", "cross", "bar"):
                assert centre_has_colour, (i, name)
            seen.add(form)
    assert {"ring", "circle", "square"} <= seen


def test_long_tail_and_structured_cooccurrence(tmp_path):
    targets = build_dataset("shapes", root=tmp_path, split="train", num_train=2000, num_test=100).targets
    freq = targets.mean(axis=0)
    assert freq.min() > 0
    assert freq.max() / freq.min() >= 10
    # labels co-occur by scene: some pairs far more often than independence predicts, some far less
    positive = targets.astype(float)
    joint = positive.T @ positive / len(positive)
    lift = joint / np.outer(freq, freq)
    off_diagonal = lift[~np.eye(len(freq), dtype=bool)]
    assert off_diagonal.max() > 2.0
    assert off_diagonal.min() < 0.3
