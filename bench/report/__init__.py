"""Leaderboards from result rows: ``leaderboard.md``, the console tables, ``report.html`` and plots.

Layers: :mod:`~bench.report.summary` (rows -> experiments), :mod:`~bench.report.comparisons`
(Δ mAP and its bootstrap), :mod:`~bench.report.model` (the report as data),
:mod:`~bench.report.tables` (one column list for every renderer), and one module per renderer
(:mod:`~bench.report.markdown`, :mod:`~bench.report.console`, :mod:`~bench.report.html`,
:mod:`~bench.report.plots`); :mod:`~bench.report.write` writes the files.
"""

from bench.report.model import Report, Section, build
from bench.report.summary import summarize
from bench.report.plugins import describe_hparams
from bench.report.tables import Column, Table, make_table
from bench.report.write import build_report, parse_formats

__all__ = ["Column", "Report", "Section", "Table", "build", "build_report", "describe_hparams", "make_table", "parse_formats", "summarize"]
