"""``voc2007``: PASCAL VOC 2007 classification, read the way the multi-label literature reads it.

Layout (``root`` is ``VOCdevkit/VOC2007``, or ``VOCdevkit/``, or the folder holding ``VOCdevkit/``)::

    VOC2007/JPEGImages/<id>.jpg
    VOC2007/ImageSets/Main/{class}_{split}.txt    # "<id> <1|-1|0>": positive / negative / difficult
    VOC2007/ImageSets/Main/{split}.txt            # the split's ids (needed for XML labels)
    VOC2007/Annotations/<id>.xml                  # used only when the class label files are absent

Splits ``trainval`` (5,011 images; the training split), ``train``, ``val`` and ``test`` (4,952).
Classes: the 20 VOC classes in alphabetical order (SPEC §3, the ML-GCN / CSRA order).

Labels come from the 20 files ``ImageSets/Main/{class}_{split}.txt`` (``1`` positive, ``-1``
negative, ``0`` difficult: the image holds that class only as difficult objects). When none of those
files exists, the labels are computed from ``Annotations/<id>.xml`` for the ids of
``ImageSets/Main/{split}.txt``: a class is positive when the image holds at least one non-difficult
object of it, and difficult when ALL its objects of that class are difficult -- the rule that
produced the label files (option ``label_source`` forces one or the other). The image order is
that of ``{split}.txt`` (or of the first class file when ``{split}.txt`` is absent).

Options:
    difficult: ``"ignore"`` (default: negative in training, ignored in evaluation -- the papers'
        protocol), ``"positive"``, ``"negative"``, or ``"train_positive"`` (positive in training,
        ignored in evaluation -- ML-GCN's release) (:func:`bench.api.difficult_labels.apply_difficult_policy`).
        It is a dataset option, so it is part of every run's configuration and recorded in its row.
    label_source: ``"auto"`` (class label files if present, else XML), ``"files"`` or ``"xml"``.

Errors (:class:`bench.core.errors.DataError`, naming the file and line): a missing label / split /
annotation file, a malformed line, an id missing from a class file, an object class outside the
20, an empty split, an image listed but absent from ``JPEGImages`` (checked when the dataset is
built, with one ``os.scandir``). An image that exists but cannot be decoded (truncated, corrupt)
raises :class:`bench.api.dataset.UnreadableImage` from :meth:`load_image`; the image cache skips and
counts it.

``fingerprint()`` covers the label files' sizes and mtimes (or the split's XMLs') and a digest of
the split's image files' (name, size, mtime), so editing, adding or touching any of them rebuilds
the image cache.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np

from bench.api import (
    DIFFICULT_POLICIES,
    DataError,
    ImageFileDataset,
    apply_difficult_policy,
    choices,
    files_digest,
    listed_images_digest,
    register_dataset,
    scan_files,
    stat_key,
    write_sample_images,
)

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)  # fmt: skip
LABEL_SOURCES = ("auto", "files", "xml")
EXPECTED_LAYOUT = (
    "voc2007 expects ROOT = VOCdevkit/VOC2007 (or the folder holding VOCdevkit/) with "
    "JPEGImages/<id>.jpg and ImageSets/Main/{class}_{split}.txt "
    "(or ImageSets/Main/{split}.txt + Annotations/<id>.xml)"
)


# -- VOC


def find_voc_root(root: str | os.PathLike) -> Path:
    """The ``VOC2007`` folder for ``root`` = ``VOC2007``, ``VOCdevkit`` or the folder holding ``VOCdevkit``."""
    root = Path(root).expanduser()
    for candidate in (root, root / "VOC2007", root / "VOCdevkit" / "VOC2007"):
        if (candidate / "ImageSets" / "Main").is_dir():
            return candidate
    raise DataError(
        f"{root} is not a VOC2007 folder: neither {root / 'ImageSets/Main'} nor "
        f"{root / 'VOCdevkit/VOC2007/ImageSets/Main'} exists; {EXPECTED_LAYOUT}"
    )


def read_id_list(path: Path) -> list[str]:
    """The ids of ``ImageSets/Main/{split}.txt`` (one per line), in file order."""
    ids, seen = [], set()
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 1:
            raise DataError(f"{path}, line {lineno}: expected one image id, got {line!r}")
        if parts[0] in seen:
            raise DataError(f"{path}, line {lineno}: image id {parts[0]!r} is listed twice")
        seen.add(parts[0])
        ids.append(parts[0])
    return ids


def read_class_file(path: Path) -> dict[str, int]:
    """``{id: 1 | -1 | 0}`` from a ``{class}_{split}.txt`` label file, in file order."""
    values: dict[str, int] = {}
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or parts[1] not in ("1", "-1", "0"):
            raise DataError(f"{path}, line {lineno}: expected '<image id> <1|-1|0>', got {line!r}")
        if parts[0] in values:
            raise DataError(f"{path}, line {lineno}: image id {parts[0]!r} is listed twice")
        values[parts[0]] = int(parts[1])
    return values


def parse_annotation(path: Path) -> list[tuple[str, bool]]:
    """``[(class name, difficult)]`` of the objects in one ``Annotations/<id>.xml``."""
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        raise DataError(f"{path}: not a valid VOC annotation (XML error: {exc})") from None
    objects = []
    for obj in root.findall("object"):
        name = (obj.findtext("name") or "").strip()
        difficult = (obj.findtext("difficult") or "0").strip()
        if difficult not in ("0", "1"):
            raise DataError(f"{path}: object {name!r} has <difficult>{difficult}</difficult>; expected 0 or 1")
        objects.append((name, difficult == "1"))
    return objects


@register_dataset("voc2007")
class VOC2007(ImageFileDataset):
    """PASCAL VOC 2007 (see the module docstring)."""

    splits = ("trainval", "train", "val", "test")
    train_split = "trainval"
    test_split = "test"
    expected_layout = EXPECTED_LAYOUT
    described_options = ("difficult",)

    def __init__(
        self,
        root: str | os.PathLike | None = None,
        split: str = "trainval",
        *,
        difficult: str = "ignore",
        label_source: str = "auto",
    ) -> None:
        root = self.data_root(root)
        if difficult not in DIFFICULT_POLICIES:
            raise ValueError(f"option difficult = {difficult!r}; valid: {choices(DIFFICULT_POLICIES)}")
        if label_source not in LABEL_SOURCES:
            raise ValueError(f"option label_source = {label_source!r}; valid: {choices(LABEL_SOURCES)}")
        self.split = self.check_split(split)
        self.root = find_voc_root(root)
        self.classes = list(VOC_CLASSES)
        main = self.root / "ImageSets" / "Main"
        split_list = main / f"{split}.txt"
        class_files = [main / f"{c}_{split}.txt" for c in self.classes]
        present = [p.is_file() for p in class_files]
        if label_source == "files" or (label_source == "auto" and any(present)):
            if not all(present):
                missing = [str(p) for p, ok in zip(class_files, present) if not ok]
                raise DataError(f"voc2007 split {split!r}: label file {missing[0]} is missing ({len(missing)} of 20 absent)")
            self.label_files = class_files + ([split_list] if split_list.is_file() else [])
            self.ids, positive, difficult_mask = self._labels_from_files(split_list, class_files)
            xml_digest = ""
        else:
            if not split_list.is_file():
                raise DataError(
                    f"voc2007 split {split!r}: split list {split_list} is missing (needed to read "
                    f"Annotations/*.xml when the {{class}}_{split}.txt label files are absent)"
                )
            self.label_files = [split_list]
            self.ids = read_id_list(split_list)
            positive, difficult_mask, xml_digest = self._labels_from_xml()
        if not self.ids:
            raise DataError(f"voc2007 split {split!r} is empty: {self.label_files[-1]} lists no image")
        self.label_source = "xml" if xml_digest else "files"
        self.targets, self.ignore = apply_difficult_policy(positive, difficult_mask, difficult)
        image_dir = self.root / "JPEGImages"
        names = [f"{i}.jpg" for i in self.ids]
        image_digest = listed_images_digest(image_dir, names, "voc2007 image", str(self.label_files[-1]))
        self.set_images(image_dir, names, " ".join(
            ["voc2007-v1", split, *(stat_key(p) for p in self.label_files), f"xml={xml_digest}", f"images={image_digest}"]
        ))

    @classmethod
    def write_sample(cls, root: Path) -> dict[str, Any]:
        main = root / "VOCdevkit" / "VOC2007" / "ImageSets" / "Main"
        main.mkdir(parents=True, exist_ok=True)
        ids = {"trainval": ["000005", "000007", "000009"], "test": ["000001", "000002"]}
        for split, names in ids.items():
            (main / f"{split}.txt").write_text("".join(f"{i}\n" for i in names))
            for c, name in enumerate(VOC_CLASSES):  # image k has class k (difficult for the last one)
                values = [("1" if k == c % len(names) else "-1") for k in range(len(names))]
                values[-1] = "0" if c == 0 else values[-1]
                (main / f"{name}_{split}.txt").write_text("".join(f"{i} {v}\n" for i, v in zip(names, values)))
        write_sample_images(root / "VOCdevkit" / "VOC2007" / "JPEGImages", [f"{i}.jpg" for v in ids.values() for i in v])
        return {}

    @classmethod
    def describe_options(cls, options: dict[str, Any]) -> list[str]:
        policy = options.get("difficult")
        if policy is None:
            return []
        meaning = DIFFICULT_POLICIES.get(policy, "")
        return [f"difficult policy: `{policy}`" + (f" ({meaning})" if meaning else "")]

    # -- labels -----------------------------------------------------------------------------------

    def _labels_from_files(self, split_list: Path, class_files: list[Path]) -> tuple[list[str], np.ndarray, np.ndarray]:
        tables = [read_class_file(p) for p in class_files]
        ids = read_id_list(split_list) if split_list.is_file() else list(tables[0])
        source = split_list if split_list.is_file() else class_files[0]
        index = {image_id: i for i, image_id in enumerate(ids)}
        values = np.empty((len(ids), len(class_files)), dtype=np.int8)
        for c, (path, table) in enumerate(zip(class_files, tables)):
            extra = [k for k in table if k not in index]
            if extra:
                lineno = _line_of(path, extra[0])
                raise DataError(f"{path}, line {lineno}: image id {extra[0]!r} is not in {source}")
            if len(table) != len(ids):
                absent = next(k for k in ids if k not in table)
                raise DataError(f"{path}: image id {absent!r} of {source} has no label in this file")
            rows = np.fromiter((index[k] for k in table), dtype=np.int64, count=len(table))
            values[rows, c] = np.fromiter(table.values(), dtype=np.int8, count=len(table))
        return ids, values == 1, values == 0

    def _labels_from_xml(self) -> tuple[np.ndarray, np.ndarray, str]:
        folder = self.root / "Annotations"
        files = scan_files(folder, "voc2007 annotation")
        names = [f"{i}.xml" for i in self.ids]
        missing = [n for n in names if n not in files]
        if missing:
            shown = ", ".join(missing[:5]) + (f" (and {len(missing) - 5} more)" if len(missing) > 5 else "")
            raise DataError(f"voc2007: {len(missing)} annotation file(s) for ids of {self.label_files[0]} are missing from {folder}: {shown}")
        class_index = {c: k for k, c in enumerate(self.classes)}
        positive = np.zeros((len(self.ids), len(self.classes)), dtype=bool)
        any_difficult = np.zeros_like(positive)
        for i, name in enumerate(names):
            for cls, is_difficult in parse_annotation(folder / name):
                if cls not in class_index:
                    raise DataError(f"{folder / name}: object class {cls!r} is not one of the 20 VOC classes")
                # positive: some instance is not difficult; difficult: ALL instances are difficult
                (any_difficult if is_difficult else positive)[i, class_index[cls]] = True
        return positive, any_difficult & ~positive, files_digest((n, files[n]) for n in names)

    def image_id(self, index: int) -> str:
        return self.ids[index]  # VOC's own image id: the file name without ".jpg"


def _line_of(path: Path, image_id: str) -> int:
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if line.split()[:1] == [image_id]:
            return lineno
    return 0
