"""Leaderboard plots: PNG files under ``<results>/plots/``, linked from the leaderboard (issue 7).

Per dataset x backbone x protocol section:

- ``tradeoff``: mAP vs head latency (batch 1, else batch 64; head parameters when the rows carry
  no latency), one point per experiment (mean over seeds, ± std bar), Pareto front marked
  (no other experiment is both faster/smaller and more accurate).
- one heat map per :class:`HeatmapSpec` the caller passes (one per head that declares a
  ``heatmap``, e.g. CSRA's H x λ): mean mAP of the experiments of that head, the other
  hyper-parameters held at one value.
- ``per_class``: per-class AP of the best head vs the section's reference (mean over seeds).

A plot whose data is absent is skipped: no file, and a :class:`PlotResult` with the reason (the
report prints it). Pure plotting: the caller passes summaries (``bench.report.build.summarize``) and
arrays; nothing here reads result files or imports a head. Figures are drawn on matplotlib's Agg
canvas without pyplot, so no global backend state is touched.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from bench.core.atomic import atomic_write
from bench.report.tables import OPTIMISTIC


@dataclass(frozen=True)
class HeatmapSpec:
    """A heat map of mean mAP over two hyper-parameters of one head.

    Rows are experiments with ``head == head`` whose hyper-parameters match ``where``; every other
    hyper-parameter (not ``x``/``y``) is held at the head's default when rows with it exist, else
    at its most common value (the plot says which).
    """

    slug: str  # file name part
    head: str  # the value of the rows' ``head`` column
    title: str
    y: str  # hyper-parameter on the vertical axis
    y_label: str
    x: str  # hyper-parameter on the horizontal axis
    x_label: str
    where: dict[str, Any] = field(default_factory=dict)


# x axes of the trade-off plot, in order of preference: (summary column, axis label)
TRADEOFF_X: tuple[tuple[str, str], ...] = (
    ("head_latency_b1_ms", "head latency, batch 1 (ms)"),
    ("head_latency_b64_ms", "head latency, batch 64 (ms)"),
    ("head_params", "head parameters"),
)

DPI = 110
_PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")


@dataclass
class PlotResult:
    """One plot of a section: ``path`` (relative to the output folder) or None when skipped."""

    slug: str
    title: str
    path: Path | None
    note: str  # a caption, or why the plot was skipped

    @property
    def skipped(self) -> bool:
        return self.path is None


def slugify(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.-]+", "_", text).strip("_") or "x"


def _save(fig: Figure, path: Path) -> None:
    FigureCanvasAgg(fig)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight"))


def _colors(heads: Sequence[str]) -> dict[str, str]:
    return {h: _PALETTE[i % len(_PALETTE)] for i, h in enumerate(sorted(set(heads)))}


def pareto_front(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """bool mask of the points no other point dominates (x lower-or-equal AND y higher-or-equal,
    one of them strictly): the best accuracy for its cost. NaN points are never on the front."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    ok = np.isfinite(x) & np.isfinite(y)
    front = np.zeros(len(x), dtype=bool)
    for i in np.flatnonzero(ok):
        dominated = ok & (x <= x[i]) & (y >= y[i]) & ((x < x[i]) | (y > y[i]))
        front[i] = not dominated.any()
    return front


def _label(row: pd.Series) -> str:
    text = str(row.get("hparams_text") or "")
    label = f"{row['head']} ({text})" if text and text != "-" else str(row["head"])
    return f"{label} [{OPTIMISTIC}]" if bool(row.get("optimistic", False)) else label


def plot_tradeoff(summary: pd.DataFrame, path: Path, rel: Path, title: str) -> PlotResult:
    """mAP vs head latency (or head parameters) with the Pareto front marked."""
    slug = "tradeoff"
    for column, x_label in TRADEOFF_X:
        if column in summary and summary[column].notna().any():
            break
    else:
        return PlotResult(slug, "mAP vs head latency", None, "skipped: no head latency or head parameter count in these rows")
    what = "head latency" if "latency" in column else "head parameters"
    data = summary[summary[column].notna() & summary["mAP"].notna()].reset_index(drop=True)
    x = data[column].astype(float).to_numpy()
    y = 100 * data["mAP"].astype(float).to_numpy()
    std = 100 * data.get("mAP_std", pd.Series(np.nan, index=data.index)).astype(float).fillna(0).to_numpy()
    front = pareto_front(x, y)
    colors = _colors(data["head"])

    fig = Figure(figsize=(7.5, 4.8))
    ax = fig.add_subplot()
    optimistic = data["optimistic"].astype(bool).to_numpy() if "optimistic" in data else np.zeros(len(data), dtype=bool)
    for head, color in colors.items():
        m = (data["head"] == head).to_numpy()
        ax.errorbar(x[m & ~optimistic], y[m & ~optimistic], yerr=std[m & ~optimistic], fmt="o", color=color, ecolor=color, alpha=0.85,
                    capsize=2, markersize=6, label=head, zorder=3)
        if (m & optimistic).any():
            ax.errorbar(x[m & optimistic], y[m & optimistic], yerr=std[m & optimistic], fmt="s", mfc="none", color=color, ecolor=color,
                        alpha=0.85, capsize=2, markersize=7, label=f"{head} [{OPTIMISTIC}]", zorder=3)
    order = np.argsort(x[front])
    fx, fy = x[front][order], y[front][order]
    ax.plot(fx, fy, drawstyle="steps-post", color="black", linewidth=1.2, linestyle="--", zorder=2, label="Pareto front")
    ax.scatter(fx, fy, s=140, facecolors="none", edgecolors="black", linewidths=1.4, zorder=4)
    positive = x[x > 0]
    if positive.size and positive.max() / positive.min() > 20 and (x > 0).all():
        ax.set_xscale("log")
    _callouts(ax, x[front], y[front], [_label(data.iloc[i]) for i in np.flatnonzero(front)])
    ax.set_xlabel(x_label)
    ax.set_ylabel("mAP (%)  mean ± std over seeds")
    ax.set_title(f"mAP vs {what} — {title}", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    _save(fig, path)
    note = f"x = {x_label}" + ("" if "latency" in column else " (the rows carry no head latency)") + f"; {int(front.sum())} of {len(x)} experiments on the Pareto front (circled)"
    optimistic = int(data["optimistic"].astype(bool).sum()) if "optimistic" in data else 0
    if optimistic:
        note += f"; {optimistic} experiment(s) {OPTIMISTIC}, drawn as hollow squares"
    return PlotResult(slug, f"mAP vs {what}", rel, note)


def _callouts(ax: Any, x: np.ndarray, y: np.ndarray, labels: list[str], gap: float = 0.06) -> None:
    """Label points in a column right of the axes, in the order of their y, with leader lines,
    spaced at least ``gap`` (axes fraction) apart so that labels never overlap."""
    if not len(labels):
        return
    ax.figure.canvas.draw_idle()
    y0, y1 = ax.get_ylim()
    frac = (np.asarray(y, float) - y0) / (y1 - y0)
    order = np.argsort(frac, kind="stable")
    slots = np.empty(len(order))
    low = 0.0
    for k, i in enumerate(order):  # push up so consecutive labels are >= gap apart
        slots[k] = max(frac[i], low)
        low = slots[k] + gap
    overflow = slots[-1] - 1.0
    if overflow > 0:  # shift down, but never below the bottom
        slots = np.maximum(slots - overflow, np.arange(len(slots)) * gap)
        if slots[-1] > 1.0:  # too many labels: squeeze evenly
            slots = np.linspace(0.0, 1.0, len(slots))
    for k, i in enumerate(order):
        ax.annotate(
            labels[i], (x[i], y[i]), xycoords="data", xytext=(1.03, slots[k]), textcoords="axes fraction", fontsize=7.5,
            va="center", ha="left", arrowprops={"arrowstyle": "-", "color": "#888888", "linewidth": 0.6, "shrinkA": 0, "shrinkB": 6},
            annotation_clip=False,
        )


def _fmt_value(v: Any) -> str:
    if isinstance(v, float):
        if math.isinf(v):
            return "∞"
        return f"{v:g}"
    return str(v)


def _hparam_rows(summary: pd.DataFrame, spec: HeatmapSpec, defaults: dict[str, Any] | None) -> tuple[pd.DataFrame, dict[str, Any], str]:
    """The rows of the heat map and the values the other hyper-parameters are held at."""
    rows = summary[summary["head"] == spec.head]
    if rows.empty:
        return rows, {}, f"skipped: no `{spec.head}` runs in this section"
    hp = rows["hparams"].map(lambda h: h if isinstance(h, dict) else {})
    keep = np.ones(len(rows), dtype=bool)
    for key, value in spec.where.items():
        keep &= hp.map(lambda h, k=key, v=value: h.get(k) == v).to_numpy()
    if not keep.any():
        wanted = ", ".join(f"{k}={v}" for k, v in spec.where.items())
        return rows.iloc[0:0], {}, f"skipped: no `{spec.head}` runs with {wanted}"
    rows, hp = rows[keep], hp[keep]
    if not all(spec.x in h and spec.y in h for h in hp):
        return rows.iloc[0:0], {}, f"skipped: `{spec.head}` rows lack hyper-parameter {spec.x!r} or {spec.y!r}"
    others = sorted({k for h in hp for k in h} - {spec.x, spec.y} - set(spec.where))
    fixed: dict[str, Any] = {}
    for key in others:
        values = hp.map(lambda h, k=key: repr(h.get(k)))
        default = (defaults or {}).get(key, None)
        if defaults is not None and key in defaults and (values == repr(default)).any():
            chosen = repr(default)
        else:
            chosen = values.value_counts().index[0]
        mask = (values == chosen).to_numpy()
        rows, hp = rows[mask], hp[mask]
        fixed[key] = next(h.get(key) for h in hp)
    return rows, fixed, ""


def plot_heatmap(spec: HeatmapSpec, summary: pd.DataFrame, path: Path, rel: Path, title: str, defaults: dict[str, Any] | None = None) -> PlotResult:
    """Mean mAP over ``spec.y`` x ``spec.x`` for the rows of ``spec.head``; best cell boxed."""
    rows, fixed, why = _hparam_rows(summary, spec, defaults)
    if why:
        return PlotResult(spec.slug, spec.title, None, why)
    xs = sorted({h[spec.x] for h in rows["hparams"]}, key=_sort_key)
    ys = sorted({h[spec.y] for h in rows["hparams"]}, key=_sort_key)
    if len(xs) * len(ys) < 2:
        return PlotResult(spec.slug, spec.title, None, f"skipped: only one ({spec.y}, {spec.x}) combination was run")
    grid = np.full((len(ys), len(xs)), np.nan)
    spread = np.full_like(grid, np.nan)
    seeds = np.zeros(grid.shape, dtype=int)
    for _, r in rows.iterrows():
        i, j = ys.index(r["hparams"][spec.y]), xs.index(r["hparams"][spec.x])
        grid[i, j] = 100 * r["mAP"]
        spread[i, j] = 100 * r.get("mAP_std", np.nan)
        seeds[i, j] = r.get("seeds", 1)

    fig = Figure(figsize=(1.1 * len(xs) + 3.2, 0.62 * len(ys) + 2.2))
    ax = fig.add_subplot()
    masked = np.ma.masked_invalid(grid)
    image = ax.imshow(masked, cmap=colormaps["viridis"].with_extremes(bad="#dddddd"), aspect="auto", origin="lower")
    finite = grid[np.isfinite(grid)]
    mid = (finite.min() + finite.max()) / 2 if finite.size else 0
    for i in range(len(ys)):
        for j in range(len(xs)):
            if np.isnan(grid[i, j]):
                ax.text(j, i, "not run", ha="center", va="center", fontsize=7, color="#555555")
                continue
            text = f"{grid[i, j]:.1f}" + (f"\n±{spread[i, j]:.1f}" if np.isfinite(spread[i, j]) else "")
            ax.text(j, i, text, ha="center", va="center", fontsize=8, color="black" if grid[i, j] > mid else "white")
    best = np.unravel_index(np.nanargmax(grid), grid.shape)
    ax.add_patch(Rectangle((best[1] - 0.5, best[0] - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2.5))
    ax.set_xticks(range(len(xs)), [_fmt_value(v) for v in xs])
    ax.set_yticks(range(len(ys)), [_fmt_value(v) for v in ys])
    ax.set_xlabel(spec.x_label)
    ax.set_ylabel(spec.y_label)
    held = ", ".join(f"{k}={_fmt_value(v)}" for k, v in {**spec.where, **fixed}.items())
    optimistic = "optimistic" in rows and bool(rows["optimistic"].astype(bool).any())
    ax.set_title(f"{spec.title} — {title}" + (f"\n{held}" if held else "") + (f"\n[{OPTIMISTIC}]" if optimistic else ""), fontsize=9)
    fig.colorbar(image, ax=ax, label="mAP (%)")
    _save(fig, path)
    n = int(seeds[np.isfinite(grid)].max()) if finite.size else 0
    note = f"mean mAP over up to {n} seed(s); best cell boxed in red" + (f"; held at {held}" if held else "")
    if optimistic:
        note += f"; cells from runs {OPTIMISTIC}"
    return PlotResult(spec.slug, spec.title, rel, note)


def _sort_key(v: Any) -> tuple[int, Any]:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return (0, float(v))
    return (1, str(v))


@dataclass
class PerClass:
    """Per-class AP (fractions, mean over seeds) of two experiments on the same classes."""

    classes: list[str]
    best: np.ndarray  # [C], NaN for a class not evaluated
    base: np.ndarray
    best_label: str
    base_label: str
    seeds: int


def plot_per_class(data: PerClass | None, path: Path, rel: Path, title: str, why: str = "") -> PlotResult:
    """A dumbbell chart: per class, the baseline's AP and the best head's AP, sorted by the gain."""
    slug = "per_class"
    if data is None:
        return PlotResult(slug, "Per-class AP", None, why or "skipped: no data")
    ok = np.isfinite(data.best) & np.isfinite(data.base)
    if not ok.any():
        return PlotResult(slug, "Per-class AP", None, "skipped: no class is evaluated in both runs")
    idx = np.flatnonzero(ok)
    gain = (data.best - data.base)[idx]
    idx = idx[np.argsort(gain, kind="stable")]  # largest gain at the top
    names = [data.classes[i] for i in idx]
    best, base = 100 * data.best[idx], 100 * data.base[idx]
    pos = np.arange(len(idx))

    fig = Figure(figsize=(7.5, 0.26 * len(idx) + 1.9))
    ax = fig.add_subplot()
    for p, a, b in zip(pos, base, best):
        ax.plot([a, b], [p, p], color="#2ca02c" if b >= a else "#d62728", linewidth=2, zorder=1)
    ax.scatter(base, pos, color="#7f7f7f", s=28, zorder=2, label=f"{data.base_label}  (mAP {np.mean(base):.1f})")
    ax.scatter(best, pos, color="#1f77b4", marker="D", s=28, zorder=3, label=f"{data.best_label}  (mAP {np.mean(best):.1f})")
    ax.set_yticks(pos, names, fontsize=8 if len(idx) <= 40 else 6)
    ax.set_ylim(-0.7, len(idx) - 0.3)
    ax.set_xlabel("AP (%), mean over seeds")
    ax.grid(True, axis="x", alpha=0.3)
    ax.set_title(f"Per-class AP: best head vs {data.base_label} — {title}", fontsize=9, pad=26)
    ax.legend(fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, frameon=False, borderaxespad=0.2)
    _save(fig, path)
    better = int((gain > 0).sum())
    note = f"{data.best_label} vs {data.base_label} over {data.seeds} seed(s): higher AP on {better} of {len(idx)} classes (green: gain, red: loss)"
    left_out = len(data.classes) - len(idx)
    if left_out:
        note += f"; {left_out} class(es) without a positive test label left out"
    return PlotResult(slug, "Per-class AP", rel, note)


def section_plots(
    summary: pd.DataFrame,
    out_dir: Path,
    prefix: str,
    title: str,
    per_class: PerClass | None,
    per_class_why: str = "",
    heatmaps: Sequence[HeatmapSpec] = (),
    defaults_of: Callable[[str], dict[str, Any] | None] = lambda head: None,
) -> list[PlotResult]:
    """Every plot of one section, written to ``out_dir/plots/<prefix>__<slug>.png``."""
    def where(slug: str) -> tuple[Path, Path]:
        rel = Path("plots") / f"{prefix}__{slug}.png"
        return out_dir / rel, rel

    out = [plot_tradeoff(summary, *where("tradeoff"), title)]
    for spec in heatmaps:
        out.append(plot_heatmap(spec, summary, *where(spec.slug), title, defaults_of(spec.head)))
    out.append(plot_per_class(per_class, *where("per_class"), title, per_class_why))
    return out


CRITICAL_DIFFERENCE = Path("plots") / "across_sections__critical_difference.png"


def plot_critical_difference(
    names: Sequence[str],
    mean_ranks: np.ndarray,
    cliques: Sequence[Sequence[int]],
    cd: float,
    blocks: Sequence[str],
    out_dir: Path,
    note: str,
) -> PlotResult:
    """A critical-difference diagram (Demšar 2006, Fig. 1): the configurations' mean ranks on an
    axis (1 = best, on the left), best half labelled on the left, the rest on the right; thick bars
    join the groups (``cliques``) with no significant difference inside; a scale bar shows the
    Nemenyi critical difference ``cd``. Written to :data:`CRITICAL_DIFFERENCE` under ``out_dir``."""
    slug, title = "critical_difference", "Critical-difference diagram across sections"
    ranks = np.asarray(mean_ranks, dtype=float)
    k = len(names)
    if k < 2:
        return PlotResult(slug, title, None, "skipped: fewer than two configurations to rank")
    order = np.argsort(ranks, kind="stable")
    half = (k + 1) // 2
    left, right = list(order[:half]), list(order[half:][::-1])
    lo, hi = 1.0, float(k)
    span = hi - lo
    height = 1.9 + 0.27 * max(len(left), len(right)) + 0.13 * len(cliques)
    fig = Figure(figsize=(9.5, height))
    ax = fig.add_subplot()
    ax.set_axis_off()
    ax.plot([lo, hi], [0, 0], color="black", linewidth=1)
    step = 1 if k <= 20 else 5 if k <= 60 else 10
    for r in range(1, k + 1):
        major = r == 1 or r == k or r % step == 0
        ax.plot([r, r], [0, -0.1 if major else -0.05], color="black", linewidth=0.8)
        if major:
            ax.text(r, -0.14, str(r), ha="center", va="bottom", fontsize=8)
    if np.isfinite(cd):
        ax.plot([lo, min(lo + cd, hi)], [-0.55, -0.55], color="#444444", linewidth=1.5)
        for end in (lo, min(lo + cd, hi)):
            ax.plot([end, end], [-0.6, -0.5], color="#444444", linewidth=1.5)
        ax.text(lo, -0.64, f"Nemenyi CD = {cd:.2f}" + (" (wider than the axis)" if lo + cd > hi else ""), ha="left", va="bottom", fontsize=7.5, color="#444444")
    y = 0.16
    for clique in cliques:
        xs = ranks[list(clique)]
        ax.plot([xs.min() - 0.015 * span, xs.max() + 0.015 * span], [y, y], color="#222222", linewidth=3.5, solid_capstyle="round")
        y += 0.13
    base = y + 0.2
    x_left, x_right = lo - 0.06 * span - 0.2, hi + 0.06 * span + 0.2
    for side, members, x_text, ha in (("left", left, x_left, "right"), ("right", right, x_right, "left")):
        for i, j in enumerate(members):
            yy = base + 0.27 * i
            ax.plot([ranks[j], ranks[j], x_text], [0, yy, yy], color="#555555", linewidth=0.7)
            ax.text(x_text + (-0.03 if side == "left" else 0.03) * max(span, 1), yy, f"{names[j]}  ({ranks[j]:.2f})" if side == "left" else f"({ranks[j]:.2f})  {names[j]}",
                    ha=ha, va="center", fontsize=8)
    bottom = base + 0.27 * max(len(left), len(right))
    ax.set_xlim(x_left, x_right)
    ax.set_ylim(bottom, -0.95)
    ax.text((lo + hi) / 2, -0.95, f"{title}: mean rank over {len(blocks)} sections (1 = best)", ha="center", va="bottom", fontsize=9.5)
    _save(fig, Path(out_dir) / CRITICAL_DIFFERENCE)
    return PlotResult(slug, title, CRITICAL_DIFFERENCE, note)


def clear_plots(out_dir: Path) -> None:
    """Remove the PNGs a previous report wrote (``plots/*__*.png``), so no stale plot survives."""
    folder = Path(out_dir) / "plots"
    if folder.is_dir():
        for png in folder.glob("*__*.png"):
            png.unlink(missing_ok=True)
