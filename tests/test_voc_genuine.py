"""voc2007 on the GENUINE VOC2007 label files (``../shared/data/voc2007/ImageSets/Main``).

A VOCdevkit is assembled in ``tmp_path``: the genuine ``ImageSets/Main`` is symlinked (never copied
into the repository) and every one of the 9,963 ids gets a placeholder JPEG (one tiny JPEG,
hard-linked). Counts are recomputed here, independently of the plugin, straight from the files;
the co-occurrence is compared with ML-GCN's released ``voc_cooccurrence.npz``.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bench.api.context import HeadContext
from bench.api.registry import build_dataset

#: ``../shared`` beside the project (what the ``shared_data`` fixture of conftest.py checks)
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture
def genuine_voc(tmp_path: Path, shared_data: Path) -> tuple[Path, Path]:
    """(devkit root, genuine ImageSets/Main); ``shared_data`` skips with the reason when absent."""
    assert shared_data.resolve() == SHARED_DATA.resolve()
    main = shared_data / "voc2007" / "ImageSets" / "Main"
    if not main.is_dir():
        pytest.skip(f"{main} is absent: the genuine VOC2007 label files live beside the project in ../shared")
    root = tmp_path / "genuine_voc"
    voc = root / "VOCdevkit" / "VOC2007"
    (voc / "ImageSets").mkdir(parents=True)
    (voc / "ImageSets" / "Main").symlink_to(main, target_is_directory=True)
    images = voc / "JPEGImages"
    images.mkdir()
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (120, 60, 30)).save(buffer, "JPEG")
    source = root / "placeholder.jpg"
    source.write_bytes(buffer.getvalue())
    ids = set()
    for split in ("trainval", "test"):
        ids.update((main / f"{split}.txt").read_text().split())
    for image_id in ids:
        try:
            os.link(source, images / f"{image_id}.jpg")
        except OSError:  # a filesystem without hard links
            (images / f"{image_id}.jpg").write_bytes(buffer.getvalue())
    return root, main


def independent_counts(main: Path, split: str, classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(positives, difficult) per class, counted from the label files' second column."""
    positives, difficult = [], []
    for name in classes:
        values = [line.split()[1] for line in (main / f"{name}_{split}.txt").read_text().splitlines() if line.strip()]
        positives.append(values.count("1"))
        difficult.append(values.count("0"))
    return np.array(positives), np.array(difficult)


def test_genuine_counts_and_cooccurrence(genuine_voc: tuple[Path, Path], shared_data: Path) -> None:
    root, main = genuine_voc
    class_order = (shared_data / "ml-gcn" / "voc_classes.txt").read_text().split()
    sizes = {"trainval": 5011, "test": 4952}
    person = {"trainval": (2008, 87), "test": (2007, 90)}
    for split in ("trainval", "test"):
        ds = build_dataset("voc2007", root, split)
        assert ds.classes == class_order == sorted(class_order)
        assert len(ds) == sizes[split]
        assert [ds.image_id(i) for i in range(len(ds))] == (main / f"{split}.txt").read_text().split()
        positives, difficult = independent_counts(main, split, ds.classes)
        np.testing.assert_array_equal(ds.targets.sum(axis=0), positives)
        np.testing.assert_array_equal(ds.ignore.sum(axis=0), difficult)
        assert not (ds.targets.astype(bool) & ds.ignore).any()
        p = ds.classes.index("person")
        assert (int(ds.targets[:, p].sum()), int(ds.ignore[:, p].sum())) == person[split]

        for policy, expected in (("positive", positives + difficult), ("negative", positives)):
            other = build_dataset("voc2007", root, split, difficult=policy)
            np.testing.assert_array_equal(other.targets.sum(axis=0), expected)
            assert not other.ignore.any()

    trainval = build_dataset("voc2007", root, "trainval")
    context = HeadContext.from_labels(trainval.classes, trainval.targets, trainval.ignore)
    released = np.load(shared_data / "ml-gcn" / "voc_cooccurrence.npz")
    order = [trainval.classes.index(name) for name in class_order]
    np.testing.assert_array_equal(context.counts[np.ix_(order, order)], released["counts"])
    np.testing.assert_array_equal(context.nums[order], released["nums"])
