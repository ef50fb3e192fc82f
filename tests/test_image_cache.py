"""A damaged image cache (truncated array, unreadable or mismatched metadata) is rebuilt with a
warning, and the rebuilt images equal the first build's."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

from bench.api import build_dataset
from bench.data.image_cache import load_or_build

SIZE = 24


def truncate(data: Path, meta: Path) -> None:
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])


def garble_meta(data: Path, meta: Path) -> None:
    meta.write_text("{not json")


def wrong_shape(data: Path, meta: Path) -> None:
    array = np.load(data)
    np.save(data, array[:-1])  # one image short of the split


def unreadable_out_of_range(data: Path, meta: Path) -> None:
    record = json.loads(meta.read_text())
    record["unreadable"] = [10_000]
    meta.write_text(json.dumps(record))


@pytest.mark.parametrize("damage", [truncate, garble_meta, wrong_shape, unreadable_out_of_range], ids=lambda f: f.__name__)
def test_damaged_image_cache_is_rebuilt_with_a_warning(tmp_path: Path, damage) -> None:
    dataset = build_dataset("shapes", None, "train", num_train=20, num_test=10)
    first = np.array(load_or_build(dataset, SIZE, tmp_path).images)
    assert first.shape == (20, SIZE, SIZE, 3) and first.std() > 0
    data = next((tmp_path / "images").glob("*.npy"))
    meta = data.with_suffix(".json")
    # a second load reads the cache as it is, silently
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(np.array(load_or_build(dataset, SIZE, tmp_path).images), first)
    damage(data, meta)
    with pytest.warns(UserWarning, match=r"image cache .* is damaged .*; rebuilding it"):
        rebuilt = np.array(load_or_build(dataset, SIZE, tmp_path).images)
    np.testing.assert_array_equal(rebuilt, first)
    with warnings.catch_warnings():  # and the rebuilt cache is whole
        warnings.simplefilter("error")
        np.testing.assert_array_equal(np.array(load_or_build(dataset, SIZE, tmp_path).images), first)
