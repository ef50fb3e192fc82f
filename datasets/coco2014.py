"""``coco2014``: MS-COCO 2014 as a multi-label classification dataset (the ML-GCN / CSRA protocol).

Layout (``root``)::

    train2014/COCO_train2014_<id>.jpg
    val2014/COCO_val2014_<id>.jpg
    annotations/instances_train2014.json
    annotations/instances_val2014.json

Splits ``train`` (the training split) and ``val`` (the test split; the papers evaluate on val2014).
Classes: the categories of the annotation file sorted by NAME (``airplane``, ``apple``, ...,
``zebra``; 80 in the real files), not by category id. An image's label c is positive when it holds
at least one instance annotation of category c, crowd annotations included (as pycocotools'
``getAnnIds`` does by default; ``include_crowd = false`` leaves them out). Images without any
label are dropped (82,081 train / 40,137 val images remain), or kept with ``keep_unlabeled = true``.
Image order: the order of ``images`` in the JSON. No difficult labels: ``ignore`` is all False.

The JSON is parsed with the standard library (no pycocotools). Parsing ``instances_train2014.json``
(~330 MB) takes seconds and gigabytes, so the per-image labels are cached in
``$HEADBENCH_CACHE/coco2014/labels_<key>.npz`` (no pickle), keyed by the JSON's path, size and
mtime; a damaged cache is re-parsed.

Errors (:class:`bench.core.errors.DataError`): a missing annotation file or image folder, an annotation
naming an unknown image or category, an empty split, an image of the JSON absent from the image
folder (checked when the dataset is built, with one ``os.scandir``). An image that exists but
cannot be decoded raises :class:`bench.api.dataset.UnreadableImage` (skipped and counted by the cache).

``fingerprint()``: the JSON's size and mtime and a digest of the split's image files' (name, size,
mtime).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from bench.api import DataError, ImageFileDataset, atomic_write_bytes, cache_dir, listed_images_digest, register_dataset, stat_key, write_sample_images

#: bump when the parsed-label cache format or the parsing rules change
LABEL_CACHE_VERSION = 1
EXPECTED_LAYOUT = (
    "coco2014 expects ROOT/train2014/*.jpg, ROOT/val2014/*.jpg and "
    "ROOT/annotations/instances_{train,val}2014.json"
)


# -- COCO


def parse_instances(path: Path) -> dict[str, np.ndarray]:
    """Per-image labels of an ``instances_*.json``, with the standard-library ``json``.

    Returns ``{"classes": str [C] sorted by name, "file_names": str [N] (JSON order),
    "labels": uint8 [N, C] (all annotations), "labels_no_crowd": uint8 [N, C]}``.
    """
    try:
        with open(path, "rb") as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DataError(f"{path}: no {key!r} list; expected a COCO instances file")
    try:
        names = {int(c["id"]): str(c["name"]) for c in data["categories"]}
        classes = sorted(set(names.values()))
        if len(classes) != len(names):
            raise DataError(f"{path}: two categories share a name")
        column = {cid: classes.index(name) for cid, name in names.items()}
        row = {int(im["id"]): i for i, im in enumerate(data["images"])}
        file_names = [str(im["file_name"]) for im in data["images"]]
        n_ann = len(data["annotations"])
        rows = np.empty(n_ann, dtype=np.int64)
        cols = np.empty(n_ann, dtype=np.int64)
        crowd = np.zeros(n_ann, dtype=bool)
        for k, ann in enumerate(data["annotations"]):
            image_id, category_id = int(ann["image_id"]), int(ann["category_id"])
            if image_id not in row:
                raise DataError(f"{path}: annotation {ann.get('id', k)} names image id {image_id}, which is not in 'images'")
            if category_id not in column:
                raise DataError(f"{path}: annotation {ann.get('id', k)} names category id {category_id}, which is not in 'categories'")
            rows[k], cols[k], crowd[k] = row[image_id], column[category_id], bool(ann.get("iscrowd", 0))
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{path}: malformed COCO instances file ({type(exc).__name__}: {exc})") from None
    labels = np.zeros((len(file_names), len(classes)), dtype=np.uint8)
    labels[rows, cols] = 1
    no_crowd = np.zeros_like(labels)
    no_crowd[rows[~crowd], cols[~crowd]] = 1
    return {
        "classes": np.array(classes, dtype=np.str_),
        "file_names": np.array(file_names, dtype=np.str_),
        "labels": labels,
        "labels_no_crowd": no_crowd,
    }


def load_instances(path: Path) -> dict[str, np.ndarray]:
    """:func:`parse_instances`, through the on-disk label cache (best effort: never required)."""
    st = path.stat()
    key = hashlib.sha256(f"{LABEL_CACHE_VERSION}\0{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:20]
    cache = cache_dir("coco2014") / f"labels_{key}.npz"
    if cache.is_file():
        try:
            with np.load(cache, allow_pickle=False) as stored:
                return {k: stored[k] for k in ("classes", "file_names", "labels", "labels_no_crowd")}
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:  # a truncated .npz: BadZipFile
            warnings.warn(f"coco2014: label cache {cache} is damaged ({exc}); re-parsing {path}", stacklevel=3)
    parsed = parse_instances(path)
    try:
        buffer = io.BytesIO()
        np.savez(buffer, **parsed)
        atomic_write_bytes(cache, buffer.getvalue())
    except OSError:
        pass  # a read-only cache folder only costs the parse next time
    return parsed


@register_dataset("coco2014")
class COCO2014(ImageFileDataset):
    """MS-COCO 2014 multi-label classification (see the module docstring)."""

    splits = ("train", "val")
    train_split = "train"
    test_split = "val"
    expected_layout = EXPECTED_LAYOUT

    @classmethod
    def write_sample(cls, root: Path) -> dict[str, Any]:
        categories = [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}, {"id": 18, "name": "dog"}]
        for split, ids in (("train", [9, 25, 34]), ("val", [42, 73])):
            images = [{"id": i, "file_name": f"COCO_{split}2014_{i:012d}.jpg", "width": 20, "height": 14} for i in ids]
            annotations = [{"id": k, "image_id": i, "category_id": categories[k % 3]["id"], "iscrowd": 0} for k, i in enumerate(ids)]
            (root / "annotations").mkdir(parents=True, exist_ok=True)
            data = {"images": images, "annotations": annotations, "categories": categories}
            (root / "annotations" / f"instances_{split}2014.json").write_text(json.dumps(data))
            write_sample_images(root / f"{split}2014", [im["file_name"] for im in images])
        return {}

    def __init__(
        self,
        root: str | os.PathLike | None = None,
        split: str = "train",
        *,
        keep_unlabeled: bool = False,
        include_crowd: bool = True,
    ) -> None:
        for name, value in (("keep_unlabeled", keep_unlabeled), ("include_crowd", include_crowd)):
            if not isinstance(value, bool):
                raise ValueError(f"option {name} must be true or false, got {value!r}")
        self.split = self.check_split(split)
        self.root = self.data_root(root)
        self.annotation_file = self.root / "annotations" / f"instances_{split}2014.json"
        if not self.annotation_file.is_file():
            raise DataError(f"coco2014 split {split!r}: annotation file {self.annotation_file} is missing; {EXPECTED_LAYOUT}")
        parsed = load_instances(self.annotation_file)
        self.classes = [str(c) for c in parsed["classes"]]
        labels = parsed["labels" if include_crowd else "labels_no_crowd"]
        keep = np.ones(len(labels), dtype=bool) if keep_unlabeled else labels.any(axis=1)
        self.file_names = [str(n) for n in parsed["file_names"][keep]]
        self.targets = np.ascontiguousarray(labels[keep])
        self.ignore = np.zeros(self.targets.shape, dtype=bool)
        if not self.file_names:
            raise DataError(f"coco2014 split {split!r} is empty: {self.annotation_file} has no {'images' if keep_unlabeled else 'labelled images'}")
        image_dir = self.root / f"{split}2014"
        image_digest = listed_images_digest(image_dir, self.file_names, "coco2014 image", str(self.annotation_file))
        self.set_images(image_dir, self.file_names, f"coco2014-v1 {split} {stat_key(self.annotation_file)} images={image_digest}")
