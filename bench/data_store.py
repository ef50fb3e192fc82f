"""What one grid launch shares across its cells: datasets, decoded images, frozen features.

Building a dataset, decoding its images into the image cache and running a frozen backbone over
them happen once per launch (and, through the on-disk caches, once per machine); the runner asks
this store for them cell by cell.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch
from accelerate import Accelerator

from bench import features, image_cache
from bench.context import HeadContext
from bench.dataset import MultiLabelDataset
from bench.errors import UsageError
from bench.features import FeatureSplit
from bench.grid import Cell
from bench.paths import cache_dir
from bench.progress import Progress
from bench.registry import build_dataset
from bench.throughput import flops_per_image
from bench.train import Classifier


@dataclass
class DataSplits:
    """A cell's data: training and test images at the recipe's size, and the head context."""

    train: image_cache.CachedSplit
    test: image_cache.CachedSplit
    classes: list[str]
    context: HeadContext


class DataStore:
    """Datasets and image caches shared by all cells of a grid in this process."""

    def __init__(self, accelerator: Accelerator) -> None:
        self.accelerator = accelerator
        self._datasets: dict[str, MultiLabelDataset] = {}
        self._cached: dict[str, image_cache.CachedSplit] = {}
        self._features: dict[str, FeatureSplit] = {}
        self._profiles: dict[str, tuple[tuple[int, int, int], int]] = {}

    def dataset(self, cell: Cell, split: str) -> MultiLabelDataset:
        key = json.dumps([cell.dataset, cell.dataset_options, cell.root, split], sort_keys=True)
        if key not in self._datasets:
            with self.accelerator.main_process_first():
                self._datasets[key] = build_dataset(cell.dataset, cell.root, split, **cell.dataset_options)
            if len(self._datasets[key]) == 0:
                raise UsageError(f"dataset {cell.dataset!r} split {split!r} is empty (root: {cell.root})")
        return self._datasets[key]

    def splits(self, cell: Cell, progress: Progress | None = None) -> DataSplits:
        size = cell.recipe["image_size"]
        cached = {}
        for split in (cell.train_split, cell.test_split):
            ds = self.dataset(cell, split)
            key = json.dumps([cell.dataset, cell.dataset_options, cell.root, split, size], sort_keys=True)
            if key not in self._cached:
                callback = progress.callback(f"caching {cell.dataset}/{split} at {size}px") if progress else None
                with self.accelerator.main_process_first():
                    self._cached[key] = image_cache.load_or_build(ds, size, cache_dir(), callback)
            cached[split] = self._cached[key]
        train_ds = self.dataset(cell, cell.train_split)
        train = cached[cell.train_split]
        context = HeadContext.from_labels(train_ds.classes, train.targets, train.ignore)
        return DataSplits(train, cached[cell.test_split], list(train_ds.classes), context)

    def features(self, cell: Cell, which: str, model: Classifier, progress: Progress | None = None) -> FeatureSplit:
        """Frozen-backbone features of the cell's ``which`` (``train`` / ``test``) split."""
        split = cell.train_split if which == "train" else cell.test_split
        size = cell.recipe["image_size"]
        images = self.splits(cell).train if which == "train" else self.splits(cell).test
        ikey = image_cache.cache_key(self.dataset(cell, split), size)
        mean, std = tuple(model.mean.flatten().tolist()), tuple(model.std.flatten().tolist())  # as applied
        identity = features.backbone_identity(model.backbone.origin, mean, std, cell.seed)
        key = features.feature_key(ikey, cell.backbone, identity, cell.recipe["feature_dtype"])
        if key not in self._features:
            model.to(self.accelerator.device).eval()
            callback = progress.callback(f"features {cell.dataset}/{split} {cell.backbone}") if progress else None
            self._features[key] = features.load_or_build(
                model.features, images, key, cache_dir(), self.accelerator, cell.recipe["eval_batch_size"], cell.recipe["feature_dtype"], callback
            )
        return self._features[key]

    def _profile(self, cell: Cell, model: Classifier) -> tuple[tuple[int, int, int], int]:
        key = f"{cell.backbone}\x1f{cell.recipe['image_size']}"
        if key not in self._profiles:
            size = cell.recipe["image_size"]
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
