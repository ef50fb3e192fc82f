"""Command line: ``run_bench.py [run] --grid NAME ...``, ``run_bench.py report``, ``run_bench.py evaluate``,
``run_bench.py status``; ``--submit slurm|local`` puts a grid on a cluster (bench/cluster).

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
    from accelerate import Accelerator

    from bench.config.grid import Grid
    from bench.engine.interrupt import StopRequest
    from bench.engine.runner import GridSummary

COMMANDS = ("run", "report", "evaluate", "status")


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
    p.add_argument(
        "--validate", action="store_true",
        help="check the grid, the options and the results directory and build every dataset, backbone and head "
        "once (like --dry-run, without the listing), then exit (0, or 2 with the error): run it before `accelerate launch`, "
        "whose launcher turns an exit status 2 into 1 and a traceback",
    )
    _add_submit_options(p)
    return p


def _add_submit_options(p: argparse.ArgumentParser) -> None:
    """``--submit``: the grid as N tasks through submitit (docs/distributed.md); the grid's
    ``[submit]`` table gives the defaults of the scheduler options."""
    g = p.add_argument_group("cluster (submitit; pip install -e '.[cluster]')")
    g.add_argument("--submit", choices=("slurm", "local"), help="submit the grid as --jobs tasks: a SLURM job array, or local jobs on this machine")
    g.add_argument("--jobs", type=int, help="number of tasks; task K runs --shard K/N [grid's [submit] jobs, else 1]")
    g.add_argument("--wait", action="store_true", help="wait for every task, then build the report")
    g.add_argument("--partition")
    g.add_argument("--time", help="time limit per task: minutes, HH:MM:SS or D-HH:MM:SS [24:00:00]")
    g.add_argument("--nodes", type=int, help="nodes per task [1]")
    g.add_argument("--gpus-per-node", type=int, help="GPUs (= processes) per node [slurm: 1; local: this machine's GPUs / jobs]")
    g.add_argument("--cpus-per-task", type=int)
    g.add_argument("--mem-gb", type=float)
    g.add_argument("--account")
    g.add_argument("--qos")
    g.add_argument("--sbatch", action="append", metavar="OPTION", help="an extra #SBATCH option, e.g. --sbatch=--mail-type=END (repeatable)")
    g.add_argument("--logs", metavar="DIR", help="submitit's folder (logs, pickles) [RESULTS/submitit]")


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

    _check_precision(mixed_precision, torch.cuda.is_available())
    # cpu=True without a GPU: accelerate only forms a gloo group of CPU processes (torchrun-style
    # launch, `accelerate launch --multi_gpu --num_processes N`) when the Accelerator is told so.
    # split_batches: the recipe's batch size is global, so results do not depend on the process count.
    return Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=mixed_precision,
        dataloader_config=DataLoaderConfiguration(split_batches=True),
    )


def _check_precision(mixed_precision: str, cuda: bool) -> None:
    if mixed_precision == "fp16" and not cuda:
        raise UsageError("recipe mixed_precision = 'fp16' needs a CUDA GPU; use 'bf16' or 'no' on a CPU")


def _check_launchable(grid: Grid, results_dir: Path, cuda_here: bool) -> None:
    """What a launch would refuse before training, checked without a launcher (``--validate``,
    ``--submit``): a grid with no cell to run, a results directory that cannot be written, fp16
    without CUDA (``cuda_here``: the launch runs on this machine)."""
    from bench.results import store as results

    if not grid.cells:
        if grid.pending:
            from bench.config.grid import no_cells_error

            raise no_cells_error(grid)
        raise UsageError(f"{grid.path}: no cell to run" + (f" ({'; '.join(grid.skipped)})" if grid.skipped else ""))
    results.check_writable(results_dir)
    if cuda_here:
        import torch

        _check_precision(grid.cells[0].recipe.mixed_precision, torch.cuda.is_available())


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
        # a refit is in its tune group's family (tune_family), so it runs in the shard of its points
        sharded = shard_cells(grid.cells + grid.refits, shard, count)
        grid.cells = [c for c in sharded if not c.tune_refit]
        grid.refits = [c for c in sharded if c.tune_refit]
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
    if args.validate or args.submit:
        _check_launchable(grid, Path(args.results), cuda_here=not args.submit or args.submit == "local")
        if args.submit:
            return _submit(args, grid, console)
        from bench.engine.data_store import DataStore
        from bench.engine.runner import preflight

        preflight(grid, DataStore(_make_accelerator(grid.cells[0].recipe.mixed_precision)))  # what the launch checks first
        console.print(f"grid {grid.name}{shard_text}: {len(grid.cells)} cells; every dataset, backbone and head builds; ready to launch",
                      soft_wrap=True, highlight=False)
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
    _leave_together(accelerator)
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
    skipped = {k: summary.count(k) for k in ("already-finished", "failed-before", "claimed", "source-unfinished", "points-unfinished")}
    console.print(
        f"{summary.trained} trained, {skipped['already-finished']} already done, {len(summary.failed)} failed"
        + (f", {skipped['failed-before']} failed before (use --retry-failed)" if skipped["failed-before"] else "")
        + (f", {skipped['claimed']} claimed by another launch" if skipped["claimed"] else "")
        + (f", {skipped['source-unfinished']} waiting for a source run that has no result yet (run again)" if skipped["source-unfinished"] else "")
        + (f", {skipped['points-unfinished']} refits waiting for points that have no result yet (run again)" if skipped["points-unfinished"] else "")
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
    _leave_together(accelerator)
    return 0


def _leave_together(accelerator: Accelerator) -> None:
    """The end of a launch on every process: output flushed, then all processes wait for each other
    and leave the process group. The launcher (torchrun) stops every process as soon as one exits
    non-zero, so none leaves before the main one has printed; and a process that exits while its
    peer's collective threads still hold the group can abort ("terminate called without an active
    exception"), so the group is destroyed before the interpreter exits."""
    sys.stdout.flush()
    sys.stderr.flush()
    accelerator.wait_for_everyone()
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _submit(args: argparse.Namespace, grid: Grid, console: Console) -> int:
    """``--submit slurm|local``: the grid as N tasks through submitit, task K running ``--shard K/N``
    under ``accelerate launch`` in its allocation; prints the job ids, the log folder and the
    progress command; ``--wait`` waits for the tasks and builds the report."""
    try:
        import submitit  # noqa: F401 - the optional dependency, imported only here
    except ImportError:
        raise UsageError("--submit needs submitit: pip install -e '.[cluster]' (or: pip install submitit)") from None
    from bench.cluster import settings as cluster_settings
    from bench.cluster import submit as cluster_submit

    if args.shard:
        raise UsageError("--submit deals the grid out itself (task K of N runs --shard K/N): leave out --shard")
    flags = {
        "partition": args.partition, "time": args.time, "nodes": args.nodes, "gpus_per_node": args.gpus_per_node,
        "cpus_per_task": args.cpus_per_task, "mem_gb": args.mem_gb, "account": args.account, "qos": args.qos,
        "jobs": args.jobs, "logs": args.logs, "sbatch": args.sbatch,
    }
    flags = {k: cluster_settings.check_value(k, v, f"--{k.replace('_', '-')}") for k, v in flags.items() if v is not None}
    table = cluster_settings.read_table(grid.path)
    results_dir = Path(args.results).resolve()
    jobs = flags.get("jobs", table.get("jobs", 1))
    default_gpus, visible = 1, 0
    if args.submit == "local":
        import torch

        visible = torch.cuda.device_count()
        default_gpus = visible // jobs
        if visible and not default_gpus and "gpus_per_node" not in flags and "gpus_per_node" not in table:
            raise UsageError(f"--submit local --jobs {jobs}: this machine has {visible} GPU(s), fewer than the jobs; "
                             "use --jobs <= the GPUs, or --gpus-per-node 0 to run every job on the CPU")
        flags.setdefault("cpus_per_task", table.get("cpus_per_task", max(1, (os.cpu_count() or 1) // jobs)))
    settings = cluster_settings.resolve(args.submit, table, flags, results_dir, default_gpus)
    if args.submit == "local" and settings.jobs * settings.gpus_per_node > visible:
        raise UsageError(f"--submit local: {settings.jobs} job(s) x {settings.gpus_per_node} GPU(s) each, but this machine has {visible}")
    shares = cluster_submit.shares(grid.cells, settings.jobs)
    if len(shares) < settings.jobs:
        console.print(f"the grid has {len(shares)} job(s) (cell families) to deal out: submitting {len(shares)} task(s), not {settings.jobs}", highlight=False)
        settings.jobs = len(shares)
    filters = [f"--{name}={','.join(values)}" for name, values in (("heads", args.heads), ("datasets", args.datasets), ("backbones", args.backbones)) if values]
    filters += [f"--data-root={name}={Path(path).resolve()}" for name, path in _data_roots(args.data_root).items()]  # tasks start elsewhere
    run_args = ["--grid", str(Path(grid.path).resolve()), "--results", str(results_dir), *filters]
    if args.retry_failed:
        run_args.append("--retry-failed")
    command = cluster_submit.status_command(Path(grid.path).resolve(), results_dir, filters)
    submission = cluster_submit.submit(cluster_submit.task_specs(shares, run_args, results_dir, settings), settings, command)
    for line in cluster_submit.describe(submission):
        console.print(line, soft_wrap=True, highlight=False)
    if not args.wait:
        return 0
    outcomes, failures = cluster_submit.wait(submission)
    from bench import report

    written = report.build_report([results_dir], console=console)
    for outcome in outcomes:
        console.print(outcome.describe(), soft_wrap=True, highlight=False)
    for line in failures:
        print(f"FAILED {line}", file=sys.stderr)
    console.print(f"{len(outcomes)} of {len(submission.jobs)} task(s) ended; leaderboard: {written.get('md', results_dir / 'leaderboard.md')}", highlight=False)
    return 1 if failures or any(o.status != 0 for o in outcomes) else 0


def _status_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="run_bench.py status",
        description="Per job and per run: finished, running (whose lock, since when), failed, pending; whatever launched the runs.",
    )
    p.add_argument("--results", default="results", help="results directory [results]")
    p.add_argument("--grid", help="the grid (name or TOML file): lists its runs that have no file yet as pending and groups runs into its jobs")
    p.add_argument("--heads", type=_csv, help="only these heads (comma-separated)")
    p.add_argument("--datasets", type=_csv, help="only these datasets (comma-separated)")
    p.add_argument("--backbones", type=_csv, help="only these backbones (comma-separated)")
    p.add_argument("--data-root", action="append", default=[], metavar="NAME=PATH", help="where dataset NAME lives (repeatable)")
    return p


def cmd_status(argv: list[str]) -> int:
    args = _status_parser().parse_args(argv)
    from bench.cluster.status import directory_jobs, format_status, grid_jobs

    results_dir = Path(args.results)
    if not results_dir.is_dir():
        raise UsageError(f"results directory not found: {results_dir}")
    if args.grid:
        from bench.config.grid import load_grid

        grid = load_grid(args.grid, heads=args.heads, datasets=args.datasets, backbones=args.backbones, data_roots=_data_roots(args.data_root))
        jobs = grid_jobs(grid.cells, results_dir)
        title = f"{results_dir}: grid {grid.name} ({grid.path})"
    else:
        jobs = directory_jobs(results_dir)
        title = f"{results_dir}: the runs that left a file (give --grid to list the grid's pending runs)"
    for line in format_status(jobs, title):
        print(line)
    submission = results_dir / "submitit" / "submission.json"
    if submission.is_file():
        try:
            record = json.loads(submission.read_text())
            print(f"last submission: {record['executor']}, {record['tasks']} task(s), job ids {' '.join(record['job_ids'])}; logs: {record['logs']}")
        except (OSError, ValueError, KeyError, TypeError):
            print(f"warning: {submission} cannot be read", file=sys.stderr)
    return 0


def _record_exit_status(status: int) -> None:
    """Write the exit status where a cluster task asked for it (``$HEADBENCH_EXIT_STATUS_FILE``,
    bench.cluster.task): accelerate's launcher reports every failure as status 1. Main process only."""
    path = os.environ.get("HEADBENCH_EXIT_STATUS_FILE")
    if path and os.environ.get("RANK", "0") == "0":
        from bench.core.atomic import atomic_write_bytes

        atomic_write_bytes(path, f"{status}\n".encode())


def _format_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int, line: str | None = None) -> str:
    """Warnings on the console as one line each: ``warning: <message>`` (no source location)."""
    return f"warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``run_bench.py``; returns the exit status."""
    warnings.formatwarning = _format_warning
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in COMMANDS else "run"
    try:
        status = {"run": cmd_run, "report": cmd_report, "evaluate": cmd_evaluate, "status": cmd_status}[command](argv)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        status = 2
    _record_exit_status(status)
    return status
