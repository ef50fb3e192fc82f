"""The report at the papers' test-set sizes (issue 15): ``python -m bench.perf --only report``.

Measured in one process run, on synthetic score files (the cost of the report does not depend on
the model that produced the scores):

(r1) the paired bootstrap of one run (1,000 resamples) at each test-set size of
     :data:`PAPER_TEST_SETS`: the direct computation it replaced
     (:func:`bench.eval.bootstrap.resampled_ap_direct`, one sort per resample above 2**20 entries;
     timed on ``--before-resamples`` resamples and scaled linearly, each resample costing the same)
     and the fast path (:func:`bench.eval.bootstrap.resampled_ap`, sorting included), both as a
     ratio to ONE full-set ``multilabel_metrics`` call on the same matrix timed in the same run;
     the largest difference between the two on the resamples both computed; the fast path's peak
     memory; loading one score file of that size;
(r2) a whole ``run_bench.py report`` (a subprocess: wall time and its peak RSS) over a synthetic
     results directory of ``--runs`` runs at one size (default: COCO's), with an empty bootstrap
     cache and again with it filled, and a rebuild into another ``--out`` that reads the cache of
     the results directory (how a report over several machines' folders reuses their bootstrap);
     in-process: loading every score file, the per-class plot, the HTML page;
(r3) the projected report time of each size's full grid (``configs/full.toml``: runs per dataset
     from the grid itself) before and after.

The section ``report-scale`` of ``docs/performance.md`` is (re)written; the other sections stay.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.core.paths import PROJECT_ROOT
from bench.eval import bootstrap as stats
from bench.eval import resampling
from bench.eval.head_cost import PeakMemory
from bench.eval.metrics import multilabel_metrics

DOC = PROJECT_ROOT / "docs" / "performance.md"
SECTION = "report-scale"  # <!-- section:report-scale --> of docs/performance.md (bench.perf.training.write_section)
TITLE = "(r) The report at the papers' test-set sizes (`python -m bench.perf --only report`)"


@dataclass(frozen=True)
class TestSet:
    """The size of a test split, and label statistics of synthetic scores for it."""

    label: str
    images: int
    classes: int
    positive_rate: float  # share of (image, class) entries that are positive
    ignore_rate: float = 0.0  # share of entries ignored (VOC's difficult labels)


#: The papers' test splits (issue 15): VOC2007 test, COCO2014 val, NUS-WIDE test.
PAPER_TEST_SETS: tuple[TestSet, ...] = (
    TestSet("VOC2007 test", 4952, 20, 1.44 / 20, 0.01),
    TestSet("COCO2014 val", 40137, 80, 2.9 / 80),
    TestSet("NUS-WIDE test", 83000, 81, 2.4 / 81),
)


def synthetic_run(size: TestSet, seed: int, quality: float = 1.0) -> stats.RunScores:
    """Scores of a model of some ``quality`` on a test set of ``size`` (the labels depend only on
    the size: every run of a size shares its test labels, as runs of one dataset do)."""
    labels = np.random.default_rng(size.images)
    targets = (labels.random((size.images, size.classes)) < size.positive_rate).astype(np.uint8)
    targets[0] = 1  # every class is evaluated
    ignore = labels.random(targets.shape) < size.ignore_rate
    ignore[0] = False
    rng = np.random.default_rng(1000 + seed)
    logits = quality * (2.0 * targets - 1.0) + rng.normal(0.0, 1.5, targets.shape)
    scores = (1.0 / (1.0 + np.exp(-logits))).astype(np.float32)
    return stats.RunScores([f"{i:07d}" for i in range(size.images)], scores, targets, ignore, [f"class{j:03d}" for j in range(size.classes)])


def _rss_mib() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def measure_bootstrap(size: TestSet, resamples: int, before_resamples: int) -> dict[str, Any]:
    """(r1) one run's bootstrap at ``size``, before and after, against one metrics call."""
    run = synthetic_run(size, 0)
    metrics_s = []
    for _ in range(3):
        start = time.perf_counter()
        multilabel_metrics(run.scores, run.targets, run.ignore)
        metrics_s.append(time.perf_counter() - start)
    metrics = statistics.median(metrics_s)

    before_n = min(before_resamples, resamples)
    start = time.perf_counter()
    direct = stats.resampled_ap_direct(run, before_n, stats.DEFAULT_SEED)
    before_measured = time.perf_counter() - start
    before = before_measured * resamples / before_n

    memory = PeakMemory(torch.device("cpu"))
    rss_before = _rss_mib()
    memory.reset()
    start = time.perf_counter()
    ranked = resampling.rank_classes(run.scores, run.targets, run.ignore)
    sort_s = time.perf_counter() - start
    fast = stats.resampled_ap(run, resamples, stats.DEFAULT_SEED, ranked=ranked, device="cpu")
    after = time.perf_counter() - start
    peak = memory.peak_mib() - rss_before
    diff = np.abs(fast[:before_n] - direct)
    same_nan = bool(np.array_equal(np.isnan(fast[:before_n]), np.isnan(direct)))

    with tempfile.TemporaryDirectory(prefix="headbench-perf-") as tmp:
        from bench.results import store as results

        results.save_scores(tmp, "0" * 16, run.image_ids, run.scores, run.targets, run.ignore, run.classes)
        start = time.perf_counter()
        stats.canonical(stats.RunScores.from_dict(results.load_scores(tmp, "0" * 16)))
        load_s = time.perf_counter() - start
        file_mib = results.scores_path(tmp, "0" * 16).stat().st_size / 2**20
    return {
        "label": size.label, "N": size.images, "C": size.classes, "resamples": resamples, "metrics_s": metrics,
        "before_s": before, "before_measured_s": before_measured, "before_resamples": before_n, "after_s": after, "sort_s": sort_s,
        "runs": ranked.runs, "entries": int(ranked.entry_image.size), "peak_mib": peak, "max_abs_diff": float(np.nanmax(diff)) if diff.size else 0.0,
        "same_nan": same_nan, "load_s": load_s, "file_mib": file_mib,
    }


def _head_configs(count: int) -> list[tuple[str, dict[str, Any]]]:
    """The reference and the first other head configurations of the full grid (plugin metadata:
    nothing here names a head)."""
    from bench.config.grid import load_grid
    from bench.report.plugins import reference

    ref = reference()
    configs = load_grid("full").head_configs
    first = [c for c in configs if ref is not None and c[0] == ref[0] and all(c[1].get(k) == v for k, v in ref[1].items())]
    others = [c for c in configs if c not in first]
    return (first[:1] + others)[:count]


def write_results(folder: Path, size: TestSet, runs: int, seeds: int = 2) -> int:
    """A results directory of ``runs`` finished runs (configurations x ``seeds``) at ``size``."""
    from bench.results import store as results

    configs = _head_configs(-(-runs // seeds))
    written = 0
    recipe = {"protocol": "finetune", "epochs": 1, "select": "last"}
    for i, (head, hparams) in enumerate(configs):
        for seed in range(seeds):
            if written == runs:
                return written
            run = synthetic_run(size, 100 * i + seed, quality=0.8 + 0.02 * i)
            config = {"dataset": {"name": "synthetic", "options": {"images": size.images}}, "backbone": {"name": "synthetic"},
                      "head": {"name": head, "hparams": hparams}, "recipe": recipe, "seed": seed}
            run_id = f"{i:08x}{seed:08x}"
            row = {
                "run_id": run_id, "group_id": f"{i:016x}", "status": "finished", "dataset": "synthetic", "backbone": "synthetic",
                "protocol": "finetune", "head": head, "hparams": hparams, "seed": seed, "recipe": recipe, "config": config,
                "dataset_options": {"images": size.images}, "train_split": "train", "test_split": "test", "test_images": size.images,
                "finished_at": "2026-01-01T00:00:00", "head_params": 1000 * (i + 1),
                **multilabel_metrics(run.scores, run.targets, run.ignore),
            }
            results.save_scores(folder, run_id, run.image_ids, run.scores, run.targets, run.ignore, run.classes)
            results.write_row(folder, row)
            written += 1
    return written


def _report_subprocess(args: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of ``run_bench.py report <args>`` in a child process."""
    env = dict(os.environ)
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(PROJECT_ROOT / "run_bench.py"), "report", *args], cwd=PROJECT_ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    stderr = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"run_bench.py report {' '.join(args)} failed: {stderr[-2000:]}")
    return wall, usage.ru_maxrss / 1024


def measure_report(size: TestSet, runs: int, resamples: int, keep: Path | None = None) -> dict[str, Any]:
    """(r2) a whole report over ``runs`` synthetic runs at ``size``."""
    from bench.eval.metrics import average_precision
    from bench.report import plots
    from bench.report.comparisons import ScoreStore
    from bench.report.html import render_html
    from bench.report.model import build
    from bench.results import store as results

    folder = Path(tempfile.mkdtemp(prefix="headbench-report-scale-")) if keep is None else keep
    try:
        folder.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        written = write_results(folder, size, runs)
        setup = time.perf_counter() - start
        common = ["--results", str(folder), "--format", "md,html", "--resamples", str(resamples)]
        cold, cold_rss = _report_subprocess(common)
        warm, warm_rss = _report_subprocess(common)
        other = folder.parent / (folder.name + "-merged")
        merged, merged_rss = _report_subprocess([*common, "--out", str(other)])
        shutil.rmtree(other, ignore_errors=True)

        # in-process: what the report does besides the bootstrap
        rows = results.load_all(folder)
        store = ScoreStore([folder], rows)
        memory = PeakMemory(torch.device("cpu"))
        rss_before = _rss_mib()
        memory.reset()
        start = time.perf_counter()
        for run_id in rows["run_id"]:
            store.get(run_id)
        load = time.perf_counter() - start
        load_peak = memory.peak_mib() - rss_before
        first = store.get(rows["run_id"].iloc[0])
        ap = average_precision(first.scores, first.targets, first.ignore)
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            plots.plot_per_class(plots.PerClass(first.classes, ap, ap * 0.9, "head", "reference", 1), Path(tmp) / "p.png", Path("p.png"), "scale")
            per_class = time.perf_counter() - start
        report = build(rows, [folder], folder, n_resamples=resamples)  # cached by now: plots, no resampling
        start = time.perf_counter()
        page = render_html(report, folder)
        html = time.perf_counter() - start
        html_mib = len(page.encode()) / 2**20
        cache_mib = sum(p.stat().st_size for p in (folder / ".cache" / "bootstrap").glob("*")) / 2**20
    finally:
        if keep is None:
            shutil.rmtree(folder, ignore_errors=True)
    return {
        "label": size.label, "N": size.images, "C": size.classes, "runs": written, "resamples": resamples, "setup_s": setup,
        "cold_s": cold, "cold_rss_mib": cold_rss, "warm_s": warm, "warm_rss_mib": warm_rss, "merged_s": merged, "merged_rss_mib": merged_rss,
        "load_s": load, "load_peak_mib": load_peak, "per_class_s": per_class, "html_s": html, "html_mib": html_mib, "cache_mib": cache_mib,
    }


def full_grid_runs() -> tuple[int, int, str]:
    """Runs per dataset of ``configs/full.toml``, the size of a section's family (configurations
    other than the reference), and how the runs decompose."""
    from bench.config.grid import load_grid

    grid = load_grid("full")
    per_dataset = grid.pending[0].cells if grid.pending else len(grid.cells) // max(1, len({c.dataset for c in grid.cells}))
    return per_dataset, len(grid.head_configs) - 1, f"{len(grid.head_configs)} head configurations × {len(grid.backbones)} backbones × {len(grid.seeds)} seeds"


def projections(boot: list[dict[str, Any]], report: dict[str, Any] | None, runs: int, family: int) -> list[dict[str, Any]]:
    """(r3) report time of a full grid of ``runs`` runs at each size: per run the bootstrap and one
    score-file load, plus the rest of the report (rows, comparisons, tables, plots, HTML: the warm
    rebuild of (r2), which does no bootstrap and loads one score file per section). Also at the
    resamples a section's family of ``family`` comparisons needs to resolve Holm-adjusted p < 0.05
    (:func:`bench.eval.significance.resamples_needed`; the sort is paid once, the rest scales)."""
    from bench.eval.significance import resamples_needed

    rest = report["warm_s"] if report else 0.0
    needed = resamples_needed(family)
    out = []
    for b in boot:
        per_resample = (b["after_s"] - b["sort_s"]) / b["resamples"]
        out.append({
            "label": b["label"], "runs": runs, "rest_s": rest, "needed": needed,
            "before_s": runs * (b["before_s"] + b["load_s"]) + rest,
            "after_s": runs * (b["after_s"] + b["load_s"]) + rest,
            "after_needed_s": runs * (b["sort_s"] + per_resample * needed + b["load_s"]) + rest,
        })
    return out


def _duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 120:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.1f} s"


def machine() -> str:
    device = resampling.report_device()
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def render(command: str, boot: list[dict[str, Any]], report: dict[str, Any] | None, projected: list[dict[str, Any]], grid_text: str,
           family: int = 0, load: tuple[float, float] | None = None) -> str:
    busy = ""
    if load is not None:
        busy = (f" The machine's load average was {load[0]:.1f} at the start and {load[1]:.1f} at the end"
                + (f" (other jobs shared its {os.cpu_count()} cores: absolute times are inflated, the ratios less so)." if max(load) > (os.cpu_count() or 1) else "."))
    lines = [
        f"Measured by `{command}` on {machine()} ({time.strftime('%Y-%m-%d %H:%M')}, torch {torch.__version__}), in one process run,",
        "on synthetic score files (the report's cost does not depend on the model). Ratios compare timings of the same run." + busy,
        "",
        "### (r1) Paired bootstrap of one run, 1,000 resamples" if boot and boot[0]["resamples"] == 1000 else "### (r1) Paired bootstrap of one run",
        "",
        "*before*: the direct computation (`resampled_ap_direct`: every resample sorts every class again above 2²⁰ entries);",
        "*after*: `resampled_ap` (each class sorted once per run, then blocks of resamples as weighted sums over that order,",
        "evaluated only where the positives' tie groups end; the sort is included). Both as a multiple of ONE full-set",
        "`multilabel_metrics` call on the same matrix (median of 3).",
        "",
        "| test set | N × C | one metrics call (s) | before (s) | before / metrics | after (s) | after / metrics | speed-up | after: peak memory (MiB) | max \\|after − before\\| |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for b in boot:
        before = f"{b['before_s']:.1f}" + ("" if b["before_resamples"] == b["resamples"] else f" ({b['before_resamples']} timed: {b['before_measured_s']:.1f})")
        lines.append(
            f"| {b['label']} | {b['N']:,} × {b['C']} | {b['metrics_s']:.2f} | {before} | {b['before_s'] / b['metrics_s']:,.0f}× | "
            f"{b['after_s']:.1f} | **{b['after_s'] / b['metrics_s']:,.0f}×** | {b['before_s'] / b['after_s']:,.0f}× | {b['peak_mib']:.0f} | "
            f"{b['max_abs_diff']:.1e}{'' if b['same_nan'] else ' (NaN pattern differs!)'} |"
        )
    lines += [
        "",
        "Where a *before* time says \"(k timed)\", the direct computation was timed on the first k resamples and scaled to",
        "all of them (every resample costs it the same: one sort of the matrix). The last column compares both on those k.",
        "The target of issue 15 is *after / metrics* ≤ 100×. Details per size: "
        + "; ".join(f"{b['label']}: sort {b['sort_s']:.2f} s, {b['runs']:,} positive runs, {b['entries']:,} of {b['N'] * b['C']:,} entries kept, "
                    f"score file {b['file_mib']:.0f} MiB loaded in {b['load_s']:.2f} s" for b in boot) + ".",
        "",
    ]
    if report:
        r = report
        lines += [
            f"### (r2) `run_bench.py report` over {r['runs']} runs at {r['label']} size ({r['N']:,} × {r['C']}), {r['resamples']} resamples",
            "",
            "A child process each; peak memory is the child's peak RSS.",
            "",
            "| report | wall (s) | peak RSS (MiB) |",
            "|---|---:|---:|",
            f"| empty bootstrap cache (every run resampled) | {r['cold_s']:.1f} | {r['cold_rss_mib']:.0f} |",
            f"| rebuilt, cache filled (no run resampled, no score file parsed but one per section) | {r['warm_s']:.1f} | {r['warm_rss_mib']:.0f} |",
            f"| into another `--out`, reading the results directory's cache (as with `--results a/ --results b/`) | {r['merged_s']:.1f} | {r['merged_rss_mib']:.0f} |",
            "",
            f"In-process, besides the bootstrap: loading all {r['runs']} score files {r['load_s']:.1f} s "
            f"({r['load_s'] / r['runs']:.2f} s each; memory grows by {r['load_peak_mib']:.0f} MiB at most: the score store keeps the last 4 runs, "
            f"not all of them); the per-class plot at {r['C']} classes {r['per_class_s']:.2f} s; the HTML page {r['html_s']:.2f} s ({r['html_mib']:.1f} MiB "
            f"with its plots inlined). The bootstrap cache holds {r['cache_mib']:.1f} MiB for {r['runs']} runs. Memory is bounded by the bootstrap's "
            "block and a few score files, not by the number of runs; time grows linearly in runs (each run is resampled once, cached on disk).",
            "",
        ]
    if projected:
        lines += [
            "### (r3) Projected report time of each paper-size full grid",
            "",
            f"`configs/full.toml` has {projected[0]['runs']} runs per dataset ({grid_text}). Projection: runs × (bootstrap of one run",
            "+ loading its score file) from (r1), plus the rest of the report (rows, comparisons, tables, plots, HTML: the cached",
            f"rebuild of (r2), {projected[0]['rest_s']:.0f} s). A rebuild with the cache filled costs about that rest alone.",
            "",
            f"| full grid at | runs | before, {boot[0]['resamples']:,} resamples | after, {boot[0]['resamples']:,} resamples | after, {projected[0]['needed']:,} resamples |",
            "|---|---:|---:|---:|---:|",
        ]
        lines += [f"| {p['label']} | {p['runs']} | {_duration(p['before_s'])} | **{_duration(p['after_s'])}** | {_duration(p['after_needed_s'])} |" for p in projected]
        lines += [
            "",
            f"The last column: a section of the full grid compares {family} configurations with the reference; with R resamples no",
            f"Holm-adjusted p-value can be below {family} · 2/(R + 1), so R = {projected[0]['needed']:,} is what it takes before any",
            "difference can be marked significant (`docs/report.md`).",
        ]
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.perf --only report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(DOC), help=f"markdown file whose report section is (re)written, '-' for stdout only [{DOC}]")
    parser.add_argument("--resamples", type=int, default=stats.DEFAULT_RESAMPLES, help="bootstrap resamples [1000]")
    parser.add_argument("--before-resamples", type=int, default=100,
                        help="resamples the direct (before) computation is timed on, then scaled; all of them at VOC size [100]")
    parser.add_argument("--sizes", default=",".join(t.label for t in PAPER_TEST_SETS), help="comma list of test-set labels for (r1)")
    parser.add_argument("--runs", type=int, default=50, help="runs of the synthetic results directory in (r2) [50]")
    parser.add_argument("--report-size", default=PAPER_TEST_SETS[1].label, help=f"test-set size of (r2) [{PAPER_TEST_SETS[1].label}]")
    parser.add_argument("--skip-report", action="store_true", help="skip (r2)")
    parser.add_argument("--keep", type=Path, default=None, help="keep (r2)'s synthetic results directory here")
    args = parser.parse_args(argv)
    by_label = {t.label: t for t in PAPER_TEST_SETS}
    wanted = [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in by_label]
    if unknown or args.report_size not in by_label:
        parser.error(f"unknown test set(s) {unknown or [args.report_size]}; known: {list(by_label)}")
    print(f"measuring the report on {machine()}", file=sys.stderr)
    load_start = os.getloadavg()[0]
    boot = []
    for label in wanted:
        size = by_label[label]
        before = args.resamples if size.images * size.classes <= 1 << 20 else args.before_resamples  # cheap sizes: all of them
        print(f"(r1) {label}: {size.images:,} x {size.classes}", file=sys.stderr)
        boot.append(measure_bootstrap(size, args.resamples, before))
        print(json.dumps(boot[-1]), file=sys.stderr)
    report = None
    if not args.skip_report:
        print(f"(r2) report over {args.runs} runs at {args.report_size}", file=sys.stderr)
        report = measure_report(by_label[args.report_size], args.runs, args.resamples, args.keep)
        print(json.dumps(report), file=sys.stderr)
    runs, family, grid_text = full_grid_runs()
    projected = projections(boot, report, runs, family)
    command = "python -m bench.perf --only report " + " ".join(argv if argv is not None else sys.argv[1:])
    section = render(command.strip(), boot, report, projected, grid_text, family, (load_start, os.getloadavg()[0]))
    print(section)
    if args.out != "-":
        from bench.perf.training import write_section

        write_section(Path(args.out), SECTION, TITLE, section)  # the file's other sections stay as they are
    return 0


if __name__ == "__main__":
    sys.exit(main())
