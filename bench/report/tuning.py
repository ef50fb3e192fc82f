"""The report of a tuned grid (docs/tuning.md): what was tuned and on what, the choices, the mAP of
every head at every point, the agreement of each fixed point's ranking with the tuned one, and the
optimism of choosing on the test set.

Two entry points: :func:`leaderboard_rows` turns the rows of a tuned grid into the rows the
leaderboard ranks (each tune group's chosen point, or its refit, re-keyed so that the seeds of a
head configuration form one experiment and pair with the tuned reference of the same seed);
:func:`analyze` builds the tuning sections. The choice itself is :func:`bench.eval.tuning.select_points`
(validation mAP only; ties to the earliest point in grid order).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bench.eval.tuning import Choice, RankAgreement, choice_optimism, is_point, rank_agreement, select_points, selection_flags
from bench.report.plugins import describe_hparams, reference_label
from bench.report.tables import SECTION_KEYS, Column, Table, make_table

#: the value a tuned key shows in the leaderboard's recipe line (its chosen values are per seed)
TUNED = "tuned"
OPTIMISM = "test-set optimism"


@dataclass
class TuningSection:
    """One dataset x backbone x protocol of a tuned grid."""

    keys: tuple[str, str, str]
    title: str
    lines: list[str]
    choices: Table  # per head configuration: tuned rank and mAP, chosen points, default-point rank, optimism
    points: Table  # mAP of every head configuration at every point
    agreement: Table  # Kendall's τ of every point's ranking with the tuned ranking
    frame: pd.DataFrame  # the section's point rows with ``tune_selected``, ``config_label``, ``point_label``
    plot: Any = None  # bench.report.plots.PlotResult of the heat map, or None
    optimism: float = float("nan")  # mean over the section's tune groups


@dataclass
class Tuning:
    """Every tuning section and the choice of every tune group."""

    sections: list[TuningSection] = field(default_factory=list)
    choices: dict[str, Choice] = field(default_factory=dict)


def _missing(value: Any) -> bool:
    try:
        return value is None or bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


def _dict(value: Any) -> dict[str, Any]:
    """A JSON column's value as a dict (rows read back hold dicts; rows built in memory may hold text)."""
    if isinstance(value, dict):
        return json.loads(json.dumps(value, default=str))  # a copy: the caller may change it
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return {}
    return value if isinstance(value, dict) else {}


def _refit(row: pd.Series) -> bool:
    value = row.get("tune_refit")
    return not _missing(value) and bool(value)


def _tuned(rows: pd.DataFrame) -> pd.Series:
    if rows.empty or "tune_group" not in rows:
        return pd.Series(False, index=rows.index)
    return rows["tune_group"].map(lambda g: not _missing(g))


def with_selection(rows: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, Choice]]:
    """``rows`` with the column ``tune_selected`` (True for each tune group's chosen point, False
    for its other points and refits, NaN for untuned rows), and the choices."""
    rows = rows.copy()
    records = rows.to_dict("records")
    choices = select_points(records)
    rows["tune_selected"] = selection_flags(records, choices)
    return rows, choices


def _point_values(row: pd.Series) -> dict[str, Any]:
    return _dict(row.get("tune_point"))


def leaderboard_rows(rows: pd.DataFrame) -> pd.DataFrame:
    """The rows the leaderboard ranks: untuned rows as they are; of a tuned grid, per tune group
    its chosen point (or, when the group has a finished refit of that point, the refit instead) and its failed
    points (for the failed-runs table). The kept rows are re-keyed: ``group_id`` ignores the seed
    and the tuned keys, and ``config`` / ``recipe`` show the tuned keys as ``"tuned"``, so a head
    configuration's seeds form one experiment and pair with the reference's choice of the same seed."""
    if rows.empty or not _tuned(rows).any():
        return rows
    rows, choices = with_selection(rows)
    tuned = _tuned(rows)
    refits = {str(r["tune_group"]) for _, r in rows[tuned].iterrows() if _fresh_refit(r, choices)}
    keep = []
    for i, row in rows.iterrows():
        if not tuned[i]:
            keep.append(i)
        elif row.get("status") == "failed":
            keep.append(i)
        elif str(row["tune_group"]) in refits:
            if _fresh_refit(row, choices):
                keep.append(i)
        elif bool(row["tune_selected"]):
            keep.append(i)
    out = rows.loc[keep].copy()
    for i, row in out.iterrows():
        if not tuned[i]:
            continue
        space = _dict(_dict(row.get("config")).get("tune")).get("space", {})
        config = _dict(row.get("config"))
        recipe = {k: (TUNED if k in space else v) for k, v in _dict(row.get("recipe")).items()}
        config["recipe"] = {k: (TUNED if k in space else v) for k, v in _dict(config.get("recipe")).items()}
        config.pop("tune", None)  # a refit pairs with the reference's refit, a point with its point
        out.at[i, "recipe"] = recipe
        out.at[i, "config"] = config
        family = {k: v for k, v in config.items() if k != "seed"}
        family["recipe"] = {k: v for k, v in config["recipe"].items() if k not in ("select", "val_fraction")}
        family["tune"] = {"space": space, "refit": _refit(row)}
        out.at[i, "group_id"] = "tuned-" + hashlib.sha256(json.dumps(family, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return out


def _fresh_refit(row: pd.Series, choices: dict[str, Choice]) -> bool:
    """A finished refit of its group's current choice (a refit of another point is stale: a point
    was retried since, and the choice moved)."""
    choice = choices.get(str(row["tune_group"]))
    index = row.get("tune_index")
    return (_refit(row) and row.get("status") == "finished" and choice is not None and choice.index is not None
            and not _missing(index) and int(index) == choice.index)


def _label(head: str, hparams: dict[str, Any]) -> str:
    text = describe_hparams(head, hparams)
    return f"{head} ({text})" if text and text != "-" else head


def _point_label(index: int) -> str:
    return f"P{index + 1}"


def _values_text(values: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())


def _pct(value: float, std: float = float("nan")) -> str:
    if _missing(value) or not np.isfinite(value):
        return "-"
    return f"{100 * value:.1f}" + ("" if _missing(std) or not np.isfinite(std) else f" ± {100 * std:.1f}")


def _col(label: str, legend: str, key: str, align: str = "right") -> Column:
    return Column(label, legend, lambda r: str(r[key]), lambda r: r.get(f"{key}_sort", r[key]), align=align)


def _section(keys: tuple[str, str, str], part: pd.DataFrame, choices: dict[str, Choice], out_dir: Path | None) -> TuningSection:
    part = part.copy()
    part["config_label"] = [_label(h, _dict(hp)) for h, hp in zip(part["head"], part["hparams"])]
    part["point_label"] = part["tune_index"].map(lambda i: _point_label(int(i)))
    values = {int(i): _point_values(r) for i, (_, r) in zip(part["tune_index"], part.iterrows())}
    indices = sorted(values)
    budget = int(pd.to_numeric(part["tune_points"], errors="coerce").max())
    defaults = pd.to_numeric(part.get("tune_default", pd.Series(dtype=float)), errors="coerce").dropna()
    default = int(defaults.iloc[0]) if len(defaults) else None
    done = part[part["status"] == "finished"]
    configs = list(dict.fromkeys(part["config_label"]))
    test = pd.to_numeric(done["mAP"], errors="coerce")
    matrix = done.assign(mAP=test).pivot_table(index="config_label", columns="tune_index", values="mAP", aggfunc="mean")
    matrix = matrix.reindex(index=configs, columns=indices)
    groups = {g: m for g, m in part.groupby("tune_group", sort=False)}
    per_config: dict[str, dict[str, Any]] = {c: {"tuned": [], "chosen": [], "optimism": [], "seeds": []} for c in configs}
    for group, members in groups.items():
        choice = choices.get(str(group))
        label = members.iloc[0]["config_label"]
        if choice is None or choice.run_id is None:
            continue
        chosen = members[members["run_id"] == choice.run_id].iloc[0]
        finished = members[members["status"] == "finished"]
        test_map = {int(i): float(v) for i, v in zip(finished["tune_index"], pd.to_numeric(finished["mAP"], errors="coerce"))}
        per_config[label]["tuned"].append(float(chosen["mAP"]))
        per_config[label]["chosen"].append((int(chosen["seed"]), choice.index))
        per_config[label]["optimism"].append(choice_optimism(test_map, int(choice.index)))
    tuned = pd.Series({c: np.mean(v["tuned"]) if v["tuned"] else np.nan for c, v in per_config.items()})
    tuned_std = pd.Series({c: np.std(v["tuned"], ddof=1) if len(v["tuned"]) > 1 else np.nan for c, v in per_config.items()})
    tuned_rank = tuned.rank(method="min", ascending=False)
    lines_out = []
    for c in configs:
        line: dict[str, Any] = {"config": c, "tuned_rank": "-" if np.isnan(tuned_rank[c]) else str(int(tuned_rank[c])),
                                "tuned_rank_sort": tuned_rank[c], "tuned": _pct(tuned[c], tuned_std[c]), "tuned_sort": tuned[c]}
        chosen = sorted(per_config[c]["chosen"])
        line["chosen"] = "; ".join(f"seed {s}: {_point_label(i)} ({_values_text(values[i])})" for s, i in chosen) or "-"
        line["chosen_sort"] = line["chosen"]
        if default is not None and default in matrix.columns:
            ranks = matrix[default].rank(method="min", ascending=False)
            line["default_rank"] = "-" if np.isnan(ranks[c]) else str(int(ranks[c]))
            line["default_rank_sort"] = ranks[c]
            line["default"] = _pct(matrix.at[c, default])
            line["default_sort"] = matrix.at[c, default]
        opt = [o for o in per_config[c]["optimism"] if np.isfinite(o)]
        line["optimism"] = f"{100 * np.mean(opt):.2f}" if opt else "-"
        line["optimism_sort"] = np.mean(opt) if opt else np.nan
        lines_out.append(line)
    choice_frame = pd.DataFrame(lines_out).sort_values("tuned_rank_sort", kind="stable", na_position="last")
    columns = [
        _col("tuned rank", "Rank by the mean test mAP of each seed's chosen point (1 = best).", "tuned_rank"),
        _col("head configuration", "Head and hyper-parameters.", "config", "left"),
        _col("tuned mAP", "Test mAP (%) at each seed's chosen point, mean ± sample std over seeds.", "tuned"),
        _col("chosen point per seed", "The point with the best validation mAP, per seed (values of the tuned keys).", "chosen", "left"),
    ]
    if default is not None:
        columns += [
            _col("rank at the grid's recipe", f"Rank at {_point_label(default)}, the point equal to the grid's [recipe] (untuned).", "default_rank"),
            _col("mAP at the grid's recipe", f"Mean test mAP (%) at {_point_label(default)} over seeds.", "default"),
        ]
    columns.append(_col(OPTIMISM, "Mean over seeds of (best test mAP over the points − test mAP of the validation choice), "
                        "in mAP points: what choosing on the TEST set would have added (optimistic, not a result).", "optimism"))
    choices_table = make_table(choice_frame, columns)

    # (a) mAP of every head configuration at every point
    rows_a = []
    for c in configs:
        line = {"config": c, "config_sort": c}
        for i in indices:
            line[_point_label(i)] = _pct(matrix.at[c, i])
            line[f"{_point_label(i)}_sort"] = matrix.at[c, i]
        line["tuned_map"], line["tuned_map_sort"] = _pct(tuned[c]), tuned[c]
        rows_a.append(line)
    point_columns = [_col("head configuration", "Head and hyper-parameters.", "config", "left")]
    point_columns += [_col(_point_label(i), _values_text(values[i]), _point_label(i)) for i in indices]
    point_columns.append(_col("tuned", "Mean test mAP (%) at each seed's chosen point.", "tuned_map"))
    points_table = make_table(pd.DataFrame(rows_a), point_columns)

    # (b) Kendall's τ between the ranking at each fixed point and the tuned ranking
    rows_b = []
    for i in indices:
        agreement: RankAgreement = rank_agreement(matrix[i].to_numpy(), tuned.reindex(configs).to_numpy())
        rows_b.append({
            "point": _point_label(i) + (" (grid's recipe)" if i == default else ""), "point_sort": i,
            "values": _values_text(values[i]), "values_sort": i,
            "tau": "-" if np.isnan(agreement.tau) else f"{agreement.tau:+.2f}", "tau_sort": agreement.tau,
            "p": "-" if np.isnan(agreement.p) else f"{agreement.p:.3g}", "p_sort": agreement.p,
            "n": str(agreement.n), "n_sort": agreement.n,
        })
    agreement_table = make_table(pd.DataFrame(rows_b), [
        _col("point", "A point of the search space (grid order).", "point", "left"),
        _col("values", "The point's values of the tuned keys.", "values", "left"),
        _col("Kendall's τ", "Kendall's τ-b (scipy.stats.kendalltau) between the ranking of head configurations by mean test mAP "
             "at this point and the tuned ranking: 1 = the same order; near 0 or negative = the verdict depends on the recipe.", "tau"),
        _col("p", "Two-sided p-value of τ (scipy); not adjusted over points.", "p"),
        _col("configurations", "Head configurations with a value at this point and a tuned value.", "n"),
    ])

    all_opt = [o for v in per_config.values() for o in v["optimism"] if np.isfinite(o)]
    optimism = float(np.mean(all_opt)) if all_opt else float("nan")
    lines = _lines(part, choices, groups, budget, indices, values, default, all_opt)
    part["tune_selected"] = part["run_id"].isin({c.run_id for c in choices.values()})
    plot = None
    if out_dir is not None:
        from bench.report.tuning_plot import plot_points

        plot = plot_points(matrix, tuned, [_point_label(i) for i in indices], [_values_text(values[i]) for i in indices],
                           default, " · ".join(str(k) for k in keys), out_dir)
    return TuningSection(keys, " · ".join(str(k) for k in keys), lines, choices_table, points_table, agreement_table, part, plot, optimism)


def _space_text(space: dict[str, list[Any]]) -> str:
    return " x ".join(k + " ∈ {" + ", ".join(str(v) for v in vs) + "}" for k, vs in space.items())


def _lines(part: pd.DataFrame, choices: dict[str, Choice], groups: dict[Any, pd.DataFrame], budget: int, indices: list[int],
           values: dict[int, dict[str, Any]], default: int | None, optimism: list[float]) -> list[str]:
    first = part.iloc[0]
    recipe = _dict(first.get("recipe"))
    space = _dict(_dict(first.get("config")).get("tune")).get("space", {})
    val_images = pd.to_numeric(part.get("val_images", pd.Series(dtype=float)), errors="coerce").dropna()
    held = f"{int(val_images.iloc[0])} held-out training images" if len(val_images) else "held-out training images"
    seeds = sorted({int(s) for s in part["seed"]})
    lines = [
        f"**Heads were tuned**: every head configuration x seed ({len(seeds)} seed(s)) trained at the same {budget} points "
        f"({_space_text(space)}); each (configuration, seed) keeps "
        f"the point with the best validation mAP (`select = \"best_val\"`, val_fraction = {recipe.get('val_fraction', '?')}: {held}, "
        "the same images for every head, seed and point); ties go to the earliest point in grid order. The leaderboard above ranks "
        "those choices by their TEST mAP; the reference is the tuned " + reference_label() + ".",
        "Points: " + "; ".join(f"{_point_label(i)} = {_values_text(values[i])}" + (" (the grid's [recipe])" if i == default else "") for i in indices) + ".",
    ]
    if optimism:
        lines.append(
            f"{OPTIMISM.capitalize()} (choosing each group's point on the TEST set instead of validation; optimistic, not a result): "
            f"mean +{100 * np.mean(optimism):.2f} mAP points over {len(optimism)} tune groups (max +{100 * np.max(optimism):.2f})."
        )
    refits = part.apply(_refit, axis=1).any() if "tune_refit" in part else False
    if refits:
        lines.append("Refit (`[tune] refit = true`): the leaderboard shows each chosen point retrained on train + validation.")
    failed = [(c, r) for c, r in ((choices.get(str(g)), m) for g, m in groups.items()) if c is not None and c.failed]
    for choice, members in failed:
        who = members.iloc[0]
        points = ", ".join(_point_label(int(i)) for i in members[members["run_id"].isin(choice.failed)]["tune_index"])
        lines.append(f"Failed points (never chosen): {_label(who['head'], _dict(who['hparams']))}, seed {int(who['seed'])}: {points}.")
    open_groups = [c for g, c in choices.items() if g in {str(x) for x in groups} and not c.complete]
    if open_groups:
        lines.append(f"{len(open_groups)} tune group(s) have points without a result yet: their choice is provisional.")
    none = [c for g, c in choices.items() if g in {str(x) for x in groups} and c.run_id is None]
    if none:
        lines.append(f"{len(none)} tune group(s) have no finished point with a validation mAP: no choice, left out of the leaderboard.")
    return lines


def analyze(rows: pd.DataFrame, out_dir: Path | None = None) -> Tuning:
    """The tuning sections of ``rows`` (empty when no row belongs to a tuned grid).

    Args:
        rows: every result row (bench.results.store.load_all).
        out_dir: where the heat maps go (``out_dir/plots``); None: no plots.
    """
    if rows.empty or not _tuned(rows).any():
        return Tuning()
    rows, choices = with_selection(rows)
    points = rows[_tuned(rows) & rows.apply(lambda r: is_point(r.to_dict()), axis=1)]
    sections = []
    for keys, part in points.groupby(list(SECTION_KEYS), sort=True):
        sections.append(_section(tuple(str(k) for k in keys), part, choices, out_dir))
    return Tuning(sections, choices)



TITLE = "Tuning"


def blocks(section: TuningSection) -> list[tuple[str, Table]]:
    """(title, table) of a tuning section, in the order every renderer shows them."""
    return [
        ("Chosen points (validation) and the leaderboard at the grid's recipe", section.choices),
        ("(a) Test mAP (%) of every head configuration at every point", section.points),
        ("(b) Kendall's τ between each point's ranking and the tuned ranking", section.agreement),
    ]


def column_legend(table: Table) -> str:
    """One line defining a tuning table's columns (markdown inline markup)."""
    return "; ".join(f"**{c.label}**: {c.legend.rstrip('.')}" for c in table.columns) + "."
