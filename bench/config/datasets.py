"""The ``[[datasets]]`` entries of a grid: options coerced to their defaults' types, splits checked,
the data root found, and (for datasets whose identity is their folder) a digest of their data.

Also :func:`coerce_setting`: a dataset option against its default's type (the one rule of
:mod:`bench.core.coerce`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from bench.api import registry
from bench.api.observe import OBSERVE_KEYS, split_observe
from bench.config.identity import config_hash
from bench.core.coerce import CoerceError, OutOfRange, annotation_of, coerce
from bench.core.errors import UsageError, choices

DATASET_KEYS = ("name", "root", "train_split", "test_split")


def coerce_setting(value: Any, default: Any, where: str, key: str) -> Any:
    """A dataset option as its default's type wants it (:func:`bench.core.coerce.coerce` of
    :func:`bench.core.coerce.annotation_of` the default: an int is a float where a float is
    expected; integers within int64; a NaN or infinite number is never a valid setting)."""
    try:
        return coerce(annotation_of(default), value)
    except OutOfRange as exc:
        what = "is not a finite number" if isinstance(value, float) else f"is out of range ({exc})"
        raise UsageError(f"{where}: {key!r} = {value!r} {what}") from None
    except CoerceError as exc:
        raise UsageError(f"{where}: {key!r} = {value!r} has type {type(value).__name__}; {exc} (default {default!r})") from None


def dataset_root(name: str, entry_root: str | None, data_roots: dict[str, str]) -> tuple[str | None, str]:
    """Where dataset ``name``'s data is: ``--data-root`` beats the grid's ``root``, which beats
    ``$HEADBENCH_ROOT_<NAME>``. Returns (root or None, a phrase saying how to set it)."""
    env = f"HEADBENCH_ROOT_{name.upper()}"
    how = f"pass --data-root {name}=PATH or set ${env}"
    for candidate in (data_roots.get(name), entry_root, os.environ.get(env)):
        if candidate:
            return str(Path(candidate).expanduser()), how
    return None, how


def expand_datasets(entries: list[dict[str, Any]], data_roots: dict[str, str], where: str):
    """(name, options, root, train_split, test_split) per dataset entry, and per dataset entry
    without a data root (name, how to give it, expected layout)."""
    resolved, skipped = [], []
    for i, entry in enumerate(entries):
        name = entry["name"]
        label = f"{where} [[datasets]] {i + 1} ({name})"
        try:
            cls = registry.dataset_class(name)
        except UsageError as exc:
            raise UsageError(f"{label}: {exc}") from None
        options = {k: v for k, v in entry.items() if k not in DATASET_KEYS}
        options, observe = split_observe(options, label)
        defaults = registry.dataset_options(name)
        unknown = sorted(set(options) - set(defaults))
        if unknown:
            valid = ['root', 'train_split', 'test_split', *OBSERVE_KEYS, *sorted(defaults)]
            raise UsageError(f"{label}: unknown option(s) {choices(unknown)}; valid: {choices(valid)}")
        for key, value in options.items():
            if isinstance(value, list) and not (defaults[key] is None or isinstance(defaults[key], (list, tuple))):
                raise UsageError(f"{label}: option {key!r} is a list; to compare datasets add another [[datasets]] entry")
            options[key] = coerce_setting(value, list(defaults[key]) if isinstance(defaults[key], tuple) else defaults[key], label, key)
        # observe = "all" adds no key, so grids that never name it keep their run ids
        full = {**defaults, **options, **observe.options()}
        for key in ("root", "train_split", "test_split"):
            if key in entry and (not isinstance(entry[key], str) or not entry[key].strip()):
                raise UsageError(f"{label}: {key} = {entry[key]!r} must be a non-empty string" + (" (a folder path)" if key == "root" else f"; valid splits: {choices(cls.splits)}"))
        splits = {}
        for key, default in (("train_split", cls.train_split), ("test_split", cls.test_split)):
            splits[key] = entry.get(key, default)
            if splits[key] not in cls.splits:
                raise UsageError(f"{label}: {key} = {splits[key]!r}; valid splits: {choices(cls.splits)}")
        root, how = dataset_root(name, entry.get("root"), data_roots)
        if getattr(cls, "needs_root", False):
            if root is None:
                skipped.append((name, how, cls.expected_layout))
                continue
            if not Path(root).is_dir():
                raise UsageError(f"{label}: data root {root} does not exist or is not a folder ({how}); {cls.expected_layout}")
        data = data_identity(name, cls, root, options, splits, label) if getattr(cls, "data_in_identity", False) and root else None
        resolved.append((name, full, root, splits["train_split"], splits["test_split"], data))
    return resolved, skipped


def data_identity(name: str, cls: type, root: str, options: dict[str, Any], splits: dict[str, str], label: str) -> str:
    """A digest of the train and test splits' data (``MultiLabelDataset.data_identity``) of a
    dataset whose identity is its folder; a bad folder is an error naming the grid entry."""
    parts = []
    for key in ("train_split", "test_split"):
        try:
            parts.append(registry.build_dataset(name, root, splits[key], **options).data_identity())
        except UsageError as exc:
            raise type(exc)(f"{label}: {exc}") from None
    return config_hash({"data": parts})
