"""The partial-labels plot: test mAP against the share of observed training labels (issue 29).

Drawn for a section whose runs sweep the dataset option ``observe`` (``bench.api.observe``): one
panel per loss (the recipe's ``loss``, with ``unknown_labels`` for the losses that read it), one
line per head configuration, x = the observed share of the training labels, y = test mAP (the test
split is always fully labelled): the mean over seeds with the min–max over seeds as error bars.
The share is the run's realised ``observed_fraction`` (the row column); rows without it (written
before the column existed) use the asked ``observe_fraction``, 1 for ``observe = "all"``, and are
left out for ``single_positive``, whose share only the realised value gives.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

from bench.api.observe import split_observe
from bench.config.recipe import KEYS
from bench.core.atomic import atomic_write
from bench.report.plots import DPI, PlotResult
from bench.report.plugins import describe_hparams

SLUG = "observed_share"
TITLE = "test mAP vs observed share of training labels"
_PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")


def _decoded(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def loss_label(recipe: Any) -> str:
    """The loss of a row's recipe, with ``unknown_labels`` where the loss reads it: ``bce (unknown: ignore)``."""
    recipe = _decoded(recipe)
    if not isinstance(recipe, dict):
        return "?"
    loss = str(recipe.get("loss", KEYS["loss"].default))
    unknown = recipe.get("unknown_labels", KEYS["unknown_labels"].default)
    return f"{loss} (unknown: {unknown})" if KEYS["unknown_labels"].in_effect({"loss": loss}) else loss


def observed_share_points(rows: pd.DataFrame) -> pd.DataFrame:
    """One line per (loss, head configuration, observe setting) of FINISHED rows: ``loss``,
    ``config`` (head and hyper-parameters in words), ``observe`` (the setting's mode), ``share``
    (mean observed share), ``mAP`` (mean over seeds), ``low`` / ``high`` (min / max over seeds),
    ``seeds``. Empty when the rows hold fewer than two observe settings."""
    if rows.empty or "mAP" not in rows:
        return pd.DataFrame()
    done = rows[(rows["status"] == "finished") & rows["mAP"].notna()] if "status" in rows else rows[rows["mAP"].notna()]
    records = []
    for _, row in done.iterrows():
        options = _decoded(row.get("dataset_options"))
        try:
            setting = split_observe(options if isinstance(options, dict) else {})[1]
        except Exception:  # noqa: BLE001 - options a later version wrote: not plotted
            continue
        share = row.get("observed_fraction")
        if share is None or (isinstance(share, float) and np.isnan(share)):
            share = {"all": 1.0, "fraction": setting.fraction}.get(setting.mode)
        if share is None:
            continue
        hparams = _decoded(row.get("hparams"))
        text = describe_hparams(str(row["head"]), hparams if isinstance(hparams, dict) else {})
        records.append({
            "loss": loss_label(row.get("recipe")),
            "config": f"{row['head']} ({text})" if text and text != "-" else str(row["head"]),
            "observe": json.dumps(setting.options(), sort_keys=True),
            "mode": setting.mode,
            "share": float(share), "mAP": float(row["mAP"]),
        })
    if not records:
        return pd.DataFrame()
    frame = pd.DataFrame(records)
    if frame["observe"].nunique() < 2:
        return pd.DataFrame()
    grouped = frame.groupby(["loss", "config", "observe"], sort=True)
    out = grouped.agg(mode=("mode", "first"), share=("share", "mean"), mAP=("mAP", "mean"), low=("mAP", "min"),
                      high=("mAP", "max"), seeds=("mAP", "size")).reset_index()
    return out.sort_values(["loss", "config", "share"], kind="stable").reset_index(drop=True)


def plot_observed_share(rows: pd.DataFrame, path: Path, rel: Path, title: str) -> PlotResult | None:
    """The plot for one section's rows, or None when they do not sweep ``observe`` (then the
    report shows nothing about it)."""
    points = observed_share_points(rows)
    if points.empty:
        return None
    losses = list(dict.fromkeys(points["loss"]))
    configs = sorted(set(points["config"]))
    colors = {c: _PALETTE[i % len(_PALETTE)] for i, c in enumerate(configs)}
    fig = Figure(figsize=(4.6 * len(losses) + 1.5, 4.4))
    axes = fig.subplots(1, len(losses), sharey=True, squeeze=False)[0]
    for ax, loss in zip(axes, losses):
        for config in configs:
            line = points[(points["loss"] == loss) & (points["config"] == config)]
            if line.empty:
                continue
            y = 100 * line["mAP"].to_numpy()
            spread = np.vstack([y - 100 * line["low"].to_numpy(), 100 * line["high"].to_numpy() - y])
            ax.errorbar(line["share"], y, yerr=spread, fmt="-o", color=colors[config], capsize=2, markersize=4, label=config, alpha=0.9)
            single = line["mode"] == "single_positive"
            if single.any():
                ax.scatter(line["share"][single], y[single.to_numpy()], s=90, facecolors="none", edgecolors=colors[config], zorder=4)
        ax.set_xscale("log")
        shares = sorted(set(points["share"].round(4)))
        ax.set_xticks(shares, [f"{100 * v:.3g} %" for v in shares], fontsize=7, rotation=45)
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("observed share of training labels (log)")
        ax.set_title(loss, fontsize=9)
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("test mAP (%)  mean, bars: min–max over seeds")
    axes[-1].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"{TITLE} — {title}", fontsize=10)
    FigureCanvasAgg(fig)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight"))
    settings = points.drop_duplicates("observe")
    note = (f"{len(settings)} observe settings x {len(losses)} loss(es) x {len(configs)} head configuration(s); "
            "single_positive circled; the test split is fully labelled")
    return PlotResult(SLUG, TITLE, rel, note)
