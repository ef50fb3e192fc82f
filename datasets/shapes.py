"""``shapes``: the embedded, procedurally generated default dataset (no download).

Every image is drawn by numpy from a seed, once, and cached on disk as uint8 ``.npy`` files. The
generator is built so that the differences between classification heads become visible on a tiny
backbone in minutes of CPU time: objects are SMALL and scattered in CLUTTER (so where a head looks
matters: global max pooling / spatial attention should beat global average pooling), and labels
CO-OCCUR through a latent scene model (so a label-graph head has something to exploit).

Classes: a conjunction of form and colour
-----------------------------------------
Six forms (``circle`` = filled disc, ``square``, ``triangle`` = apex up, ``bar`` = horizontal
3:1 bar, ``ring`` = hollow circle, ``cross`` = plus sign; chosen to stay distinguishable at 10 px)
and six saturated colours (``red``, ``green``, ``blue``, ``yellow``, ``magenta``, ``cyan``) make
36 (colour, form) pairs. :data:`CLASSES` lists the 14 pairs that are classes, named
``"<colour>_<form>"``; the other 22 pairs are DISTRACTORS. Every form and every colour occurs both
in classes (2 or 3 classes each) and in distractors, so neither the colour alone nor the form alone
identifies a class: ``red_circle`` is a class, while a red bar or a yellow circle is clutter. A
label is positive iff an object of that class is drawn (an image holds at most one per class).

Classes are listed in decreasing base weight ``w_c = (c + 1) ** -LONG_TAIL_EXPONENT`` (Zipf-like).

Scene model (label co-occurrence)
---------------------------------
Each image first draws a latent scene type ``s`` in {0, 1, 2, 3} with probabilities
:data:`SCENE_PRIOR` = (0.35, 0.30, 0.20, 0.15). Each scene has 5 "core" classes (:data:`SCENES`):

- scene 0: red_circle, blue_square, cyan_ring, green_ring, red_square
- scene 1: red_circle, green_triangle, magenta_cross, red_triangle, green_circle
- scene 2: blue_square, yellow_bar, blue_circle, magenta_bar, cyan_cross
- scene 3: green_triangle, yellow_bar, yellow_square, cyan_cross, red_square

The sets overlap and each mixes forms and colours, so co-occurrence is not visual similarity.
Given the scene:

1. the number of class objects ``n`` is drawn from {1, ..., 5} with :data:`NUM_OBJECTS_PROB`
   = (0.3, 0.3, 0.2, 0.12, 0.08) (mean 2.4 labels per image);
2. ``n`` DISTINCT classes are drawn without replacement (Gumbel top-k) from
   ``p(c | s) ∝ w_c * (1 if c is core to s else OFF_SCENE_WEIGHT = 0.03)``, so most labels of an
   image come from its scene's core set and occasionally one comes from outside it.

Labels therefore co-occur in blocks (the scenes; pairwise lifts P(i, j) / P(i) P(j) range from
about 0.1 to 4.8) with a long-tailed marginal frequency. Train frequencies, seed 0, 4000 images
(%): red_circle 62.9, blue_square 41.6, green_triangle 28.9, yellow_bar 20.3, cyan_ring 14.6,
magenta_cross 12.2, blue_circle 7.7, red_triangle 9.3, yellow_square 4.5, green_ring 8.0,
magenta_bar 4.7, cyan_cross 7.8, red_square 8.8, green_circle 4.7; most / rarest = 14 (the tests
assert >= 10). The scene id is not stored: it is a latent cause the heads may infer.

Image generation (``image_size`` S, default 64)
-----------------------------------------------
Drawn back to front, all with numpy masks evaluated at pixel centres (no anti-aliasing):

- BACKGROUND: a grey level uniform in [60, 160] with a per-channel tint (+-15), plus a
  low-frequency texture (a 5 x 5 grid of N(0, 22^2) values per channel, bilinearly upsampled),
  so the background has coloured blotches of varying brightness.
- SCRIBBLES: 3 to 6 straight line segments, 1 to 2 px wide, between uniform random end points,
  each in one of the six colours (+ jitter): colour evidence spread over the image with no form.
- DISTRACTORS: ``k`` objects, ``k`` uniform in [distractors // 2, distractors + distractors // 2]
  (mean ``distractors``, default 6), each a uniformly drawn distractor (colour, form) pair, placed
  anywhere in the image; distractors may overlap each other and the scribbles.
- CLASS OBJECTS: the image is cut into a 4 x 4 grid of cells; the ``n`` class objects take ``n``
  distinct random cells and a uniform position inside their cell, so they can be anywhere, never
  overlap each other, and are drawn last: every labelled object is fully visible.
- OBJECT SIZE (distractors and class objects alike): the diameter is log-uniform in
  [min_object, max_object] * S (defaults 0.15 and 0.25: 9.6 to 16 px at 64 px, i.e. each object
  covers about 2-6 % of the image; max_object is capped at one grid cell, 1/4).
- OBJECT COLOUR: the colour's base RGB (:data:`COLOURS`) plus a per-object uniform offset of
  +-10 per channel.
- NOISE: i.i.d. N(0, 10^2) per pixel and channel over the whole image; values clipped to [0, 255].

Why these defaults: a check with the ``tiny_cnn`` backbone, 2000 train / 500 test images at
64 px, a linear classifier on globally pooled features, AdamW (lr 1e-3, weight decay 1e-4),
batch 64, 10 epochs, BCE, data seed = torch seed, macro mAP on test (class-frequency chance level
about 18). Global MAX pooling beat global AVERAGE pooling by 7 to 13 mAP points over three seeds
(seed 0: avg 45.1 / max 58.5; seed 1: 55.8 / 66.9; seed 2: 54.0 / 61.3). Neither is saturated
(max pooling fits the training set, so the gap is in what generalises). Smaller objects make both
heads worse rather than widening the gap: ``min_object=0.12`` gave avg 38.3 / 46.1 / 43.0 vs max
42.9 / 52.1 / 50.7, and ``max_object=0.2`` (objects under 13 px, with a +-20 jitter) left max
pooling no better than average pooling. With a colour jitter of +-20 instead of +-10 (with or
without scribbles) the gap was only 1 to 11 points and varied a lot with the seed.

Splits and determinism
----------------------
Splits ``train`` and ``test`` (fixed). Each split is generated in chunks of :data:`CHUNK` images;
chunk ``j`` of split ``t`` uses its own stream ``SeedSequence([STREAM_TAG, seed, t, j])``. So the
test set never depends on ``num_train`` (and vice versa), and a smaller split is a prefix of a
larger one with the same options.

Cache
-----
Under ``root`` (default ``$HEADBENCH_CACHE/shapes`` if that variable is set, else
``~/.cache/headbench/shapes``), per split, ``<key>_images.npy`` (uint8 [N, S, S, 3], read with
``mmap_mode="r"``) and ``<key>_labels.npy`` (uint8 [N, C]); ``<key>`` encodes the generator version
and every generation option of that split, so changing any of them regenerates. Files are written
to a temporary file and moved into place with ``os.replace`` (a killed generation never leaves a
partial cache); a cache that fails to load or validate is regenerated with a warning. No pickle.
Generating the default 4000 + 1000 images takes a few seconds on one CPU core.

Bump :data:`GENERATOR_VERSION` whenever a change here alters the generated data.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from bench.api import MultiLabelDataset, atomic_write, cache_dir, register_dataset

#: bump when the generated data changes (it is part of the cache file names and the fingerprint)
GENERATOR_VERSION = 1

FORMS: tuple[str, ...] = ("circle", "square", "triangle", "bar", "ring", "cross")

#: base RGB of each colour (objects add a per-object jitter of +-COLOUR_JITTER per channel)
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 45, 45),
    "green": (45, 180, 70),
    "blue": (50, 90, 235),
    "yellow": (235, 215, 50),
    "magenta": (215, 60, 215),
    "cyan": (50, 210, 215),
}

#: the classes, in decreasing base weight: (colour, form) pairs; every other pair is a distractor
CLASS_PAIRS: tuple[tuple[str, str], ...] = (
    ("red", "circle"),
    ("blue", "square"),
    ("green", "triangle"),
    ("yellow", "bar"),
    ("cyan", "ring"),
    ("magenta", "cross"),
    ("blue", "circle"),
    ("red", "triangle"),
    ("yellow", "square"),
    ("green", "ring"),
    ("magenta", "bar"),
    ("cyan", "cross"),
    ("red", "square"),
    ("green", "circle"),
)
CLASSES: tuple[str, ...] = tuple(f"{colour}_{form}" for colour, form in CLASS_PAIRS)
DISTRACTOR_PAIRS: tuple[tuple[str, str], ...] = tuple(
    (colour, form) for colour in COLOURS for form in FORMS if (colour, form) not in CLASS_PAIRS
)

#: latent scene types: prior probability and core classes (indices into CLASSES)
SCENE_PRIOR: tuple[float, ...] = (0.35, 0.30, 0.20, 0.15)
SCENES: tuple[tuple[int, ...], ...] = (
    (0, 1, 4, 9, 12),  # red_circle, blue_square, cyan_ring, green_ring, red_square
    (0, 2, 5, 7, 13),  # red_circle, green_triangle, magenta_cross, red_triangle, green_circle
    (1, 3, 6, 10, 11),  # blue_square, yellow_bar, blue_circle, magenta_bar, cyan_cross
    (2, 3, 8, 11, 12),  # green_triangle, yellow_bar, yellow_square, cyan_cross, red_square
)
LONG_TAIL_EXPONENT = 1.3
OFF_SCENE_WEIGHT = 0.03
NUM_OBJECTS_PROB: tuple[float, ...] = (0.3, 0.3, 0.2, 0.12, 0.08)  # n = 1, ..., 5
MAX_OBJECTS = len(NUM_OBJECTS_PROB)
GRID = 4  # class objects take distinct cells of a GRID x GRID grid

COLOUR_JITTER = 10.0
BACKGROUND_LEVEL = (60.0, 160.0)
BACKGROUND_TINT = 15.0
TEXTURE_GRID = 5
TEXTURE_STD = 22.0
PIXEL_NOISE_STD = 10.0
NUM_LINES = (3, 6)
LINE_WIDTH = (1.0, 2.0)

CHUNK = 250
STREAM_TAG = 0x5A4E5
_SPLIT_CODE = {"train": 0, "test": 1}


def default_root() -> Path:
    """``$HEADBENCH_CACHE/shapes`` if the variable is set, else ``~/.cache/headbench/shapes``."""
    return cache_dir("shapes")


# ----------------------------------------------------------------------------------------------
# generation


def _class_probs() -> np.ndarray:
    """p(c | s) as a [num_scenes, C] array."""
    weights = (np.arange(len(CLASSES)) + 1.0) ** -LONG_TAIL_EXPONENT
    affinity = np.full((len(SCENES), len(CLASSES)), OFF_SCENE_WEIGHT)
    for s, core in enumerate(SCENES):
        affinity[s, list(core)] = 1.0
    probs = affinity * weights
    return probs / probs.sum(axis=1, keepdims=True)


def _form_masks(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Masks of all forms at normalised coordinates (u right, v down, radius 1) -> [F, ...]."""
    rho2 = u * u + v * v
    au, av = np.abs(u), np.abs(v)
    return np.stack(
        [
            rho2 <= 1.0,  # circle
            np.maximum(au, av) <= 0.82,  # square
            (v >= -1.0) & (v <= 0.8) & (au <= (v + 1.0) * 0.55),  # triangle, apex up
            (au <= 1.0) & (av <= 0.35),  # bar (horizontal)
            (rho2 <= 1.0) & (rho2 >= 0.55**2),  # ring
            ((au <= 0.33) & (av <= 1.0)) | ((av <= 0.33) & (au <= 1.0)),  # cross
        ]
    )


def _draw_layer(
    images: np.ndarray,
    active: np.ndarray,
    form: np.ndarray,
    colour: np.ndarray,
    cy: np.ndarray,
    cx: np.ndarray,
    radius: np.ndarray,
    patch: int,
) -> None:
    """Paint one object into each image where ``active`` (all arrays are per image, [B] / [B, 3])."""
    b_count, size = images.shape[0], images.shape[1]
    offsets = np.arange(patch)
    ys = np.floor(cy - patch / 2).astype(np.int64)[:, None] + offsets  # [B, P]
    xs = np.floor(cx - patch / 2).astype(np.int64)[:, None] + offsets
    v = ((ys + 0.5 - cy[:, None]) / radius[:, None])[:, :, None]  # [B, P, 1]
    u = ((xs + 0.5 - cx[:, None]) / radius[:, None])[:, None, :]  # [B, 1, P]
    masks = _form_masks(u, v)  # [F, B, P, P]
    mask = masks[form, np.arange(b_count)]
    mask &= active[:, None, None]
    mask &= ((ys >= 0) & (ys < size))[:, :, None]
    mask &= ((xs >= 0) & (xs < size))[:, None, :]
    b, i, j = np.nonzero(mask)
    images[b, ys[b, i], xs[b, j]] = colour[b]


def _log_uniform(rng: np.random.Generator, low: float, high: float, shape: tuple[int, ...]) -> np.ndarray:
    return np.exp(rng.uniform(math.log(low), math.log(high), size=shape))


def _upsample_matrix(coarse: int, size: int) -> np.ndarray:
    """[size, coarse] bilinear interpolation from ``coarse`` knots spanning the image."""
    positions = np.linspace(0.0, coarse - 1.0, size)
    eye = np.eye(coarse)
    return np.stack([np.interp(positions, np.arange(coarse), eye[k]) for k in range(coarse)], axis=1)


def generate_chunk(
    rng: np.random.Generator,
    count: int,
    image_size: int,
    distractors: int,
    min_object: float,
    max_object: float,
) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Generate ``count`` images from ``rng``.

    Returns:
        ``(images uint8 [B, S, S, 3], targets uint8 [B, C], layout)`` where ``layout`` describes the
        class objects: ``class`` int [B, MAX_OBJECTS] (-1 where no object), ``cy``, ``cx``,
        ``radius`` float [B, MAX_OBJECTS] in pixels, and ``scene`` int [B].
    """
    size = image_size
    num_classes = len(CLASSES)
    colour_table = np.array([COLOURS[c] for c in COLOURS], dtype=np.float32)
    colour_index = {c: k for k, c in enumerate(COLOURS)}
    class_form = np.array([FORMS.index(f) for _, f in CLASS_PAIRS])
    class_colour = np.array([colour_index[c] for c, _ in CLASS_PAIRS])
    distractor_form = np.array([FORMS.index(f) for _, f in DISTRACTOR_PAIRS])
    distractor_colour = np.array([colour_index[c] for c, _ in DISTRACTOR_PAIRS])
    r_min, r_max = min_object * size / 2.0, max_object * size / 2.0
    patch = int(math.ceil(2.0 * r_max)) + 2

    # --- the scene model: scene, number of objects, classes (all sampled before any pixel)
    scene = rng.choice(len(SCENE_PRIOR), size=count, p=np.asarray(SCENE_PRIOR))
    num_objects = rng.choice(np.arange(1, MAX_OBJECTS + 1), size=count, p=np.asarray(NUM_OBJECTS_PROB))
    gumbel = rng.gumbel(size=(count, num_classes))
    order = np.argsort(-(np.log(_class_probs()[scene]) + gumbel), axis=1, kind="stable")
    slot = np.arange(MAX_OBJECTS)
    present = slot[None, :] < num_objects[:, None]  # [B, K]
    classes = np.where(present, order[:, :MAX_OBJECTS], -1)
    targets = np.zeros((count, num_classes), dtype=np.uint8)
    rows, slots = np.nonzero(present)
    targets[rows, classes[rows, slots]] = 1

    # --- background: grey level + tint + low-frequency texture
    level = rng.uniform(*BACKGROUND_LEVEL, size=(count, 1, 1, 1))
    tint = rng.uniform(-BACKGROUND_TINT, BACKGROUND_TINT, size=(count, 1, 1, 3))
    coarse = rng.normal(0.0, TEXTURE_STD, size=(count, TEXTURE_GRID, TEXTURE_GRID, 3))
    up = _upsample_matrix(TEXTURE_GRID, size)
    texture = np.einsum("hi,bijc,wj->bhwc", up, coarse, up, optimize=True)
    images = (level + tint + texture).astype(np.float32)

    # --- scribbles: long thin lines in the class colours (colour evidence without a form)
    if NUM_LINES[1] > 0:
        num_lines = rng.integers(NUM_LINES[0], NUM_LINES[1] + 1, size=count)
        grid_y = np.arange(size, dtype=np.float32)[:, None] + 0.5
        grid_x = np.arange(size, dtype=np.float32)[None, :] + 0.5
        for k in range(NUM_LINES[1]):
            ends = rng.uniform(0, size, size=(count, 4)).astype(np.float32)
            width = rng.uniform(*LINE_WIDTH, size=count).astype(np.float32)
            colour = colour_table[rng.integers(0, len(COLOURS), size=count)]
            colour = colour + rng.uniform(-COLOUR_JITTER, COLOUR_JITTER, size=(count, 3))
            y0, x0, y1, x1 = (ends[:, i, None, None] for i in range(4))
            dy, dx = y1 - y0, x1 - x0
            t = ((grid_y - y0) * dy + (grid_x - x0) * dx) / np.maximum(dy * dy + dx * dx, 1e-6)
            t = np.clip(t, 0.0, 1.0)
            dist2 = (grid_y - y0 - t * dy) ** 2 + (grid_x - x0 - t * dx) ** 2
            mask = (dist2 <= (width[:, None, None] / 2) ** 2) & (k < num_lines)[:, None, None]
            b, i, j = np.nonzero(mask)
            images[b, i, j] = colour[b]

    # --- distractors, anywhere, under the class objects
    low = distractors // 2
    high = distractors + distractors // 2
    num_distractors = rng.integers(low, high + 1, size=count)
    for k in range(high):
        pair = rng.integers(0, len(DISTRACTOR_PAIRS), size=count)
        radius = _log_uniform(rng, r_min, r_max, (count,))
        cy = rng.uniform(radius, size - radius)
        cx = rng.uniform(radius, size - radius)
        jitter = rng.uniform(-COLOUR_JITTER, COLOUR_JITTER, size=(count, 3))
        _draw_layer(
            images,
            k < num_distractors,
            distractor_form[pair],
            colour_table[distractor_colour[pair]] + jitter,
            cy,
            cx,
            radius,
            patch,
        )

    # --- class objects, one per distinct grid cell
    cell = size / GRID
    cells = np.argsort(rng.random((count, GRID * GRID)), axis=1)[:, :MAX_OBJECTS]
    radius = np.minimum(_log_uniform(rng, r_min, r_max, (count, MAX_OBJECTS)), cell / 2.0)
    cy = (cells // GRID) * cell + rng.uniform(radius, cell - radius)
    cx = (cells % GRID) * cell + rng.uniform(radius, cell - radius)
    jitter = rng.uniform(-COLOUR_JITTER, COLOUR_JITTER, size=(count, MAX_OBJECTS, 3))
    safe = np.maximum(classes, 0)
    for k in range(MAX_OBJECTS):
        _draw_layer(
            images,
            present[:, k],
            class_form[safe[:, k]],
            colour_table[class_colour[safe[:, k]]] + jitter[:, k],
            cy[:, k],
            cx[:, k],
            radius[:, k],
            patch,
        )

    # --- pixel noise
    images += rng.standard_normal(size=images.shape, dtype=np.float32) * PIXEL_NOISE_STD
    np.clip(images, 0.0, 255.0, out=images)
    layout = {
        "class": classes,
        "cy": np.where(present, cy, np.nan),
        "cx": np.where(present, cx, np.nan),
        "radius": np.where(present, radius, np.nan),
        "scene": scene,
    }
    return np.rint(images).astype(np.uint8), targets, layout


def chunk_rng(seed: int, split: str, chunk: int) -> np.random.Generator:
    """The random stream of chunk ``chunk`` of ``split`` (independent of the split's size)."""
    return np.random.default_rng(np.random.SeedSequence([STREAM_TAG, seed, _SPLIT_CODE[split], chunk]))


def generate_split(
    split: str,
    count: int,
    *,
    seed: int,
    image_size: int,
    distractors: int,
    min_object: float,
    max_object: float,
) -> tuple[np.ndarray, np.ndarray]:
    """The first ``count`` images of ``split``: ``(images uint8 [N, S, S, 3], targets uint8 [N, C])``."""
    images = np.empty((count, image_size, image_size, 3), dtype=np.uint8)
    targets = np.empty((count, len(CLASSES)), dtype=np.uint8)
    for chunk, start in enumerate(range(0, count, CHUNK)):
        # always generate a full chunk, so that image i does not depend on ``count``
        img, tgt, _ = generate_chunk(
            chunk_rng(seed, split, chunk), CHUNK, image_size, distractors, min_object, max_object
        )
        stop = min(start + CHUNK, count)
        images[start:stop] = img[: stop - start]
        targets[start:stop] = tgt[: stop - start]
    return images, targets


# ----------------------------------------------------------------------------------------------
# cache


def _save_npy(path: Path, array: np.ndarray) -> None:
    """Write ``array`` to ``path`` as .npy (no pickle), crash-safely (temp file + os.replace)."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            np.save(handle, array, allow_pickle=False)

    atomic_write(path, write)


@register_dataset("shapes")
class ShapesDataset(MultiLabelDataset):
    """Procedurally generated multi-label shapes in clutter (see the module docstring).

    Args:
        root: cache folder (default: ``$HEADBENCH_CACHE/shapes`` or ``~/.cache/headbench/shapes``).
        split: ``"train"`` or ``"test"``.
        seed: generation seed.
        image_size: image side S in pixels.
        num_train / num_test: number of images of each split.
        distractors: mean number of distractor objects per image.
        min_object / max_object: object diameter range as fractions of S (max_object <= 1/4).
    """

    splits = ("train", "test")
    train_split = "train"
    test_split = "test"

    def __init__(
        self,
        root: str | os.PathLike | None = None,
        split: str = "train",
        *,
        seed: int = 0,
        image_size: int = 64,
        num_train: int = 4000,
        num_test: int = 1000,
        distractors: int = 6,
        min_object: float = 0.15,
        max_object: float = 0.25,
    ) -> None:
        self.split = self.check_split(split)
        for name, value, least in (
            ("seed", seed, 0),
            ("image_size", image_size, 16),
            ("num_train", num_train, 1),
            ("num_test", num_test, 1),
            ("distractors", distractors, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
                raise ValueError(f"option {name} must be an integer >= {least}, got {value!r}")
        if not 0.0 < float(min_object) <= float(max_object) <= 1.0 / GRID:
            raise ValueError(
                f"options need 0 < min_object <= max_object <= {1.0 / GRID}, "
                f"got {min_object!r} and {max_object!r}"
            )
        self.root = Path(root).expanduser() if root is not None else default_root()
        self.options = {
            "seed": int(seed),
            "image_size": int(image_size),
            "distractors": int(distractors),
            "min_object": float(min_object),
            "max_object": float(max_object),
        }
        self.count = int(num_train if split == "train" else num_test)
        self.classes = list(CLASSES)
        self.images, self.targets = self._load_or_generate()
        self.ignore = np.zeros(self.targets.shape, dtype=bool)

    @classmethod
    def write_sample(cls, root: Path) -> dict[str, Any]:
        return {"num_train": 24, "num_test": 12, "image_size": 32}

    # -- cache ------------------------------------------------------------------------------------

    @property
    def cache_key(self) -> str:
        """The file-name stem of this split's cache: the version and every generation option."""
        o = self.options
        return (
            f"shapes_v{GENERATOR_VERSION}_seed{o['seed']}_px{o['image_size']}_d{o['distractors']}"
            f"_obj{o['min_object']:g}-{o['max_object']:g}_{self.split}{self.count}"
        )

    @property
    def cache_paths(self) -> tuple[Path, Path]:
        """``(images .npy, labels .npy)`` of this split."""
        return self.root / f"{self.cache_key}_images.npy", self.root / f"{self.cache_key}_labels.npy"

    def _load(self) -> tuple[np.ndarray, np.ndarray]:
        image_path, label_path = self.cache_paths
        size = self.options["image_size"]
        images = np.load(image_path, mmap_mode="r", allow_pickle=False)
        targets = np.load(label_path, allow_pickle=False)
        if images.dtype != np.uint8 or images.shape != (self.count, size, size, 3):
            raise ValueError(f"images are {images.dtype} {images.shape}")
        if targets.dtype != np.uint8 or targets.shape != (self.count, len(CLASSES)):
            raise ValueError(f"labels are {targets.dtype} {targets.shape}")
        per_image = targets.sum(axis=1, dtype=np.int64)
        if targets.max(initial=0) > 1 or per_image.min() < 1 or per_image.max() > MAX_OBJECTS:
            raise ValueError("labels are not 1 to 5 binary labels per image")
        return images, targets

    def _load_or_generate(self) -> tuple[np.ndarray, np.ndarray]:
        image_path, label_path = self.cache_paths
        if image_path.exists() or label_path.exists():
            try:
                return self._load()
            except Exception as exc:  # truncated, garbage, missing half, wrong shape
                warnings.warn(
                    f"shapes: cache {image_path.name} in {self.root} is unreadable "
                    f"({type(exc).__name__}: {exc}); regenerating it",
                    RuntimeWarning,
                    stacklevel=3,
                )
        self.root.mkdir(parents=True, exist_ok=True)
        images, targets = generate_split(self.split, self.count, **self.options)
        _save_npy(label_path, targets)
        _save_npy(image_path, images)
        return self._load()

    # -- the MultiLabelDataset contract ---------------------------------------------------------

    def load_image(self, index: int) -> np.ndarray:
        # a writable copy of one image (torch refuses to wrap the read-only memory map)
        return np.array(self.images[index])

    def fingerprint(self) -> str:
        return f"{self.cache_key} " + ",".join(f"{k}={v}" for k, v in sorted(self.options.items()))

    def image_id(self, index: int) -> str:
        return f"{self.split}_{index:05d}"
