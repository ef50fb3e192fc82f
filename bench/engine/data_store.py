"""What one grid launch shares across its cells: datasets, decoded images, frozen features.

Building a dataset, decoding its images into the image cache and running a frozen backbone over
them happen once per launch (and, through the on-disk caches, once per machine); the runner asks
this store for them cell by cell.
"""

from __future__ import annotations

import functools
import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from accelerate import Accelerator

from bench.api.context import HeadContext
from bench.api.dataset import MultiLabelDataset
from bench.api.image_files import first_duplicate
from bench.api.observe import observed_mask
from bench.api.registry import build_dataset
from bench.config.grid import Cell
from bench.core.errors import DataError, UsageError
from bench.core.paths import cache_dir
from bench.data import feature_cache as features
from bench.data import image_cache
from bench.data.feature_cache import FeatureSplit
from bench.data.label_checks import classes_without_positives, no_positive_message
from bench.data import holdout as held_out
from bench.engine.progress import Progress
from bench.eval.head_cost import flops_per_image
from bench.eval.metrics import evaluated_classes
from bench.models.classifier import Classifier

#: a test split with fewer images gets a warning: its metrics are noisy, and a rare class may have
#: no positive there (it is then left out of mAP, SPEC §1)
MIN_TEST_IMAGES = 100


class DataWarning(UserWarning):
    """A dataset mistake that does not stop the run but changes what its numbers mean."""


def check_validation_labels(val: image_cache.CachedSplit, dataset: str, fraction: float) -> None:
    """A validation split without any positive label cannot rank epochs: say so before training."""
    if not evaluated_classes(val.targets, val.ignore).any():
        raise DataError(
            f"dataset {dataset!r}: the {len(val.targets)} validation images (val_fraction = {fraction}) hold no "
            f"positive label, so their mAP is undefined; raise val_fraction"
        )


def check_listed_once(dataset: MultiLabelDataset, name: str, split: str) -> None:
    """A :class:`DataError` when a split lists an image (by ``image_id``) twice: it would be counted
    twice, and a test split with a duplicate cannot be paired with another run's scores."""
    ids = [dataset.image_id(i) for i in range(len(dataset))]
    twice = first_duplicate(ids)
    if twice is not None:
        first, second = twice
        raise DataError(
            f"dataset {name!r} split {split!r} lists image {ids[second]!r} twice (entries {first + 1} and {second + 1} "
            "of the split); list each image once"
        )


def split_warnings(train: MultiLabelDataset, test: MultiLabelDataset, name: str, train_split: str, test_split: str) -> list[str]:
    """Warnings about a pair of splits: test images also in the training split (by ``image_id``),
    a test split smaller than :data:`MIN_TEST_IMAGES`."""
    out = []
    test_ids = [test.image_id(i) for i in range(len(test))]
    train_ids = {train.image_id(i) for i in range(len(train))}
    shared = [i for i in test_ids if i in train_ids]
    if shared:
        shown = ", ".join(repr(i) for i in shared[:3]) + (", ..." if len(shared) > 3 else "")
        out.append(
            f"dataset {name!r}: {len(shared)} of the {len(test_ids)} images of test split {test_split!r} are also in "
            f"training split {train_split!r} ({shown}); a test image seen in training inflates every score"
        )
    no_positive = no_positive_message(name, train_split, classes_without_positives(train.classes, train.targets, train.ignore), len(train.classes))
    if no_positive is not None:
        out.append(no_positive)
    if len(test_ids) < MIN_TEST_IMAGES:
        out.append(
            f"dataset {name!r}: test split {test_split!r} has only {len(test_ids)} images (fewer than {MIN_TEST_IMAGES}): "
            "its metrics are noisy, and a class without a positive there is left out of mAP"
        )
    return out


@dataclass
class DataSplits:
    """A cell's data at the recipe's size: the images the model trains on, the validation images
    (``select = "best_val"``, else None), the test split, and the head context (from ``train``).

    The test split is decoded and its labels read on first use of :attr:`test`, so a run touches it
    only when it evaluates (docs/model-selection.md). ``holdout``: the rows of the whole training
    split that ``train`` and ``val`` hold (None without a validation split).
    """

    train: image_cache.CachedSplit
    load_test: Callable[[], image_cache.CachedSplit]
    classes: list[str]
    context: HeadContext
    val: image_cache.CachedSplit | None = None
    holdout: held_out.Holdout | None = None
    #: bool [N, C] over ``train``: the training labels the run observes (dataset option ``observe``,
    #: bench/api/observe.py); the loss sees only these, and so does the head context
    observed: np.ndarray | None = None

    @functools.cached_property
    def test(self) -> image_cache.CachedSplit:
        return self.load_test()


class DataStore:
    """Datasets and image caches shared by all cells of a grid in this process."""

    def __init__(self, accelerator: Accelerator) -> None:
        self.accelerator = accelerator
        self._datasets: dict[str, MultiLabelDataset] = {}
        self._cached: dict[str, image_cache.CachedSplit] = {}
        self._features: dict[str, FeatureSplit] = {}
        self._profiles: dict[str, tuple[tuple[int, int, int], int]] = {}
        self._holdouts: dict[str, held_out.Holdout] = {}
        self._checked_pairs: set[str] = set()

    def dataset(self, cell: Cell, split: str) -> MultiLabelDataset:
        key = json.dumps([cell.dataset, cell.dataset_options, cell.root, split], sort_keys=True)
        if key not in self._datasets:
            with self.accelerator.main_process_first():
                built = build_dataset(cell.dataset, cell.root, split, **cell.dataset_options)
            if len(built) == 0:
                raise UsageError(f"dataset {cell.dataset!r} split {split!r} is empty (root: {cell.root})")
            check_listed_once(built, cell.dataset, split)
            self._datasets[key] = built
        if split == cell.test_split:
            self._check_test_split(cell)
        return self._datasets[key]

    def _check_test_split(self, cell: Cell) -> None:
        """Once per dataset and pair of splits (main process): warn about test images that are in
        the training split too, and about a test split too small to rank heads."""
        key = json.dumps([cell.dataset, cell.dataset_options, cell.root, cell.train_split, cell.test_split], sort_keys=True)
        if key in self._checked_pairs:
            return
        self._checked_pairs.add(key)
        test, train = self.dataset(cell, cell.test_split), self.dataset(cell, cell.train_split)
        if getattr(self.accelerator, "is_main_process", True):
            for message in split_warnings(train, test, cell.dataset, cell.train_split, cell.test_split):
                warnings.warn(message, DataWarning, stacklevel=3)

    def cached(self, cell: Cell, split: str, progress: Progress | None = None) -> image_cache.CachedSplit:
        """All readable images of ``split`` at the recipe's size (decoded into the image cache once)."""
        size = cell.recipe.image_size
        key = json.dumps([cell.dataset, cell.dataset_options, cell.root, split, size], sort_keys=True)
        if key not in self._cached:
            ds = self.dataset(cell, split)
            callback = progress.callback(f"caching {cell.dataset}/{split} at {size}px") if progress else None
            with self.accelerator.main_process_first():
                self._cached[key] = image_cache.load_or_build(ds, size, cache_dir(), callback)
        return self._cached[key]

    def holdout(self, cell: Cell) -> held_out.Holdout | None:
        """The validation rows of the cell's training split (``select = "best_val"``), else None."""
        if cell.recipe.select != "best_val":
            return None
        full = self.cached(cell, cell.train_split)
        key = json.dumps([cell.dataset, cell.dataset_options, cell.root, cell.train_split, cell.recipe.image_size, cell.recipe.val_fraction], sort_keys=True)
        if key not in self._holdouts:
            self._holdouts[key] = held_out.holdout(cell.dataset, cell.train_split, full.image_ids, cell.recipe.val_fraction)
        return self._holdouts[key]

    def splits(self, cell: Cell, progress: Progress | None = None) -> DataSplits:
        full = self.cached(cell, cell.train_split, progress)
        train, val, rows = full, None, self.holdout(cell)
        if rows is not None:
            train = held_out.cached_rows(full, rows.train_rows, keep_skipped=True)
            val = held_out.cached_rows(full, rows.val_rows, keep_skipped=False)
            check_validation_labels(val, cell.dataset, cell.recipe.val_fraction)
        train_ds = self.dataset(cell, cell.train_split)
        observed = observed_mask(np.asarray(train.targets), cell.dataset_options, train.known)
        # a head's label statistics (ML-GCN's co-occurrence) count only the labels the run observes
        context = HeadContext.from_labels(train_ds.classes, train.targets, np.asarray(train.ignore, dtype=bool) | ~observed)
        return DataSplits(train, lambda: self.cached(cell, cell.test_split, progress), list(train_ds.classes), context, val, rows, observed)

    def features(self, cell: Cell, which: str, model: Classifier, progress: Progress | None = None) -> FeatureSplit:
        """Frozen-backbone features of the cell's ``which`` images: ``train`` (those it trains on),
        ``val`` (held out, ``select = "best_val"``) or ``test``. Features are computed and cached for
        a whole split; ``train`` and ``val`` are then row views of the training split's."""
        if which not in ("train", "val", "test"):
            raise ValueError(f"features of {which!r}: expected 'train', 'val' or 'test'")
        split = cell.test_split if which == "test" else cell.train_split
        rows = None if which == "test" else self.holdout(cell)
        if which == "val" and rows is None:
            raise ValueError(f"{cell.describe()} has no validation split (recipe select = {cell.recipe.select!r})")
        out = self._split_features(cell, split, model, progress)
        if rows is not None:
            out = held_out.feature_rows(out, rows.train_rows if which == "train" else rows.val_rows)
        return out

    def _split_features(self, cell: Cell, split: str, model: Classifier, progress: Progress | None) -> FeatureSplit:
        size = cell.recipe.image_size
        images = self.cached(cell, split, progress)
        ikey = image_cache.cache_key(self.dataset(cell, split), size)
        mean, std = tuple(model.mean.flatten().tolist()), tuple(model.std.flatten().tolist())  # as applied
        identity = features.backbone_identity(model.backbone.origin, mean, std, cell.seed)
        key = features.feature_key(ikey, cell.backbone, identity, cell.recipe.feature_dtype)
        if key not in self._features:
            model.to(self.accelerator.device).eval()
            callback = progress.callback(f"features {cell.dataset}/{split} {cell.backbone}") if progress else None
            self._features[key] = features.load_or_build(
                model.features, images, key, cache_dir(), self.accelerator, cell.recipe.eval_batch_size, cell.recipe.feature_dtype, callback
            )
        return self._features[key]

    def _profile(self, cell: Cell, model: Classifier) -> tuple[tuple[int, int, int], int]:
        key = f"{cell.backbone}\x1f{cell.recipe.image_size}"
        if key not in self._profiles:
            size = cell.recipe.image_size
            example = torch.zeros(1, 3, size, size, device=next(model.parameters()).device)
            # eval mode: a forward in train mode would move BatchNorm statistics of the model
            # about to be trained (and make the first cell of a launch differ from the others)
            was_training = model.training
            model.eval()
            with torch.no_grad():
                shape = tuple(model.features(example).shape[1:])
            model.train(was_training)
            self._profiles[key] = (shape, flops_per_image(model.backbone, example))
        return self._profiles[key]

    def feature_shape(self, cell: Cell, model: Classifier) -> tuple[int, int, int]:
        """[d, h, w] of the backbone's output at the recipe's image size."""
        return self._profile(cell, model)[0]

    def backbone_flops(self, cell: Cell, model: Classifier) -> int:
        """FLOPs of the backbone for one image at the recipe's size."""
        return self._profile(cell, model)[1]
