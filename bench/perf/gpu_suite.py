"""``python -m bench.perf --suite gpu``: the speed measurements that need a GPU (at most ~8 minutes on one).

Never needed by the tests. ``--dry-run`` prints the plan and checks that every piece resolves (on
any machine, in seconds); ``--smoke`` runs every step at toy sizes on whatever device there is (the
CPU path a test exercises). On a GPU, with the defaults:

1. **Data**: synthetic images at 448 px with the class count of the paper grid's first dataset
   (``configs/full.toml``; its own ``write_sample`` builds it, so no dataset is named here), held by
   a private dataset registered for the run. Training reads the decoded-image cache, so the speed
   does not depend on the on-disk layout; images are generated, not downloaded.
2. **Finetune throughput** for each backbone (default ``timm:resnet50``, ``timm:resnet101``: timm's
   ResNets run in ``channels_last``, see ``bench.models.backbones.TimmFeatures``) with bf16
   autocast: the harness's training epoch (``bench.engine.trainer.Trainer.run_epoch``, GPU
   augmentation from the uint8 cache, the reference head, the paper recipe's optimizer and
   schedule) against the bare forward + backward of the same model on a batch already on the GPU
   (the limit), and the bare forward + backward + optimizer step.
3. **The frozen head group**: ``--heads`` head configurations spread over the paper grid's heads,
   ``protocol = "frozen"`` on the first backbone's cached features, one at a time vs together
   (``[run] heads_together``), wall and training time.
4. **The report's bootstrap** (``bench.eval.bootstrap.paired_bootstrap``, which runs its block
   arithmetic on the GPU when there is one) on synthetic scores of ``--bootstrap-images`` x
   ``--bootstrap-classes`` for 3 seed pairs.

Results go into their own section of ``docs/performance.md`` (``--out``).
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from PIL import Image

from bench.api import registry
from bench.api.dataset import MultiLabelDataset
from bench.config.grid import CONFIG_DIR, Cell, Grid, load_grid, with_sources
from bench.config.recipe import resolve_recipe
from bench.config.run_options import RunOptions
from bench.core.paths import cache_dir
from bench.data import image_cache
from bench.data.augment import augment
from bench.data.batched_arrays import array_loader
from bench.models.backbones import build_backbone
from bench.models.classifier import Classifier
from bench.perf.grids import scratch_cache
from bench.perf.harness import harness_trainer
from bench.perf.together import evenly, run_rows, training_seconds
from bench.perf.training import DOC, EMBEDDED_GRID, PAPER_GRID, device_name, reference_and_hparams, write_section

SECTION = "gpu-suite"
SYNTHETIC = "_gpu_suite_synthetic"


# ----------------------------------------------------------------------------------------------
# Synthetic data
# ----------------------------------------------------------------------------------------------


def paper_dataset_classes() -> tuple[str, int]:
    """The paper grid's first dataset and its class count, from the dataset's own tiny sample."""
    with open(CONFIG_DIR / f"{PAPER_GRID}.toml", "rb") as f:
        name = tomllib.load(f)["datasets"][0]["name"]
    cls = registry.dataset_class(name)
    with tempfile.TemporaryDirectory() as root:
        options = cls.write_sample(Path(root))
        root_arg = root if getattr(cls, "needs_root", False) else None
        sample = registry.build_dataset(name, root_arg, cls.train_split, **(options or {}))
        return name, len(sample.classes)


class SyntheticImages(MultiLabelDataset):
    """Smooth random colour fields of ``image_size`` px with random labels (about 1.5 per image):
    a stand-in with the size and class count of the paper data. Registered under a private name
    for the duration of the suite only."""

    def __init__(self, root: Any = None, split: str = "train", *, num_train: int = 1024, num_test: int = 512,
                 image_size: int = 448, num_classes: int = 20, seed: int = 0) -> None:
        self.split = split
        self.count = num_train if split == "train" else num_test
        self.size, self.seed = image_size, seed + (0 if split == "train" else 1)
        self.classes = [f"class_{i:02d}" for i in range(num_classes)]
        rng = np.random.default_rng(self.seed)
        self.targets = (rng.random((self.count, num_classes)) < 1.5 / num_classes).astype(np.uint8)
        self.targets[np.arange(self.count), rng.integers(0, num_classes, self.count)] = 1
        self.ignore = np.zeros(self.targets.shape, dtype=bool)

    def load_image(self, index: int) -> np.ndarray:
        rng = np.random.default_rng((self.seed, index))
        coarse = rng.integers(0, 256, size=(6, 6, 3), dtype=np.uint8)
        return np.asarray(Image.fromarray(coarse).resize((self.size, self.size), Image.BICUBIC))

    def fingerprint(self) -> str:
        return f"gpu-suite-synthetic-v1 {self.split} {self.count} {self.size} {len(self.classes)} {self.seed}"

    def image_id(self, index: int) -> str:
        return f"{self.split}_{index:06d}"


def register_synthetic() -> None:
    if SYNTHETIC not in registry.list_datasets():
        registry.register_dataset(SYNTHETIC)(SyntheticImages)


# ----------------------------------------------------------------------------------------------
# Measurements
# ----------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def finetune_throughput(accelerator: Accelerator, backbone_name: str, options: dict[str, Any], recipe: Any, steps: int) -> dict[str, Any]:
    """Images/s of the harness's training epoch vs the bare forward + backward of the same model."""
    device = accelerator.device
    dataset = registry.build_dataset(SYNTHETIC, None, "train", **options)
    split = image_cache.load_or_build(dataset, recipe.image_size, cache_dir())
    reference, reference_hparams = reference_and_hparams()

    def model() -> Classifier:
        set_seed(0)
        backbone = build_backbone(backbone_name)
        head = registry.build_head(reference, backbone.out_channels, len(dataset.classes), **reference_hparams)
        return Classifier(backbone, head)

    # the harness: the trainer's epoch, as a finetuned cell's job runs it (bench.engine.trainer)
    harness = model()
    loader = array_loader(image_cache.CachedImages(split), batch_size=recipe.batch_size, shuffle=True, generator=torch.Generator().manual_seed(0))
    per_epoch = len(loader)
    cell = Cell(SYNTHETIC, options, "train", "test", backbone_name, None, reference, reference_hparams, recipe, 0)

    def prepare(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return augment(images.to(device), recipe.augment, generator, recipe.crop_scale_min)

    trainer = harness_trainer(cell, harness, image_cache.CachedImages(split), prepare, accelerator)
    trainer.build(per_epoch)
    loader = accelerator.prepare(loader)
    generator = torch.Generator().manual_seed(0)  # augmentation draws on the CPU, as in a run
    trainer.run_epoch(loader, generator)  # warm-up (cuDNN autotune)
    seconds, images_seen, _losses = trainer.run_epoch(loader, generator)
    harness_ips = images_seen / seconds
    del harness, trainer, loader
    accelerator.free_memory()

    # the limit: the same model, a batch already on the device, channels_last, bf16 autocast
    bare = model().to(device).train()
    bare_optimizer = torch.optim.SGD([p for p in bare.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
    batch = recipe.batch_size // accelerator.num_processes
    images = torch.rand(batch, 3, recipe.image_size, recipe.image_size, device=device).contiguous(memory_format=torch.channels_last)
    targets = (torch.rand(batch, len(dataset.classes), device=device) < 0.1).float()
    bce = torch.nn.BCEWithLogitsLoss()

    def run(with_step: bool) -> float:
        for i in range(steps + 2):  # two warm-up steps
            if i == 2:
                _sync(device)
                start = time.perf_counter()
            with accelerator.autocast():
                loss = bce(bare(images).float(), targets)
            loss.backward()
            if with_step:
                bare_optimizer.step()
            bare_optimizer.zero_grad(set_to_none=True)
        _sync(device)
        return steps * batch / (time.perf_counter() - start)

    fwd_bwd, with_step = run(False), run(True)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
    return {"backbone": backbone_name, "batch": recipe.batch_size, "image_size": recipe.image_size, "steps_per_epoch": per_epoch,
            "harness_ips": harness_ips, "bare_ips": fwd_bwd, "bare_step_ips": with_step, "ratio": harness_ips / fwd_bwd, "peak_mib": peak}


def head_configs(count: int) -> list[tuple[str, dict[str, Any]]]:
    """``count`` trained head configurations spread evenly over the paper grid's heads."""
    configs = [(n, hp) for n, hp in load_grid(PAPER_GRID).head_configs if getattr(registry.head_class(n), "derived_from", None) is None]
    cells = [Cell(dataset="", dataset_options={}, train_split="", test_split="", backbone="", weights=None, head=n, hparams=hp,
                  recipe=resolve_recipe({}, "gpu suite"), seed=0) for n, hp in configs]
    return [(c.head, c.hparams) for c in evenly(cells, count)]


def frozen_group(accelerator: Accelerator, backbone_name: str, options: dict[str, Any], recipe: Any, heads: int, epochs: int) -> dict[str, Any]:
    """``heads`` heads on cached frozen features: one at a time vs together."""
    full_options = {**registry.dataset_options(SYNTHETIC), **options}
    frozen = recipe.replace(protocol="frozen", augment="none", epochs=epochs)
    cells = [
        Cell(dataset=SYNTHETIC, dataset_options=full_options, train_split="train", test_split="test", backbone=backbone_name, weights=None,
             head=name, hparams={**registry.head_hparams(name), **hp}, recipe=frozen, seed=0)
        for name, hp in head_configs(heads)
    ]
    grid = Grid(name="gpu-suite", path=Path("gpu-suite"), description="", cells=with_sources(cells),
                run=RunOptions(save_weights="head", checkpoint="none"))
    warm = copy.deepcopy(grid)
    warm.cells = warm.cells[:1]
    warm.cells[0].recipe = frozen.replace(epochs=1)
    warm.run = warm.run.replace(heads_together=False)
    run_rows(warm, accelerator)  # features computed and cached before timing
    out = {}
    for together in (False, True):
        timed = copy.deepcopy(grid)
        timed.run = timed.run.replace(heads_together=together)
        seconds, rows = run_rows(timed, accelerator)
        out["together" if together else "alone"] = (seconds, training_seconds(rows))
    return {"heads": len(cells), "backbone": backbone_name, "epochs": epochs, "alone_s": out["alone"][0], "together_s": out["together"][0],
            "alone_train_s": out["alone"][1], "together_train_s": out["together"][1], "ratio": out["alone"][0] / out["together"][0]}


def bootstrap_timing(images: int, classes: int, resamples: int, seeds: int = 3) -> dict[str, Any]:
    """Seconds of the report's paired bootstrap (head vs reference, ``seeds`` seed pairs)."""
    from bench.eval.bootstrap import RunScores, paired_bootstrap
    from bench.eval.resampling import report_device

    rng = np.random.default_rng(0)
    targets = (rng.random((images, classes)) < 0.03).astype(np.uint8)
    ids = [f"{i:07d}" for i in range(images)]
    names = [f"c{i}" for i in range(classes)]

    def run(shift: float) -> RunScores:
        scores = np.clip(targets * shift + rng.random((images, classes), dtype=np.float32), 0, 1).astype(np.float32)
        return RunScores(ids, scores, targets, np.zeros_like(targets, dtype=bool), names)

    heads, bases = [run(0.35) for _ in range(seeds)], [run(0.3) for _ in range(seeds)]
    paired_bootstrap(heads[:1], bases[:1], n_resamples=min(resamples, 20))  # warm-up
    start = time.perf_counter()
    result = paired_bootstrap(heads, bases, n_resamples=resamples)
    return {"images": images, "classes": classes, "resamples": resamples, "seeds": seeds, "seconds": time.perf_counter() - start,
            "device": str(report_device()), "delta": result.delta, "low": result.low, "high": result.high}


# ----------------------------------------------------------------------------------------------
# Plan, report, entry point
# ----------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.perf --suite gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(DOC), help=f"markdown report ('-': print only) [{DOC}]")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and check that it resolves; measure nothing")
    parser.add_argument("--smoke", action="store_true", help="every step at toy sizes on this device (a check of the code, not a measurement)")
    parser.add_argument("--backbones", default="timm:resnet50,timm:resnet101", help="backbones of the finetune throughput [timm:resnet50,timm:resnet101]")
    parser.add_argument("--image-size", type=int, default=448, help="image side in px [448]")
    parser.add_argument("--images", type=int, default=1024, help="synthetic training images [1024]")
    parser.add_argument("--test-images", type=int, default=512, help="synthetic test images [512]")
    parser.add_argument("--batch", type=int, default=64, help="global batch of the finetune throughput [64]")
    parser.add_argument("--steps", type=int, default=20, help="timed steps of the bare forward + backward [20]")
    parser.add_argument("--heads", type=int, default=45, help="heads of the frozen group [45]")
    parser.add_argument("--group-epochs", type=int, default=2, help="epochs of the frozen group runs [2]")
    parser.add_argument("--bootstrap-images", type=int, default=40_000, help="test images of the bootstrap [40000]")
    parser.add_argument("--bootstrap-classes", type=int, default=80, help="classes of the bootstrap [80]")
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples [1000]")
    return parser


def plan(args: argparse.Namespace) -> dict[str, Any]:
    """What the suite will run, with every name resolved (raises when one does not)."""
    if args.smoke:
        embedded = load_grid(EMBEDDED_GRID).cells[0]
        args.backbones, args.image_size, args.images, args.test_images = embedded.backbone, 32, 32, 16
        args.batch, args.steps, args.heads, args.group_epochs = 8, 2, 3, 1
        args.bootstrap_images, args.bootstrap_classes, args.resamples = 300, 10, 20
    backbones = [b for b in args.backbones.split(",") if b]
    unknown = [b for b in backbones if not registry.is_known_backbone(b)]
    if unknown:
        raise SystemExit(f"--backbones: unknown backbone(s) {', '.join(unknown)}; valid: {registry.describe_backbone_names()}")
    dataset, classes = paper_dataset_classes()
    heads = head_configs(args.heads)
    return {"backbones": backbones, "dataset": dataset, "classes": classes, "heads": heads, "reference": reference_and_hparams()}


def render(machine: str, command: str, throughput: list[dict[str, Any]], group: dict[str, Any] | None, boot: dict[str, Any] | None,
           classes: int, dataset: str, precision: str = "bf16") -> str:
    """The GPU suite's section of docs/performance.md."""
    lines = [f"Measured by `{command}` on {machine} ({time.strftime('%Y-%m-%d %H:%M')}, torch {torch.__version__}); synthetic images with the",
             f"class count of `{dataset}` ({classes}).", ""]
    if throughput:
        t0 = throughput[0]
        lines += [
            f"### Finetune throughput, mixed precision {precision}, {t0['image_size']} px, batch {t0['batch']}", "",
            "| backbone | harness training epoch (img/s) | bare forward + backward (img/s) | harness / bare | bare + optimizer step (img/s) | peak memory (MiB) |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        lines += [f"| `{t['backbone']}` | {t['harness_ips']:.0f} | {t['bare_ips']:.0f} | **{100 * t['ratio']:.0f} %** | {t['bare_step_ips']:.0f} | {t['peak_mib']:.0f} |"
                  for t in throughput]
        lines.append("")
    if group:
        lines += [
            f"### {group['heads']} heads on cached frozen `{group['backbone']}` features, {group['epochs']} epoch{'s' if group['epochs'] != 1 else ''}", "",
            "| | one at a time (s) | together (s) | speed-up |", "|---|---:|---:|---:|",
            f"| wall | {group['alone_s']:.1f} | {group['together_s']:.1f} | **{group['ratio']:.1f}×** |",
            f"| training | {group['alone_train_s']:.1f} | {group['together_train_s']:.1f} | {group['alone_train_s'] / group['together_train_s']:.1f}× |", "",
        ]
    if boot:
        lines += [
            f"### The report's paired bootstrap on `{boot['device']}`", "",
            f"{boot['seeds']} seed pairs, {boot['images']:,} images x {boot['classes']} classes, {boot['resamples']} resamples: "
            f"**{boot['seconds']:.2f} s** (Δ = {boot['delta']:+.4f}, interval [{boot['low']:+.4f}, {boot['high']:+.4f}]).", "",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    steps = plan(args)
    command = ("python -m bench.perf --suite gpu " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    cuda = torch.cuda.is_available()
    print(f"gpu suite: device {'cuda: ' + torch.cuda.get_device_name(0) if cuda else 'cpu'}; backbones {', '.join(steps['backbones'])}; "
          f"{len(steps['heads'])} heads of configs/{PAPER_GRID}.toml; data: {args.images} + {args.test_images} synthetic images of "
          f"{args.image_size} px, {steps['classes']} classes (as {steps['dataset']}); reference head {steps['reference'][0]}; "
          f"bootstrap {args.bootstrap_images} x {args.bootstrap_classes}, {args.resamples} resamples", file=sys.stderr)
    if args.dry_run:
        return 0
    if not cuda and not args.smoke:
        print("gpu suite: no CUDA device here; run it where a GPU is lent (or use --smoke to check the code on this machine)", file=sys.stderr)
        return 2
    register_synthetic()
    accelerator = Accelerator(cpu=not cuda, mixed_precision="bf16" if cuda else "no", dataloader_config=DataLoaderConfiguration(split_batches=True))
    recipe = resolve_recipe({**_paper_recipe(), "image_size": args.image_size, "batch_size": args.batch, "epochs": 2,
                             "mixed_precision": "bf16" if cuda else "no", "eval_batch_size": max(args.batch, 64)}, "gpu suite")
    options = {"num_train": args.images, "num_test": args.test_images, "image_size": args.image_size, "num_classes": steps["classes"]}
    with scratch_cache():
        throughput = [finetune_throughput(accelerator, b, options, recipe, args.steps) for b in steps["backbones"]]
        group = frozen_group(accelerator, steps["backbones"][-1], options, recipe, args.heads, args.group_epochs)
    boot = bootstrap_timing(args.bootstrap_images, args.bootstrap_classes, args.resamples)
    text = render(device_name(accelerator.device), command, throughput, group, boot, steps["classes"], steps["dataset"], accelerator.mixed_precision)
    print(text)
    if args.out != "-":
        write_section(Path(args.out), SECTION, "GPU suite (`python -m bench.perf --suite gpu`)", text)
    return 0


def _paper_recipe() -> dict[str, Any]:
    """The paper grid's ``[recipe]`` table (its preset resolved by ``resolve_recipe``)."""
    with open(CONFIG_DIR / f"{PAPER_GRID}.toml", "rb") as f:
        return dict(tomllib.load(f).get("recipe", {}))


if __name__ == "__main__":
    sys.exit(main())
