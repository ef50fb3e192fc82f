"""``run_bench.py report``: rows -> report -> the files and console output asked for.

One entry point::

    build_report(["results"], formats=("md", "html", "console"))
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Iterable, Sequence

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from rich.console import Console

from bench.core.atomic import atomic_write, atomic_write_bytes
from bench.core.errors import UsageError, choices
from bench.eval import bootstrap as stats
from bench.report.console import render_console
from bench.report.html import render_html
from bench.report.markdown import render_markdown
from bench.report.model import build
from bench.report.tables import FORMATS
from bench.results import store as results


def _readable(paths: Iterable[Path]) -> None:
    """Give report files the usual permissions (the atomic writer's temporary files are 0600):
    a report is meant to be shared."""
    mask = os.umask(0)
    os.umask(mask)
    for path in paths:
        try:
            path.chmod(0o666 & ~mask)
        except OSError:
            pass


COMPARISONS = "comparisons.parquet"


def write_comparisons(frame: pd.DataFrame, path: Path) -> Path:
    """``comparisons.parquet``: one row per comparison the report makes (vs the reference and vs
    the section's best; columns :data:`bench.report.comparisons.COMPARISON_COLUMNS`), atomically."""
    table = pa.Table.from_pandas(frame, preserve_index=False)
    atomic_write(path, lambda tmp: pq.write_table(table, tmp))
    return path


def parse_formats(values: Iterable[str] | None) -> list[str]:
    """``["md,html", "console"]`` -> ``["md", "html", "console"]``; default: all formats."""
    out: list[str] = []
    for value in values or []:
        for item in str(value).split(","):
            item = item.strip().lower()
            if not item:
                continue
            if item not in FORMATS:
                raise UsageError(f"--format {item!r} is not one of {choices(FORMATS)}")
            if item not in out:
                out.append(item)
    return out or list(FORMATS)


def build_report(
    results_dirs: Sequence[str | Path],
    out_dir: str | Path | None = None,
    formats: Iterable[str] | None = None,
    datasets: Sequence[str] | None = None,
    backbones: Sequence[str] | None = None,
    heads: Sequence[str] | None = None,
    n_resamples: int | None = None,
    seed: int = stats.DEFAULT_SEED,
    console: Console | None = None,
    wide: bool = False,
) -> dict[str, Path]:
    """Rebuild the leaderboard from the Parquet files of ``results_dirs`` (merged) and write it.

    Writes ``leaderboard.md`` (with ``plots/*.png``), ``report.html`` (plots inlined) into
    ``out_dir`` (default: the first results directory) and/or prints the console tables,
    according to ``formats`` (``md``, ``html``, ``console``; default all; ``wide``: every column on
    the console, not the compact set). With ``md`` or ``html``
    it also writes ``comparisons.parquet`` (every comparison, its p-value and Holm's adjustment).

    Returns ``{"md": path, "html": path, "comparisons": path}`` for the files written.
    """
    dirs = [Path(d) for d in results_dirs]
    if not dirs:
        raise UsageError("no results directory given")
    missing = [str(d) for d in dirs if not d.is_dir()]
    if missing:
        raise UsageError(f"results directory not found: {choices(missing)}")
    formats = parse_formats(formats)
    out = Path(out_dir) if out_dir is not None else dirs[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # nanmean of all-NaN classes in per-class AP
        rows = results.load_all(*dirs)
        files = "md" in formats or "html" in formats
        report = build(rows, dirs, out if files else None, datasets, backbones, heads, n_resamples, seed, plots=files)
    written: dict[str, Path] = {}
    if files:
        written["comparisons"] = write_comparisons(report.comparisons, out / COMPARISONS)
    if "md" in formats:
        path = out / "leaderboard.md"
        atomic_write_bytes(path, render_markdown(report).encode())
        written["md"] = path
    if "html" in formats:
        path = out / "report.html"
        atomic_write_bytes(path, render_html(report, out).encode())
        written["html"] = path
    plots = [out / p.path for s in report.sections for p in s.plots if not p.skipped]
    if report.across_plot is not None and not report.across_plot.skipped:
        plots.append(out / report.across_plot.path)
    _readable([*written.values(), *plots])
    if "console" in formats:
        render_console(report, console, wide=wide)
    return written
