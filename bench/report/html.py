"""``report.html``: the leaderboard as ONE self-contained page (issue 7).

The same tables as the markdown (``bench.report.build.make_table``), every column sortable by clicking
its header (a few lines of inline JavaScript, numeric-aware: each cell carries its sort key in
``data-sort``; missing values sort last), and the plots inlined as base64 PNG. No network, no CDN,
no external file: the page can be mailed or archived as is.
"""

from __future__ import annotations

import base64
import html
import math
import re
from pathlib import Path
from typing import Any

from bench.report.markdown import ACROSS_TITLE, _bootstrap_sentence, _provenance, across_text
import bench.report.tuning as tuning
from bench.report.model import Report
from bench.report.plots import slugify
from bench.report.tables import CONVENTIONS, OPTIMISTIC, Table

CSS = """
body { font-family: -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; margin: 24px;
       color: #222; line-height: 1.4; }
div.scroll { overflow-x: auto; max-width: 100%; }
h1 { font-size: 1.6em; margin-bottom: 4px; } h2 { font-size: 1.25em; margin-top: 36px; border-bottom: 1px solid #ddd; padding-bottom: 4px; }
p.meta { color: #555; margin-top: 0; }
nav a { margin-right: 14px; }
table.board { border-collapse: collapse; font-size: 13px; margin: 10px 0 6px; }
table.board th, table.board td { border: 1px solid #d8d8d8; padding: 4px 8px; white-space: nowrap; }
table.board th { background: #f1f3f5; cursor: pointer; user-select: none; position: sticky; top: 0; }
table.board th:hover { background: #e2e6ea; }
table.board th::after { content: " \\2195"; color: #aaa; font-size: 11px; }
table.board th[aria-sort="ascending"]::after { content: " \\25B2"; color: #333; }
table.board th[aria-sort="descending"]::after { content: " \\25BC"; color: #333; }
table.board tbody tr:nth-child(even) { background: #fafbfc; }
table.board tbody tr:hover { background: #fff8e1; }
td.num { text-align: right; font-variant-numeric: tabular-nums; } td.txt { text-align: left; }
td.sig { font-weight: 600; color: #1b5e20; } td.sig.neg { color: #b71c1c; }
td.optimistic { background: #fff3cd; color: #7a4f01; font-weight: 600; }
ul.settings { font-size: 13px; color: #444; margin: 6px 0; } ul.settings code { font-size: 12px; }
div.plots { display: flex; flex-wrap: wrap; gap: 18px; align-items: flex-start; margin-top: 10px; }
figure { margin: 0; border: 1px solid #e3e3e3; padding: 8px; background: #fff; max-width: 100%; box-sizing: border-box; }
figure img { max-width: 100%; height: auto; display: block; }
figcaption { font-size: 12px; color: #555; margin-top: 4px; }
p.skipped { font-size: 12px; color: #777; }
dl.legend dt { font-weight: 600; margin-top: 6px; } dl.legend dd { margin-left: 18px; font-size: 13px; }
p.conv, dl.legend { font-size: 13px; max-width: 1100px; }
"""

JS = """
(function () {
  function key(cell) { return cell.getAttribute('data-sort'); }
  document.querySelectorAll('table.sortable').forEach(function (table) {
    var headers = table.tHead.rows[0].cells;
    Array.prototype.forEach.call(headers, function (th, col) {
      th.addEventListener('click', function () {
        var ascending = th.getAttribute('aria-sort') !== 'ascending';
        var numeric = th.getAttribute('data-type') === 'num';
        var body = table.tBodies[0];
        var rows = Array.prototype.slice.call(body.rows);
        rows.sort(function (a, b) {
          var x = key(a.cells[col]), y = key(b.cells[col]);
          if (x === '' || y === '') { return (x === '') - (y === ''); }   // missing values last
          var r = numeric ? parseFloat(x) - parseFloat(y) : x.localeCompare(y, undefined, {numeric: true});
          return ascending ? r : -r;
        });
        rows.forEach(function (row) { body.appendChild(row); });
        Array.prototype.forEach.call(headers, function (h) { h.removeAttribute('aria-sort'); });
        th.setAttribute('aria-sort', ascending ? 'ascending' : 'descending');
      });
    });
  });
})();
"""


def _inline_markup(text: str) -> str:
    """Escape, then render the markdown we use in prose: **bold** and `code`."""
    out = html.escape(text)
    out = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", out)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", out)


def _sort_attr(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, (int, float)):
        return "" if isinstance(value, float) and math.isnan(value) else repr(float(value))
    return str(value)


def table_html(table: Table, table_id: str) -> str:
    """A sortable ``<table>``: each ``<td>`` carries its sort key; numeric columns are typed."""
    head = []
    types = []
    for column in table.columns:
        keys = [v for v in table.sort_keys[column.label] if _sort_attr(v) != ""]
        numeric = bool(keys) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in keys)
        types.append(numeric)
        head.append(f'<th data-type="{"num" if numeric else "str"}" title="click to sort">{html.escape(column.label)}</th>')
    body = []
    for i in range(len(table.text)):
        cells = []
        for j, column in enumerate(table.columns):
            text = str(table.text.iat[i, j])
            key = table.sort_keys.iat[i, j]
            classes = ["num" if types[j] else "txt"]
            if OPTIMISTIC in text:
                classes.append("optimistic")
            if column.label.startswith("Δ") and text.rstrip(")").split(" (")[0].endswith("*"):
                classes.append("sig")
                if text.startswith("-"):
                    classes.append("neg")
            cells.append(f'<td class="{" ".join(classes)}" data-sort="{html.escape(_sort_attr(key))}">{html.escape(text)}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (
        f'<div class="scroll"><table class="board sortable" id="{table_id}"><thead><tr>{"".join(head)}</tr></thead>'
        f'<tbody>{"".join(body)}</tbody></table></div>'
    )


def _image(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _tuning_html(report: Report, out_dir: Path) -> list[str]:
    """A tuned grid's sections (bench/report/tuning.py)."""
    parts = []
    for section in report.tuning:
        parts.append(f"<h2>{html.escape(tuning.TITLE)}: {html.escape(section.title)}</h2>")
        parts.append('<ul class="settings">' + "".join(f"<li>{_inline_markup(s)}</li>" for s in section.lines) + "</ul>")
        for i, (title, table) in enumerate(tuning.blocks(section)):
            parts += [f"<h3>{html.escape(title)}</h3>", table_html(table, f"table-tuning-{slugify(section.title)}-{i}"),
                      f'<p class="conv">{_inline_markup(tuning.column_legend(table))}</p>']
        plot = section.plot
        if plot is not None and not plot.skipped and (out_dir / plot.path).is_file():
            parts.append(
                f'<div class="plots"><figure><img alt="{html.escape(plot.title)}" src="{_image(out_dir / plot.path)}">'
                f"<figcaption><strong>{html.escape(plot.title)}</strong>: {_inline_markup(plot.note)}</figcaption></figure></div>"
            )
    return parts


def render_html(report: Report, out_dir: str | Path) -> str:
    """The report as one HTML page; plots are read from ``out_dir`` and inlined."""
    out_dir = Path(out_dir)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        "<title>headbench leaderboard</title>",
        f"<style>{CSS}</style></head><body>",
        "<h1>headbench leaderboard</h1>",
        f'<p class="meta">{_inline_markup(_provenance(report))} Click any column header to sort.</p>',
    ]
    if report.sections:
        links = (['<a href="#best">best heads</a>'] if report.best is not None else []) + [f'<a href="#{s.slug}">{html.escape(s.title)}</a>' for s in report.sections]
        links += ['<a href="#across">across sections</a>'] if report.across is not None else []
        parts.append("<nav>" + "".join(links) + '<a href="#legend">legend</a></nav>')
        if report.best is not None:
            parts += ['<h2 id="best">Best head per dataset × backbone</h2>', table_html(report.best, "table-best")]
        for section in report.sections:
            parts.append(f'<h2 id="{section.slug}">{html.escape(section.title)}</h2>')
            parts.append('<ul class="settings">' + "".join(f"<li>{_inline_markup(s)}</li>" for s in section.settings) + "</ul>")
            parts.append(table_html(section.table, f"table-{section.slug}"))
            figures = []
            for plot in section.plots:
                if plot.skipped or not (out_dir / plot.path).is_file():
                    continue
                figures.append(
                    f'<figure><img alt="{html.escape(plot.title)} — {html.escape(section.title)}" src="{_image(out_dir / plot.path)}">'
                    f"<figcaption><strong>{html.escape(plot.title)}</strong>: {_inline_markup(plot.note)}</figcaption></figure>"
                )
            if figures:
                parts.append('<div class="plots">' + "".join(figures) + "</div>")
            skipped = [p for p in section.plots if p.skipped]
            if skipped:
                parts.append('<p class="skipped">Plots not drawn: ' + "; ".join(_inline_markup(f"{p.title}: {p.note}") for p in skipped) + ".</p>")
    else:
        parts.append("<p>No finished runs yet.</p>")
    if report.across is not None:
        parts.append(f'<h2 id="across">{html.escape(ACROSS_TITLE)}</h2>')
        parts.append('<p class="conv">' + " ".join(_inline_markup(line) for line in across_text(report)) + "</p>")
        if report.across_table is not None:
            parts.append(table_html(report.across_table, "table-across"))
        plot = report.across_plot
        if plot is not None and not plot.skipped and (out_dir / plot.path).is_file():
            parts.append(
                f'<div class="plots"><figure><img alt="{html.escape(plot.title)}" src="{_image(out_dir / plot.path)}">'
                f"<figcaption><strong>{html.escape(plot.title)}</strong>: {_inline_markup(plot.note)}</figcaption></figure></div>"
            )
        elif plot is not None:
            parts.append(f'<p class="skipped">{_inline_markup(f"{plot.title}: {plot.note}")}.</p>')
    parts += _tuning_html(report, out_dir)
    if report.notes:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{_inline_markup(n)}</li>" for n in report.notes) + "</ul>")
    if report.failed is not None:
        parts += ["<h2>Failed runs</h2>", table_html(report.failed, "table-failed")]
    parts.append('<h2 id="legend">Legend</h2>')
    parts.append(f'<p class="conv">{_inline_markup(CONVENTIONS)}</p>')
    parts.append('<dl class="legend">' + "".join(f"<dt>{html.escape(label)}</dt><dd>{_inline_markup(text)}</dd>" for label, text in report.legend()) + "</dl>")
    parts.append(f'<p class="conv">{_inline_markup(_bootstrap_sentence(report))}</p>')
    parts.append(f"<script>{JS}</script></body></html>")
    return "\n".join(parts)
