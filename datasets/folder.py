"""``folder``: your own data -- an images folder plus a CSV or JSON manifest per split.

Layout (``root``)::

    train.csv | train.json     # one manifest per split: {split}.csv, else {split}.json
    test.csv  | test.json      # (option manifest = "labels/{split}.csv" names them; splits are
    val.csv   | val.json       #  train, val, test; a grid's default is train / test)
    classes.txt                # optional: the class list, one name per line, in label order
    <image files>              # anywhere under ROOT/<image_dir> (default: ROOT itself)

CSV manifests (UTF-8, a header row, then one image per row; blank lines are skipped):

- long form, header ``path,labels`` (the second column named ``labels``, ``label``, ``tags`` or
  ``classes``): ``cats/001.jpg,cat;sofa`` -- labels separated by ``label_sep`` (default ``;``),
  an empty cell is an image without labels;
- wide form, any other header ``path,<class>,<class>,...``: one 0/1 column per class (empty = 0).

JSON manifests: a list ``[{"path": "cats/001.jpg", "labels": ["cat", "sofa"]}, ...]`` or an object
``{"samples": [...], "labels": [...]}`` (the seed 002 format: ``image_name`` / ``image_labels`` keys
are accepted as well; the top-level ``labels`` / ``classes`` list, when present, is the class list).

Unknown labels (partially annotated data): a label a manifest marks unknown is neither positive
nor negative. It takes no part in evaluation (``ignore``) and, in the training split, no part in
the loss (``known``; the dataset option ``observe`` may hide more, ``bench/api/observe.py``):

- long-form CSV: ``?dog`` in the labels cell marks ``dog`` unknown, and a lone ``?`` marks every
  label the row does not list unknown (``cat;?``: a single positive label, the rest unannotated);
- wide-form CSV: a cell ``?`` (besides ``1``, ``0`` and empty = 0);
- JSON: a sample key ``"unknown"``: a list of label names, or ``"*"`` for every label not in its
  ``labels``.

Image paths are relative to ``ROOT/<image_dir>`` and must stay inside it: an absolute path, a path
whose ``..`` leads outside, or a symlink (file or folder) resolving outside is a
:class:`bench.core.errors.DataError` naming the manifest and the line. (The images folder itself may be
a symlink to another disk.)

The class list, first that applies:
1. option ``classes``: a list of names, or one string of comma-separated names (a grid can set
   the string form, e.g. ``classes = "cat,dog,sofa"``);
2. option ``classes_file`` (relative to ROOT), else ``ROOT/classes.txt`` when present;
3. the ``labels`` / ``classes`` list of the JSON manifests (identical in every split that has one);
4. inferred: the sorted union of the labels of EVERY split's manifest found under the same pattern,
   so train and test always agree on the class order.
With 1-3 a label outside the list is an error naming the manifest and the line.

Errors (:class:`bench.core.errors.DataError`): a missing manifest or images folder, a malformed row, an
unknown label, an escaping path, an empty split, an image absent from disk (checked at
construction, one ``os.scandir`` per folder). An image that exists but cannot be decoded raises
:class:`bench.api.dataset.UnreadableImage` from :meth:`load_image` (skipped and counted by the cache).

``fingerprint()``: the manifest's size and mtime and a digest of the split's image files' (path,
size, mtime). ``data_in_identity``: the train and test splits' labelled samples and image sizes
(``data_identity()``) are part of every run's id, so ``--data-root folder=A`` and ``folder=B``
holding different data are different runs (a copy of the same data is the same run).
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench.api import DataError, ImageFileDataset, index_images, line_of, register_dataset, safe_relpath, stat_key, write_sample_images

EXPECTED_LAYOUT = (
    "folder expects ROOT/{split}.csv (header 'path,labels', labels separated by ';') or "
    'ROOT/{split}.json ([{"path": ..., "labels": [...]}]) with image paths relative to ROOT'
)
LONG_FORM_COLUMNS = ("labels", "label", "tags", "classes")
PATH_KEYS = ("path", "image", "image_name", "file_name", "filename")
LABEL_KEYS = ("labels", "image_labels", "tags")
#: marks a label unknown in a manifest (module docstring)
UNKNOWN = "?"

# -- manifests

#: one parsed manifest: (image paths, label lists, where(i) -> "file, line L", class list or None)
Manifest = tuple[list[str], list[list[str]], Callable[[int], str], list[str] | None]


def read_csv_manifest(path: Path, label_sep: str) -> Manifest:
    """Rows of a long- or wide-form CSV manifest (see the module docstring)."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = [(reader.line_num, row) for reader in [csv.reader(f)] for row in reader]
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: not a readable CSV file ({exc})") from None
    rows = [(n, r) for n, r in rows if any(cell.strip() for cell in r)]
    if not rows:
        raise DataError(f"{path}: empty manifest (expected a header row such as 'path,labels')")
    header_line, header = rows[0]
    header = [h.strip() for h in header]
    if len(header) < 2:
        raise DataError(f"{path}, line {header_line}: header {header!r} needs a path column and a labels column (or one column per class)")
    long_form = len(header) == 2 and header[1].lower() in LONG_FORM_COLUMNS
    lines, paths, labels = [], [], []
    for lineno, row in rows[1:]:
        if len(row) != len(header):
            raise DataError(f"{path}, line {lineno}: {len(row)} field(s), the header has {len(header)}")
        if long_form:
            names = [s.strip() for s in row[1].split(label_sep)] if label_sep else [row[1].strip()]
            names = [s for s in names if s]
        else:
            names = []
            for column, cell in zip(header[1:], row[1:]):
                cell = cell.strip()
                if cell not in ("0", "1", "", UNKNOWN):
                    raise DataError(f"{path}, line {lineno}: column {column!r} holds {cell!r}; expected 0, 1 or {UNKNOWN} (unknown)")
                if cell in ("1", UNKNOWN):
                    names.append(column if cell == "1" else UNKNOWN + column)
        lines.append(lineno)
        paths.append(row[0])
        labels.append(names)
    return paths, labels, lambda i: f"{path}, line {lines[i]}", None if long_form else sorted(header[1:])


def read_json_manifest(path: Path) -> Manifest:
    """Samples of a JSON manifest (a list of samples, or ``{"samples": [...], "labels": [...]}``)."""
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None
    classes = None
    if isinstance(data, dict):
        classes = data.get("labels", data.get("classes"))
        if classes is not None and (not isinstance(classes, list) or not all(isinstance(c, str) for c in classes)):
            raise DataError(f"{path}: the top-level 'labels' / 'classes' must be a list of names")
        data = data.get("samples")
    if not isinstance(data, list):
        raise DataError(f'{path}: expected a list of samples or {{"samples": [...], "labels": [...]}}')

    def where(i: int) -> str:
        sample = data[i]
        name = next((sample[k] for k in PATH_KEYS if k in sample), None) if isinstance(sample, dict) else None
        line = line_of(text, json.dumps(name)) if isinstance(name, str) else 0
        return f"{path}, sample {i + 1}" + (f" (line {line})" if line else "")

    paths, labels = [], []
    for i, sample in enumerate(data):
        path_key = next((k for k in PATH_KEYS if isinstance(sample, dict) and k in sample), None)
        label_key = next((k for k in LABEL_KEYS if isinstance(sample, dict) and k in sample), None)
        if path_key is None or label_key is None:
            raise DataError(f'{where(i)}: expected {{"path": ..., "labels": [...]}}, got {sample!r:.120}')
        names = sample[label_key]
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise DataError(f"{where(i)}: {label_key!r} must be a list of label names, got {names!r:.120}")
        unknown = sample.get("unknown", [])
        if unknown == "*":
            unknown = [""]  # "?" alone: every label not listed
        elif not isinstance(unknown, list) or not all(isinstance(n, str) and n for n in unknown):
            raise DataError(f'{where(i)}: "unknown" must be a list of label names or "*", got {unknown!r:.120}')
        paths.append(sample[path_key])
        labels.append([*names, *(UNKNOWN + n for n in unknown)])
    return paths, labels, where, classes


def split_unknown(names: list[str]) -> tuple[list[str], list[str], bool]:
    """A manifest row's label names -> (positives, names marked unknown, whether every label not
    listed is unknown): ``["cat", "?dog"]`` -> (["cat"], ["dog"], False); ``["cat", "?"]`` -> (["cat"], [], True)."""
    positives = [n for n in names if not n.startswith(UNKNOWN)]
    marked = [n[len(UNKNOWN):] for n in names if n.startswith(UNKNOWN)]
    return positives, [n for n in marked if n], "" in marked


def read_classes_file(path: Path) -> list[str]:
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    return [n for n in names if n and not n.startswith("#")]


def _class_option(classes: object) -> list[str] | None:
    if classes is None:
        return None
    if isinstance(classes, str):
        classes = [c.strip() for c in classes.split(",") if c.strip()]
    if not isinstance(classes, (list, tuple)) or not classes or not all(isinstance(c, str) and c for c in classes):
        raise ValueError(f"option classes must be a non-empty list of names or a comma-separated string, got {classes!r}")
    if len(set(classes)) != len(classes):
        raise ValueError(f"option classes lists a name twice: {list(classes)!r}")
    return list(classes)


@register_dataset("folder")
class FolderDataset(ImageFileDataset):
    """An images folder with CSV / JSON manifests (see the module docstring)."""

    splits = ("train", "val", "test")
    train_split = "train"
    test_split = "test"
    expected_layout = EXPECTED_LAYOUT
    data_in_identity = True  # your own folder: other data under another root is another run

    @classmethod
    def write_sample(cls, root: Path) -> dict[str, Any]:
        rows = {"train": [("a/1.jpg", "cat;dog"), ("2.jpg", "dog"), ("3.jpg", "bird")], "val": [("v.jpg", "cat")], "test": [("t1.jpg", "cat"), ("t2.jpg", "bird;dog")]}
        root.mkdir(parents=True, exist_ok=True)
        for split, items in rows.items():
            (root / f"{split}.csv").write_text("path,labels\n" + "".join(f"{p},{labels}\n" for p, labels in items))
            write_sample_images(root, [p for p, _ in items])
        return {}

    def __init__(
        self,
        root: str | os.PathLike | None = None,
        split: str = "train",
        *,
        manifest: str = "{split}",
        image_dir: str = "",
        classes: list[str] | str | None = None,
        classes_file: str = "",
        label_sep: str = ";",
    ) -> None:
        root = self.data_root(root)
        if "{split}" not in manifest:
            raise ValueError(f"option manifest = {manifest!r} must contain '{{split}}' (one manifest per split)")
        if Path(manifest).suffix not in ("", ".csv", ".json"):
            raise ValueError(f"option manifest = {manifest!r} must end in .csv or .json, or have no suffix (then .csv, else .json)")
        given = _class_option(classes)
        self.split = self.check_split(split)
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise DataError(f"folder: data root {self.root} does not exist; {EXPECTED_LAYOUT}")
        self.image_dir = self.root / image_dir
        if not self.image_dir.is_dir():
            raise DataError(f"folder: images folder {self.image_dir} does not exist (option image_dir = {image_dir!r})")
        self.manifest_file = self._manifest(split, manifest)
        if self.manifest_file is None:
            tried = " or ".join(str(p) for p in self._manifest_candidates(split, manifest))
            raise DataError(f"folder split {split!r}: manifest {tried} is missing; {EXPECTED_LAYOUT}")
        paths, labels, where, listed = self._read(self.manifest_file, label_sep)
        if not paths:
            raise DataError(f"folder split {split!r} is empty: {self.manifest_file} lists no image")

        # -- the class list (module docstring: option, classes file, JSON list, inferred)
        classes_path = self.root / classes_file if classes_file else self.root / "classes.txt"
        if classes_file and not classes_path.is_file():
            raise DataError(f"folder: classes file {classes_path} is missing (option classes_file = {classes_file!r})")
        if given is not None:
            self.classes, source = given, "option classes"
        elif classes_path.is_file():
            self.classes, source = read_classes_file(classes_path), str(classes_path)
            if not self.classes or len(set(self.classes)) != len(self.classes):
                raise DataError(f"{classes_path}: the class list must be non-empty and hold each name once")
        else:
            others = [(f, self._read(f, label_sep)) for s in self.splits if s != split and (f := self._manifest(s, manifest))]
            json_lists = [(f, m[3]) for f, m in [(self.manifest_file, (paths, labels, where, listed)), *others]
                          if f.suffix == ".json" and m[3] is not None]  # fmt: skip
            if json_lists:
                first_file, first = json_lists[0]
                for other_file, other in json_lists[1:]:
                    if other != first:
                        raise DataError(f"folder: the class lists of {first_file} and {other_file} differ")
                self.classes, source = list(first), f"the 'labels' list of {first_file}"
                if len(set(self.classes)) != len(self.classes):
                    raise DataError(f"{first_file}: the 'labels' list holds a name twice")
            else:
                union = {name for names in labels for part in split_unknown(names)[:2] for name in part}
                for _, (_, other_labels, _, other_listed) in others:
                    union.update(name for names in other_labels for part in split_unknown(names)[:2] for name in part)
                    union.update(other_listed or ())
                union.update(listed or ())
                self.classes, source = sorted(union), None
        if not self.classes:
            raise DataError(f"folder split {split!r}: no class at all in {self.manifest_file} (and the other splits' manifests)")

        index = {c: k for k, c in enumerate(self.classes)}
        self.targets = np.zeros((len(paths), len(self.classes)), dtype=np.uint8)
        known = np.ones(self.targets.shape, dtype=bool)
        for i, names in enumerate(labels):
            positives, unknown, rest_unknown = split_unknown(names)
            for name in positives + unknown:
                if name not in index:
                    raise DataError(f"{where(i)}: label {name!r} is not in the class list ({source}): {', '.join(self.classes)}")
            both = set(positives) & set(unknown)
            if both:
                raise DataError(f"{where(i)}: label(s) {', '.join(sorted(both))} marked both positive and unknown")
            if rest_unknown:
                known[i] = False
            for name in positives:
                self.targets[i, index[name]] = 1
                known[i, index[name]] = True
            for name in unknown:
                known[i, index[name]] = False
        self.ignore = ~known  # an unannotated label is not scored
        self.known = known
        self.paths = [safe_relpath(p, self.image_dir, lambda i=i: where(i)) for i, p in enumerate(paths)]
        image_digest = index_images(self.image_dir, self.paths, where)
        self.set_images(self.image_dir, self.paths, f"folder-v1 {split} {stat_key(self.manifest_file)} images={image_digest}")

    # -- manifests --------------------------------------------------------------------------------

    def _manifest_candidates(self, split: str, pattern: str) -> list[Path]:
        base = self.root / pattern.replace("{split}", split)
        if base.suffix in (".csv", ".json"):
            return [base]
        return [base.with_name(base.name + ".csv"), base.with_name(base.name + ".json")]

    def _manifest(self, split: str, pattern: str) -> Path | None:
        return next((p for p in self._manifest_candidates(split, pattern) if p.is_file()), None)

    @staticmethod
    def _read(path: Path, label_sep: str) -> Manifest:
        return read_json_manifest(path) if path.suffix == ".json" else read_csv_manifest(path, label_sep)

