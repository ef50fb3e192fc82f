"""The report's tables on the console (rich).

A terminal is 80 to 120 columns wide; the leaderboard has some twenty columns (about 300
characters). The console therefore shows a compact set by default (:data:`COMPACT_COLUMNS`: rank,
head, hyper-parameters, mAP, seeds, Δ mAP with its interval, its Holm p-value; the setup and the
selection when a section has them) fitted to the terminal's width, and says where the rest is:
``leaderboard.md`` / ``report.html``, or ``report --format console --wide``.
"""

from __future__ import annotations

import re

from rich import box
from rich.cells import cell_len
from rich.console import Console
from rich.table import Table as RichTable

import bench.report.tuning as tuning
from bench.report.model import Report
from bench.report.tables import Table


#: the leaderboard columns the console shows unless asked for all (``--wide``); the "best" table's
#: dataset / backbone / protocol are kept too
COMPACT_COLUMNS = frozenset({
    "rank", "head", "hyper-parameters", "setup", "selection", "mAP", "n", "Δ mAP [95% CI]", "p (Holm)",
    "dataset", "backbone", "protocol",
})
WIDE_HINT = "console: the main columns; every column is in leaderboard.md and report.html (or: report --format console --wide)"
DELTA = "Δ mAP [95% CI]"
#: the narrowest a name column (head, hyper-parameters, setup) should be squeezed to
NAME_WIDTH = 16
_INTERVAL = re.compile(r" \[[^\]]*\]")


def table_rich(table: Table, title: str = "", compact: bool = False, narrow: bool = False) -> RichTable:
    """A rich table of ``table``. ``compact``: only the :data:`COMPACT_COLUMNS`; the names
    (head, hyper-parameters, setup) wrap within their column, numbers never do. ``narrow``: also
    the Δ column without its interval (for a terminal too narrow for it; the interval is in the
    markdown and HTML)."""
    rich_table = RichTable(title=title or None, title_justify="left", box=box.SIMPLE_HEAD, title_style="bold", pad_edge=not compact)
    keep = [i for i, c in enumerate(table.columns) if not compact or c.label in COMPACT_COLUMNS]
    for i in keep:
        column = table.columns[i]
        label = "Δ mAP" if narrow and column.label == DELTA else column.label
        wraps = not compact or column.label in ("head", "hyper-parameters", "setup")
        widest = max([cell_len(label), *(cell_len(str(v)) for v in table.text.iloc[:, i])])
        rich_table.add_column(label, justify=column.align, no_wrap=not wraps, overflow="fold", min_width=min(widest, NAME_WIDTH) if compact and wraps and not narrow else None)
    for _, r in table.text.iterrows():
        cells = [str(r.values[i]) for i in keep]
        if narrow:
            cells = [_INTERVAL.sub("", cell) if table.columns[i].label == DELTA else cell for i, cell in zip(keep, cells)]
        rich_table.add_row(*cells)
    return rich_table


def needed_width(rich_table: RichTable, console: Console) -> int:
    """Columns the table needs with its numbers on one line and each name column (the ones that
    wrap) at most :data:`NAME_WIDTH` wide: rich's own measure, with those columns capped."""
    wrapping = [c for c in rich_table.columns if not c.no_wrap]
    for column in wrapping:
        column.max_width = NAME_WIDTH
    try:
        return console.measure(rich_table, options=console.options.update_width(10_000)).maximum
    finally:
        for column in wrapping:
            column.max_width = None


def fitted(table: Table, title: str, console: Console, compact: bool) -> RichTable:
    """The compact table, or its narrow form when the compact one is wider than the console."""
    rich_table = table_rich(table, title, compact)
    if compact and needed_width(rich_table, console) > console.width:
        rich_table = table_rich(table, title, compact, narrow=True)
    return rich_table


def render_console(report: Report, console: Console | None = None, wide: bool = False) -> None:
    """Print the report's tables with rich: the compact columns fitted to the terminal, or every
    column (``wide``)."""
    console = console or Console()
    compact = not wide
    if not console.is_terminal:
        # Piped or captured output has no width to respect: print the tables at their natural
        # width instead of squeezing them into 80 columns.
        console = Console(file=console.file, width=max(console.width, 1000), color_system=None, highlight=False, soft_wrap=False)
    width = None
    if not report.sections:
        console.print("No finished runs yet.")
    else:
        if report.best is not None:
            console.print(fitted(report.best, "Best head per dataset × backbone", console, compact), width=width)
        for section in report.sections:
            console.print(fitted(section.table, section.title, console, compact), width=width)
        if compact:
            console.print(WIDE_HINT, highlight=False, style="dim")
        if report.across is not None:
            from bench.report.markdown import ACROSS_TITLE, across_text

            if report.across_table is not None:
                console.print(table_rich(report.across_table, ACROSS_TITLE), width=width)
            else:
                console.print(f"[bold]{ACROSS_TITLE}[/bold]")
            for line in across_text(report):
                console.print(line, highlight=False)
    for section in report.tuning:
        console.print(f"[bold]{tuning.TITLE}: {section.title}[/bold]")
        for line in section.lines:
            console.print(line, highlight=False)
        for title, table in tuning.blocks(section):
            console.print(table_rich(table, title), width=width)
    if report.failed is not None:
        console.print(f"[red]{len(report.failed)} failed run(s)[/red]")
        console.print(table_rich(report.failed), width=width)
    for note in report.notes:
        console.print(f"[yellow]note[/yellow]: {note}", highlight=False)


