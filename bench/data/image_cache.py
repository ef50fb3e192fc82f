"""Decode and resize every image of a split once, into a memory-mapped uint8 array on disk.

The cache of a split at size S is ``<cache_dir>/images/<key>.u8`` holding [N, S, S, 3] uint8, plus
``<key>.json`` with N, S, the indices of images that could not be read, and the key's inputs. The
key hashes the dataset's class, split, :meth:`MultiLabelDataset.fingerprint` (which covers the
source files' sizes and modification times), S and this module's decode/resize version, so any
change rebuilds. Files are written under temporary names and renamed, so a killed build leaves no
cache that looks complete (and its temporary file is removed by the next build in that folder); a
cache that cannot be read or whose size does not match its metadata is rebuilt with a warning.

A split none of whose images can be decoded is a :class:`bench.core.errors.DataError` naming the
dataset and the split (there would be nothing to train on or to evaluate).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from bench.api.dataset import MultiLabelDataset, UnreadableImage, as_uint8_rgb
from bench.core.atomic import atomic_write, atomic_write_bytes, remove_stale_temporaries
from bench.core.errors import DataError
from bench.data.batched_arrays import ArrayItems

#: v2: images decode to what a viewer shows (EXIF orientation, 16-bit and float modes, alpha over
#: white: ``bench.api.dataset.as_uint8_rgb``), so caches built by v1 are rebuilt
RESIZE_VERSION = "pil-bilinear-square-v2"
#: unreadable images whose messages the cache's metadata keeps (for the error of an all-bad split)
KEEP_MESSAGES = 3
_CLEANED: set[Path] = set()


class SkippedImageWarning(UserWarning):
    """An image could not be decoded; it is left out of the split and counted."""


@dataclass
class CachedSplit:
    """A split's images resized to S x S, with the labels of the images that could be read.

    Attributes:
        images: uint8 [M, S, S, 3] (memory-mapped), M = number of readable images.
        targets: uint8 [M, C]; ignore: bool [M, C]; image_ids: list of M ids.
        skipped: ids of images that could not be read (left out, counted in the run's row).
        known: bool [M, C], the labels the SOURCE annotates (``MultiLabelDataset.known``; None:
            all); the training split's observed mask is drawn from it (``bench.api.observe``).
    """

    images: np.ndarray
    targets: np.ndarray
    ignore: np.ndarray
    image_ids: list[str]
    skipped: list[str]
    known: np.ndarray | None = None


def cache_key(dataset: MultiLabelDataset, size: int) -> str:
    parts = [type(dataset).__qualname__, getattr(dataset, "registry_name", ""), dataset.split, dataset.fingerprint(), str(size), RESIZE_VERSION]
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:20]


def resize_square(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [size, size, 3] (bilinear, with PIL's antialiasing)."""
    if image.shape[0] == size and image.shape[1] == size:
        return image
    return np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR), dtype=np.uint8)


def _describe(dataset: MultiLabelDataset) -> str:
    return f"dataset {getattr(dataset, 'registry_name', type(dataset).__name__)!r} split {dataset.split!r}"


def _build(dataset: MultiLabelDataset, size: int, data_path: Path, progress: Callable[[int, int], None] | None) -> tuple[list[int], list[str]]:
    """Decode and resize every image into ``data_path`` (atomically); return the unreadable
    indices and the first :data:`KEEP_MESSAGES` messages."""
    n = len(dataset)
    bad: list[int] = []
    messages: list[str] = []

    def fill(tmp: Path) -> None:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(n, size, size, 3))
        for i in range(n):
            try:
                loaded = dataset.load_image(i)
                try:
                    pixels = as_uint8_rgb(loaded)
                except ValueError as exc:  # the plugin returned something that is not an image
                    raise DataError(f"{_describe(dataset)}: load_image({i}) (image {dataset.image_id(i)}) returned {type(loaded).__name__}: {exc}") from None
                out[i] = resize_square(pixels, size)
            except UnreadableImage as exc:
                warnings.warn(f"skipping unreadable image {dataset.image_id(i)}: {exc}", SkippedImageWarning, stacklevel=4)
                bad.append(i)
                if len(messages) < KEEP_MESSAGES:
                    messages.append(str(exc))
            if progress is not None:
                progress(i + 1, n)
        out.flush()
        del out

    atomic_write(data_path, fill)
    return bad, messages


def _check_some_readable(dataset: MultiLabelDataset, bad: list[int], messages: list[str]) -> None:
    if len(bad) == len(dataset):
        shown = "; ".join(messages) or "see the warnings above"
        raise DataError(
            f"{_describe(dataset)}: none of its {len(dataset)} images can be decoded, so there is nothing to "
            f"train on or evaluate (e.g. {shown}); check the image files of that split"
        )


def load_or_build(
    dataset: MultiLabelDataset,
    size: int,
    cache_dir: str | Path,
    progress: Callable[[int, int], None] | None = None,
) -> CachedSplit:
    """Return the split's images at ``size`` from the cache, building the cache if needed.

    Only one process should build (the runner calls this under ``main_process_first``).
    """
    folder = Path(cache_dir) / "images"
    folder.mkdir(parents=True, exist_ok=True)
    if folder not in _CLEANED:  # what a killed build left (once per folder and process)
        _CLEANED.add(folder)
        remove_stale_temporaries([folder])
    key = cache_key(dataset, size)
    data_path, meta_path = folder / f"{key}.npy", folder / f"{key}.json"
    images = None
    if data_path.is_file() and meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
            images = np.load(data_path, mmap_mode="r")
            if images.shape != (len(dataset), size, size, 3) or images.dtype != np.uint8:
                raise ValueError(f"{images.dtype} {images.shape}, expected uint8 {(len(dataset), size, size, 3)}")
            bad = sorted({int(i) for i in meta["unreadable"]})
            if bad and not 0 <= bad[0] <= bad[-1] < len(dataset):
                raise ValueError("unreadable image indices out of range")
            messages = [str(m) for m in meta.get("messages", [])]
        except (ValueError, KeyError, TypeError, OSError, EOFError) as exc:
            warnings.warn(f"image cache {data_path} is damaged ({exc}); rebuilding it", stacklevel=2)
            images = None
    if images is None:
        meta_path.unlink(missing_ok=True)
        bad, messages = _build(dataset, size, data_path, progress)
        meta = {"n": len(dataset), "size": size, "unreadable": bad, "messages": messages, "split": dataset.split, "fingerprint": dataset.fingerprint()}
        atomic_write_bytes(meta_path, json.dumps(meta).encode())
        images = np.load(data_path, mmap_mode="r")
    _check_some_readable(dataset, bad, messages)
    keep = np.setdiff1d(np.arange(len(dataset)), np.asarray(bad, dtype=np.int64))
    ids = [dataset.image_id(int(i)) for i in keep]
    if bad:
        images = images[keep]  # copies the readable rows into memory; rare (only with bad files)
    return CachedSplit(
        images=images,
        targets=np.asarray(dataset.targets)[keep],
        ignore=np.asarray(dataset.ignore)[keep],
        image_ids=ids,
        skipped=[dataset.image_id(i) for i in bad],
        known=np.asarray(dataset.known, dtype=bool)[keep],
    )


class CachedImages(ArrayItems):
    """Items ``(image uint8 [S, S, 3], target float [C], ignore bool [C])`` from a :class:`CachedSplit`,
    read a batch at a time; with ``known`` (bool [M, C], the training split's observed mask) a
    fourth element ``known bool [C]`` (see :class:`ArrayItems`)."""

    def __init__(self, split: CachedSplit, known: np.ndarray | None = None) -> None:
        super().__init__(split.images, split.targets, split.ignore, known)
