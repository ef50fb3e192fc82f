"""The validation split of ``select = "best_val"``: which images of a training split are held out.

Every image is ranked by ``sha256(dataset, split, image id)`` and the first ``round(fraction * N)``
are held out (:func:`holdout`), so every head and seed of a dataset holds out the same images and
runs stay paired; :class:`RowView` and the ``*_rows`` functions read those rows of a cached split
without copying it (docs/model-selection.md).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from bench.core.errors import DataError
from bench.data.feature_cache import FeatureSplit
from bench.data.image_cache import CachedSplit


@dataclass(frozen=True)
class Holdout:
    """Rows of a training split (indices into its readable images): the ones kept for training and
    the ones held out for validation. Both ascending, disjoint, together every row."""

    train_rows: np.ndarray  # int64 [N - V]
    val_rows: np.ndarray  # int64 [V]


def validation_count(n: int, fraction: float, where: str) -> int:
    """``round(fraction * n)`` held-out images; an error when that leaves no image on one side."""
    count = int(math.floor(fraction * n + 0.5))
    if not 1 <= count <= n - 1:
        raise DataError(
            f"{where}: val_fraction = {fraction} of {n} training images holds out {count}; it must leave at least "
            f"one image for validation and one for training (choose val_fraction in [{1 / n:.3g}, {1 - 1 / n:.3g}])"
        )
    return count


def holdout(dataset: str, split: str, image_ids: list[str], fraction: float) -> Holdout:
    """The validation rows of a training split.

    Every image is ranked by ``sha256(dataset, split, image id)`` and the first
    ``round(fraction * N)`` are held out. The choice depends on nothing else: not the run's seed,
    the head, the image size, the dataset's options or the files' modification times, so every run
    on the dataset holds out the same images (and a copy of the data on another machine too).

    Args:
        dataset: the registered dataset name; split: the training split's name.
        image_ids: the ids of the split's readable images, in row order (length N).
        fraction: the recipe's ``val_fraction``, in (0, 1).
    """
    n = len(image_ids)
    count = validation_count(n, fraction, f"dataset {dataset!r} split {split!r}")
    prefix = f"{dataset}\x1f{split}\x1f".encode()
    ranks = [hashlib.sha256(prefix + image_id.encode()).digest() for image_id in image_ids]
    order = sorted(range(n), key=lambda i: (ranks[i], image_ids[i]))
    val = np.sort(np.asarray(order[:count], dtype=np.int64))
    train = np.setdiff1d(np.arange(n, dtype=np.int64), val)
    return Holdout(train, val)


class RowView:
    """Rows ``rows`` of an array [N, ...] (typically a memory map of cached images or features),
    read through without copying the whole subset: ``view[i]`` is ``base[rows[i]]``.

    Supports what the loaders and caches use: ``len``, ``shape``, ``dtype``, ``ndim`` and indexing
    by an int, a slice or an integer array (the result is a NumPy array, as for the base).
    """

    def __init__(self, base: Any, rows: np.ndarray) -> None:
        self.base, self.rows = base, np.asarray(rows, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.rows), *self.base.shape[1:])

    @property
    def dtype(self) -> np.dtype:
        return self.base.dtype

    @property
    def ndim(self) -> int:
        return self.base.ndim

    def __getitem__(self, index: Any) -> np.ndarray:
        if isinstance(index, (int, np.integer)):
            return self.base[int(self.rows[index])]
        return self.base[self.rows[index]]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self.base[self.rows]
        return out if dtype is None else out.astype(dtype)


def cached_rows(split: CachedSplit, rows: np.ndarray, keep_skipped: bool) -> CachedSplit:
    """The images ``rows`` of a cached split (a view; ``skipped`` kept only where asked, so the
    split's unreadable images are counted once)."""
    return CachedSplit(
        images=RowView(split.images, rows),  # type: ignore[arg-type]
        targets=np.asarray(split.targets)[rows],
        ignore=np.asarray(split.ignore)[rows],
        image_ids=[split.image_ids[i] for i in rows],
        skipped=list(split.skipped) if keep_skipped else [],
        known=None if split.known is None else np.asarray(split.known)[rows],
    )


def feature_rows(split: FeatureSplit, rows: np.ndarray) -> FeatureSplit:
    """The features of images ``rows`` (a view of the cached feature file)."""
    return FeatureSplit(
        features=RowView(split.features, rows),  # type: ignore[arg-type]
        targets=np.asarray(split.targets)[rows],
        ignore=np.asarray(split.ignore)[rows],
        image_ids=[split.image_ids[i] for i in rows],
        known=None if split.known is None else np.asarray(split.known)[rows],
    )
