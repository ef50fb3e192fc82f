"""The report as data: sections of ranked summaries with their tables, settings and plots.

Everything is rebuilt from the Parquet files alone (``runs/*.parquet`` rows and the per-image
``scores/*.parquet``): no training, no model code. One table per dataset x backbone x protocol
("section"); rows are experiments (a head with its hyper-parameters under one setup,
``group_id``), aggregated over seeds as mean ± std, ranked by mean mAP. Each row's Δ mAP vs the
section's reference comes with a 95 % paired-bootstrap interval (``bench.eval.bootstrap``), a
p-value Holm-adjusted over the section's family, and the spread of its per-seed Δ; the section's
best configuration is compared with every other one (ties for first); configurations shared by
several sections are ranked across them (``bench.report.comparisons``). Runs that selected their
epoch on the test split are labelled everywhere (``bench.report.tables.OPTIMISTIC``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from bench.config.recipe import KEYS, load_presets
from bench.eval import bootstrap as stats
from bench.eval import significance
import bench.report.plots as plotting
import bench.report.observed as observed_plot
from bench.report.comparisons import (
    AcrossSections,
    CachedBootstrapper,
    Comparisons,
    ScoreStore,
    across_sections,
    add_deltas,
    add_ties,
    comparison_records,
    comparisons_frame,
    rank_section,
)
from bench.report.plugins import (
    dataset_setting_lines,
    head_defaults,
    heatmap_specs,
    is_reference,
    reference_label,
)
from bench.report.summary import _canonical, summarize
from bench.report.tuning import TuningSection, analyze, leaderboard_rows
from bench.report.tables import (
    ACROSS_COLUMNS,
    BEST_COLUMNS,
    FAILED_COLUMNS,
    LEADERBOARD_COLUMNS,
    OPTIMISTIC,
    SECTION_KEYS,
    Table,
    _missing,
    experiment_label,
    make_table,
)


@dataclass
class Section:
    """One dataset x backbone x protocol: its ranked summary, settings, table and plots."""

    keys: tuple[str, str, str]
    title: str
    slug: str
    summary: pd.DataFrame
    settings: list[str]
    table: Table
    plots: list[plotting.PlotResult] = field(default_factory=list)


@dataclass
class Report:
    """Everything the renderers lay out."""

    sources: list[str]
    filters: dict[str, list[str]]
    runs: int
    finished: int
    best: Table | None
    sections: list[Section]
    failed: Table | None
    notes: list[str]
    resamples: int
    seed: int
    comparisons: pd.DataFrame = field(default_factory=pd.DataFrame)  # one row per comparison (comparisons.parquet)
    across: AcrossSections | None = None  # ranks across sections
    across_table: Table | None = None
    across_plot: plotting.PlotResult | None = None
    tuning: list[TuningSection] = field(default_factory=list)  # a tuned grid's choices (bench/report/tuning.py)

    @property
    def optimistic(self) -> bool:
        """True when some shown run selected its epoch on the test split."""
        return any(bool(s.summary.get("optimistic", pd.Series(False)).any()) for s in self.sections)

    def legend(self) -> list[tuple[str, str]]:
        """(label, definition) of every column shown in any table, in column order."""
        shown: dict[str, str] = {}
        tables = [s.table for s in self.sections] + [t for t in (self.best, self.across_table) if t is not None]
        for column in (*BEST_COLUMNS[:3], *LEADERBOARD_COLUMNS, *BEST_COLUMNS[3:], *ACROSS_COLUMNS):
            if column.legend and any(column.label in table.labels for table in tables):
                shown[column.label] = column.legend
        return list(shown.items())


def _shown_keys(recipe: dict[str, Any]) -> dict[str, Any]:
    """The recipe less the keys that have no effect in it (e.g. ``asl_*`` when the loss is not ASL,
    ``val_fraction`` unless ``select = "best_val"``: ``Key.applies_when``)."""
    return {k: v for k, v in recipe.items() if k not in KEYS or KEYS[k].in_effect(recipe)}


def _recipe_text(recipe: Any, preset: Any) -> str:
    recipe = _canonical(recipe)
    if not isinstance(recipe, dict):
        return "unknown recipe"
    overrides = ""
    name = None if _missing(preset) else str(preset)
    if name:
        try:
            base = {k: spec.default for k, spec in KEYS.items()}
            base.update({k: v for k, v in load_presets().get(name, {}).items() if k != "description"})
            changed = {k: v for k, v in recipe.items() if base.get(k) != v}
            overrides = "; overrides: " + ", ".join(f"{k}={v}" for k, v in sorted(changed.items())) if changed else "; no overrides"
        except Exception:  # presets file moved or invalid: the full recipe below still says it all
            overrides = ""
    full = ", ".join(f"{k}={v}" for k, v in sorted(_shown_keys(recipe).items()))
    return (f"preset `{name}`{overrides}" if name else "no preset") + f". Full recipe: {full}"


def _setup_lines(first: pd.Series) -> list[str]:
    options = _canonical(first.get("dataset_options"))
    options = options if isinstance(options, dict) else {}
    own, other = dataset_setting_lines(str(first.get("dataset")), options)
    split = f"train split `{first.get('train_split', '?')}`, test split `{first.get('test_split', '?')}`"
    if not _missing(first.get("test_images")):
        split += f" ({int(first['test_images'])} test images)"
    lines = [
        *own,
        f"recipe: {_recipe_text(first.get('recipe'), first.get('recipe_preset'))}",
        f"data: {split}" + (f"; dataset options: {', '.join(f'{k}={v}' for k, v in sorted(other.items()))}" if other else ""),
    ]
    weights = first.get("weights")
    lines.append(f"backbone weights: {'none (from scratch)' if _missing(weights) else f'`{weights}`'}")
    untrained = untrained_classes_line(first)
    return lines + ([untrained] if untrained else [])


def untrained_classes_line(row: pd.Series) -> str | None:
    """The setup line saying how many classes had no positive training label (None when none)."""
    count = row.get("train_classes_without_positives")
    if _missing(count) or int(count) <= 0:
        return None
    return f"**{int(count)} class(es) have no positive training label**: scored, never learned (their test AP measures nothing trained)"


def _per_class_data(part: pd.DataFrame, comparisons: Comparisons) -> tuple[plotting.PerClass | None, str]:
    candidates = part[~part.apply(lambda r: is_reference(r["head"], r["hparams"]), axis=1)]
    candidates = candidates[candidates["reference_runs"].map(len) > 0] if "reference_runs" in candidates else candidates.iloc[0:0]
    if candidates.empty:
        return None, f"skipped: no head other than the reference ({reference_label()}) has a reference run to compare with"
    store = comparisons.store
    if store is None:
        return None, "skipped: no score files"
    best = candidates.iloc[0]  # ranked: the best head with a reference
    try:
        # per-run AP comes from the bootstrapper's statistics (cached): only one file is read, for the class names
        classes = list(store.get(best["run_ids"][0]).classes)
        ap_head = np.nanmean(np.stack([comparisons.boot.full(r, store.loader(r)) for r in best["run_ids"]]), axis=0)
        ap_base = np.nanmean(np.stack([comparisons.boot.full(r, store.loader(r)) for r in best["reference_runs"]]), axis=0)
    except FileNotFoundError as exc:
        return None, f"skipped: {exc}"
    base_label = reference_label() + (f" [{OPTIMISTIC}]" if best.get("optimistic") else "")
    return plotting.PerClass(classes, ap_head, ap_base, experiment_label(best), base_label, len(best["run_ids"])), ""


def _filter(rows: pd.DataFrame, column: str, wanted: Sequence[str] | None) -> pd.DataFrame:
    from bench.core.errors import UsageError, choices

    if not wanted or rows.empty:
        return rows
    present = sorted(str(v) for v in rows[column].dropna().unique()) if column in rows else []
    unknown = [w for w in wanted if w not in present]
    if unknown:
        raise UsageError(f"no runs with {column} {choices(unknown)}; the results have {column} {choices(present)}")
    return rows[rows[column].astype(str).isin(list(wanted))]


def auto_resamples(summary: pd.DataFrame, alpha: float = significance.ALPHA) -> int:
    """Bootstrap resamples enough for every section's Holm family to reach ``alpha``.

    With R resamples no p-value is below 2/(R + 1), so a family of m comparisons cannot have a
    Holm-adjusted p-value below 2m/(R + 1). The families are a section's configurations other than
    the reference (or other than the best, for the ties): m = configurations - 1. Returns at
    least :data:`bench.eval.bootstrap.DEFAULT_RESAMPLES`, else the multiple of 1,000 at which the
    largest family's floor is at most alpha / 2 (:func:`bench.eval.significance.resamples_needed`).
    """
    if summary.empty:
        return stats.DEFAULT_RESAMPLES
    largest = int(summary.groupby(list(SECTION_KEYS), sort=False).size().max()) - 1
    return max(stats.DEFAULT_RESAMPLES, significance.resamples_needed(largest, alpha))


def build(
    rows: pd.DataFrame,
    results_dirs: Sequence[str | Path] = (),
    out_dir: str | Path | None = None,
    datasets: Sequence[str] | None = None,
    backbones: Sequence[str] | None = None,
    heads: Sequence[str] | None = None,
    n_resamples: int | None = None,
    seed: int = stats.DEFAULT_SEED,
    plots: bool = True,
) -> Report:
    """Compute the report of ``rows`` (from :func:`bench.results.store.load_all`).

    Args:
        results_dirs: where the score files are (for Δ mAP and the per-class plot).
        out_dir: where plots go (``out_dir/plots``); no plots when None or ``plots`` is False.
        datasets, backbones, heads: show only these. Sections are the chosen datasets x backbones;
            ``heads`` hides rows but not family members: every configuration of a section takes
            part in its Holm family, ranks and ties, so a filter never changes a row's ``*``.
        n_resamples, seed: of the paired bootstrap; ``n_resamples=None`` picks
            :func:`auto_resamples` for the largest Holm family among the sections.
    """
    tuned_rows = _filter(_filter(rows, "dataset", datasets), "backbone", backbones)
    rows = leaderboard_rows(rows)  # a tuned grid: each tune group's chosen point (docs/tuning.md)
    all_rows = rows
    in_sections = _filter(_filter(rows, "dataset", datasets), "backbone", backbones)
    shown = _filter(in_sections, "head", heads)
    notes: list[str] = []
    store = ScoreStore(list(results_dirs), all_rows) if results_dirs and not all_rows.empty else None
    cache = Path(out_dir) / ".cache" / "bootstrap" if out_dir is not None else None
    others = [Path(d) / ".cache" / "bootstrap" for d in results_dirs]  # caches of merged results directories
    family = summarize(in_sections)
    if n_resamples is None:
        n_resamples = auto_resamples(family)
    comparisons = Comparisons(store, CachedBootstrapper(n_resamples, seed, store, cache, others))
    sections: list[Section] = []
    records: list[dict[str, Any]] = []
    blocks: list[tuple[str, pd.DataFrame]] = []
    best_table = None
    if out_dir is not None and plots:
        plotting.clear_plots(Path(out_dir))
    tuning = analyze(tuned_rows, Path(out_dir) if out_dir is not None and plots else None).sections
    if not family.empty:
        visible = summarize(shown)
        shown_groups = set(visible["group_id"]) if not visible.empty else set()
        family = add_deltas(family, all_rows, comparisons.store, comparisons.boot, notes)
        finished = in_sections[in_sections["status"] == "finished"]
        first_row = {gid: r for gid, r in finished.groupby(finished["group_id"].fillna(finished["run_id"]) if "group_id" in finished else finished["run_id"])}
        for keys, part in family.groupby(list(SECTION_KEYS), sort=True):
            part = add_ties(rank_section(part, comparisons.store), all_rows, comparisons.store, comparisons.boot, notes)
            records += comparison_records(part, reference_label())
            part = part[part["group_id"].isin(shown_groups)].reset_index(drop=True)
            if part.empty:
                continue
            setups = list(dict.fromkeys(part["setup"]))
            settings: list[str] = []
            if len(setups) == 1:
                settings = _setup_lines(first_row[part.iloc[0]["group_id"]].iloc[0])
                part["setup_varies"] = False
            else:
                labels = {s: f"S{i + 1}" for i, s in enumerate(setups)}
                for s in setups:
                    gid = part[part["setup"] == s].iloc[0]["group_id"]
                    settings.append(f"setup {labels[s]}: " + "; ".join(_setup_lines(first_row[gid].iloc[0])))
                part["setup"] = part["setup"].map(labels)
                part["setup_varies"] = True
            settings += _selection_lines(part)
            title = " · ".join(str(k) for k in keys)
            for setup, lines in part.groupby("setup", sort=False):
                label = title + (f" · setup {setup}" if len(setups) > 1 else "")
                blocks.append((label + (f" [{OPTIMISTIC}]" if lines["optimistic"].any() else ""), lines))
            slug = plotting.slugify("_".join(str(k) for k in keys))
            section = Section(tuple(str(k) for k in keys), title, slug, part, settings, make_table(part))
            if out_dir is not None and plots:
                per_class, why = _per_class_data(part, comparisons)
                section.plots = plotting.section_plots(part, Path(out_dir), slug, title, per_class, why, heatmap_specs(), head_defaults)
                ids = {r for run_ids in part["run_ids"] for r in run_ids}
                rel = Path("plots") / f"{slug}__{observed_plot.SLUG}.png"
                swept = observed_plot.plot_observed_share(finished[finished["run_id"].isin(ids)], Path(out_dir) / rel, rel, title)
                if swept is not None:  # only when the section sweeps the observed labels
                    section.plots.append(swept)
            sections.append(section)
        if sections:
            ranked = pd.concat([s.summary for s in sections], ignore_index=True).dropna(subset=["mAP"])
            if not ranked.empty:
                best = ranked.loc[ranked.groupby(["dataset", "backbone"], sort=True)["mAP"].idxmax()].reset_index(drop=True)
                best_table = make_table(best, BEST_COLUMNS)
    across = across_table = across_plot = None
    if sections:
        across = across_sections(blocks)
        if across.result is not None:
            across_table = make_table(_across_summary(across), ACROSS_COLUMNS)
            if out_dir is not None and plots:
                across_plot = plotting.plot_critical_difference(
                    across.configurations, across.result.mean_ranks, across.result.cliques, across.result.nemenyi_cd, across.blocks,
                    Path(out_dir), _across_caption(across),
                )
    notes += left_out_class_notes(shown)
    every = _filter(tuned_rows, "head", heads)  # every run, a tuned grid's unchosen points included
    failed = None
    if not shown.empty and "status" in shown:
        bad = shown[shown["status"] == "failed"]
        if not bad.empty:
            failed = make_table(bad.reset_index(drop=True), FAILED_COLUMNS)
    return Report(
        sources=[str(d) for d in results_dirs], filters={k: list(v) for k, v in (("dataset", datasets), ("backbone", backbones), ("head", heads)) if v},
        runs=len(every), finished=int((every["status"] == "finished").sum()) if "status" in every else 0,
        best=best_table, sections=sections, failed=failed, notes=notes, resamples=n_resamples, seed=seed,
        comparisons=comparisons_frame(records), across=across, across_table=across_table, across_plot=across_plot,
        tuning=tuning,
    )


def _selection_lines(part: pd.DataFrame) -> list[str]:
    """A settings line when a section has runs that did not score their last epoch."""
    noted = part[part["select_noted"]] if "select_noted" in part else part.iloc[0:0]
    if noted.empty:
        return []
    rules = ", ".join(f"`{rule}` ({n})" for rule, n in noted["select"].value_counts().sort_index().items())
    line = f"model selection: {len(noted)} of {len(part)} configurations did not score their last epoch: {rules}"
    if noted["optimistic"].any():
        line += f"; those with `best_test` are labelled **{OPTIMISTIC}** in every table and plot"
    return [line]


def _across_summary(across: AcrossSections) -> pd.DataFrame:
    """The across-sections table: one line per configuration, by mean rank, with clique letters."""
    result = across.result
    assert result is not None
    letters = {}
    for n, clique in enumerate(result.cliques):
        for j in clique:
            letters.setdefault(j, []).append(_letter(n))
    order = np.argsort(result.mean_ranks, kind="stable")
    return pd.DataFrame([
        {"mean_rank": float(result.mean_ranks[j]), "configuration": across.configurations[j], "mean_mAP": float(across.values[:, j].mean()),
         "group": ", ".join(letters.get(j, [])) or "-"}
        for j in order
    ])


def _letter(n: int) -> str:
    out = ""
    n += 1
    while n:
        n, r = divmod(n - 1, 26)
        out = chr(ord("a") + r) + out
    return out


def _across_caption(across: AcrossSections) -> str:
    result = across.result
    assert result is not None
    k, n = len(across.configurations), len(across.blocks)
    friedman = (f"Friedman χ² = {result.friedman_statistic:.2f}, p = {result.friedman_p:.3g}" if np.isfinite(result.friedman_p)
                else "Friedman's test needs three or more configurations")
    pairs = int(np.triu(result.significant, 1).sum())
    return (f"{k} configurations ranked in each of {n} sections; {friedman}; {pairs} of {k * (k - 1) // 2} pairs differ significantly "
            f"(Wilcoxon signed-rank over sections, Holm-adjusted p < {result.alpha:g}); bars join groups without a significant pair; "
            f"the scale shows Nemenyi's critical difference ({result.nemenyi_cd:.2f}) for reference")


# -- classes left out of mAP (issue 17: a test split too small for a class to have a positive) ----


def left_out_class_notes(rows: pd.DataFrame) -> list[str]:
    """One note per dataset and test split whose finished runs evaluated fewer classes than the
    dataset has: a class without a positive, non-ignored test image is left out of mAP and the
    class averages (SPEC §1), which the tables alone do not show."""
    needed = {"status", "dataset", "test_split", "num_classes", "classes_evaluated"}
    if rows.empty or not needed <= set(rows):
        return []
    done = rows[(rows["status"] == "finished") & rows["num_classes"].notna() & rows["classes_evaluated"].notna()]
    done = done[done["classes_evaluated"].astype(int) < done["num_classes"].astype(int)]
    notes = []
    for (dataset, split), part in done.groupby(["dataset", "test_split"], sort=True):
        counts = sorted({(int(e), int(c)) for e, c in zip(part["classes_evaluated"], part["num_classes"])})
        said = "; ".join(f"{c - e} of {c} classes" for e, c in counts)
        notes.append(
            f"{dataset}, test split `{split}`: {said} have no positive (non-ignored) test image, so they are left out of mAP "
            f"and the class averages of {len(part)} run(s); a larger test split would evaluate them"
        )
    return notes
