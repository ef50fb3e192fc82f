"""``nuswide``: NUS-WIDE in the format of seed document 002 (the learnopencv multi-label tutorial).

One JSON file per split, as the tutorial's ``small_train.json`` / ``small_test.json``::

    {"samples": [{"image_name": "51353_2739084573_16e9be31f5_m.jpg", "image_labels": ["clouds", "sky"]},
                 ...],
     "labels": ["house", "birds", "sun", ...]}

and an images folder that ``image_name`` is relative to (``image_name`` may contain sub-folders, but
may not leave the images folder).

Layout (``root``)::

    images/<image_name>                 # option image_dir; "" (default) = ROOT/images if it is a
                                        # folder, else ROOT itself (the tutorial keeps the JSON files
                                        # inside images/, so ROOT may be that folder)
    {split}.json or small_{split}.json  # in ROOT or in the images folder (searched in that order);
                                        # option annotations = "path/with/{split}.json" names them

Splits: ``train`` and ``test`` (the tutorial's 5,000 / 1,000 images; NUS-WIDE's official
161,789 / 107,859 split in the same format). One file per split, so the split is decided by whoever
wrote the files; nothing is re-split here.

Classes: the file's ``labels`` list, in file order (the tutorial binarises labels in that order: 27
of the 81 concepts there, 81 for the full set). Both splits must carry the same list (checked when
the other split's file is present), so a test split can never be scored with a shifted class order.
Every name in ``image_labels`` must be in ``labels``. Samples without labels are kept, as the
tutorial's loader keeps them (``keep_unlabeled = false`` drops them). Order: the file's ``samples``.

Errors (:class:`bench.core.errors.DataError`, naming the file and the sample / line): a missing JSON or
images folder, a malformed sample, an unknown label, an image path that escapes the images folder,
an empty split, an image absent from disk (checked at construction, one ``os.scandir`` per folder).
An image that exists but cannot be decoded raises :class:`bench.api.dataset.UnreadableImage`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from bench.api import DataError, ImageFileDataset, index_images, line_of, register_dataset, safe_relpath, stat_key, write_sample_images

EXPECTED_LAYOUT = (
    "nuswide expects ROOT/images/<image_name> and ROOT/{split}.json or ROOT/small_{split}.json "
    '(seed 002 format: {"samples": [{"image_name", "image_labels"}], "labels": [...]})'
)
SPLIT_FILE_PATTERNS = ("{split}.json", "small_{split}.json")


# -- NUS-WIDE


def read_split_file(path: Path) -> tuple[str, dict]:
    """Text and parsed content of a seed-002 JSON file (validated at the top level)."""
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text)
    except FileNotFoundError:
        raise DataError(f"nuswide: annotation file {path} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("samples"), list) or not isinstance(data.get("labels"), list):
        raise DataError(f'{path}: expected {{"samples": [...], "labels": [...]}} (the seed 002 format)')
    labels = data["labels"]
    if not all(isinstance(c, str) for c in labels) or len(set(labels)) != len(labels):
        raise DataError(f"{path}: 'labels' must be a list of distinct strings")
    return text, data


@register_dataset("nuswide")
class NUSWide(ImageFileDataset):
    """NUS-WIDE, seed 002 format (see the module docstring)."""

    splits = ("train", "test")
    train_split = "train"
    test_split = "test"
    expected_layout = EXPECTED_LAYOUT

    @classmethod
    def write_sample(cls, root: Path) -> dict[str, Any]:
        labels = ["clouds", "house", "sky"]
        splits = {"train": [["clouds", "sky"], ["house"], ["sky"]], "test": [["clouds"], ["house", "sky"]]}
        for split, rows in splits.items():
            samples = [{"image_name": f"{split}_{k}.jpg", "image_labels": row} for k, row in enumerate(rows)]
            root.mkdir(parents=True, exist_ok=True)
            (root / f"{split}.json").write_text(json.dumps({"samples": samples, "labels": labels}))
            write_sample_images(root / "images", [s["image_name"] for s in samples])
        return {}

    def __init__(
        self,
        root: str | os.PathLike | None = None,
        split: str = "train",
        *,
        image_dir: str = "",
        annotations: str = "",
        keep_unlabeled: bool = True,
    ) -> None:
        root = self.data_root(root)
        if annotations and "{split}" not in annotations:
            raise ValueError(f"option annotations = {annotations!r} must contain '{{split}}' (one file per split)")
        if not isinstance(keep_unlabeled, bool):
            raise ValueError(f"option keep_unlabeled must be true or false, got {keep_unlabeled!r}")
        self.split = self.check_split(split)
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise DataError(f"nuswide: data root {self.root} does not exist; {EXPECTED_LAYOUT}")
        if image_dir:
            self.image_dir = self.root / image_dir
            if not self.image_dir.is_dir():
                raise DataError(f"nuswide: images folder {self.image_dir} does not exist (option image_dir = {image_dir!r})")
        else:
            self.image_dir = self.root / "images" if (self.root / "images").is_dir() else self.root
        self.annotation_file = self._split_file(split, annotations)
        if self.annotation_file is None:
            tried = ", ".join(str(p) for p in self._candidates(split, annotations))
            raise DataError(f"nuswide split {split!r}: no annotation file; looked for {tried}")
        text, data = read_split_file(self.annotation_file)
        self.classes = list(data["labels"])
        for other in self.splits:
            other_file = self._split_file(other, annotations) if other != split else None
            if other_file is not None and read_split_file(other_file)[1]["labels"] != self.classes:
                raise DataError(
                    f"nuswide: the 'labels' lists of {self.annotation_file} and {other_file} differ; "
                    "both splits must use the same classes in the same order"
                )
        samples = data["samples"]

        def at(i: int) -> str:  # "<file>, sample i (line L)" -- computed only for an error message
            name = samples[i].get("image_name") if isinstance(samples[i], dict) else None
            line = line_of(text, json.dumps(name)) if isinstance(name, str) else 0
            return f"{self.annotation_file}, sample {i + 1}" + (f" (line {line})" if line else "")

        index = {c: k for k, c in enumerate(self.classes)}
        names, kept, rows = [], [], []
        for i, sample in enumerate(samples):
            if not isinstance(sample, dict) or "image_name" not in sample or not isinstance(sample.get("image_labels"), list):
                raise DataError(f"{at(i)}: expected {{\"image_name\": ..., \"image_labels\": [...]}}, got {sample!r:.120}")
            row = np.zeros(len(self.classes), dtype=np.uint8)
            for label in sample["image_labels"]:
                if label not in index:
                    raise DataError(f"{at(i)}: label {label!r} of {sample['image_name']!r} is not in the file's 'labels' list")
                row[index[label]] = 1
            if not keep_unlabeled and not row.any():
                continue
            names.append(safe_relpath(sample["image_name"], self.image_dir, lambda i=i: at(i)))
            kept.append(i)
            rows.append(row)
        if not names:
            raise DataError(f"nuswide split {split!r} is empty: {self.annotation_file} has no {'samples' if keep_unlabeled else 'labelled samples'}")
        self.image_names = names
        self.targets = np.stack(rows)
        self.ignore = np.zeros(self.targets.shape, dtype=bool)
        image_digest = index_images(self.image_dir, names, lambda k: at(kept[k]))
        self.set_images(self.image_dir, names, f"nuswide-v1 {split} {stat_key(self.annotation_file)} images={image_digest}")

    def _candidates(self, split: str, annotations: str) -> list[Path]:
        if annotations:
            return [self.root / annotations.replace("{split}", split)]
        folders = [self.root] + ([self.image_dir] if self.image_dir != self.root else [])
        return [folder / p.replace("{split}", split) for folder in folders for p in SPLIT_FILE_PATTERNS]

    def _split_file(self, split: str, annotations: str) -> Path | None:
        return next((p for p in self._candidates(split, annotations) if p.is_file()), None)

