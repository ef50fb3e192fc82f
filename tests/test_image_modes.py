"""Images decode to the RGB picture a viewer shows, whatever mode Pillow opens them in (issue 17, item 4).

Every expected array is computed here from the definition of the mode (16-bit samples scaled so
65535 is white, alpha composited over white, the CMYK and JFIF YCbCr conversion formulas, EXIF
orientation as the EXIF 2.3 specification defines it), in float64, never by the code under test.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bench.api.dataset import as_uint8_rgb
from bench.api.image_files import open_rgb
from bench.core.errors import UnreadableImage

RNG = np.random.default_rng(17)


def gray3(values: np.ndarray) -> np.ndarray:
    """float64 grey [H, W] -> rounded uint8 [H, W, 3]."""
    return np.repeat(np.floor(np.clip(values, 0, 255) + 0.5).astype(np.uint8)[:, :, None], 3, axis=2)


def over_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Straight alpha over a white background, in float64: c·a/255 + 255·(1 − a/255)."""
    a = alpha.astype(np.float64)[:, :, None] / 255.0
    return np.floor(rgb.astype(np.float64) * a + 255.0 * (1.0 - a) + 0.5).astype(np.uint8)


def saved(image: Image.Image, fmt: str, tmp_path: Path, **options) -> Path:
    path = tmp_path / f"image.{fmt.lower()}"
    image.save(path, fmt, **options)
    return path


def decoded(path: Path) -> np.ndarray:
    out = np.asarray(open_rgb(path))
    assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3
    return out


# -- one test per mode, through a file on disk (open_rgb) where a format stores the mode ----------


def test_16_bit_png_is_not_white(tmp_path: Path) -> None:
    """The issue's example: a 16-bit grey PNG (mode I;16) used to clip to almost all white."""
    values = RNG.integers(0, 65536, size=(5, 7), dtype=np.uint16)
    values[0, 0], values[0, 1] = 0, 65535
    path = saved(Image.fromarray(values), "PNG", tmp_path)
    assert Image.open(path).mode == "I;16"
    out = decoded(path)
    np.testing.assert_array_equal(out, gray3(values.astype(np.float64) * 255.0 / 65535.0))
    assert out[0, 0, 0] == 0 and out[0, 1, 0] == 255 and (out < 250).mean() > 0.5


def test_16_bit_big_endian_mode(tmp_path: Path) -> None:
    values = RNG.integers(0, 65536, size=(4, 6), dtype=np.uint16)
    image = Image.fromarray(values.astype(">u2"))
    assert image.mode == "I;16B"
    np.testing.assert_array_equal(as_uint8_rgb(image), gray3(values.astype(np.float64) / 257.0))


def test_mode_I_holds_16_bit_samples(tmp_path: Path) -> None:
    """Pillow opens 16-bit PGM files (and 32-bit TIFFs) as mode I; samples are on the 16-bit scale."""
    values = RNG.integers(0, 65536, size=(3, 5)).astype(">u2")
    path = tmp_path / "image.pgm"
    path.write_bytes(b"P5\n5 3\n65535\n" + values.tobytes())
    assert Image.open(path).mode == "I"
    np.testing.assert_array_equal(decoded(path), gray3(values.astype(np.float64) * 255.0 / 65535.0))
    # out-of-range 32-bit values clip to black and white
    image = Image.fromarray(np.array([[-5, 70000]], dtype=np.int32))
    assert image.mode == "I"
    np.testing.assert_array_equal(as_uint8_rgb(image)[0, :, 0], [0, 255])


def test_mode_F_in_unit_range_and_beyond(tmp_path: Path) -> None:
    unit = RNG.random((4, 4)).astype(np.float32)
    path = saved(Image.fromarray(unit), "TIFF", tmp_path)
    assert Image.open(path).mode == "F"
    np.testing.assert_array_equal(decoded(path), gray3(unit.astype(np.float64) * 255.0))
    wide = np.array([[0.0, 100.4, 300.0, -2.0]], dtype=np.float32)  # not a [0, 1] image: Pillow's 0..255 scale
    np.testing.assert_array_equal(as_uint8_rgb(Image.fromarray(wide))[0, :, 0], [0, 100, 255, 0])
    with_nan = np.array([[np.nan, 0.5]], dtype=np.float32)
    np.testing.assert_array_equal(as_uint8_rgb(Image.fromarray(with_nan))[0, :, 0], [0, 128])


def test_mode_1_and_L(tmp_path: Path) -> None:
    bits = RNG.random((6, 8)) > 0.5
    path = saved(Image.fromarray(bits), "PNG", tmp_path)
    assert Image.open(path).mode == "1"
    np.testing.assert_array_equal(decoded(path), gray3(bits * 255.0))
    grey = RNG.integers(0, 256, size=(6, 8), dtype=np.uint8)
    path = saved(Image.fromarray(grey), "PNG", tmp_path)
    assert Image.open(path).mode == "L"
    np.testing.assert_array_equal(decoded(path), gray3(grey.astype(np.float64)))


def test_mode_LA_is_composited_over_white(tmp_path: Path) -> None:
    grey = RNG.integers(0, 256, size=(5, 5), dtype=np.uint8)
    alpha = RNG.integers(0, 256, size=(5, 5), dtype=np.uint8)
    alpha[0, 0], alpha[0, 1] = 0, 255
    path = saved(Image.fromarray(np.stack([grey, alpha], axis=2), "LA"), "PNG", tmp_path)
    assert Image.open(path).mode == "LA"
    out = decoded(path)
    np.testing.assert_array_equal(out, over_white(np.repeat(grey[:, :, None], 3, axis=2), alpha))
    assert tuple(out[0, 0]) == (255, 255, 255) and out[0, 1, 0] == grey[0, 1]


def test_mode_RGBA_is_composited_over_white(tmp_path: Path) -> None:
    rgb = RNG.integers(0, 256, size=(5, 6, 3), dtype=np.uint8)
    alpha = RNG.integers(0, 256, size=(5, 6), dtype=np.uint8)
    alpha[1, 1] = 0
    rgb[1, 1] = 0  # black under full transparency: a viewer shows the background, not black
    path = saved(Image.fromarray(np.dstack([rgb, alpha])), "PNG", tmp_path)
    assert Image.open(path).mode == "RGBA"
    out = decoded(path)
    np.testing.assert_array_equal(out, over_white(rgb, alpha))
    assert tuple(out[1, 1]) == (255, 255, 255)


def test_mode_P_with_and_without_transparency(tmp_path: Path) -> None:
    palette = RNG.integers(0, 256, size=(256, 3), dtype=np.uint8)
    index = RNG.integers(0, 4, size=(6, 6), dtype=np.uint8)
    image = Image.frombytes("P", (6, 6), index.tobytes())
    image.putpalette(palette.reshape(-1).tolist())
    path = saved(image, "PNG", tmp_path)
    assert Image.open(path).mode == "P"
    np.testing.assert_array_equal(decoded(path), palette[index])
    path = saved(image, "PNG", tmp_path, transparency=2)  # index 2 fully transparent (tRNS)
    opened = Image.open(path)
    assert opened.mode == "P" and "transparency" in opened.info
    expected = palette[index].copy()
    expected[index == 2] = 255
    np.testing.assert_array_equal(decoded(path), expected)
    gif = saved(image, "GIF", tmp_path, transparency=1)
    expected = palette[index].copy()
    expected[index == 1] = 255
    np.testing.assert_array_equal(decoded(gif), expected)


def test_mode_RGB(tmp_path: Path) -> None:
    rgb = RNG.integers(0, 256, size=(4, 7, 3), dtype=np.uint8)
    path = saved(Image.fromarray(rgb), "PNG", tmp_path)
    np.testing.assert_array_equal(decoded(path), rgb)


def test_mode_CMYK(tmp_path: Path) -> None:
    cmyk = RNG.integers(0, 256, size=(4, 5, 4), dtype=np.uint8)
    path = saved(Image.frombytes("CMYK", (5, 4), cmyk.tobytes()), "TIFF", tmp_path)
    assert Image.open(path).mode == "CMYK"
    c, m, y, k = (cmyk[:, :, i].astype(np.float64) / 255.0 for i in range(4))
    expected = np.stack([255.0 * (1 - c) * (1 - k), 255.0 * (1 - m) * (1 - k), 255.0 * (1 - y) * (1 - k)], axis=2)
    out = decoded(path).astype(np.int64)
    assert np.abs(out - expected).max() <= 1.0  # Pillow's integer arithmetic: within one level


def test_mode_YCbCr() -> None:
    ycc = RNG.integers(0, 256, size=(4, 5, 3), dtype=np.uint8)
    image = Image.frombytes("YCbCr", (5, 4), ycc.tobytes())
    y, cb, cr = (ycc[:, :, i].astype(np.float64) for i in range(3))
    expected = np.clip(np.stack([y + 1.402 * (cr - 128), y - 0.344136 * (cb - 128) - 0.714136 * (cr - 128), y + 1.772 * (cb - 128)], axis=2), 0, 255)
    out = as_uint8_rgb(image).astype(np.int64)
    assert np.abs(out - expected).max() <= 1.0  # JFIF conversion in Pillow's fixed point


EXIF_ORIENTATION = 0x0112
#: EXIF 2.3 orientation -> how a viewer turns the stored pixels [H, W, 3] for display
ORIENTATIONS = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1, :],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, k=-1),  # 90° clockwise
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),
    8: lambda a: np.rot90(a, k=1),  # 90° counter-clockwise
}


@pytest.mark.parametrize("orientation", sorted(ORIENTATIONS))
def test_exif_rotated_jpeg_is_shown_upright(tmp_path: Path, orientation: int) -> None:
    stored = np.zeros((16, 24, 3), dtype=np.uint8)
    stored[:8, :8] = (250, 0, 0)  # a red block in the stored top-left corner
    stored[8:, 16:] = (0, 0, 250)
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    path = saved(Image.fromarray(stored), "JPEG", tmp_path, exif=exif.tobytes(), quality=95)
    with Image.open(path) as raw:  # the stored pixels as decoded, before any orientation
        pixels = np.asarray(raw.convert("RGB"))
    out = decoded(path)
    np.testing.assert_array_equal(out, ORIENTATIONS[orientation](pixels))
    if orientation in (5, 6, 7, 8):
        assert out.shape[:2] == (24, 16)


# -- arrays from plugins, and what is not an image ----------------------------------------------


def test_arrays_of_every_supported_layout() -> None:
    grey = RNG.integers(0, 256, size=(3, 4), dtype=np.uint8)
    np.testing.assert_array_equal(as_uint8_rgb(grey), gray3(grey.astype(np.float64)))
    np.testing.assert_array_equal(as_uint8_rgb(grey[:, :, None]), gray3(grey.astype(np.float64)))
    np.testing.assert_array_equal(as_uint8_rgb(grey.astype(np.int64)), gray3(grey.astype(np.float64)))
    wide = RNG.integers(0, 65536, size=(3, 4), dtype=np.uint16)
    np.testing.assert_array_equal(as_uint8_rgb(wide), gray3(wide / 257.0))
    unit = RNG.random((3, 4, 3))
    np.testing.assert_array_equal(as_uint8_rgb(unit), np.floor(unit * 255 + 0.5).astype(np.uint8))
    rgba = RNG.integers(0, 256, size=(3, 4, 4), dtype=np.uint8)
    np.testing.assert_array_equal(as_uint8_rgb(rgba), over_white(rgba[:, :, :3], rgba[:, :, 3]))
    np.testing.assert_array_equal(as_uint8_rgb(np.array([[True, False]])), [[[255] * 3, [0] * 3]])


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.zeros((3, 4, 5), dtype=np.uint8), "expected an image array"),
        (np.zeros((3,), dtype=np.uint8), "expected an image array"),
        (np.full((2, 2), 300, dtype=np.int32), "must hold 0..255"),
        (np.array([["a"]]), "not an image"),
    ],
)
def test_what_is_not_an_image_array_is_named(array: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        as_uint8_rgb(array)


def test_a_file_that_is_not_an_image_is_unreadable_not_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "broken.png"
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(buffer, "PNG")
    path.write_bytes(buffer.getvalue()[:40])  # truncated
    with pytest.raises(UnreadableImage, match="broken.png"):
        open_rgb(path)
