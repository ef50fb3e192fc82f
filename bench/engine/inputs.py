"""What a pass reads: the datasets of a job and how a loader batch becomes the members' input.

On cached features (``protocol = "frozen"``) a batch is the features as stored; on images it is
the augmented batch, which the frozen backbone turns into features once for every member
(``freeze_backbone = true``) or which the member's own classifier reads (the backbone trains).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from accelerate import Accelerator

from bench.config.grid import Cell
from bench.config.recipe import Recipe
from bench.data import image_cache
from bench.data.augment import augment, to_float
from bench.data.batched_arrays import ArrayItems
from bench.data.feature_cache import FeatureDataset
from bench.engine.data_store import DataSplits, DataStore
from bench.engine.progress import Progress
from bench.engine.selection import EpochSelector
from bench.models.classifier import Classifier


def eval_batch_size(recipe: Recipe, processes: int) -> int:
    """The recipe's evaluation batch size rounded down to a multiple of the process count."""
    return max(processes, recipe.eval_batch_size - recipe.eval_batch_size % processes)


@dataclass
class Inputs:
    """Datasets, and how a loader batch becomes the pass's input.

    ``test`` is built on first use, so a run reads the test split only when it evaluates it (after
    training, or after every epoch for ``select = "best_test"``); ``val``: the held-out validation
    images of ``select = "best_val"`` (else None)."""

    train: ArrayItems
    load_test: Callable[[], ArrayItems]
    prepare_train: Callable[[torch.Tensor, torch.Generator], torch.Tensor]
    prepare_eval: Callable[[torch.Tensor], torch.Tensor]
    feature_shape: tuple[int, int, int]
    val: ArrayItems | None = None

    @functools.cached_property
    def test(self) -> ArrayItems:
        return self.load_test()


def make_inputs(cell: Cell, model: Classifier, data: DataSplits, store: DataStore, progress: Progress) -> Inputs:
    """The cell's inputs: cached backbone features (``frozen``, computed by ``model``'s backbone),
    or cached images, augmented for training (``finetune``)."""
    recipe, device = cell.recipe, store.accelerator.device
    if recipe.protocol == "frozen":
        train_f = store.features(cell, "train", model, progress)
        if data.observed is None or data.observed.shape != tuple(train_f.targets.shape):
            raise RuntimeError(f"{cell.describe()}: the observed mask does not match the training features")
        val = FeatureDataset(store.features(cell, "val", model, progress)) if data.val is not None else None
        to_device = lambda f: f.to(device)  # noqa: E731
        return Inputs(
            FeatureDataset(train_f, known=data.observed), lambda: FeatureDataset(store.features(cell, "test", model, progress)),
            lambda f, _g: to_device(f), to_device, tuple(train_f.features.shape[1:]), val,
        )

    def prepare_train(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return augment(images.to(device), recipe.augment, generator, recipe.crop_scale_min)

    feature_shape = store.feature_shape(cell, model)
    return Inputs(
        image_cache.CachedImages(data.train, known=data.observed), lambda: image_cache.CachedImages(data.test), prepare_train,
        lambda images: to_float(images.to(device)), feature_shape,
        image_cache.CachedImages(data.val) if data.val is not None else None,
    )


@dataclass
class Trunk:
    """What every member of a pass shares: the backbone (inside a ``Classifier``, for its input
    normalisation, feature shape and cost), the inputs, and how a prepared batch becomes the
    members' input: the batch itself (cached features, or images for a member whose backbone
    trains) or the frozen backbone's features of it."""

    model: Classifier
    inputs: Inputs
    shared_backbone: bool  # the frozen backbone runs once per batch for every member

    def features(self, batch: torch.Tensor) -> torch.Tensor:
        """A prepared batch -> the members' input."""
        return self.model.features(batch) if self.shared_backbone else batch


def make_selector(cell: Cell, inputs: Inputs, accelerator: Accelerator) -> EpochSelector:
    """The cell's model selection (recipe ``select``; the pass scores the validation images or the test split)."""
    return EpochSelector(cell.recipe.select, accelerator, len(inputs.val) if inputs.val is not None else 0)
