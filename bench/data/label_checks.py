"""Checks of a training split that do not stop a run but change what its numbers mean: a class
with no positive training label, a batch larger than the split. Each returns the warning's text
(None when all is well); the caller warns once and the row counts it (SPEC §1: a class without a
test positive is left out of mAP; one without a training positive is scored but never learned).
"""

from __future__ import annotations

import numpy as np


class TrainingDataWarning(UserWarning):
    """The training split or the recipe makes part of a run meaningless (it still runs)."""


def classes_without_positives(classes: list[str] | tuple[str, ...], targets: np.ndarray, ignore: np.ndarray | None = None) -> list[str]:
    """The names of the classes with no positive label in ``targets`` [N, C] (ignored entries
    [N, C] do not count as positives)."""
    positive = np.asarray(targets, dtype=bool)
    if ignore is not None:
        positive = positive & ~np.asarray(ignore, dtype=bool)
    return [name for name, present in zip(classes, positive.any(axis=0)) if not present]


def no_positive_message(dataset: str, split: str, missing: list[str], total: int) -> str | None:
    """The warning for ``missing`` classes (of ``total``) without a training positive, or None."""
    if not missing:
        return None
    shown = ", ".join(repr(n) for n in missing[:8]) + (f" (and {len(missing) - 8} more)" if len(missing) > 8 else "")
    return (
        f"dataset {dataset!r}: {len(missing)} of {total} classes have no positive label in training split {split!r}: {shown}; "
        "a head learns only to call them absent, so their test AP measures nothing learned (counted in each row's "
        "train_classes_without_positives)"
    )


def batch_message(batch_size: int, images: int) -> str | None:
    """The warning for a global batch larger than the training split, or None."""
    if batch_size <= images:
        return None
    return (
        f"recipe batch_size = {batch_size} is larger than the {images} training images: every epoch is one batch of "
        f"{images} (one optimizer step per epoch); lower batch_size to train with more steps"
    )
