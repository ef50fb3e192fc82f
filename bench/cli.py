"""Command line: ``run_bench.py [run] --grid NAME ...``, ``run_bench.py report``, ``run_bench.py evaluate``.

Usage errors (bad grid, unknown name, missing file) print one message and exit with status 2;
a grid in which some runs failed exits with status 1 after a one-line summary per failure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console

from bench.core.errors import UsageError, choices

if TYPE_CHECKING:  # imported lazily at run time: `--help` and `--list` stay fast
    from bench.engine.interrupt import StopRequest
    from bench.engine.runner import GridSummary

COMMANDS = ("run", "report", "evaluate")


def _csv(value: str) -> list[str]:
    """Comma-separated names; none at all (``--heads ,``) is an error, not "every name"."""
    names = [v.strip() for v in value.split(",") if v.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expects one or more comma-separated names, got {value!r}")
    return names


def _data_roots(pairs: list[str]) -> dict[str, str]:
    roots = {}
    for pair in pairs:
        name, sep, path = pair.partition("=")
        if not sep or not name or not path:
            raise UsageError(f"--data-root expects NAME=PATH (e.g. voc2007=/data/VOCdevkit/VOC2007), got {pair!r}")
        roots[name] = path
    return roots


def _run_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="run_bench.py", description="Train and evaluate every cell of a grid, then print the leaderboard.")
    p.add_argument("--grid", default="smoke", help="grid name (configs/NAME.toml) or path to a TOML file [smoke]")
    p.add_argument("--heads", type=_csv, help="only these heads (comma-separated)")
    p.add_argument("--datasets", type=_csv, help="only these datasets (comma-separated)")
    p.add_argument("--backbones", type=_csv, help="only these backbones (comma-separated)")
    p.add_argument("--results", default="results", help="results directory [results]")
    p.add_argument("--data-root", action="append", default=[], metavar="NAME=PATH", help="where dataset NAME lives (repeatable)")
    p.add_argument("--retry-failed", action="store_true", help="re-run only the runs recorded as failed")
    p.add_argument("--shard", default=None, metavar="K/N", help="run only every N-th cell family, starting with the K-th (1-based)")
    p.add_argument("--dry-run", action="store_true", help="list the expanded cells and skipped datasets; train nothing")
    p.add_argument("--list", action="store_true", help="list registered heads, datasets, backbones and grids")
    return p


def _report_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="run_bench.py report",
        description="Rebuild the leaderboard (markdown + plots, HTML, console) from result files alone; no training.",
    )
    p.add_argument("--results", action="append", default=None, metavar="DIR", help="results directory (repeat to merge several) [results]")
    p.add_argument("--out", default=None, metavar="DIR", help="where leaderboard.md, plots/ and report.html go [the first results dir]")
    p.add_argument("--format", action="append", default=None, metavar="FMT", help="md, html and/or console (repeatable or comma-separated) [all]")
    p.add_argument("--dataset", action="append", type=_csv, default=None, help="only these datasets (repeatable or comma-separated)")
    p.add_argument("--backbone", action="append", type=_csv, default=None, help="only these backbones (repeatable or comma-separated)")
    p.add_argument("--head", action="append", type=_csv, default=None, help="only these heads (repeatable or comma-separated); Δ mAP still uses the baseline runs")
    p.add_argument(
        "--resamples", type=int, default=None,
        help="paired-bootstrap resamples of the test images [auto: 1000, or more where a section's Holm family needs "
        "them to reach p < 0.05: 5000 for 55 configurations]",
    )
    p.add_argument("--bootstrap-seed", type=int, default=0, help="seed of the bootstrap resampling [0]")
    p.add_argument("--wide", action="store_true", help="console: every column (default: the main ones, fitted to the terminal)")
    return p


def _evaluate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="run_bench.py evaluate", description="Re-evaluate a finished run's saved weights; print its metrics as JSON.")
    p.add_argument("--run-id", required=True)
    p.add_argument("--results", default="results")
    p.add_argument("--data-root", default=None, help="the dataset's root, if it moved since the run")
    return p


def _make_accelerator(mixed_precision: str = "no"):
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    if mixed_precision == "fp16" and not torch.cuda.is_available():
        raise UsageError("recipe mixed_precision = 'fp16' needs a CUDA GPU; use 'bf16' or 'no' on a CPU")
    # cpu=True without a GPU: accelerate only forms a gloo group of CPU processes (torchrun-style
    # launch, `accelerate launch --multi_gpu --num_processes N`) when the Accelerator is told so.
    # split_batches: the recipe's batch size is global, so results do not depend on the process count.
    return Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=mixed_precision,
        dataloader_config=DataLoaderConfiguration(split_batches=True),
    )


def _list(console: Console) -> int:
    """Print what is registered; exit status 2 (after the list) when a plugin file failed to import."""
    from bench.api.registry import broken_plugins, head_hparams, list_backbones, list_datasets, list_heads
    from bench.config.grid import CONFIG_DIR

    with warnings.catch_warnings():  # the broken files are listed below, once
        warnings.simplefilter("ignore")
        heads, datasets = list_heads(), list_datasets()
    console.print("[bold]heads[/bold]: " + ", ".join(f"{h}({', '.join(head_hparams(h))})" for h in heads))
    console.print("[bold]datasets[/bold]: " + ", ".join(datasets))
    console.print("[bold]backbones[/bold]: " + ", ".join(list_backbones()))
    console.print("[bold]grids[/bold]: " + ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.toml") if p.stem != "recipes")))
    broken = [*broken_plugins("head").values(), *broken_plugins("dataset").values()]
    for text in broken:
        print(f"error: {text}", file=sys.stderr)
    return 2 if broken else 0


def _print_plan(grid, console: Console) -> None:
    """The grid's heads (configurations), backbones and seeds, and the cells of each dataset,
    including the datasets still waiting for a data root."""
    from collections import Counter

    def show(text: str) -> None:
        console.print(f"  {text}", soft_wrap=True, highlight=False)

    heads = Counter(h for h, _ in grid.head_configs)
    show(f"heads: {len(grid.head_configs)} configurations: " + ", ".join(f"{h} x{n}" for h, n in sorted(heads.items())))
    show(f"backbones: {', '.join(grid.backbones)}; seeds: {', '.join(map(str, grid.seeds))}")
    for name, n in Counter(c.dataset for c in grid.cells).items():
        show(f"{name}: {n} cells")
    for line in grid.skipped:
        show(line)


def cmd_run(argv: list[str]) -> int:
    args = _run_parser().parse_args(argv)
    console = Console(stderr=False)
    if args.list:
        return _list(console)
    from bench.config.grid import load_grid

    grid = load_grid(args.grid, heads=args.heads, datasets=args.datasets, backbones=args.backbones, data_roots=_data_roots(args.data_root))
    shard_text = ""
    if args.shard:
        from bench.config.grid import parse_shard, shard_cells

        shard, count = parse_shard(args.shard)
        grid.cells = shard_cells(grid.cells, shard, count)
        shard_text = f" (shard {shard}/{count})"
    if args.dry_run:
        console.print(f"grid {grid.name}{shard_text} ({grid.path}): {len(grid.cells)} cells", soft_wrap=True)
        _print_plan(grid, console)
        if grid.tune is not None:
            space = " x ".join(f"{k} {list(v)}" for k, v in grid.tune.space)
            console.print(f"  tune: {len(grid.tune.points())} points ({space}) for every head configuration x seed; chosen on "
                          f"validation mAP" + (f"; {len(grid.refits)} refit cells (run after their group's points)" if grid.refits else ""),
                          soft_wrap=True, highlight=False)
        for i, cell in enumerate(grid.cells):
            console.print(f"  {i + 1:4d}  {cell.run_id}  {cell.describe()}", soft_wrap=True, highlight=False)
        if grid.cells:
            from bench.engine.data_store import DataStore
            from bench.engine.runner import preflight

            preflight(grid, DataStore(_make_accelerator()))  # builds every dataset, backbone and head; trains nothing
            console.print("every dataset, backbone and head of these cells builds", soft_wrap=True)
        return 0
    if not grid.cells:
        for line in grid.skipped:
            console.print(line, soft_wrap=True, highlight=False)
        if grid.pending:
            from bench.config.grid import no_cells_error

            raise no_cells_error(grid)
        raise UsageError(f"{grid.path}: no cell to run")

    from bench.engine.interrupt import StopRequest
    from bench.engine.progress import Progress
    from bench.engine.runner import run_grid
    from bench.results import store as results

    accelerator = _make_accelerator(grid.cells[0].recipe.mixed_precision)
    main = accelerator.is_main_process
    results_dir = Path(args.results)
    if main:
        results.check_writable(results_dir)
        for line in grid.skipped:
            console.print(line, soft_wrap=True, highlight=False)
        console.print(f"grid {grid.name}{shard_text}: {len(grid.cells)} cells on {accelerator.num_processes} process(es), device {accelerator.device}")
    with StopRequest() as stop, Progress(enabled=main, console=console) as progress:
        summary = run_grid(grid, results_dir, accelerator, progress, stop, retry_failed=args.retry_failed)
    accelerator.wait_for_everyone()
    if main:
        _print_outcome(summary, stop, results_dir, console)
    # The launcher (torchrun) stops every process as soon as one exits non-zero: no process
    # leaves before the main one has written the report and printed (and flushed) the outcome.
    sys.stdout.flush()
    sys.stderr.flush()
    accelerator.wait_for_everyone()
    if summary.interrupted:
        return stop.exit_status
    return 1 if summary.failed else 0


def _print_outcome(summary: GridSummary, stop: StopRequest, results_dir: Path, console: Console) -> None:
    """Main process: the leaderboard (unless interrupted) and a one-line summary, one line per failure."""
    from bench import report

    if summary.interrupted:
        print(
            f"stopped by signal {stop.signal} after {summary.trained} run(s); everything finished is saved "
            "and the interrupted run resumes from its last epoch: run the same command again",
            file=sys.stderr,
        )
        return
    written = report.build_report([results_dir], console=console)
    path = written.get("md", results_dir / "leaderboard.md")
    skipped = {k: summary.count(k) for k in ("already-finished", "failed-before", "claimed", "source-unfinished")}
    console.print(
        f"{summary.trained} trained, {skipped['already-finished']} already done, {len(summary.failed)} failed"
        + (f", {skipped['failed-before']} failed before (use --retry-failed)" if skipped["failed-before"] else "")
        + (f", {skipped['claimed']} claimed by another launch" if skipped["claimed"] else "")
        + (f", {skipped['source-unfinished']} waiting for a source run that has no result yet (run again)" if skipped["source-unfinished"] else "")
        + f"; leaderboard: {path}"
    )
    for outcome in summary.failed:
        print(f"FAILED {outcome.cell.run_id} {outcome.cell.describe()}: {outcome.error.splitlines()[0] if outcome.error else ''}", file=sys.stderr)


def cmd_report(argv: list[str]) -> int:
    args = _report_parser().parse_args(argv)
    from bench import report

    def flat(values: list[list[str]] | None) -> list[str] | None:
        return [v for group in values for v in group] if values else None

    dirs = [Path(d) for d in (args.results or ["results"])]
    missing = [str(d) for d in dirs if not d.is_dir()]
    if missing:
        raise UsageError(f"results directory not found: {choices(missing)}")
    if args.resamples is not None and args.resamples < 1:
        raise UsageError(f"--resamples must be >= 1, got {args.resamples}")
    if args.bootstrap_seed < 0:
        raise UsageError(f"--bootstrap-seed must be an integer >= 0, got {args.bootstrap_seed}")
    from bench.report.write import parse_formats

    out = Path(args.out) if args.out is not None else dirs[0]
    if {"md", "html"} & set(parse_formats(args.format)):
        _check_report_folder(out, "--out" if args.out is not None else "the results directory (no --out)")
    try:
        written = report.build_report(
            dirs,
            out_dir=args.out,
            formats=args.format,
            datasets=flat(args.dataset),
            backbones=flat(args.backbone),
            heads=flat(args.head),
            n_resamples=args.resamples,
            seed=args.bootstrap_seed,
            wide=args.wide,
        )
    except OSError as exc:  # the folder filled up or changed while the report was written
        raise UsageError(f"cannot write the report into {out}: {_os_reason(exc)}") from None
    for kind, path in written.items():
        print(f"{'leaderboard' if kind == 'md' else kind}: {path}")
    return 0


def _os_reason(exc: OSError) -> str:
    where = f" ({exc.filename})" if exc.filename else ""
    return f"{exc.strerror or exc}{where}"


def _check_report_folder(out: Path, what: str) -> None:
    """Create the report's folder and prove it is writable before anything is computed; remove
    the temporary files a killed report left there."""
    from bench.core.atomic import host_tag
    from bench.results import store as results

    inside = results.internal_folder(out)
    if inside is not None:
        raise UsageError(
            f"{what}: {out} is inside {inside}, a folder of a results directory that holds only the harness's own files "
            f"(a report there would be read back as damaged results); give another folder, e.g. {inside.parent / 'report'}"
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".report-write-test.{host_tag()}.{os.getpid()}.probe000.tmp"  # the temporary-file form: cleaned if left
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UsageError(f"{what}: cannot write the report into {out}: {_os_reason(exc)}; give a writable folder") from None
    results.clean_temporaries(out)


def cmd_evaluate(argv: list[str]) -> int:
    args = _evaluate_parser().parse_args(argv)
    from bench.engine.runner import evaluate_run
    from bench.results.store import check_run_id

    check_run_id(args.run_id, "--run-id")

    accelerator = _make_accelerator()
    metrics = evaluate_run(args.run_id, Path(args.results), accelerator, args.data_root)
    if accelerator.is_main_process:
        print(json.dumps(metrics, sort_keys=True))
    return 0


def _format_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int, line: str | None = None) -> str:
    """Warnings on the console as one line each: ``warning: <message>`` (no source location)."""
    return f"warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``run_bench.py``; returns the exit status."""
    warnings.formatwarning = _format_warning
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in COMMANDS else "run"
    try:
        return {"run": cmd_run, "report": cmd_report, "evaluate": cmd_evaluate}[command](argv)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
