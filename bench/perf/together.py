"""``--only together``: heads trained together in one pass on a frozen backbone (a job of
several members, bench.engine.trainer) vs one at a time, in one process run (sections of
``docs/performance.md``; the measurements are described in bench.perf.training's docstring)."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn

from bench.config.grid import Cell, Grid, load_grid
from bench.data.batched_arrays import array_loader
from bench.engine.losses import make_loss
from bench.engine.optim import make_optimizer
from bench.models.classifier import Classifier
from bench.perf.grids import changed, grid_warmup, run_timed, scratch_cache, timed_grid

#: the shipped grid the measurements read their heads, data and backbones from
EMBEDDED_GRID = "full-embedded"

TOGETHER = "heads-together"


def _trained_heads(grid: Grid) -> list[Cell]:
    """The first seed's cells that train (derived heads left out), in grid order."""
    seed = min(c.seed for c in grid.cells)
    return [c for c in grid.cells if c.seed == seed and c.source_run_id is None]


def evenly(cells: list[Cell], n: int) -> list[Cell]:
    """``n`` of ``cells`` spread evenly over the list (first and last included), so every head
    family of a grid is represented in proportion."""
    if n >= len(cells):
        return list(cells)
    if n == 1:
        return [cells[0]]
    return [cells[round(i * (len(cells) - 1) / (n - 1))] for i in range(n)]


def run_rows(grid: Grid, accelerator: Accelerator) -> tuple[float, Any]:
    """Wall time of running ``grid`` into a scratch results folder, and its rows."""
    seconds, _, rows = run_timed(grid, accelerator)
    return seconds, rows


def training_seconds(rows: Any) -> float:
    """Seconds spent in training epochs: per run alone, per shared pass together (each pass once)."""
    seen, total = set(), 0.0
    for _, row in rows.iterrows():
        if row["status"] != "finished" or not (row["train_images_per_s"] > 0):
            continue  # derived heads do not train
        shared = row["trained_with"]
        if isinstance(shared, dict):
            if shared["id"] in seen:
                continue
            seen.add(shared["id"])
        total += row["epochs"] * row["train_images"] / row["train_images_per_s"]
    return total


def group_epoch_seconds(rows: Any) -> float:
    """One training epoch of the (largest) shared pass in ``rows``."""
    shared = [r for _, r in rows.iterrows() if isinstance(r["trained_with"], dict)]
    if not shared:
        raise RuntimeError("no row was trained together")
    row = max(shared, key=lambda r: r["trained_with"]["size"])
    return row["train_images"] / row["train_images_per_s"]


def _both_ways(grid: Grid, change: Callable[[Cell], None], accelerator: Accelerator) -> dict[str, Any]:
    """``grid`` (after ``change``) one head at a time, then together: wall and training seconds."""
    alone, together = changed(grid, change, together=False), changed(grid, change, together=True)
    alone_s, alone_rows = run_rows(alone, accelerator)
    together_s, together_rows = run_rows(together, accelerator)
    trained = together_rows[together_rows["train_images_per_s"].notna()]
    sizes = sorted({r["size"] for r in trained["trained_with"] if isinstance(r, dict)})
    return {
        "runs": len(together_rows), "heads": len(trained), "passes": sizes,
        "alone_s": alone_s, "together_s": together_s, "ratio": alone_s / together_s,
        "alone_train_s": training_seconds(alone_rows), "together_train_s": training_seconds(together_rows),
        "group_epoch_s": group_epoch_seconds(together_rows) if sizes else float("nan"), "grid": together,
    }


@torch.no_grad()
def _feature_pass(trunk: Classifier, inputs: Any, loader: Any, accelerator: Accelerator, frozen_protocol: bool) -> tuple[float, list[tuple[torch.Tensor, torch.Tensor]]]:
    """One pass of what a group does once per batch: read the batch (cached features) or augment
    it and run the frozen backbone; its seconds and every (features, targets) batch."""
    device = accelerator.device
    augmenter = torch.Generator().manual_seed(0)
    kept = []
    _sync(device)
    start = time.perf_counter()
    for x, y, _ in loader:
        with accelerator.autocast():
            batch = inputs.prepare_train(x, augmenter)
            feats = batch.float() if frozen_protocol else trunk.features(batch)
        kept.append((feats, y.to(device)))
    _sync(device)
    return time.perf_counter() - start, kept


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _heads_alone(heads: list[nn.Module], recipes: list[Any], kept: list[tuple[torch.Tensor, torch.Tensor]], loss_fn: nn.Module,
                 accelerator: Accelerator) -> tuple[float, float]:
    """Seconds of each head's own forward + backward, and of its optimizer step, over the batches
    ``kept``, head after head (summed over heads)."""
    device = accelerator.device
    fwd_bwd = step = 0.0
    for head, recipe in zip(heads, recipes):
        optimizer = make_optimizer(None, head, recipe)
        for feats, targets in kept:
            _sync(device)
            t0 = time.perf_counter()
            with accelerator.autocast():
                logits = head(feats)
            loss_fn(logits.float(), targets.float()).backward()
            _sync(device)
            t1 = time.perf_counter()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            _sync(device)
            fwd_bwd += t1 - t0
            step += time.perf_counter() - t1
    return fwd_bwd, step


def measure_limit(grid: Grid, accelerator: Accelerator, batches: int = 8, repeats: int = 3) -> dict[str, Any]:
    """(d): a group's training epoch against its floor, timed interleaved on the same batches.

    On the first ``batches`` batches of the training split, ``repeats`` times in turn: (1) the
    pass's real training epoch (``bench.engine.trainer.Trainer.run_epoch``: loader, features once
    per batch, every head, the backward, each head's optimizer step, its per-step checks); (2) one pass of the
    loader with the frozen backbone (or the feature read) alone; (3) each head's own forward +
    backward on those same feature batches, head after head (their optimizer steps timed apart).
    The ratio (1) / ((2) + (3)) is the median over the repeats; the seconds are per full epoch
    (scaled by its steps / ``batches``). Interleaving keeps a machine's changing load out of the ratio.
    """
    import dataclasses

    from bench.data.batched_arrays import ArrayItems
    from bench.engine.data_store import DataStore
    from bench.engine.job import JobRun
    from bench.engine.jobs import Job
    from bench.engine.outcomes import GridSummary
    from bench.engine.trainer import Trainer
    from bench.perf.harness import quiet_context

    cells = [c for c in grid.cells if c.source_run_id is None]
    first = cells[0]
    recipe = first.recipe
    ctx = quiet_context(accelerator, grid, DataStore(accelerator))
    # the job's own setup: backbone and heads drawn as in a run, inputs, model selection
    members, trunk, _data = JobRun(Job("perf", cells), ctx, False, GridSummary()).setup([(c, None) for c in cells])
    inputs = trunk.inputs
    frozen_protocol = recipe.protocol == "frozen"
    steps_per_epoch = -(-len(inputs.train) // recipe.batch_size)
    rows = min(len(inputs.train), batches * recipe.batch_size)
    full = inputs.train
    subset = ArrayItems(full.data[:rows], full.targets[:rows], full.ignore[:rows])
    inputs = dataclasses.replace(inputs, train=subset)
    trunk = dataclasses.replace(trunk, inputs=inputs)
    loader = accelerator.prepare(array_loader(subset, batch_size=recipe.batch_size, shuffle=True, generator=torch.Generator().manual_seed(0)))
    trainer = Trainer(members, trunk, ctx)
    trainer.build(steps_per_epoch)
    loss_fn = make_loss(recipe)
    # separate copies for the heads alone, so the group's heads are not touched between its epochs
    alone = [copy.deepcopy(m.head) for m in members]
    trainer.run_epoch(loader, torch.Generator().manual_seed(0))  # warm-up
    measured = []
    for r in range(repeats):
        group_s = trainer.run_epoch(loader, torch.Generator().manual_seed(r))[0]
        pass_s, kept = _feature_pass(trunk.model, inputs, loader, accelerator, frozen_protocol)
        fwd_bwd, step = _heads_alone(alone, [c.recipe for c in cells], kept, loss_fn, accelerator)
        measured.append((group_s, pass_s, fwd_bwd, step))
    scale = steps_per_epoch / len(loader)
    ratios = [g / (p + f) for g, p, f, _ in measured]
    best = sorted(range(repeats), key=lambda i: ratios[i])[repeats // 2]  # the repeat with the median ratio
    g, p, f, st = (v * scale for v in measured[best])
    accelerator.free_memory()
    return {"heads": len(cells), "steps": steps_per_epoch, "batches": len(loader), "repeats": repeats, "group_s": g, "pass_s": p,
            "heads_fwd_bwd_s": f, "heads_step_s": st, "limit_s": p + f, "ratio": ratios[best], "ratios": ratios}


def measure_together_augmented(accelerator: Accelerator, heads: int = 21, backbone: str = "resnet18", num_train: int = 1000,
                               epochs: int = 3) -> dict[str, Any]:
    """(a) and its (d): ``heads`` head configurations spread over the embedded grid, on a frozen
    ``backbone`` (random init) with the grid's flip augmentation: one at a time vs together."""
    base = load_grid(EMBEDDED_GRID)
    base.cells = evenly(_trained_heads(base), heads)

    def change(cell: Cell) -> None:
        cell.dataset_options = {**cell.dataset_options, "num_train": num_train}
        cell.backbone, cell.weights = backbone, None
        cell.recipe = cell.recipe.replace(protocol="finetune", freeze_backbone=True, augment="flip", epochs=epochs)

    with scratch_cache():
        timed_grid(grid_warmup(changed(base, change)), accelerator)  # images decoded before timing
        out = _both_ways(base, change, accelerator)
        out["limit"] = measure_limit(out.pop("grid"), accelerator)
    cell = base.cells[0]
    return {**out, "backbone": backbone, "num_train": num_train, "epochs": epochs, "image_size": cell.recipe.image_size,
            "batch_size": cell.recipe.batch_size, "augment": "flip"}


def measure_together_cached(accelerator: Accelerator, sizes: tuple[int, ...] = (1, 5, 22, 45)) -> dict[str, Any]:
    """(b), (c) and their (d): the embedded grid's heads (first seed) on cached frozen features,
    the whole grid and ``sizes`` heads spread over it, one at a time vs together."""
    base = load_grid(EMBEDDED_GRID)
    seed = min(c.seed for c in base.cells)
    base.cells = [c for c in base.cells if c.seed == seed]

    def change(cell: Cell) -> None:
        cell.recipe = cell.recipe.replace(protocol="frozen", freeze_backbone=False, augment="none")

    with scratch_cache():
        warm = changed(base, change)
        warm.cells = warm.cells[:1]
        warm.cells[0].recipe = warm.cells[0].recipe.replace(epochs=1)
        timed_grid(warm, accelerator)  # images decoded and features cached before timing
        full = _both_ways(base, change, accelerator)
        full["limit"] = measure_limit(full.pop("grid"), accelerator)
        growth = []
        trained = _trained_heads(base)
        for n in sizes:
            subset = copy.deepcopy(base)
            subset.cells = evenly(trained, n)
            row = _both_ways(subset, change, accelerator)
            row.pop("grid")
            growth.append({**row, "n": n})
    cell = base.cells[0]
    return {"full": full, "growth": growth, "backbone": cell.backbone, "num_train": cell.dataset_options.get("num_train"),
            "epochs": cell.recipe.epochs, "image_size": cell.recipe.image_size, "batch_size": cell.recipe.batch_size}


def _verdict_at_least(ratio: float, target: float) -> str:
    return "met" if ratio >= target else f"missed: {ratio:.2f}× of {target:g}×"


def render_together(machine: str, command: str, a: dict[str, Any] | None, cached: dict[str, Any] | None) -> str:
    """The generated part of the heads-together section of docs/performance.md."""
    lines = [f"Measured by `{command}` on {machine}, in one process run ({time.strftime('%Y-%m-%d %H:%M')}, torch {torch.__version__}).",
             "*Wall* is the whole grid (training, evaluation, per-run head latency / FLOPs measurements, result files); *training* is",
             "the time inside training epochs only (one at a time: summed over runs; together: summed over shared passes).", ""]
    if a:
        lines += [
            f"### (a) {a['heads']} heads on a frozen `{a['backbone']}`, {a['augment']} augmentation", "",
            f"{a['heads']} head configurations spread evenly over `configs/{EMBEDDED_GRID}.toml`'s heads, {a['num_train']} training images of",
            f"{a['image_size']} px, {a['epochs']} epochs, batch {a['batch_size']}; the backbone (random init) runs on every augmented batch.", "",
            "| | one at a time (s) | together (s) | speed-up | target |", "|---|---:|---:|---:|---|",
            f"| wall | {a['alone_s']:.1f} | {a['together_s']:.1f} | **{a['ratio']:.1f}×** | ≥ 4×: {_verdict_at_least(a['ratio'], 4)} |",
            f"| training | {a['alone_train_s']:.1f} | {a['together_train_s']:.1f} | {a['alone_train_s'] / a['together_train_s']:.1f}× | |", "",
        ]
    if cached:
        f = cached["full"]
        speed = f["ratio"]
        lines += [
            f"### (b) The `{EMBEDDED_GRID}` head grid on cached frozen features", "",
            f"Every cell of the grid's first seed ({f['runs']} runs, {f['heads']} trained, the others derived), `protocol = \"frozen\"` on",
            f"`{cached['backbone']}` features ({cached['num_train']} training images of {cached['image_size']} px, {cached['epochs']} epochs, batch {cached['batch_size']});",
            "features cached before timing.", "",
            "| | one at a time (s) | together (s) | speed-up | target |", "|---|---:|---:|---:|---|",
            f"| wall | {f['alone_s']:.1f} | {f['together_s']:.1f} | **{speed:.2f}×** | not slower: {'met' if speed >= 1 else 'missed'} |",
            f"| training | {f['alone_train_s']:.1f} | {f['together_train_s']:.1f} | {f['alone_train_s'] / f['together_train_s']:.2f}× | |", "",
            "### (c) Wall time against the number of heads in a group (cached features, as (b))", "",
            "| heads | one at a time (s) | together (s) | speed-up | training one at a time (s) | training together (s) | together, per head (s) |",
            "|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for g in cached["growth"]:
            lines.append(f"| {g['n']} | {g['alone_s']:.1f} | {g['together_s']:.1f} | {g['ratio']:.2f}× | {g['alone_train_s']:.1f} | "
                         f"{g['together_train_s']:.1f} | {g['together_s'] / g['n']:.2f} |")
        lines.append("")
    limits = [(f"(a) {a['heads']} heads, frozen `{a['backbone']}` + augmentation", a) for _ in [0] if a] + \
             [(f"(b) {cached['full']['heads']} heads, cached features", cached["full"]) for _ in [0] if cached]
    if limits:
        lim0 = limits[0][1]["limit"]
        lines += [
            "### (d) Distance to the limit", "",
            "A group's training epoch (the real `Trainer.run_epoch` of the pass: loader, features once per batch, every head, the backward,",
            "each head's optimizer step, its per-step checks) over its floor: one pass of the loader with the frozen backbone on the",
            "augmented batches (or one read of the cached features), plus each head's own forward and backward on the same",
            f"feature batches, head after head. Timed in turn on the first {lim0['batches']} batches, {lim0['repeats']} times (the repeat with the median",
            "ratio is shown, in seconds per full epoch), so the machine's changing load stays out of the ratio; the heads' own",
            "optimizer steps, timed the same way, are shown apart (the group takes them too). *Epoch in the run*: the group's",
            "epoch in the timed grid run above, for reference.", "",
            "| setting | group epoch (s) | backbone pass / feature read (s) | heads' forward + backward (s) | limit (s) | ratio | heads' optimizer steps (s) | epoch in the run (s) | target ≤ 1.5× |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for label, r in limits:
            lim = r["limit"]
            verdict = "met" if lim["ratio"] <= 1.5 else f"missed by {lim['ratio'] - 1.5:.2f}"
            lines.append(f"| {label} | {lim['group_s']:.2f} | {lim['pass_s']:.2f} | {lim['heads_fwd_bwd_s']:.2f} | {lim['limit_s']:.2f} | "
                         f"**{lim['ratio']:.2f}×** | {lim['heads_step_s']:.2f} | {r['group_epoch_s']:.2f} | {verdict} |")
        lines.append("")
    return "\n".join(lines)
