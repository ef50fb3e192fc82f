"""Measure what the decoded-image cache buys: one epoch from JPEG files vs from the uint8 memmap.

    python -m bench.perf.input_cache                       # 2,000 images at 224 px, writes docs/input-cache.md
    python -m bench.perf.input_cache --images 200 --out -  # a quick look, table on stdout only

Steps (everything lives in a temporary folder that is removed afterwards, unless ``--keep``):

1. Generate ``--images`` photo-like JPEGs (quality 90), each of a random size between 256 and 500 px
   per side: a smooth random colour field (a coarse random grid upsampled bicubically) with a few
   soft blobs and mild pixel noise, so they compress and decode like camera photos, not like flat
   colour. A ``train.csv`` manifest with random labels over 10 classes makes it a ``folder``
   dataset, read as an (unregistered) ``ImageFileDataset`` over the generated files.
2. (a) **decode every epoch, naive**: a ``DataLoader`` over the dataset's ``__getitem__`` (PIL
   decode -> float tensor at native size) followed by a bilinear, antialiased torch resize to S x S.
   (a') **decode every epoch, tuned**: ``load_image`` then PIL's bilinear resize on the uint8 image
   (exactly the cache build's per-image work), yielding uint8 batches like (b).
3. (b) **cache**: ``bench.data.image_cache.load_or_build`` decodes and resizes once into the memmap (its
   build time is reported on its own), a second call times a cache hit, then a ``DataLoader`` of
   ``CachedImages`` is timed over ``--epochs`` epochs, as it is (uint8 batches: the training loop
   converts them to float on the training device) and with the float conversion on the CPU.

All loaders shuffle and use the same batch size and number of workers (default 0: the main
process) with one torch thread (``--threads``; DataLoader workers also run single-threaded), so the
numbers are per core. The ratios reported are (a) / (b), (a') / (b) and (a) / (b with the CPU conversion) per epoch.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import PIL
import torch
from PIL import Image, ImageFilter
from torch.nn import functional as F

from bench.api.dataset import as_uint8_rgb
from bench.api.image_files import ImageFileDataset
from bench.core.paths import PROJECT_ROOT
from bench.data.augment import to_float
from bench.data.batched_arrays import collate_fetched
from bench.data.image_cache import CachedImages, load_or_build, resize_square

NUM_CLASSES = 10


def generate_folder(root: Path, count: int, seed: int = 0) -> None:
    """Write ``count`` photo-like JPEGs under ``root/images`` and a ``root/train.csv`` manifest."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = ["path,labels"]
    for i in range(count):
        w, h = (int(v) for v in rng.integers(256, 501, size=2))
        coarse = rng.integers(0, 256, size=(int(rng.integers(3, 9)), int(rng.integers(3, 9)), 3), dtype=np.uint8)
        field = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), dtype=np.float32)
        yy, xx = np.mgrid[0:h, 0:w]
        for _ in range(int(rng.integers(2, 6))):  # soft blobs: "objects"
            cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(20, 90)
            weight = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))[:, :, None]
            field = field * (1 - weight) + rng.uniform(0, 255, size=3) * weight
        field += rng.normal(0, 6, size=field.shape)
        image = Image.fromarray(np.clip(field, 0, 255).astype(np.uint8)).filter(ImageFilter.DETAIL)
        image.save(root / "images" / f"{i:05d}.jpg", quality=90)
        labels = sorted({f"c{int(k)}" for k in rng.integers(0, NUM_CLASSES, size=int(rng.integers(1, 4)))})
        rows.append(f"images/{i:05d}.jpg,{';'.join(labels)}")
    (root / "train.csv").write_text("\n".join(rows) + "\n")


class GeneratedImages(ImageFileDataset):
    """The generated folder as a dataset (not registered: a benchmark input, not a plugin)."""

    def __init__(self, root: Path) -> None:
        lines = (root / "train.csv").read_text().split("\n")[1:]
        rows = [line.split(",") for line in lines if line]
        self.split = "train"
        self.classes = [f"c{k}" for k in range(NUM_CLASSES)]
        self.targets = np.zeros((len(rows), NUM_CLASSES), dtype=np.uint8)
        for i, (_, labels) in enumerate(rows):
            self.targets[i, [self.classes.index(c) for c in labels.split(";")]] = 1
        self.ignore = np.zeros(self.targets.shape, dtype=bool)
        self.set_images(root, [path for path, _ in rows], f"perf-generated {len(rows)}")


class DecodeAndResize(torch.utils.data.Dataset):
    """Decode every time. ``tensor``: the dataset's ``__getitem__`` (float tensor at native size),
    then a torch antialiased bilinear resize -- the naive loader. ``pil``: ``load_image`` then
    PIL's bilinear resize on the uint8 image (the cache build's own per-image work, i.e. the best a
    decode-every-epoch loader can do), returned as uint8 [S, S, 3] like the cache."""

    def __init__(self, dataset, size: int, mode: str = "tensor") -> None:
        self.dataset, self.size, self.mode = dataset, size, mode

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        if self.mode == "pil":
            image = resize_square(as_uint8_rgb(self.dataset.load_image(index)), self.size)
            target = torch.from_numpy(self.dataset.targets[index].astype(np.float32))
            return torch.from_numpy(np.array(image)), target, torch.from_numpy(self.dataset.ignore[index])
        image, target, ignore = self.dataset[index]
        image = F.interpolate(image[None], size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)[0]
        return image, target, ignore


def time_epochs(loader: torch.utils.data.DataLoader, epochs: int, convert: bool = False) -> list[float]:
    """Seconds per epoch of iterating ``loader``; ``convert``: also turn each uint8 [B, S, S, 3]
    batch into float [B, 3, S, S] on the CPU (``bench.data.augment.to_float``, which the training loop
    runs on the training device)."""
    times = []
    for _ in range(epochs):
        start = time.perf_counter()
        for images, _, _ in loader:
            if convert:
                images = to_float(images)
        times.append(time.perf_counter() - start)
    return times


def machine() -> str:
    return (
        f"{platform.platform()}; {platform.machine()} {platform.processor() or ''}".rstrip()
        + f"; {os.cpu_count()} CPU(s) visible (os.cpu_count); "
        f"Python {platform.python_version()}, torch {torch.__version__}, Pillow {PIL.__version__}, numpy {np.__version__}"
    )


def run(args: argparse.Namespace) -> tuple[str, str]:
    """Generate, measure, clean up; return (markdown table, markdown details)."""
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="headbench-perf-input-"))
    try:
        root, cache = work / "data", work / "cache"
        start = time.perf_counter()
        if not (root / "train.csv").is_file():
            generate_folder(root, args.images)
        generate_s = time.perf_counter() - start
        dataset = GeneratedImages(root)
        sizes = []
        for p in dataset.image_files[:200]:
            with Image.open(root / p) as image:
                sizes.append(image.size)
        mean_px = np.mean([w * h for w, h in sizes]) ** 0.5
        jpeg_mb = sum((root / p).stat().st_size for p in dataset.image_files) / 2**20

        loader_kw = {"batch_size": args.batch_size, "shuffle": True, "num_workers": args.workers}
        torch.manual_seed(0)
        naive = time_epochs(torch.utils.data.DataLoader(DecodeAndResize(dataset, args.size), **loader_kw), args.epochs)
        tuned = time_epochs(torch.utils.data.DataLoader(DecodeAndResize(dataset, args.size, "pil"), **loader_kw), args.epochs)

        shutil.rmtree(cache, ignore_errors=True)
        start = time.perf_counter()
        split = load_or_build(dataset, args.size, cache)
        build_s = time.perf_counter() - start
        start = time.perf_counter()
        split = load_or_build(dataset, args.size, cache)
        hit_s = time.perf_counter() - start
        cached_loader = torch.utils.data.DataLoader(CachedImages(split), collate_fn=collate_fetched, **loader_kw)
        cached = time_epochs(cached_loader, args.epochs)
        cached_cpu = time_epochs(cached_loader, args.epochs, convert=True)
        cache_mb = sum(p.stat().st_size for p in (cache / "images").glob("*.npy")) / 2**20
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    n, s = len(dataset), args.size
    naive_mean, tuned_mean = float(np.mean(naive)), float(np.mean(tuned))
    cached_mean, cpu_mean = float(np.mean(cached)), float(np.mean(cached_cpu))
    fmt = lambda ts: ", ".join(f"{t:.2f}" for t in ts)  # noqa: E731
    lines = [
        "| step | seconds | images / s |",
        "|---|---:|---:|",
        f"| (a) decode JPEG + torch resize of the float tensor, one epoch (mean of {len(naive)}: {fmt(naive)}) | {naive_mean:.2f} | {n / naive_mean:,.0f} |",
        f"| (a') decode JPEG + PIL resize of the uint8 image, one epoch (mean of {len(tuned)}: {fmt(tuned)}) | {tuned_mean:.2f} | {n / tuned_mean:,.0f} |",
        f"| (b) cache build: decode + resize once into the memmap (one-off) | {build_s:.2f} | {n / build_s:,.0f} |",
        f"| (b) cache hit: `load_or_build` on a built cache | {hit_s:.3f} | |",
        f"| (b) one epoch from the memmap, uint8 batches (mean of {len(cached)}: {fmt(cached)}) | {cached_mean:.3f} | {n / cached_mean:,.0f} |",
        f"| (b) the same plus the uint8 -> float conversion on the CPU (mean of {len(cached_cpu)}: {fmt(cached_cpu)}) | {cpu_mean:.3f} | {n / cpu_mean:,.0f} |",
        "",
        f"**Epoch-time ratio (a) / (b): {naive_mean / cached_mean:.0f}x** -- {tuned_mean / cached_mean:.0f}x against the "
        f"tuned decode-every-epoch loader (a'), and {naive_mean / cpu_mean:.1f}x when the float conversion, which "
        "the training loop runs on the training device (`bench.data.augment`), is paid on this CPU too. "
        f"The one-off build costs {build_s / naive_mean:.2f} naive epochs, so the cache pays for itself "
        "within the second epoch, and later runs and seeds that share the split and size reuse it for free.",
    ]
    table = "\n".join(lines)
    command = "python -m bench.perf.input_cache " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    details = (
        f"- Data: {n} generated photo-like JPEGs (quality 90, 256-500 px per side, geometric-mean side "
        f"{mean_px:.0f} px, {jpeg_mb:.1f} MiB in all; generated in {generate_s:.1f} s), read as a `folder` dataset.\n"
        f"- Size S = {s} px; batch size {args.batch_size}; DataLoader workers {args.workers}; shuffled; "
        f"torch threads {args.threads}; {args.epochs} epoch(s) each. Cache on disk: {cache_mb:.1f} MiB (uint8 [{n}, {s}, {s}, 3]).\n"
        f"- Machine: {machine()}.\n"
        f"- Command: `{command.strip()}`"
    )
    return table, details


DOC_NOTES = """## Reading the numbers

- All loaders run in one process with one torch thread, so these are per-core rates. DataLoader
  workers multiply (a) by roughly the number of free cores; the cache makes them unnecessary.
- A uint8 epoch from the memmap moves ~150 KB per image from the page cache; after that the float
  conversion dominates on a CPU. The training loop converts (and augments) whole batches on the
  training device (`bench.data.augment`), so on a GPU the loader's cost is the uint8 row.
- The build decodes each JPEG once at full size; later runs (other heads, seeds, recipes at the
  same image size) find the cache by key and skip it (the "cache hit" row).
- Timings come from a machine shared with other jobs: expect some run-to-run spread; rerun the
  command to refresh this page.
"""

DOC_HEAD = """# The decoded-image cache: how much it saves

Every split is decoded and resized ONCE into a memory-mapped uint8 array (`bench/data/image_cache.py`,
key = dataset, split, size and the source files' sizes and mtimes); later epochs, seeds and runs
read the array instead of decoding JPEGs, and augmentation runs on the cached tensors.

Measured with `bench/perf/input_cache.py` (`python -m bench.perf.input_cache`), which generates a folder of
photo-like JPEGs with a `train.csv` manifest in a temporary folder and times one epoch of reading
every image at S x S:

- (a) the naive loader: the dataset's `__getitem__` (PIL decode at native size -> float tensor),
  then an antialiased bilinear resize to S x S, through a `DataLoader`;
- (a') a tuned decode-every-epoch loader: `load_image`, then PIL's bilinear resize of the uint8 image
  (the cache build's own per-image work);
- (b) `bench.data.image_cache.load_or_build` (build time reported separately, then a cache hit), then a
  `DataLoader` of `CachedImages` over the memmap: uint8 batches as the training loop receives them
  (it converts them to float on the training device), and again with that conversion on the CPU.

"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.perf.input_cache", description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000, help="number of generated JPEGs (default 2000)")
    parser.add_argument("--size", type=int, default=224, help="cached / resized side S (default 224)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs timed per loader (default 2)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers for every loader (default 0)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads in the main process (default 1, as in DataLoader workers)")
    parser.add_argument("--keep", default="", help="keep the generated data in this folder (reused if present)")
    parser.add_argument("--out", default=str(PROJECT_ROOT / "docs" / "input-cache.md"),
                        help="markdown file to write ('-': stdout only)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    table, details = run(args)
    print(table + "\n\n" + details)
    if args.out != "-":
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(DOC_HEAD + "## Result\n\n" + table + "\n\n## How it was measured\n\n" + details + "\n\n" + DOC_NOTES)
        print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
