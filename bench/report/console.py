"""The report's tables on the console (rich)."""

from __future__ import annotations

from rich import box
from rich.console import Console
from rich.table import Table as RichTable

from bench.report import tuning
from bench.report.model import Report
from bench.report.tables import Table


def table_rich(table: Table, title: str = "") -> RichTable:
    rich_table = RichTable(title=title or None, title_justify="left", box=box.SIMPLE_HEAD, title_style="bold")
    for column in table.columns:
        rich_table.add_column(column.label, justify=column.align)
    for _, r in table.text.iterrows():
        rich_table.add_row(*[str(v) for v in r.values])
    return rich_table


def render_console(report: Report, console: Console | None = None) -> None:
    """Print the report's tables with rich."""
    console = console or Console()
    if not console.is_terminal:
        # Piped or captured output has no width to respect: print the tables at their natural
        # width instead of squeezing them into 80 columns.
        console = Console(file=console.file, width=max(console.width, 1000), color_system=None, highlight=False, soft_wrap=False)
    width = None
    if not report.sections:
        console.print("No finished runs yet.")
    else:
        if report.best is not None:
            console.print(table_rich(report.best, "Best head per dataset × backbone"), width=width)
        for section in report.sections:
            console.print(table_rich(section.table, section.title), width=width)
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


