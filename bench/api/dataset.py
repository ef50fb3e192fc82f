"""The contract every dataset plugin fulfils, and the label helpers plugins share.

A dataset plugin (a file in ``datasets/``) subclasses :class:`MultiLabelDataset`, decorates it with
``@register_dataset("name")`` and fills in, for one split:

- ``classes``: list of C class names, in the dataset's canonical order;
- ``targets``: uint8 array [N, C] in {0, 1} (training labels after the difficult policy);
- ``ignore``: bool array [N, C]; True entries take no part in evaluation (SPEC §1);
- optionally ``known``: bool array [N, C]; False where the source leaves a label unannotated
  (neither positive nor negative; default: every label known). A plugin that sets it should also
  set ``ignore`` there, so that an unannotated test label is not scored. The harness draws the
  training split's observed mask from it (the dataset option ``observe``, ``bench.api.observe``);
- ``load_image(i)``: the i-th image as an RGB ``PIL.Image`` or a uint8 array [H, W, 3];
- ``fingerprint()``: a string that changes whenever the source files change (cache key).

A dataset whose identity is its folder (the user's own data: ``data_in_identity = True``) also
gives :meth:`MultiLabelDataset.data_identity`, a digest of its labelled samples that joins each run's
identity (``run_id``), so two folders of different data are different runs. A published dataset
(VOC, COCO) leaves it False: its root is only where a copy lives, and its run ids do not change.

Items are ``(image, target, ignore)`` with ``image`` a float tensor [3, H, W] in [0, 1] at the
image's native size; the harness's loaders resize, cache and augment (``bench.data.image_cache``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image

from bench.core.errors import DataError, UnreadableImage, choices  # noqa: F401 (UnreadableImage: re-exported)


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

    #: True when the data must be given a root on disk (the grid skips the dataset without one)
    needs_root: ClassVar[bool] = False
    #: options :meth:`describe_options` puts in words (the report lists the others as key=value)
    described_options: ClassVar[tuple[str, ...]] = ()
    #: True when what the data IS depends on the root (the user's own folder): the train and test
    #: splits' :meth:`data_identity` then join each run's id (bench.config.grid)
    data_in_identity: ClassVar[bool] = False

    @classmethod
    def write_sample(cls, root: Path) -> dict[str, Any]:
        """Write a TINY sample of this dataset in its own on-disk layout under ``root`` (a few
        images per split, every split of :attr:`splits` the grids use) and return the options that
        read it. The contract test (``tests/test_plugin_contract.py``) builds every registered
        dataset from it, so a dataset dropped into ``datasets/`` is tested with no test edit."""
        raise NotImplementedError(f"{cls.__name__} declares no write_sample(root) for the dataset contract test")

    @classmethod
    def describe_options(cls, options: dict[str, Any]) -> list[str]:
        """Lines the report prints under a section about these options. The default says that the
        dataset has no difficult labels (SPEC §3: a dataset with them describes its policy)."""
        return ["difficult policy: not applicable (the dataset has no difficult labels)"]

    @property
    def known(self) -> np.ndarray:
        """bool [N, C]: the labels the source annotates (all True unless the plugin set it). Not
        the observed mask of a run: that one is drawn from this by ``bench.api.observe``."""
        own = self.__dict__.get("_known")
        return np.ones(np.shape(self.targets), dtype=bool) if own is None else own

    @known.setter
    def known(self, value: np.ndarray) -> None:
        value = np.asarray(value, dtype=bool)
        if value.shape != np.shape(self.targets):
            raise ValueError(f"known {value.shape} and targets {np.shape(self.targets)} disagree")
        self.__dict__["_known"] = value

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

    def data_identity(self) -> str:
        """A digest of what this split holds: the class list, each sample's id, its labels
        ([N, C] targets and ignore). Not file times: a copy of the same data is the same data."""
        digest = hashlib.sha256(json.dumps([self.split, list(self.classes)]).encode())
        digest.update("\0".join(self.image_id(i) for i in range(len(self))).encode())
        digest.update(np.ascontiguousarray(self.targets, dtype=np.uint8).tobytes())
        digest.update(np.ascontiguousarray(self.ignore, dtype=bool).tobytes())
        return digest.hexdigest()[:16]

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


def write_sample_images(folder: Path, names: list[str], size: tuple[int, int] = (20, 14)) -> None:
    """Write small random JPEGs ``folder / name`` (for :meth:`MultiLabelDataset.write_sample`)."""
    rng = np.random.default_rng(0)
    for name in names:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)).save(path, "JPEG", quality=90)


def _viewer_bytes(values: np.ndarray, what: str) -> np.ndarray:
    """One- or multi-channel samples of any numeric dtype -> uint8 on a viewer's scale.

    bool: False/True -> 0/255. uint8: as is. uint16 (and Pillow's 16-bit modes): ``round(v / 257)``,
    so 65535 is white. Other integers (Pillow mode ``I``, which holds 16-bit samples of PNM, TIFF
    and older PNG decoders): the same 16-bit scale, clipped to [0, 65535]. Floating point (mode
    ``F``): ``round(255 v)`` when every finite value lies in [0, 1] (the floating-point image
    convention), else Pillow's 0..255 scale; clipped, NaN -> 0.
    """
    kind = values.dtype.kind
    if kind == "b":
        return values.astype(np.uint8) * np.uint8(255)
    if values.dtype == np.uint8:
        return values
    if kind in "iu":
        wide = np.clip(values.astype(np.int64), 0, 65535)
        return ((wide * 2 + 257) // 514).astype(np.uint8)  # round(v / 257), halves up
    if kind == "f":
        floats = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=np.inf, neginf=-np.inf)
        finite = floats[np.isfinite(floats)]
        unit = finite.size == 0 or (finite.min() >= 0.0 and finite.max() <= 1.0)
        scaled = floats * 255.0 if unit else floats
        return np.floor(np.clip(scaled, 0.0, 255.0) + 0.5).astype(np.uint8)
    raise ValueError(f"{what}: samples of dtype {values.dtype} are not an image")


def _over_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """uint8 colour [H, W, 3] with uint8 alpha [H, W] composited over a white background:
    ``round((c·a + 255·(255 − a)) / 255)`` (straight, not premultiplied, alpha)."""
    a = alpha.astype(np.int64)[:, :, None]
    mixed = rgb.astype(np.int64) * a + 255 * (255 - a)
    return ((mixed * 2 + 255) // 510).astype(np.uint8)


#: modes whose pixels carry an alpha channel (premultiplied ``RGBa``/``La`` included)
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def _pil_rgb(image: Image.Image) -> np.ndarray:
    """A PIL image of any mode -> the uint8 [H, W, 3] picture a viewer shows (see :func:`as_uint8_rgb`)."""
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return np.asarray(image, dtype=np.uint8)
    if mode.startswith("I") or mode == "F":  # 16- and 32-bit integer, and float, single channel
        gray = _viewer_bytes(np.asarray(image), f"image mode {mode}")
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = np.asarray(image.convert("RGBA"), dtype=np.uint8)
        return _over_white(rgba[:, :, :3], rgba[:, :, 3])
    try:
        return np.asarray(image.convert("RGB"), dtype=np.uint8)  # 1, L, P, CMYK, YCbCr, HSV, ...
    except ValueError as exc:
        raise ValueError(f"image mode {mode} cannot be shown as RGB ({exc})") from None


def _exif_upright(image: Image.Image) -> Image.Image:
    """``image`` turned as its EXIF orientation tag says (what viewers do); unchanged without one."""
    try:
        orientation = image.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 - an unreadable EXIF block: viewers show the image as stored
        return image
    if orientation in (None, 1):
        return image
    from PIL import ImageOps

    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001 - an orientation value outside 1..8
        return image


def as_uint8_rgb(image: Image.Image | np.ndarray) -> np.ndarray:
    """Convert a PIL image or an array to the uint8 RGB array [H, W, 3] an image viewer shows.

    PIL images: turned upright by their EXIF orientation; every mode Pillow opens is converted —
    ``1``/``L``/``P``/``CMYK``/``YCbCr`` by Pillow's colour conversion, transparency (``LA``,
    ``RGBA``, ``PA``, ``P``/``L``/``RGB`` with a ``transparency`` entry) composited over white,
    16-bit modes (``I;16``, ``I;16B``, ...) and ``I`` scaled so 65535 is white, ``F`` in [0, 1]
    (or on a 0..255 scale when values exceed 1).

    Arrays: [H, W] or [H, W, 1] grey, [H, W, 2] grey + alpha, [H, W, 3] RGB, [H, W, 4] RGBA, of
    dtype bool, uint8 (as is), uint16 (16-bit scale), another integer type holding 0..255, or
    float (the scales above). Anything else raises ``ValueError``.
    """
    if isinstance(image, Image.Image):
        return _pil_rgb(_exif_upright(image))
    array = np.asarray(image)
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 2, 3, 4) or array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"expected an image array [H, W], [H, W, 1|2|3|4], got shape {array.shape}")
    if array.dtype.kind in "iu" and array.dtype not in (np.uint8, np.uint16) and array.size and (array.min() < 0 or array.max() > 255):
        raise ValueError(f"an integer image array other than uint8/uint16 must hold 0..255, got {array.min()}..{array.max()} ({array.dtype})")
    if array.dtype.kind in "iu" and array.dtype not in (np.uint8, np.uint16):
        array = array.astype(np.uint8)
    values = _viewer_bytes(array, "image array")
    channels = values.shape[2]
    if channels in (2, 4):
        color = values[:, :, :1] if channels == 2 else values[:, :, :3]
        values = _over_white(np.repeat(color, 3, axis=2) if channels == 2 else color, values[:, :, -1])
    elif channels == 1:
        values = np.repeat(values, 3, axis=2)
    return np.ascontiguousarray(values)


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
