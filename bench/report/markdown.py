"""``leaderboard.md``: the report as markdown."""

from __future__ import annotations

import numpy as np
import pandas as pd
from tabulate import tabulate

import bench.report.tuning as tuning
from bench.report.model import Report, build
from bench.report.tables import CONVENTIONS, OPTIMISTIC, Table


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")


def table_markdown(table: Table) -> str:
    frame = table.text.map(_md_escape) if len(table.text) else table.text
    align = ["left" if c.align == "left" else "right" for c in table.columns]
    return tabulate(frame, headers="keys", tablefmt="github", showindex=False, colalign=align, disable_numparse=True)


def render_markdown(report: Report | pd.DataFrame) -> str:
    """The whole leaderboard as markdown (a :class:`Report`, or rows: then without Δ / plots)."""
    if isinstance(report, pd.DataFrame):
        report = build(report)
    lines = ["# headbench leaderboard", ""]
    lines += [_provenance(report), ""]
    if not report.sections:
        lines += ["No finished runs yet.", ""]
    else:
        if report.best is not None:
            lines += ["## Best head per dataset × backbone", "", table_markdown(report.best), ""]
        for section in report.sections:
            lines += [f"## {section.title}", ""]
            lines += [f"- {s}" for s in section.settings] + [""]
            lines += [table_markdown(section.table), ""]
            made = [p for p in section.plots if not p.skipped]
            for plot in made:
                lines += [f"**{plot.title}** ({plot.note}):", "", f"![{plot.title} — {section.title}]({plot.path.as_posix()})", ""]
            skipped = [p for p in section.plots if p.skipped]
            if skipped:
                lines += ["Plots not drawn: " + "; ".join(f"{p.title}: {p.note}" for p in skipped) + ".", ""]
    lines += across_markdown(report)
    lines += tuning_markdown(report)
    if report.notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in report.notes] + [""]
    if report.failed is not None:
        lines += ["## Failed runs", "", table_markdown(report.failed), ""]
    lines += ["## Legend", "", CONVENTIONS, ""]
    lines += [f"- **{label}**: {text}" for label, text in report.legend()]
    lines += ["", _bootstrap_sentence(report), ""]
    return "\n".join(lines)


def tuning_markdown(report: Report) -> list[str]:
    """A tuned grid's sections (bench/report/tuning.py)."""
    lines: list[str] = []
    for section in report.tuning:
        lines += [f"## {tuning.TITLE}: {section.title}", ""] + [f"- {s}" for s in section.lines] + [""]
        for title, table in tuning.blocks(section):
            lines += [f"**{title}**", "", table_markdown(table), "", tuning.column_legend(table), ""]
        plot = section.plot
        if plot is not None and not plot.skipped:
            lines += [f"**{plot.title}** ({plot.note}):", "", f"![{plot.title} — {section.title}]({plot.path.as_posix()})", ""]
        elif plot is not None:
            lines += [f"{plot.title}: {plot.note}.", ""]
    return lines


ACROSS_TITLE = "Across sections: mean ranks and critical differences"


def across_text(report: Report) -> list[str]:
    """The across-sections paragraph(s), renderer-neutral (markdown inline markup)."""
    across = report.across
    if across is None:
        return []
    if across.result is None:
        return [f"Not computed: {across.note}."]
    result = across.result
    k, n = len(across.configurations), len(across.blocks)
    lines = [
        f"{k} head configurations present in all {n} sections ({'; '.join(across.blocks)}), ranked by mean mAP within each "
        "section (1 = best, ties share the mean rank), then averaged.",
    ]
    if np.isfinite(result.friedman_p):
        verdict = "the configurations do not all rank alike" if result.friedman_p < result.alpha else "no evidence that the configurations rank differently"
        lines.append(f"Friedman's test: χ² = {result.friedman_statistic:.2f} (k − 1 = {k - 1} df), p = {result.friedman_p:.3g}: {verdict} (α = {result.alpha:g}).")
    else:
        lines.append("Friedman's test needs three or more configurations: not computed.")
    pairs = int(np.triu(result.significant, 1).sum())
    lines.append(
        f"Pairwise Wilcoxon signed-rank tests over the {n} sections (scipy), Holm-adjusted over the {k * (k - 1) // 2} pairs: "
        f"{pairs} pair(s) differ significantly (adjusted p < {result.alpha:g})."
        + (f" With {n} sections the smallest possible two-sided Wilcoxon p-value is {2 / 2 ** n:.3g}: more sections are needed before any pair can differ." if 2 / 2 ** n >= result.alpha else "")
    )
    if across.note:
        lines.append(f"{across.note}: {', '.join(across.left_out)}.")
    return lines


def across_markdown(report: Report) -> list[str]:
    across = report.across
    if across is None:
        return []
    lines = [f"## {ACROSS_TITLE}", ""]
    lines += [" ".join(across_text(report)), ""]
    if report.across_table is not None:
        lines += [table_markdown(report.across_table), ""]
    plot = report.across_plot
    if plot is not None and not plot.skipped:
        lines += [f"**{plot.title}** ({plot.note}):", "", f"![{plot.title}]({plot.path.as_posix()})", ""]
    elif plot is not None:
        lines += [f"{plot.title}: {plot.note}.", ""]
    return lines


def _provenance(report: Report) -> str:
    where = ", ".join(f"`{s}`" for s in report.sources) or "rows given in memory"
    text = f"Built from {report.runs} run(s) ({report.finished} finished) in {where}."
    if report.filters:
        text += " Filters: " + "; ".join(f"{k} = {', '.join(v)}" for k, v in report.filters.items()) + "."
    return text


def _bootstrap_sentence(report: Report) -> str:
    text = (
        f"Δ mAP intervals: {report.resamples} paired resamples of the test images (seed {report.seed}); with several seeds, "
        "each resample's Δ is the mean of the per-seed Δ on the same resampled images; a class without a positive in "
        "a resample drops out of both runs' means for that resample. p-values come from the same resamples (two-sided, "
        "`docs/report.md`) and are Holm-adjusted per section; `results/comparisons.parquet` lists every comparison. What "
        "the intervals cover: the bootstrap interval, the test images drawn (models fixed); the seed range, training "
        "randomness (this test set); neither, other datasets or recipes. Each section lists its difficult policy and recipe."
    )
    if report.optimistic:
        text += (
            f" Runs marked **{OPTIMISTIC}** kept the epoch with the best test mAP (recipe `select = \"best_test\"`, as "
            "the papers' released code did): their scores use the test labels twice and are biased upwards."
        )
    return text


