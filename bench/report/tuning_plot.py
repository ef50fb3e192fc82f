"""The heat map of a tuned grid: test mAP of every head configuration (rows) at every point
(columns) and at its tuned choice (last column); each row's best point is boxed."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from bench.core.atomic import atomic_write
from bench.report.plots import DPI, PlotResult, slugify

TITLE = "mAP at every point"


def _save(fig: Figure, path: Path) -> None:
    FigureCanvasAgg(fig)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight"))


def plot_points(matrix: pd.DataFrame, tuned: pd.Series, labels: Sequence[str], values: Sequence[str], default: int | None,
                title: str, out_dir: Path) -> PlotResult:
    """Draw ``matrix`` (configurations x point indices, mean test mAP as fractions) with a last
    column ``tuned`` (mean test mAP at the chosen points) into ``out_dir/plots``.

    Args:
        labels / values: per column of ``matrix``, its short label (``P1``) and its values in words.
        default: the point index equal to the grid's [recipe] (its label is starred), or None.
    """
    slug = "tuning__" + slugify(title)  # plots/*__*.png: removed by the next report (plots.clear_plots)
    if matrix.empty or not np.isfinite(matrix.to_numpy(dtype=float)).any():
        return PlotResult(slug, TITLE, None, "skipped: no finished point")
    grid = 100 * np.column_stack([matrix.to_numpy(dtype=float), tuned.reindex(matrix.index).to_numpy(dtype=float)])
    columns = [f"{lab}*" if i == default else lab for i, lab in zip(matrix.columns, labels)] + ["tuned"]
    rel = Path("plots") / f"{slug}.png"
    fig = Figure(figsize=(0.9 * len(columns) + 4.0, 0.45 * len(matrix.index) + 2.4))
    ax = fig.add_subplot()
    image = ax.imshow(np.ma.masked_invalid(grid), cmap=colormaps["viridis"].with_extremes(bad="#dddddd"), aspect="auto")
    finite = grid[np.isfinite(grid)]
    mid = (finite.min() + finite.max()) / 2
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            text = "-" if np.isnan(grid[i, j]) else f"{grid[i, j]:.1f}"
            ax.text(j, i, text, ha="center", va="center", fontsize=7, color="black" if np.isfinite(grid[i, j]) and grid[i, j] > mid else "white")
        row = grid[i, :-1]
        if np.isfinite(row).any():
            best = int(np.nanargmax(row))
            ax.add_patch(Rectangle((best - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
    ax.axvline(grid.shape[1] - 1.5, color="white", linewidth=3)
    ax.set_xticks(range(len(columns)), columns)
    ax.set_yticks(range(len(matrix.index)), list(matrix.index), fontsize=8)
    ax.set_title(f"test mAP (%) per point — {title}", fontsize=9)
    fig.colorbar(image, ax=ax, label="mAP (%)")
    _save(fig, out_dir / rel)
    legend = "; ".join(f"{lab} = {v}" for lab, v in zip(labels, values))
    note = (f"mean test mAP over seeds; red box: each configuration's best point on the TEST set (not the choice, which is made "
            f"on validation); last column: the validation choices{'; * = the grid’s [recipe]' if default is not None else ''}; {legend}")
    return PlotResult(slug, TITLE, rel, note)
