"""The frozen-feature protocol's cache: backbone feature maps computed once, memory-mapped on disk.

Under ``protocol = "frozen"`` the backbone runs once per (dataset split, image size, backbone,
weights, feature dtype) on the unaugmented cached images, and every head of the grid trains and
evaluates on the stored maps. ``<cache>/features/<key>.npy`` holds [N, d, h, w] in float16 (or
float32) and ``<key>.json`` its shape, dtype and a digest of sampled blocks of the file. The key
hashes the image cache key, the backbone name, the backbone's identity (the origin of its weights,
which names a file's content hash, and its input normalisation; for a random initialisation, the
seed that drew it), the dtype, the torch version and this module's version, so any change rebuilds. A file whose size, header or digest does not match its
record (a truncated or overwritten file) is rebuilt with a warning.

Building is shared by all processes of a launch: process r computes rows r, r + P, r + 2P, ... and
writes them into one memory-mapped file (a shared file system is assumed across machines), then the
main process records the digest and renames the file into place.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator

from bench.core.atomic import atomic_write_bytes
from bench.data.augment import to_float
from bench.data.batched_arrays import ArrayItems
from bench.data.image_cache import CachedSplit

FEATURES_VERSION = "features-v1"
DTYPES = {"float16": np.float16, "float32": np.float32}
_SAMPLE_BLOCK = 1 << 20


def backbone_identity(origin: str, mean: tuple[float, ...], std: tuple[float, ...], seed: int) -> str:
    """What fixes a frozen backbone's output: where its weights came from (a file's origin names
    its content hash) and its input normalisation; a random initialisation adds the seed that drew it."""
    identity = f"{origin}|mean={list(mean)}|std={list(std)}"
    return identity + (f"|seed={seed}" if origin.startswith("random") else "")


def feature_key(image_key: str, backbone: str, identity: str, dtype: str) -> str:
    """Cache key of a split's features: images, backbone name and identity, dtype, torch, version."""
    parts = [image_key, backbone, identity, dtype, torch.__version__, FEATURES_VERSION]
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:20]


def sampled_digest(path: Path) -> str:
    """blake2b of the file's size and of 1 MiB blocks at its start, middle and end (cheap even for
    files of many GB; catches truncation and most partial overwrites)."""
    size = path.stat().st_size
    digest = hashlib.blake2b(str(size).encode(), digest_size=16)
    with open(path, "rb") as f:
        for offset in sorted({0, max(0, size // 2 - _SAMPLE_BLOCK // 2), max(0, size - _SAMPLE_BLOCK)}):
            f.seek(offset)
            digest.update(f.read(_SAMPLE_BLOCK))
    return digest.hexdigest()


@dataclass
class FeatureSplit:
    """A split's backbone features with the labels of its images.

    Attributes:
        features: float16/32 [N, d, h, w] (memory-mapped); targets uint8 [N, C]; ignore bool [N, C].
        known: bool [N, C], the labels the SOURCE annotates (``MultiLabelDataset.known``; None: all);
            the training split's observed mask is drawn from it (``bench.api.observe.observed_mask``).
    """

    features: np.ndarray
    targets: np.ndarray
    ignore: np.ndarray
    image_ids: list[str]
    known: np.ndarray | None = None


class FeatureDataset(ArrayItems):
    """Items ``(features [d, h, w] as stored, target float [C], ignore bool [C])``, read a batch at
    a time; with ``known`` (bool [N, C], the training split's observed mask) a fourth element
    ``known bool [C]`` (see :class:`ArrayItems`)."""

    def __init__(self, split: FeatureSplit, known: np.ndarray | None = None) -> None:
        super().__init__(split.features, split.targets, split.ignore, known)


def _valid(data_path: Path, meta_path: Path) -> np.ndarray | None:
    """The cached features if file and record agree, else None (with a warning if damaged)."""
    if not (data_path.is_file() and meta_path.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text())
        array = np.load(data_path, mmap_mode="r")
        if list(array.shape) != meta["shape"] or str(array.dtype) != meta["dtype"]:
            raise ValueError(f"shape {array.shape} {array.dtype}, recorded {meta['shape']} {meta['dtype']}")
        if sampled_digest(data_path) != meta["digest"]:
            raise ValueError("contents do not match the recorded digest")
        return array
    except (ValueError, KeyError, OSError) as exc:
        warnings.warn(f"feature cache {data_path} is damaged ({exc}); rebuilding it", stacklevel=3)
        return None


def load_or_build(
    extract: Callable[[torch.Tensor], torch.Tensor],
    images: CachedSplit,
    key: str,
    cache_dir: str | Path,
    accelerator: Accelerator,
    batch_size: int,
    dtype: str = "float16",
    progress: Callable[[int, int], None] | None = None,
) -> FeatureSplit:
    """Return the split's features from the cache, computing them (on every process) if needed.

    Args:
        extract: images float [B, 3, S, S] in [0, 1] on the accelerator's device -> features
            [B, d, h, w] (the frozen backbone, normalisation included).
        images: the split's cached images, uint8 [N, S, S, 3].
    """
    folder = Path(cache_dir) / "features"
    data_path, meta_path = folder / f"{key}.npy", folder / f"{key}.json"
    ready = _valid(data_path, meta_path) if accelerator.is_main_process else None
    box = [ready is not None]
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(box, from_process=0)
    if not box[0]:
        _build(extract, images, data_path, meta_path, accelerator, batch_size, dtype, progress)
    features = np.load(data_path, mmap_mode="r")
    return FeatureSplit(features, images.targets, images.ignore, images.image_ids, images.known)


@torch.no_grad()
def _build(
    extract: Callable[[torch.Tensor], torch.Tensor],
    images: CachedSplit,
    data_path: Path,
    meta_path: Path,
    accelerator: Accelerator,
    batch_size: int,
    dtype: str,
    progress: Callable[[int, int], None] | None,
) -> None:
    device, n = accelerator.device, len(images.targets)
    with accelerator.autocast():
        sample = extract(to_float(torch.from_numpy(np.array(images.images[:1])).to(device)))
    shape = (n, *sample.shape[1:])
    # one temporary name for the whole launch (the main process's pid), distinct from other launches
    box = [f"{data_path.name}.{os.getpid()}.building"]
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(box, from_process=0)
    tmp = data_path.with_name(box[0])
    if accelerator.is_main_process:
        data_path.parent.mkdir(parents=True, exist_ok=True)
        meta_path.unlink(missing_ok=True)
        np.lib.format.open_memmap(tmp, mode="w+", dtype=DTYPES[dtype], shape=shape).flush()
    accelerator.wait_for_everyone()
    out = np.load(tmp, mmap_mode="r+")
    mine = np.arange(accelerator.process_index, n, accelerator.num_processes)
    for start in range(0, len(mine), batch_size):
        rows = mine[start : start + batch_size]
        batch = to_float(torch.from_numpy(np.array(images.images[rows])).to(device))
        with accelerator.autocast():
            feats = extract(batch)
        out[rows] = feats.float().cpu().numpy().astype(DTYPES[dtype])
        if progress is not None:
            progress(min(len(mine), start + batch_size), len(mine))
    out.flush()
    del out
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        shutil.move(tmp, data_path)
        meta = {"shape": list(shape), "dtype": np.dtype(DTYPES[dtype]).name, "digest": sampled_digest(data_path)}
        atomic_write_bytes(meta_path, json.dumps(meta).encode())
    accelerator.wait_for_everyone()
