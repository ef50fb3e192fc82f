"""Image files on disk, for dataset plugins: scanning folders, digests for cache keys, safe
relative paths, and decoding that tells an unreadable image (skipped, counted) from a missing one
(an error).
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import ClassVar

import numpy as np
from PIL import Image

from bench.api.dataset import MultiLabelDataset, as_uint8_rgb
from bench.core.errors import DataError, UnreadableImage


def scan_files(folder: Path, what: str) -> dict[str, os.DirEntry]:
    """``name -> DirEntry`` of the non-directory entries of ``folder`` (one ``os.scandir``)."""
    try:
        with os.scandir(folder) as entries:
            return {e.name: e for e in entries if not e.is_dir()}
    except (FileNotFoundError, NotADirectoryError):
        raise DataError(f"{what} folder {folder} does not exist") from None


def files_digest(named: Iterable[tuple[str, os.DirEntry]]) -> str:
    """A digest of the (name, size, mtime) of files, in order (``DirEntry.stat``, no path lookups)."""
    digest = hashlib.sha256()
    for name, entry in named:
        st = entry.stat()
        digest.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:20]


def stat_key(path: Path) -> str:
    st = path.stat()
    return f"{path.name}:{st.st_size}:{st.st_mtime_ns}"


def listed_images_digest(folder: Path, names: Sequence[str], what: str, source: str) -> str:
    """A digest of the files ``folder / name`` (name, size, mtime); an error naming ``source``
    (the list that names them) when any is missing. One ``os.scandir`` of ``folder``."""
    twice = first_duplicate(names)
    if twice is not None:
        raise DataError(f"{source}: image {names[twice[1]]!r} is listed twice (entries {twice[0] + 1} and {twice[1] + 1}); list each image once")
    files = scan_files(folder, what)
    missing = [n for n in names if n not in files]
    if missing:
        raise missing_images(missing, folder, source)
    return files_digest((n, files[n]) for n in names)


def missing_images(missing: list[str], folder: Path, source: str) -> DataError:
    shown = ", ".join(missing[:5]) + (f" (and {len(missing) - 5} more)" if len(missing) > 5 else "")
    return DataError(f"{len(missing)} image file(s) listed in {source} are missing from {folder}: {shown}")


#: 16-bit PNG colour types Pillow decodes to 8 bits by keeping each sample's high byte: rawmode ->
#: (the mode and rawmode that decode the same rows whole, how many 16-bit channels per pixel)
_PNG_WIDE = {"RGB;16B": ("RGB", "RGB;16L", 3), "RGBA;16B": ("RGBA", "RGBA;16L", 4), "LA;16B": ("I", "I;32B", 2)}


def _png_16bit_samples(path: Path, image: Image.Image, tile: object) -> np.ndarray | None:
    """The uint16 samples [H, W, 3 | 4 | 2] of a 16-bit RGB, RGBA or grey+alpha PNG, else None.

    Pillow has no 16-bit colour mode: it keeps the high byte of each sample (``v >> 8``), where
    16-bit grey gets the documented ``round(v / 257)``. The same rows are decoded a second time
    with a rawmode that keeps the low bytes (RGB, RGBA: the little-endian unpacker reads byte 1 of
    each big-endian sample) or whole 32-bit grey+alpha pixels, so one rule holds for every mode.
    ``tile``: the image's only decoder tile, read before ``image.load()`` (which clears it).
    """
    rawmode = getattr(tile, "args", None) if image.format == "PNG" else None
    if rawmode not in _PNG_WIDE:
        return None
    mode, other, channels = _PNG_WIDE[rawmode]
    with Image.open(path) as second:
        second.tile = [second.tile[0]._replace(args=other)]
        second._mode = mode  # noqa: SLF001 - Pillow's own decoder, asked for the same rows' other bytes
        second.load()
        raw = np.asarray(second)
    if channels == 2:  # whole pixels: grey << 16 | alpha
        whole = raw.astype(np.uint32)
        return np.stack([whole >> 16, whole & 0xFFFF], axis=2).astype(np.uint16)
    high = np.asarray(image, dtype=np.uint16)
    return high << 8 | raw.astype(np.uint16)


def open_rgb(path: Path) -> Image.Image:
    """Decode ``path`` fully as the RGB picture an image viewer shows (EXIF orientation applied,
    every Pillow mode converted: :func:`bench.api.dataset.as_uint8_rgb`; 16-bit PNGs of every
    colour type on the one 16-bit scale, ``round(v / 257)``); a file that cannot be decoded raises
    :class:`UnreadableImage`."""
    try:
        with Image.open(path) as image:
            tile = image.tile[0] if len(image.tile) == 1 else None
            image.load()  # truncated files fail here (ImageFile.LOAD_TRUNCATED_IMAGES is left False)
            wide = _png_16bit_samples(path, image, tile)
            if wide is None:
                return Image.fromarray(as_uint8_rgb(image))
            out = Image.fromarray(as_uint8_rgb(wide))
            if "exif" in image.info:
                out.info["exif"] = image.info["exif"]
            return Image.fromarray(as_uint8_rgb(out))  # the EXIF orientation, as for every other image
    except FileNotFoundError:
        raise DataError(f"image file {path} is missing (it was present when the dataset was built)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise UnreadableImage(f"{path}: {type(exc).__name__}: {exc}") from exc


def safe_relpath(rel: object, base: Path, where: Callable[[], str]) -> str:
    """``rel`` normalised, or a DataError when it is not a relative path staying inside ``base``.

    Spaces around the name are dropped (a manifest's ``a.jpg, cat``) unless a file of exactly that
    name exists: `` a.jpg`` with a leading space is a legal file name."""
    if not isinstance(rel, str) or not rel.strip():
        raise DataError(f"{where()}: image path {rel!r} is empty or not a string")
    if rel != rel.strip() and not os.path.lexists(base / rel):
        rel = rel.strip()
    if os.path.isabs(rel) or rel.startswith(("/", "\\")) or re.match(r"[A-Za-z]:[\\/]", rel):
        raise DataError(f"{where()}: image path {rel!r} is absolute; paths must be relative to {base} and stay inside it")
    norm = posixpath.normpath(rel)
    if norm == ".." or norm.startswith("../"):
        raise DataError(f"{where()}: image path {rel!r} escapes {base} ('..' leads outside it)")
    return norm


def _inside(path: str, anchor: str) -> bool:
    return path == anchor or path.startswith(anchor.rstrip(os.sep) + os.sep)


def first_duplicate(names: Sequence[object]) -> tuple[int, int] | None:
    """The positions ``(first, second)`` of the first name listed a second time, or None."""
    seen: dict[object, int] = {}
    for i, name in enumerate(names):
        j = seen.setdefault(name, i)
        if j != i:
            return j, i
    return None


def index_images(base: Path, paths: Sequence[str], where: Callable[[int], str]) -> str:
    """Check that every ``base/path`` exists and resolves inside ``base`` and that none is listed
    twice; return the files' digest.

    One ``os.scandir`` per distinct folder; symlinks (files or folders) must resolve inside
    ``base``. ``where(i)`` describes path i for error messages (file and line / sample).
    """
    twice = first_duplicate(paths)
    if twice is not None:
        raise DataError(f"image {paths[twice[1]]!r} is listed twice: {where(twice[0])} and {where(twice[1])}; list each image once")
    anchor = os.path.realpath(base)
    by_dir: dict[str, dict[str, os.DirEntry]] = {}
    missing: list[int] = []
    entries: list[os.DirEntry] = []
    for i, rel in enumerate(paths):
        folder, name = posixpath.split(rel)
        if folder not in by_dir:
            real = os.path.realpath(base / folder)
            if not _inside(real, anchor):
                raise DataError(f"{where(i)}: image path {rel!r} escapes {base}: folder {folder!r} resolves to {real}")
            try:
                with os.scandir(base / folder) as it:
                    by_dir[folder] = {e.name: e for e in it}
            except (FileNotFoundError, NotADirectoryError):
                by_dir[folder] = {}
        entry = by_dir[folder].get(name)
        if entry is None or entry.is_dir():
            missing.append(i)
            continue
        if entry.is_symlink() and not _inside(os.path.realpath(entry.path), anchor):
            raise DataError(f"{where(i)}: image path {rel!r} is a symlink resolving outside {base} (to {os.path.realpath(entry.path)})")
        entries.append(entry)
    if missing:
        shown = "; ".join(f"{where(i)}: {paths[i] if paths[i] == paths[i].strip() else repr(paths[i])}" for i in missing[:5])
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise DataError(f"{len(missing)} image file(s) are missing from {base}: {shown}{more}")
    return files_digest(zip(paths, entries))


def line_of(text: str, needle: str) -> int:
    """1-based line of the first occurrence of ``needle`` in ``text`` (0 when absent)."""
    pos = text.find(needle)
    return 0 if pos < 0 else text.count("\n", 0, pos) + 1


class ImageFileDataset(MultiLabelDataset):
    """A split whose images are files on disk: what every file-based dataset plugin shares.

    A subclass's ``__init__`` calls :meth:`data_root` first (the root, or a clear error naming
    :attr:`expected_layout`), fills ``classes``, ``targets`` and ``ignore`` as every dataset does,
    then calls :meth:`set_images` with the image folder, one relative file name per sample and
    a fingerprint of the sources (label files plus image files' sizes and times). Loading,
    fingerprint and image ids then come from here.
    """

    needs_root: ClassVar[bool] = True
    #: one sentence saying where the data must be, shown when the root is missing or wrong
    expected_layout: ClassVar[str] = ""

    image_dir: Path
    image_files: list[str]

    def data_root(self, root: str | os.PathLike | None) -> Path:
        """``root`` as a path; a missing root is an error that says what the layout must be."""
        if root is None:
            raise ValueError(f"no data root given; {self.expected_layout}")
        return Path(root).expanduser()

    def set_images(self, image_dir: Path, image_files: list[str], fingerprint: str) -> None:
        """The images of this split: ``image_dir / image_files[i]`` is sample i."""
        self.image_dir, self.image_files, self._fingerprint = image_dir, list(image_files), fingerprint

    def load_image(self, index: int) -> Image.Image:
        return open_rgb(self.image_dir / self.image_files[index])

    def fingerprint(self) -> str:
        return self._fingerprint

    def image_id(self, index: int) -> str:
        return self.image_files[index]

    def data_identity(self) -> str:
        """The labelled samples (:meth:`MultiLabelDataset.data_identity`) and each image file's size,
        so the same manifest over other pictures (resized, re-encoded) is other data."""
        digest = hashlib.sha256(super().data_identity().encode())
        for name in self.image_files:
            try:
                digest.update(f"{os.stat(self.image_dir / name).st_size}\n".encode())
            except OSError:
                raise DataError(f"image file {self.image_dir / name} is missing (it was present when the dataset was built)") from None
        return digest.hexdigest()[:16]
