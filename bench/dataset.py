"""The contract every dataset plugin fulfils, and the label helpers plugins share.

A dataset plugin (a file in ``datasets/``) subclasses :class:`MultiLabelDataset`, decorates it with
``@register_dataset("name")`` and fills in, for one split:

- ``classes``: list of C class names, in the dataset's canonical order;
- ``targets``: uint8 array [N, C] in {0, 1} (training labels after the difficult policy);
- ``ignore``: bool array [N, C]; True entries take no part in evaluation (SPEC §1);
- ``load_image(i)``: the i-th image as an RGB ``PIL.Image`` or a uint8 array [H, W, 3];
- ``fingerprint()``: a string that changes whenever the source files change (cache key).

Items are ``(image, target, ignore)`` with ``image`` a float tensor [3, H, W] in [0, 1] at the
image's native size; the harness's loaders resize, cache and augment (``bench.image_cache``).
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
from PIL import Image

from bench.errors import DataError, choices



class UnreadableImage(Exception):
    """Raised by ``load_image`` for a file that exists but cannot be decoded (skipped, counted)."""


class MultiLabelDataset(torch.utils.data.Dataset):
    """Base class of dataset plugins. Subclasses set the attributes below in ``__init__``."""

    #: split names the dataset understands, and the ones a grid uses unless it says otherwise
    splits: ClassVar[tuple[str, ...]] = ("train", "test")
    train_split: ClassVar[str] = "train"
    test_split: ClassVar[str] = "test"

    classes: list[str]
    targets: np.ndarray
    ignore: np.ndarray
    split: str

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    def load_image(self, index: int) -> Image.Image | np.ndarray:
        """Return image ``index`` as RGB (PIL image or uint8 [H, W, 3])."""
        raise NotImplementedError

    def fingerprint(self) -> str:
        """A string identifying the source data of this split (for cache invalidation)."""
        raise NotImplementedError

    def image_id(self, index: int) -> str:
        """A human-readable id of image ``index`` (file name), used in warnings and score files."""
        return str(index)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        image = np.array(as_uint8_rgb(self.load_image(index)))  # a writable copy for torch
        tensor = torch.from_numpy(image).permute(2, 0, 1).float() / 255.0
        return (
            tensor,
            torch.from_numpy(self.targets[index].astype(np.float32)),
            torch.from_numpy(self.ignore[index].astype(bool)),
        )

    def check_split(self, split: str) -> str:
        """Validate ``split`` against :attr:`splits`; return it."""
        if split not in self.splits:
            raise DataError(
                f"{type(self).__name__}: unknown split {split!r}; valid splits: {choices(self.splits)}"
            )
        return split


def as_uint8_rgb(image: Image.Image | np.ndarray) -> np.ndarray:
    """Convert a PIL image or an array to a uint8 RGB array [H, W, 3]."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    array = np.asarray(image)
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image [H, W, 3], got {array.dtype} {array.shape}")
    return array


def cooccurrence(targets: np.ndarray, ignore: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Label co-occurrence of a training split (SPEC §2, ML-GCN).

    Args:
        targets: {0, 1} array [N, C].
        ignore: bool [N, C] or None; ignored entries are not counted as positives.

    Returns:
        ``(counts int64 [C, C], nums int64 [C])``: ``counts[i, j]`` images holding both i and j
        (zero diagonal), ``nums[i]`` images holding i.
    """
    positive = np.asarray(targets, dtype=bool)
    if ignore is not None:
        positive = positive & ~np.asarray(ignore, dtype=bool)
    as_int = positive.astype(np.int64)
    counts = as_int.T @ as_int
    nums = np.diag(counts).copy()
    np.fill_diagonal(counts, 0)
    return counts, nums
