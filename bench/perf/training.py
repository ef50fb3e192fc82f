"""``python -m bench.perf``: measure the harness's speed claims in one process run; write a report.

Not a test: speed goals are measured here, as ratios of timings taken in the same run, on the
device picked automatically (CUDA if present, timings synchronised), and written to
``docs/performance.md`` with the machine and the command that reproduces them.

(a) the head grid of ``configs/full-embedded.toml`` under ``protocol = "frozen"`` (backbone run once,
    heads train on cached features) vs ``finetune`` with ``freeze_backbone = true`` (backbone
    recomputed for every head and epoch) — wall-time ratio (target >= 10x);
(b) the harness's training epoch (accelerate-prepared model, optimiser, scheduler, loader, per-step
    finiteness / stop check) vs a minimal hand-written PyTorch loop on the same model and data —
    overhead (target <= 5 %);
(c) each head's latency and FLOPs as a fraction of the backbone's, at ResNet-50 / 448 px with 80
    classes (target: CSRA H=8 adds < 3 % FLOPs);
(d) growth: wall time and peak memory against dataset size (frozen protocol), and metric computation
    time and memory at N = 100,000 with C = 80 and 1,000.

``--only together`` (its own section of the report, ``bench.engine.group``: a head group trained
in one pass on a frozen backbone), each one at a time vs together, in one process run:

(a) 21 head configurations spread over the embedded grid's heads, on a frozen ``resnet18`` with
    flip augmentation (1,000 images, 64 px, 3 epochs) — wall-time ratio (target >= 4x);
(b) the embedded grid's whole head grid on cached frozen features (target: not slower);
(c) wall time against the number of heads in a group (1, 5, 22, 45), cached features;
(d) the distance to the limit: a group's training epoch over one backbone pass (or one feature
    read) plus the heads' own forward and backward on the same batches, timed head by head
    (target within 1.5x).

The GPU measurements are ``python -m bench.perf --suite gpu`` (``bench.perf.gpu_suite``).
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from torch import nn

from bench.api.context import HeadContext
from bench.api.registry import PROJECT_ROOT, build_dataset, build_head, dataset_options, reference_head
from bench.config.grid import Cell, load_grid
from bench.config.recipe import resolve_recipe
from bench.data import image_cache
from bench.data.batched_arrays import array_loader
from bench.eval.head_cost import PeakMemory, flops_per_image, median_latency_ms
from bench.eval.metrics import multilabel_metrics
from bench.models.backbones import build_backbone
from bench.models.classifier import Classifier
from bench.perf.grids import changed, grid_warmup, scratch_cache, timed_grid, with_recipe
from bench.perf.harness import harness_trainer
from bench.perf.together import TOGETHER, measure_together_augmented, measure_together_cached, render_together

DOC = PROJECT_ROOT / "docs" / "performance.md"
#: the shipped grids the measurements read their heads, data and backbones from
EMBEDDED_GRID, PAPER_GRID = "full-embedded", "full"


def reference_and_hparams() -> tuple[str, dict[str, Any]]:
    """The reference head (the one every other is compared with) and its hyper-parameters."""
    found = reference_head()
    if found is None:
        raise RuntimeError("no registered head declares itself the reference (Head.reference)")
    return found


def make_accelerator() -> Accelerator:
    return Accelerator(cpu=not torch.cuda.is_available(), dataloader_config=DataLoaderConfiguration(split_batches=True))


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def measure_frozen_vs_finetune(
    accelerator: Accelerator, grid_name: str, epochs: int, num_train: int, seeds: int, backbone: str | None = None
) -> dict[str, Any]:
    """(a): the same head grid, frozen (features cached once) vs finetune with a frozen backbone."""
    grid = load_grid(grid_name)
    grid.cells = [c for c in grid.cells if c.seed in sorted({c.seed for c in grid.cells})[:seeds]]

    def resize(cell: Cell) -> None:
        cell.dataset_options = {**cell.dataset_options, "num_train": num_train}
        if backbone:
            cell.backbone, cell.weights = backbone, None

    grid = changed(grid, resize)
    common = {"epochs": epochs, "augment": "none"}
    frozen = with_recipe(grid, protocol="frozen", freeze_backbone=False, **common)
    finetune = with_recipe(grid, protocol="finetune", freeze_backbone=True, **common)
    with scratch_cache():
        # decode / generate the images first, so neither side pays for it
        timed_grid(grid_warmup(grid), accelerator)
        t_frozen, n = timed_grid(frozen, accelerator)
        t_finetune, _ = timed_grid(finetune, accelerator)
    cell = grid.cells[0]
    return {
        "grid": grid_name, "runs": n, "heads": len({(c.head, str(c.hparams)) for c in grid.cells}), "backbone": cell.backbone,
        "image_size": cell.recipe.image_size, "num_train": num_train, "epochs": epochs,
        "batch_size": cell.recipe.batch_size, "frozen_s": t_frozen, "finetune_s": t_finetune, "ratio": t_finetune / t_frozen,
    }


def measure_harness_overhead(accelerator: Accelerator, epochs: int, num_train: int, image_size: int = 64) -> dict[str, Any]:
    """(b): the harness's training epoch (``bench.engine.trainer.Trainer.run_epoch``: a pass of one
    member, per-step finiteness / failure / stop checks, its own random stream and schedule) vs a
    minimal loop, same model and data.

    Both see the same cached uint8 images through the same DataLoader, convert them to float the
    same way, use AdamW with the same learning rate and BCE; epochs alternate (harness, minimal,
    harness, ...) and the medians are compared.
    """
    embedded = load_grid(EMBEDDED_GRID).cells[0]  # the embedded dataset of the shipped grid
    with scratch_cache() as cache:
        options = {**embedded.dataset_options, "num_train": num_train, "num_test": 100, "image_size": image_size}
        dataset = build_dataset(embedded.dataset, split=embedded.train_split, **{k: v for k, v in options.items() if k in dataset_options(embedded.dataset)})
        images = image_cache.load_or_build(dataset, image_size, cache)
    recipe = resolve_recipe({
        "optimizer": "adamw", "lr": 1e-3, "lrp": 1.0, "weight_decay": 1e-4, "momentum": 0.9, "nesterov": False,
        "schedule": "cosine", "warmup_epochs": 1.0, "epochs": 2 * epochs, "loss": "bce", "step_size": 4, "gamma": 0.1,
    }, "bench.perf (b)")
    device = accelerator.device
    reference, reference_hparams = reference_and_hparams()

    def to_input(images_u8: torch.Tensor) -> torch.Tensor:
        return images_u8.to(device).permute(0, 3, 1, 2).float().div_(255.0)

    def model_and_loader() -> tuple[nn.Module, torch.utils.data.DataLoader]:
        set_seed(0)
        backbone = build_backbone(embedded.backbone)
        head = build_head(reference, backbone.out_channels, len(dataset.classes), **reference_hparams)
        loader = array_loader(image_cache.CachedImages(images), batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))
        return Classifier(backbone, head), loader

    model, loader = model_and_loader()
    cell = Cell(embedded.dataset, options, embedded.train_split, embedded.test_split, embedded.backbone, None, reference, reference_hparams, recipe, 0)
    trainer = harness_trainer(cell, model, image_cache.CachedImages(images), to_input, accelerator)
    trainer.build(len(loader))
    loader = accelerator.prepare(loader)
    augmenter = torch.Generator()

    plain, plain_loader = model_and_loader()
    plain.to(device)
    plain_opt = torch.optim.AdamW(plain.parameters(), lr=1e-3, weight_decay=1e-4)
    bce = nn.BCEWithLogitsLoss()

    def minimal_epoch() -> float:
        plain.train()
        start = time.perf_counter()
        for x, y, _ in plain_loader:
            loss = bce(plain(to_input(x)), y.to(device))
            loss.backward()
            plain_opt.step()
            plain_opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    harness, minimal = [], []
    minimal_epoch()  # warm-up of both paths
    trainer.run_epoch(loader, augmenter)
    for _ in range(epochs):
        harness.append(trainer.run_epoch(loader, augmenter)[0])
        minimal.append(minimal_epoch())
    h, m = statistics.median(harness), statistics.median(minimal)
    accelerator.free_memory()
    return {"epochs": epochs, "num_train": num_train, "harness_s": h, "minimal_s": m, "overhead": h / m - 1.0, "harness_all": harness, "minimal_all": minimal}


def head_variants() -> list[tuple[str, dict[str, Any]]]:
    """The first and the last configuration of every head in the shipped paper grid
    (``configs/full.toml``, in its expansion order): each head family's range of sizes."""
    by_head: dict[str, list[dict[str, Any]]] = {}
    for name, hparams in load_grid(PAPER_GRID).head_configs:
        by_head.setdefault(name, []).append(hparams)
    out = []
    for name, configs in by_head.items():
        out += [(name, hp) for i, hp in enumerate(configs) if i in (0, len(configs) - 1) and (i == 0 or hp != configs[0])]
    return out


def measure_head_costs(device: torch.device, backbone_name: str = "resnet50", image_size: int = 448, num_classes: int = 80) -> dict[str, Any]:
    """(c): FLOPs and batch-1 latency of each head relative to the backbone's."""
    backbone = build_backbone(backbone_name).to(device).eval()
    image = torch.rand(1, 3, image_size, image_size, device=device)
    with torch.no_grad():
        shape = tuple(backbone(image).shape[1:])
    backbone_flops = flops_per_image(backbone, image)
    backbone_ms = median_latency_ms(backbone, image, repeats=5, warmup=1)
    rng = np.random.default_rng(0)
    targets = (rng.random((2000, num_classes)) < 0.05).astype(np.uint8)
    context = HeadContext.from_labels([f"class_{i}" for i in range(num_classes)], targets)
    rows = []
    feats = torch.rand(1, *shape, device=device)
    for name, hparams in head_variants():
        try:
            head = build_head(name, shape[0], num_classes, context, **hparams).to(device)
        except Exception as exc:  # a head not installed here
            rows.append({"head": name, "hparams": hparams, "error": str(exc)})
            continue
        flops = flops_per_image(head, feats)
        ms = median_latency_ms(head, feats, repeats=20, warmup=3)
        rows.append({"head": name, "hparams": hparams, "flops": flops, "latency_ms": ms, "flops_frac": flops / backbone_flops, "latency_frac": ms / backbone_ms})
    return {"backbone": backbone_name, "image_size": image_size, "feature_shape": shape, "num_classes": num_classes, "backbone_flops": backbone_flops, "backbone_ms": backbone_ms, "heads": rows}


def measure_growth(accelerator: Accelerator, sizes: list[int], epochs: int) -> list[dict[str, Any]]:
    """(d) first part: one frozen-protocol run per dataset size; its row's wall time and peak memory."""
    out = []
    for n in sizes:
        grid = load_grid(str(PROJECT_ROOT / "configs" / "smoke.toml"), heads=[reference_and_hparams()[0]])
        grid.cells = grid.cells[:1]

        def resize(cell: Cell, n: int = n) -> None:
            cell.dataset_options = {**cell.dataset_options, "num_train": n, "num_test": max(250, n // 4)}
            cell.recipe = cell.recipe.replace(protocol="frozen", augment="none", epochs=epochs)

        grid = changed(grid, resize)
        with scratch_cache():
            first = grid.cells[0]
            build_dataset(first.dataset, split=first.train_split, **first.dataset_options)  # generation is not timed
            memory = PeakMemory(accelerator.device)
            memory.reset()
            seconds, _ = timed_grid(grid, accelerator)
            out.append({"num_train": n, "wall_s": seconds, "peak_mib": memory.peak_mib(), "memory_kind": memory.kind})
        gc.collect()
    return out


def measure_metric_growth(n: int = 100_000, classes: tuple[int, ...] = (80, 1000)) -> list[dict[str, Any]]:
    """(d) second part: ``multilabel_metrics`` time and peak memory at N x C."""
    out = []
    for c in classes:
        rng = np.random.default_rng(c)
        targets = (rng.random((n, c)) < 0.05).astype(np.uint8)
        scores = np.clip(targets * 0.3 + rng.random((n, c), dtype=np.float32) * 0.7, 0, 1).astype(np.float32)
        gc.collect()
        memory = PeakMemory(torch.device("cpu"))
        before = memory.peak_mib()
        memory.reset()
        start = time.perf_counter()
        multilabel_metrics(scores, targets)
        seconds = time.perf_counter() - start
        out.append({"N": n, "C": c, "seconds": seconds, "peak_mib": memory.peak_mib(), "inputs_mib": (scores.nbytes + targets.nbytes) / 2**20, "before_mib": before})
        del scores, targets
    return out


def _fmt_flops(value: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.2f} {unit}"
    return f"{value:.0f}"


def accelerate_check_ms(calls: int = 2000) -> float:
    """Milliseconds per ``accelerate.utils.is_lomo_available()`` call, which accelerate makes, uncached,
    in ``Accelerator.backward`` and ``AcceleratedOptimizer.step`` of every training step."""
    from accelerate.utils import is_lomo_available

    start = time.perf_counter()
    for _ in range(calls):
        is_lomo_available()
    return 1000 * (time.perf_counter() - start) / calls


def _frozen_analysis(a: list[dict[str, Any]]) -> list[str]:
    """Why the speed-up is what it is: the part of a run the frozen protocol cannot remove."""
    lines = []
    for r in a:
        per_run_frozen, per_run_finetune = r["frozen_s"] / r["runs"], r["finetune_s"] / r["runs"]
        steps = r["runs"] * r["epochs"] * -(-r["num_train"] // r["batch_size"])
        lines.append(
            f"- `{r['backbone']}`: a run costs {per_run_finetune:.2f} s recomputing the backbone and {per_run_frozen:.2f} s on cached "
            f"features ({1000 * r['frozen_s'] / steps:.1f} ms per training step over {steps} steps, evaluation and measurements included)."
        )
    if any(r["ratio"] < 10 for r in a):
        lines += [
            "",
            "Where the target is missed, the backbone is too cheap for caching to matter 10×: the frozen protocol removes only the",
            "backbone's forward pass, and what remains per run — the head's forward and backward on the feature maps, the",
            "optimizer step, evaluation, the per-run head latency / FLOPs measurements and the result writes — is then a large",
            "share of the finetune run as well. The speed-up grows with the backbone's cost; at the papers' resnet50 / resnet101",
            "at 448 px, where a head's FLOPs are a small fraction of the backbone's (section (c)), it is bounded by that fraction",
            "rather than by these fixed costs.",
        ]
    ms = accelerate_check_ms()
    lines += [
        "",
        f"Noticed in profiling: accelerate {_accelerate_version()} calls `is_lomo_available()` — an uncached `importlib` lookup, {ms:.2f} ms",
        "here — in both `Accelerator.backward` and `AcceleratedOptimizer.step`, so every training step pays about",
        f"{2 * ms:.2f} ms of it. On the cached-feature runs of `tiny_cnn` that is a visible share of a step; it is accelerate's code and",
        "is left as it is.",
    ]
    return lines


def _accelerate_version() -> str:
    import accelerate

    return accelerate.__version__


def _verdict_ratio(ratio: float, target: float) -> str:
    return "met" if ratio >= target else f"missed: {ratio / target:.0%} of the target, {target / ratio:.1f}× short"


def _verdict_percent(value: float, limit: float, relation: str) -> str:
    met = value <= limit if relation == "≤" else value < limit
    return "met" if met else f"missed by {value - limit:.2f} percentage points"


def render(machine: str, command: str, a: dict | None, b: dict | None, c: dict | None, growth: list | None, metric_growth: list | None) -> str:
    lines = ["# Performance", "", f"Measured by `{command}` on {machine}, in one process run", f"({time.strftime('%Y-%m-%d %H:%M')}, torch {torch.__version__}).", ""]
    lines += ["Ratios compare timings taken in the same run on the same machine; absolute numbers depend on the machine and its load.", ""]
    if a:
        first = a[0]
        lines += [
            "## (a) Frozen-feature protocol vs recomputing the backbone", "",
            f"The head grid of `configs/{first['grid']}.toml` ({first['heads']} head configurations, {first['runs']} runs) at {first['image_size']} px,",
            f"{first['num_train']} training images, {first['epochs']} epoch{'s' if first['epochs'] != 1 else ''} per run, no augmentation; images decoded before timing. The finetune side",
            "freezes the backbone (`freeze_backbone = true`) so both sides train the same parameters; the frozen side's time",
            "includes computing and caching the features.", "",
            "| backbone | finetune, backbone frozen: recomputed per head and epoch (s) | frozen: features computed once (s) | speed-up | target ≥ 10× |",
            "|---|---:|---:|---:|---|",
        ]
        lines += [
            f"| `{r['backbone']}` | {r['finetune_s']:.1f} | {r['frozen_s']:.1f} | **{r['ratio']:.1f}×** | {_verdict_ratio(r['ratio'], 10)} |"
            for r in a
        ]
        lines += ["", *_frozen_analysis(a), ""]
    if b:
        lines += [
            "## (b) Harness overhead over a minimal PyTorch loop", "",
            f"`tiny_cnn` + average-pool baseline, {b['num_train']} images of 64 px, batch 64, AdamW; median of {b['epochs']} alternating epochs each.", "",
            "| loop | epoch (s) |", "|---|---:|",
            f"| minimal hand-written loop | {b['minimal_s']:.3f} |",
            f"| harness `Trainer.run_epoch` (a pass of one member: schedule, per-step finiteness / failure / stop check) | {b['harness_s']:.3f} |",
            f"| **overhead** | **{100 * b['overhead']:+.1f} %** (target ≤ 5 %: {_verdict_percent(100 * b['overhead'], 5, '≤')}) |", "",
            f"All epochs (s) — harness: {', '.join(f'{x:.3f}' for x in b['harness_all'])}; minimal: {', '.join(f'{x:.3f}' for x in b['minimal_all'])}.", "",
        ]
    if c:
        lines += [
            f"## (c) Head cost relative to the backbone ({c['backbone']}, {c['image_size']} px, {c['num_classes']} classes)", "",
            f"Backbone: {_fmt_flops(c['backbone_flops'])}FLOPs, {c['backbone_ms']:.1f} ms per image (batch 1); feature map {list(c['feature_shape'])}.",
            "FLOPs from `torch.utils.flop_counter` (matrix products and convolutions; a multiply-add is 2 FLOPs).", "",
            "| head | hyper-parameters | FLOPs | % of backbone FLOPs | latency b1 (ms) | % of backbone latency |", "|---|---|---:|---:|---:|---:|",
        ]
        for r in c["heads"]:
            hp = ", ".join(f"{k}={v}" for k, v in r["hparams"].items()) or "defaults"
            if "error" in r:
                lines.append(f"| {r['head']} | {hp} | not measured: {r['error']} | | | |")
            else:
                lines.append(f"| {r['head']} | {hp} | {_fmt_flops(r['flops'])} | {100 * r['flops_frac']:.2f} % | {r['latency_ms']:.2f} | {100 * r['latency_frac']:.2f} % |")
        measured = [r for r in c["heads"] if "flops_frac" in r]
        if measured:
            top = max(measured, key=lambda r: r["flops_frac"])
            hp = ", ".join(f"{k}={v}" for k, v in top["hparams"].items()) or "defaults"
            lines += ["", f"The costliest head, {top['head']} ({hp}), adds **{100 * top['flops_frac']:.2f} %** FLOPs to {c['backbone']} "
                      f"at {c['image_size']} px (target < 3 %: {_verdict_percent(100 * top['flops_frac'], 3, '<')})."]
        lines.append("")
    if growth:
        lines += ["## (d) Growth with dataset size (frozen protocol, one run)", "", "| training images | wall time (s) | peak memory (MiB) |", "|---:|---:|---:|"]
        lines += [f"| {g['num_train']} | {g['wall_s']:.1f} | {g['peak_mib']:.0f} ({g['memory_kind']}) |" for g in growth]
        lines.append("")
    if metric_growth:
        lines += ["## (d) Metric computation (`multilabel_metrics`, vectorised)", "", "| N | C | seconds | peak memory (MiB) | inputs (MiB) |", "|---:|---:|---:|---:|---:|"]
        lines += [f"| {m['N']:,} | {m['C']} | {m['seconds']:.2f} | {m['peak_mib']:.0f} | {m['inputs_mib']:.0f} |" for m in metric_growth]
        lines.append("")
    return "\n".join(lines)


def write_section(path: Path, name: str, title: str, generated: str) -> None:
    """Put ``generated`` into section ``name`` of the markdown file ``path``, between its
    ``<!-- generated:NAME -->`` markers; text around them (in the section or elsewhere in the file)
    is kept. A missing section is appended as ``## title`` with the markers."""
    begin, end = f"<!-- generated:{name} -->", f"<!-- /generated:{name} -->"
    text = path.read_text() if path.is_file() else "# Performance\n"
    block = f"{begin}\n{generated.rstrip()}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + f"\n\n<!-- section:{name} -->\n## {title}\n\n{block}\n<!-- /section:{name} -->\n"
    path.write_text(text)


def kept_sections(text: str) -> str:
    """Every ``<!-- section:NAME -->`` ... ``<!-- /section:NAME -->`` block of ``text`` (sections other
    commands write), to be kept when the training sections rewrite the file."""
    import re

    return "\n\n".join(m.group(0) for m in re.finditer(r"<!-- section:([\w-]+) -->.*?<!-- /section:\1 -->", text, re.S))



def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.perf", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(DOC), help=f"markdown report [{DOC}]")
    parser.add_argument("--only", default="a,b,c,d,together",
                        help="comma list of sections to measure: a, b, c, d (the training sections) and 'together' (heads "
                             "trained together on a frozen backbone, its own section of the report) [a,b,c,d,together]")
    parser.add_argument("--grid", default="full-embedded", help="head grid for (a) [full-embedded]")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per run in (a) [3]")
    parser.add_argument("--num-train", type=int, default=1000, help="training images in (a) [1000]")
    parser.add_argument("--seeds", type=int, default=1, help="seeds of the grid used in (a) [1]")
    parser.add_argument("--backbone", default="grid,resnet18",
                        help="comma list of backbones for (a); 'grid' keeps the grid's own [grid,resnet18]")
    parser.add_argument("--sizes", default="1000,2000,4000,8000", help="dataset sizes for (d)")
    parser.add_argument("--together-heads", type=int, default=21, help="heads of the augmented group in 'together' (a) [21]")
    parser.add_argument("--together-backbone", default="resnet18", help="frozen backbone of 'together' (a) [resnet18]")
    parser.add_argument("--together-num-train", type=int, default=1000, help="training images in 'together' (a) [1000]")
    parser.add_argument("--together-epochs", type=int, default=3, help="epochs in 'together' (a) [3]")
    parser.add_argument("--together-sizes", default="1,5,22,45", help="group sizes of 'together' (c) [1,5,22,45]")
    parser.add_argument("--together-parts", default="augmented,cached",
                        help="'together' parts: augmented ((a) and its (d)), cached ((b), (c) and their (d)) [augmented,cached]")
    args = parser.parse_args(argv)
    only = set(args.only.split(","))
    unknown = only - {"a", "b", "c", "d", "together"}
    if unknown:
        parser.error(f"--only: unknown section(s) {', '.join(sorted(unknown))}; valid: a, b, c, d, together")
    accelerator = make_accelerator()
    machine = device_name(accelerator.device)
    print(f"measuring on {machine}", file=sys.stderr)
    command = ("python -m bench.perf " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    out = Path(args.out)
    if only & {"a", "b", "c", "d"}:
        backbones = [None if name == "grid" else name for name in args.backbone.split(",")]
        a = [measure_frozen_vs_finetune(accelerator, args.grid, args.epochs, args.num_train, args.seeds, name) for name in backbones] if "a" in only else None
        b = measure_harness_overhead(accelerator, epochs=5, num_train=2048) if "b" in only else None
        c = measure_head_costs(accelerator.device) if "c" in only else None
        growth = measure_growth(accelerator, [int(s) for s in args.sizes.split(",")], epochs=2) if "d" in only else None
        metric_growth = measure_metric_growth() if "d" in only else None
        text = render(machine, command, a, b, c, growth, metric_growth)
        print(text)
        if str(out) != "-":
            others = kept_sections(out.read_text()) if out.is_file() else ""  # sections other commands wrote
            out.write_text(text.rstrip() + ("\n\n" + others + "\n" if others else "\n"))
    if "together" in only:
        parts = set(args.together_parts.split(","))
        augmented = measure_together_augmented(
            accelerator, args.together_heads, args.together_backbone, args.together_num_train, args.together_epochs
        ) if "augmented" in parts else None
        cached = measure_together_cached(accelerator, tuple(int(n) for n in args.together_sizes.split(","))) if "cached" in parts else None
        text = render_together(machine, command, augmented, cached)
        print(text)
        if str(out) != "-":
            write_section(out, TOGETHER, "Heads trained together on a frozen backbone (`[run] heads_together`)", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
