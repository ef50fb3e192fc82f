"""Leaderboards from result rows: ``leaderboard.md``, the console tables, ``report.html`` and plots.

Everything is rebuilt from the Parquet files alone (``runs/*.parquet`` rows and the per-image
``scores/*.parquet``): no training, no model code. One entry point::

    build_report(["results"], formats=("md", "html", "console"))

One table per dataset x backbone x protocol ("section"); rows are experiments (a head with its
hyper-parameters under one setup, ``group_id``), aggregated over seeds as mean ± std, ranked by
mean mAP. Each row's Δ mAP vs the average-pooling baseline of the same backbone / dataset /
protocol / recipe / seed comes with a 95 % paired-bootstrap interval (``bench.stats``).

Rendering: :func:`make_table` turns a summary into display strings (and numeric sort keys) from
ONE list of column definitions (:data:`LEADERBOARD_COLUMNS`), which also writes the legend; the
markdown, console (rich) and HTML (``bench.html_report``) renderers only lay that table out.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import pandas as pd
from rich import box
from rich.console import Console
from rich.table import Table as RichTable
from tabulate import tabulate

from bench import plots as plotting
from bench import stats
from bench.atomic import atomic_write, atomic_write_bytes
from bench.difficult_labels import DIFFICULT_POLICIES

METRICS = ("mAP", "CP", "CR", "CF1", "mF1", "OP", "OR", "OF1", "CP_top3", "CR_top3", "CF1_top3", "mF1_top3", "OP_top3", "OR_top3", "OF1_top3")
SECTION_KEYS = ("dataset", "backbone", "protocol")
# Per-experiment means of these row columns are carried into the summary when present.
COST_COLUMNS = ("train_images_per_s", "eval_images_per_s", "head_latency_b1_ms", "head_latency_b64_ms", "head_params", "head_flops", "total_params")
MIN_COLUMNS = ("head_latency_b1_ms", "head_latency_b64_ms")  # aggregated by the minimum over seeds
# The reference every head is compared with: (head, hyper-parameters it must have).
REFERENCE = ("baseline", {"pool": "avg"})
# The parts of a run's configuration, besides the head, that define its "setup".
SETUP_KEYS = ("dataset_options", "train_split", "test_split", "weights", "recipe")
FORMATS = ("md", "html", "console")
# Bump when the resampling or the AP computation changes: old bootstrap cache files are then ignored.
CACHE_VERSION = 1

CONVENTIONS = """\
Metric conventions (SPEC §1): values are percentages on the test split. **mAP** is the mean over
the evaluated classes of non-interpolated average precision; tied scores form one threshold (as
scikit-learn), so it does not depend on the order of images. A class is evaluated when it has at
least one positive, non-ignored test label; other classes are left out of every class average.
Ignored entries (VOC "difficult" labels under the `ignore` policy) take no part in any metric. A
label is predicted when its probability is ≥ 0.5; the @3 variants also require it to be among the
3 highest scores of its image (ties to the lower class index). **CF1** (ML-GCN/CSRA) and **mF1**
(macro F1) are different numbers and are always reported under their own names."""


# ---------------------------------------------------------------------------------------------
# Formatting helpers
# ---------------------------------------------------------------------------------------------


def _parse_json(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _missing(value: Any) -> bool:
    try:
        return value is None or bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


def _pct(mean: float, std: float, digits: int = 1) -> str:
    if _missing(mean):
        return "-"
    return f"{100 * mean:.{digits}f}" + ("" if _missing(std) else f" ± {100 * std:.{digits}f}")


def _count(value: float) -> str:
    if _missing(value):
        return "-"
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.2f}{suffix}" if scale > 1e3 else f"{value / scale:.1f}{suffix}"
    return f"{value:.0f}"


def _ms(value: float) -> str:
    if _missing(value):
        return "-"
    return f"{value:.3f}" if value < 1 else f"{value:.2f}"


def _rate(value: float) -> str:
    return "-" if _missing(value) else f"{value:.0f}"


def _num(value: Any) -> float:
    return float("nan") if _missing(value) else float(value)


def describe_hparams(head: str, hparams: dict[str, Any]) -> str:
    """Hyper-parameters in words, via the head's ``describe_hparams`` when it is installed."""
    from bench import registry  # local: reports must work even where plugins fail to import

    try:
        cls = registry.head_class(head)
        describe = getattr(cls, "describe_hparams", None)
        if describe is not None:
            return describe(hparams)
    except Exception:  # a removed or broken plugin: fall back to key=value
        pass
    return ", ".join(f"{k}={v}" for k, v in sorted(hparams.items())) or "-"


def head_defaults(head: str) -> dict[str, Any] | None:
    """The registered defaults of a head's hyper-parameters, or None when it is not installed."""
    from bench import registry

    try:
        return registry.head_hparams(head)
    except Exception:
        return None


def delta_text(line: pd.Series | dict[str, Any]) -> str:
    """``+1.23 [+0.45, +2.01] *`` (percentage points), ``ref``, or ``-``."""
    note = line.get("delta_note")
    if note == "ref":
        return "ref"
    if _missing(line.get("delta")):
        return "-"
    text = f"{100 * line['delta']:+.2f}"
    if not _missing(line.get("delta_low")):
        text += f" [{100 * line['delta_low']:+.2f}, {100 * line['delta_high']:+.2f}]"
        if line.get("delta_significant"):
            text += " *"
    pairs, seeds = line.get("delta_pairs"), line.get("seeds")
    if not _missing(pairs) and not _missing(seeds) and pairs < seeds:
        text += f" ({int(pairs)}/{int(seeds)} seeds)"
    return text


# ---------------------------------------------------------------------------------------------
# Columns: ONE definition list for every renderer and for the legend
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Column:
    """A display column: its label, its legend text, how to render and sort one summary line."""

    label: str
    legend: str
    text: Callable[[pd.Series], str]
    sort: Callable[[pd.Series], Any]
    needs: str | None = None  # shown only when this summary column has a value in the section
    align: str = "right"


def _metric_column(metric: str, label: str, legend: str, digits: int = 1) -> Column:
    return Column(
        label, legend, lambda r: _pct(r.get(metric), r.get(f"{metric}_std"), digits), lambda r: _num(r.get(metric)), needs=metric
    )


LEADERBOARD_COLUMNS: tuple[Column, ...] = (
    Column("rank", "Position by mean mAP within the section (1 = best; equal means share a rank).", lambda r: str(int(r["rank"])), lambda r: int(r["rank"])),
    Column("head", "The registered head (`heads/<name>.py`).", lambda r: str(r["head"]), lambda r: str(r["head"]), align="left"),
    Column("hyper-parameters", "The head's hyper-parameters in words (the head's `describe_hparams`, else key=value).", lambda r: str(r["hparams_text"]), lambda r: str(r["hparams_text"]), align="left"),
    Column("setup", "Which of the section's setups (recipe, dataset options, splits, backbone weights; listed above the table) the row used. Shown only when a section mixes setups.", lambda r: str(r.get("setup", "")), lambda r: str(r.get("setup", "")), needs="setup_varies", align="left"),
    _metric_column("mAP", "mAP", "Mean average precision (%): mean ± sample standard deviation over seeds (no ± with one seed).", digits=2),
    Column("n", "Number of seeds (finished runs) aggregated in the row.", lambda r: str(int(r["seeds"])), lambda r: int(r["seeds"])),
    _metric_column("CF1", "CF1", "Per-class F1 as ML-GCN/CSRA define it: 2·CP·CR/(CP+CR) from the class-mean precision CP and recall CR (%), mean ± std."),
    _metric_column("OF1", "OF1", "Overall (micro) F1 from precision and recall summed over all labels (%), mean ± std."),
    _metric_column("CF1_top3", "CF1@3", "CF1 when each image keeps at most its 3 highest-scoring labels (%)."),
    _metric_column("OF1_top3", "OF1@3", "OF1 when each image keeps at most its 3 highest-scoring labels (%)."),
    _metric_column("mF1", "mF1", "Mean of the per-class F1 scores (macro F1, as mmpretrain/ASL) (%): a different number from CF1."),
    Column(
        "Δ mAP [95% CI]",
        "mAP(head) − mAP(average-pooling baseline with the same dataset, backbone, protocol, recipe and seed), in percentage "
        "points, mean over seeds; in brackets the 95 % paired-bootstrap percentile interval over test images (both runs "
        "scored on the same resampled images; procedure in `bench/stats.py` and `docs/report.md`). `*`: the interval "
        "excludes 0 (a significant difference). `ref`: the baseline itself. `-`: no baseline run or no score files. "
        "`(k/n seeds)`: only k seeds had a baseline to pair with.",
        delta_text, lambda r: _num(r.get("delta")) if r.get("delta_note") != "ref" else 0.0, needs="delta_any",
    ),
    Column("train img/s", "Training images per second of the whole pipeline, all processes (mean over seeds).", lambda r: _rate(r.get("train_images_per_s")), lambda r: _num(r.get("train_images_per_s")), needs="train_images_per_s"),
    Column("eval img/s", "Evaluation images per second of the whole pipeline (mean over seeds).", lambda r: _rate(r.get("eval_images_per_s")), lambda r: _num(r.get("eval_images_per_s")), needs="eval_images_per_s"),
    Column("latency b1 (ms)", "Head forward latency at batch size 1, milliseconds (the head alone, on backbone features), minimum over seeds (timing noise only adds time).", lambda r: _ms(r.get("head_latency_b1_ms")), lambda r: _num(r.get("head_latency_b1_ms")), needs="head_latency_b1_ms"),
    Column("latency b64 (ms)", "Head forward latency at batch size 64, milliseconds (the head alone), minimum over seeds.", lambda r: _ms(r.get("head_latency_b64_ms")), lambda r: _num(r.get("head_latency_b64_ms")), needs="head_latency_b64_ms"),
    Column("head params", "Trainable parameters of the head alone (k = 10³, M = 10⁶).", lambda r: _count(r.get("head_params")), lambda r: _num(r.get("head_params")), needs="head_params"),
    Column("head FLOPs", "Floating-point operations of one forward pass of the head per image, as recorded in the run's `head_flops` (k/M/G).", lambda r: _count(r.get("head_flops")), lambda r: _num(r.get("head_flops")), needs="head_flops"),
)

BEST_COLUMNS: tuple[Column, ...] = (
    Column("dataset", "The registered dataset (`datasets/<name>.py`) whose test split is scored.", lambda r: str(r["dataset"]), lambda r: str(r["dataset"]), align="left"),
    Column("backbone", "The feature extractor the head sits on (`bench/backbones.py`).", lambda r: str(r["backbone"]), lambda r: str(r["backbone"]), align="left"),
    Column("protocol", "The recipe's protocol: `finetune` trains backbone and head, `frozen` trains the head on fixed backbone features.", lambda r: str(r["protocol"]), lambda r: str(r["protocol"]), align="left"),
    *[c for c in LEADERBOARD_COLUMNS if c.label in ("head", "hyper-parameters", "mAP", "n", "Δ mAP [95% CI]")],
)

FAILED_COLUMNS: tuple[Column, ...] = tuple(
    Column(name, "", lambda r, k=name: "" if _missing(r.get(k)) else str(r.get(k))[:160], lambda r, k=name: "" if _missing(r.get(k)) else str(r.get(k)), align="left")
    for name in ("run_id", "dataset", "backbone", "head", "seed", "error_type", "error")
)


@dataclass
class Table:
    """A rendered table: display strings, sort keys (numbers or strings; NaN = missing), alignment."""

    columns: list[Column]
    text: pd.DataFrame
    sort_keys: pd.DataFrame

    @property
    def labels(self) -> list[str]:
        return [c.label for c in self.columns]

    def __len__(self) -> int:
        return len(self.text)


def _has(frame: pd.DataFrame, name: str | None) -> bool:
    if name is None:
        return True
    if name not in frame:
        return False
    values = frame[name]
    return bool(values.map(lambda v: not _missing(v) and v is not False).any())


def make_table(summary: pd.DataFrame, columns: Sequence[Column] = LEADERBOARD_COLUMNS) -> Table:
    """The display table of ``summary`` (already ranked/ordered): one entry per column whose data
    is present. Every renderer (markdown, console, HTML) lays out this one table."""
    shown = [c for c in columns if _has(summary, c.needs)]
    records = [r for _, r in summary.iterrows()]
    text = pd.DataFrame({c.label: [c.text(r) for r in records] for c in shown}, columns=[c.label for c in shown])
    keys = pd.DataFrame({c.label: [c.sort(r) for r in records] for c in shown}, columns=[c.label for c in shown])
    return Table(shown, text, keys)


# ---------------------------------------------------------------------------------------------
# Summaries
# ---------------------------------------------------------------------------------------------


def summarize(rows: pd.DataFrame) -> pd.DataFrame:
    """Aggregate finished rows over seeds: one line per experiment (``group_id``).

    Returns a frame with the section keys, ``group_id``, ``head``, ``hparams`` (dict),
    ``hparams_text``, ``seeds`` (count), ``run_ids`` (list), ``setup`` (a JSON key of the
    non-head configuration) and, for every metric m present, ``m`` (mean) and ``m_std`` (sample
    std, NaN with one seed); cost columns (:data:`COST_COLUMNS`) are means. Sorted by section,
    then mean mAP descending.
    """
    if rows.empty or "status" not in rows:
        return pd.DataFrame()
    done = rows[rows["status"] == "finished"].copy()
    if done.empty:
        return pd.DataFrame()
    done["hparams"] = done["hparams"].map(lambda h: _parse_json(h) if not _missing(h) else {})
    if "group_id" not in done:
        done["group_id"] = done["run_id"]
    done["group_id"] = done["group_id"].fillna(done["run_id"])
    metric_cols = [m for m in METRICS if m in done]
    cost_cols = [c for c in COST_COLUMNS if c in done]
    out = []
    for group_id, group in done.groupby("group_id", sort=False):
        first = group.iloc[0]
        line: dict[str, Any] = {k: first.get(k) for k in SECTION_KEYS}
        line.update(group_id=group_id, head=first["head"], hparams=first["hparams"], seeds=len(group))
        line["hparams_text"] = describe_hparams(first["head"], first["hparams"] if isinstance(first["hparams"], dict) else {})
        line["run_ids"] = list(group["run_id"])
        line["seed_list"] = sorted(int(s) for s in group["seed"]) if "seed" in group else []
        line["setup"] = _setup_key(first)
        for m in metric_cols:
            values = pd.to_numeric(group[m], errors="coerce")
            line[m] = values.mean()
            line[f"{m}_std"] = values.std(ddof=1) if values.notna().sum() > 1 else np.nan
        for c in cost_cols:
            values = pd.to_numeric(group[c], errors="coerce")
            # a head's latency does not depend on the seed, and timing noise (a busy machine) only
            # adds time: the minimum over seeds is the best estimate (as timeit advises)
            line[c] = values.min() if c in MIN_COLUMNS else values.mean()
        out.append(line)
    table = pd.DataFrame(out)
    return table.sort_values([*SECTION_KEYS, "mAP", "head", "hparams_text"], ascending=[True, True, True, False, True, True], kind="stable").reset_index(drop=True)


def _canonical(value: Any) -> Any:
    value = _parse_json(value)
    return None if _missing(value) else value


def _setup_key(row: pd.Series) -> str:
    return json.dumps({k: _canonical(row.get(k)) for k in SETUP_KEYS}, sort_keys=True, default=str)


def _pair_key(row: pd.Series) -> str:
    """Everything of a run's configuration except the head (so a head run and its baseline run of
    the same seed share it)."""
    config = _canonical(row.get("config"))
    if isinstance(config, dict) and "head" in config:
        return json.dumps({k: v for k, v in config.items() if k != "head"}, sort_keys=True, default=str)
    keys = ("dataset", "backbone", "protocol", "seed", *SETUP_KEYS)
    return json.dumps({k: _canonical(row.get(k)) for k in keys}, sort_keys=True, default=str)


def is_reference(head: str, hparams: Any) -> bool:
    """True for the average-pooling baseline (:data:`REFERENCE`)."""
    name, wanted = REFERENCE
    hparams = hparams if isinstance(hparams, dict) else {}
    return head == name and all(hparams.get(k, v) == v for k, v in wanted.items())


# ---------------------------------------------------------------------------------------------
# Score files and Δ mAP
# ---------------------------------------------------------------------------------------------


class ScoreStore:
    """Finds and loads the per-image score file of a run across several results directories."""

    def __init__(self, results_dirs: Sequence[Path], rows: pd.DataFrame) -> None:
        from bench import results

        self._results = results
        self.dirs = [Path(d) for d in results_dirs]
        self.finished_at = dict(zip(rows["run_id"], rows["finished_at"])) if {"run_id", "finished_at"} <= set(rows) else {}
        self._cache: dict[str, stats.RunScores] = {}

    def directory(self, run_id: str) -> Path | None:
        found = [d for d in self.dirs if self._results.scores_path(d, run_id).is_file()]
        if len(found) > 1:  # the same run in several merged folders: the one whose row won
            want = self.finished_at.get(run_id)
            for d in reversed(found):
                row = self._results.read_row(d / self._results.RUNS / f"{run_id}.parquet")
                if row is not None and row.get("finished_at") == want:
                    return d
        return found[-1] if found else None

    def digest(self, run_id: str) -> str:
        """A digest of the run's score file content (so a cache follows the data, not the path)."""
        folder = self.directory(run_id)
        if folder is None:
            return "none"
        return hashlib.sha256(self._results.scores_path(folder, run_id).read_bytes()).hexdigest()[:16]

    def get(self, run_id: str) -> stats.RunScores:
        if run_id not in self._cache:
            folder = self.directory(run_id)
            if folder is None:
                raise FileNotFoundError(f"run {run_id} has no per-image score file (scores/{run_id}.parquet)")
            self._cache[run_id] = stats.canonical(stats.RunScores.from_dict(self._results.load_scores(folder, run_id)))
        return self._cache[run_id]


class CachedBootstrapper(stats.Bootstrapper):
    """A :class:`bench.stats.Bootstrapper` that keeps each run's resampled AP matrix [R, C] on disk
    (``<out>/.cache/bootstrap/``), keyed by the score file's content, R, the seed and
    :data:`CACHE_VERSION`: a run is resampled once, however often the report is rebuilt."""

    def __init__(self, n_resamples: int, seed: int, store: "ScoreStore | None", folder: Path | None) -> None:
        super().__init__(n_resamples, seed)
        self.store, self.folder = store, folder

    def resampled_ap(self, key: object, run: stats.RunScores) -> np.ndarray:
        if self.folder is None or self.store is None or not isinstance(key, str) or key in self._ap:
            return super().resampled_ap(key, run)
        digest = self.store.digest(key)
        path = self.folder / f"{key}-{digest}-r{self.n_resamples}-s{self.seed}-v{CACHE_VERSION}.npy"
        if path.is_file():
            try:
                cached = np.load(path, allow_pickle=False)
                if cached.shape == (self.n_resamples, run.scores.shape[1]):
                    self._ap[key] = cached
                    return cached
            except (OSError, ValueError):
                pass  # a damaged cache file is recomputed
        value = super().resampled_ap(key, run)

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:  # a file object: np.save would add ".npy" to a path
                np.save(f, value, allow_pickle=False)

        try:
            atomic_write(path, write)
        except OSError:
            pass  # an unwritable cache only costs time
        return value


@dataclass
class Comparisons:
    """Where score files are and the (caching) bootstrapper: what Δ mAP and the per-class plot use."""

    store: ScoreStore | None
    boot: stats.Bootstrapper


def _reference_rows(rows: pd.DataFrame) -> dict[str, dict[str, Any]]:
    """pair key -> the finished average-pooling baseline row of that key."""
    out: dict[str, dict[str, Any]] = {}
    if rows.empty or "status" not in rows:
        return out
    for _, row in rows[rows["status"] == "finished"].iterrows():
        if is_reference(row["head"], _canonical(row.get("hparams"))):
            out[_pair_key(row)] = row.to_dict()
    return out


def add_deltas(summary: pd.DataFrame, rows: pd.DataFrame, store: ScoreStore | None, boot: stats.Bootstrapper, notes: list[str]) -> pd.DataFrame:
    """Add ``delta``, ``delta_low``, ``delta_high``, ``delta_significant``, ``delta_pairs`` and
    ``delta_note`` to ``summary`` (see :mod:`bench.stats`). ``rows``: ALL rows (the references are
    looked up there even when filters hide them)."""
    summary = summary.copy()
    for col in ("delta", "delta_low", "delta_high"):
        summary[col] = np.nan
    summary["delta_significant"] = False
    summary["delta_pairs"] = 0
    summary["delta_note"] = ""
    summary["reference_runs"] = [[] for _ in range(len(summary))]
    references = _reference_rows(rows)
    by_id = {r["run_id"]: r for _, r in rows.iterrows()} if not rows.empty else {}
    for i, line in summary.iterrows():
        if is_reference(line["head"], line["hparams"]):
            summary.at[i, "delta_note"] = "ref"
            continue
        pairs = []
        for run_id in line["run_ids"]:
            ref = references.get(_pair_key(by_id[run_id]))
            if ref is not None:
                pairs.append((run_id, ref["run_id"]))
        summary.at[i, "reference_runs"] = [b for _, b in pairs]
        if not pairs:
            summary.at[i, "delta_note"] = "no baseline"
            continue
        if store is None:
            summary.at[i, "delta_note"] = "no score files"
            continue
        try:
            result = boot.delta([((h, store.get(h)), (b, store.get(b))) for h, b in pairs])
        except (FileNotFoundError, stats.PairingError) as exc:
            summary.at[i, "delta_note"] = "unavailable"
            notes.append(f"Δ mAP of {line['head']} ({line['hparams_text']}) on {line['dataset']} / {line['backbone']}: {exc}")
            continue
        summary.at[i, "delta"] = result.delta
        summary.at[i, "delta_low"] = result.low
        summary.at[i, "delta_high"] = result.high
        summary.at[i, "delta_significant"] = result.significant
        summary.at[i, "delta_pairs"] = result.seeds
        if result.dropped:
            notes.append(f"{line['head']} ({line['hparams_text']}): {result.dropped} of {result.resamples} resamples had no evaluated class and were left out")
    summary["delta_any"] = summary["delta_note"].eq("ref") | summary["delta"].notna()
    return summary


def _rank(part: pd.DataFrame) -> pd.DataFrame:
    part = part.sort_values(["mAP", "head", "hparams_text"], ascending=[False, True, True], kind="stable").reset_index(drop=True)
    part["rank"] = part["mAP"].rank(method="min", ascending=False).fillna(len(part)).astype(int)
    return part


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------


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

    def legend(self) -> list[tuple[str, str]]:
        """(label, definition) of every column shown in any table, in column order."""
        shown: dict[str, str] = {}
        tables = [s.table for s in self.sections] + ([self.best] if self.best is not None else [])
        for column in (*BEST_COLUMNS[:3], *LEADERBOARD_COLUMNS):
            if column.legend and any(column.label in table.labels for table in tables):
                shown[column.label] = column.legend
        return list(shown.items())


def _recipe_text(recipe: Any, preset: Any) -> str:
    recipe = _canonical(recipe)
    if not isinstance(recipe, dict):
        return "unknown recipe"
    overrides = ""
    name = None if _missing(preset) else str(preset)
    if name:
        try:
            from bench.recipe import KEYS, load_presets

            base = {k: spec.default for k, spec in KEYS.items()}
            base.update({k: v for k, v in load_presets().get(name, {}).items() if k != "description"})
            changed = {k: v for k, v in recipe.items() if base.get(k) != v}
            overrides = "; overrides: " + ", ".join(f"{k}={v}" for k, v in sorted(changed.items())) if changed else "; no overrides"
        except Exception:  # presets file moved or invalid: the full recipe below still says it all
            overrides = ""
    full = ", ".join(f"{k}={v}" for k, v in sorted(recipe.items()))
    return (f"preset `{name}`{overrides}" if name else "no preset") + f". Full recipe: {full}"


def _difficult_text(options: Any) -> str:
    options = _canonical(options)
    if isinstance(options, dict) and "difficult" in options:
        policy = options["difficult"]
        meaning = DIFFICULT_POLICIES.get(policy, "")
        return f"`{policy}`" + (f" ({meaning})" if meaning else "")
    return "not applicable (the dataset has no difficult labels)"


def _setup_lines(first: pd.Series) -> list[str]:
    options = _canonical(first.get("dataset_options"))
    other = {k: v for k, v in options.items() if k != "difficult"} if isinstance(options, dict) else {}
    split = f"train split `{first.get('train_split', '?')}`, test split `{first.get('test_split', '?')}`"
    if not _missing(first.get("test_images")):
        split += f" ({int(first['test_images'])} test images)"
    lines = [
        f"difficult policy: {_difficult_text(first.get('dataset_options'))}",
        f"recipe: {_recipe_text(first.get('recipe'), first.get('recipe_preset'))}",
        f"data: {split}" + (f"; dataset options: {', '.join(f'{k}={v}' for k, v in sorted(other.items()))}" if other else ""),
    ]
    weights = first.get("weights")
    lines.append(f"backbone weights: {'none (from scratch)' if _missing(weights) else f'`{weights}`'}")
    return lines


def _per_class_data(part: pd.DataFrame, comparisons: Comparisons) -> tuple[plotting.PerClass | None, str]:
    candidates = part[~part.apply(lambda r: is_reference(r["head"], r["hparams"]), axis=1)]
    candidates = candidates[candidates["reference_runs"].map(len) > 0] if "reference_runs" in candidates else candidates.iloc[0:0]
    if candidates.empty:
        return None, "skipped: no head other than the average-pooling baseline has a baseline run to compare with"
    if comparisons.store is None:
        return None, "skipped: no score files"
    best = candidates.iloc[0]  # ranked: the best head with a reference
    try:
        head_runs = [comparisons.store.get(r) for r in best["run_ids"]]
        base_runs = [comparisons.store.get(r) for r in best["reference_runs"]]
    except FileNotFoundError as exc:
        return None, f"skipped: {exc}"
    ap_head = np.nanmean(np.stack([comparisons.boot.full(r, s) for r, s in zip(best["run_ids"], head_runs)]), axis=0)
    ap_base = np.nanmean(np.stack([comparisons.boot.full(r, s) for r, s in zip(best["reference_runs"], base_runs)]), axis=0)
    label = f"{best['head']} ({best['hparams_text']})" if best["hparams_text"] not in ("", "-") else str(best["head"])
    return plotting.PerClass(list(head_runs[0].classes), ap_head, ap_base, label, "baseline (avg pool)", len(head_runs)), ""


def _filter(rows: pd.DataFrame, column: str, wanted: Sequence[str] | None) -> pd.DataFrame:
    from bench.errors import UsageError, choices

    if not wanted or rows.empty:
        return rows
    present = sorted(str(v) for v in rows[column].dropna().unique()) if column in rows else []
    unknown = [w for w in wanted if w not in present]
    if unknown:
        raise UsageError(f"no runs with {column} {choices(unknown)}; the results have {column} {choices(present)}")
    return rows[rows[column].astype(str).isin(list(wanted))]


def build(
    rows: pd.DataFrame,
    results_dirs: Sequence[str | Path] = (),
    out_dir: str | Path | None = None,
    datasets: Sequence[str] | None = None,
    backbones: Sequence[str] | None = None,
    heads: Sequence[str] | None = None,
    n_resamples: int = stats.DEFAULT_RESAMPLES,
    seed: int = stats.DEFAULT_SEED,
    plots: bool = True,
) -> Report:
    """Compute the report of ``rows`` (from :func:`bench.results.load_all`).

    Args:
        results_dirs: where the score files are (for Δ mAP and the per-class plot).
        out_dir: where plots go (``out_dir/plots``); no plots when None or ``plots`` is False.
        datasets, backbones, heads: show only these (the baseline runs Δ needs are still used).
        n_resamples, seed: of the paired bootstrap.
    """
    all_rows = rows
    shown = _filter(_filter(_filter(rows, "dataset", datasets), "backbone", backbones), "head", heads)
    notes: list[str] = []
    store = ScoreStore(list(results_dirs), all_rows) if results_dirs and not all_rows.empty else None
    cache = Path(out_dir) / ".cache" / "bootstrap" if out_dir is not None else None
    comparisons = Comparisons(store, CachedBootstrapper(n_resamples, seed, store, cache))
    summary = summarize(shown)
    sections: list[Section] = []
    best_table = None
    if out_dir is not None and plots:
        plotting.clear_plots(Path(out_dir))
    if not summary.empty:
        summary = add_deltas(summary, all_rows, store, comparisons.boot, notes)
        finished = shown[shown["status"] == "finished"]
        first_row = {gid: r for gid, r in finished.groupby(finished["group_id"].fillna(finished["run_id"]) if "group_id" in finished else finished["run_id"])}
        for keys, part in summary.groupby(list(SECTION_KEYS), sort=True):
            part = _rank(part)
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
            title = " · ".join(str(k) for k in keys)
            slug = plotting.slugify("_".join(str(k) for k in keys))
            section = Section(tuple(str(k) for k in keys), title, slug, part, settings, make_table(part))
            if out_dir is not None and plots:
                per_class, why = _per_class_data(part, comparisons)
                section.plots = plotting.section_plots(part, Path(out_dir), slug, title, per_class, why, head_defaults)
            sections.append(section)
        ranked = pd.concat([s.summary for s in sections], ignore_index=True).dropna(subset=["mAP"])
        if not ranked.empty:
            best = ranked.loc[ranked.groupby(["dataset", "backbone"], sort=True)["mAP"].idxmax()].reset_index(drop=True)
            best_table = make_table(best, BEST_COLUMNS)
    failed = None
    if not shown.empty and "status" in shown:
        bad = shown[shown["status"] == "failed"]
        if not bad.empty:
            failed = make_table(bad.reset_index(drop=True), FAILED_COLUMNS)
    return Report(
        sources=[str(d) for d in results_dirs], filters={k: list(v) for k, v in (("dataset", datasets), ("backbone", backbones), ("head", heads)) if v},
        runs=len(shown), finished=int((shown["status"] == "finished").sum()) if "status" in shown else 0,
        best=best_table, sections=sections, failed=failed, notes=notes, resamples=n_resamples, seed=seed,
    )


# ---------------------------------------------------------------------------------------------
# Renderers
# ---------------------------------------------------------------------------------------------


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
    if report.notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in report.notes] + [""]
    if report.failed is not None:
        lines += ["## Failed runs", "", table_markdown(report.failed), ""]
    lines += ["## Legend", "", CONVENTIONS, ""]
    lines += [f"- **{label}**: {text}" for label, text in report.legend()]
    lines += ["", _bootstrap_sentence(report), ""]
    return "\n".join(lines)


def _provenance(report: Report) -> str:
    where = ", ".join(f"`{s}`" for s in report.sources) or "rows given in memory"
    text = f"Built from {report.runs} run(s) ({report.finished} finished) in {where}."
    if report.filters:
        text += " Filters: " + "; ".join(f"{k} = {', '.join(v)}" for k, v in report.filters.items()) + "."
    return text


def _bootstrap_sentence(report: Report) -> str:
    return (
        f"Δ mAP intervals: {report.resamples} paired resamples of the test images (seed {report.seed}); with several seeds, "
        "each resample's Δ is the mean of the per-seed Δ on the same resampled images; a class without a positive in "
        "a resample drops out of both runs' means for that resample. Each section lists its difficult policy and recipe."
    )


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
    if report.failed is not None:
        console.print(f"[red]{len(report.failed)} failed run(s)[/red]")
        console.print(table_rich(report.failed), width=width)
    for note in report.notes:
        console.print(f"[yellow]note[/yellow]: {note}", highlight=False)


def _readable(paths: Iterable[Path]) -> None:
    """Give report files the usual permissions (the atomic writer's temporary files are 0600):
    a report is meant to be shared."""
    mask = os.umask(0)
    os.umask(mask)
    for path in paths:
        try:
            path.chmod(0o666 & ~mask)
        except OSError:
            pass


def parse_formats(values: Iterable[str] | None) -> list[str]:
    """``["md,html", "console"]`` -> ``["md", "html", "console"]``; default: all formats."""
    from bench.errors import UsageError, choices

    out: list[str] = []
    for value in values or []:
        for item in str(value).split(","):
            item = item.strip().lower()
            if not item:
                continue
            if item not in FORMATS:
                raise UsageError(f"--format {item!r} is not one of {choices(FORMATS)}")
            if item not in out:
                out.append(item)
    return out or list(FORMATS)


def build_report(
    results_dirs: Sequence[str | Path],
    out_dir: str | Path | None = None,
    formats: Iterable[str] | None = None,
    datasets: Sequence[str] | None = None,
    backbones: Sequence[str] | None = None,
    heads: Sequence[str] | None = None,
    n_resamples: int = stats.DEFAULT_RESAMPLES,
    seed: int = stats.DEFAULT_SEED,
    console: Console | None = None,
) -> dict[str, Path]:
    """Rebuild the leaderboard from the Parquet files of ``results_dirs`` (merged) and write it.

    Writes ``leaderboard.md`` (with ``plots/*.png``), ``report.html`` (plots inlined) into
    ``out_dir`` (default: the first results directory) and/or prints the console tables,
    according to ``formats`` (``md``, ``html``, ``console``; default all).

    Returns ``{"md": path, "html": path}`` for the files written.
    """
    from bench import results
    from bench.errors import UsageError, choices

    dirs = [Path(d) for d in results_dirs]
    if not dirs:
        raise UsageError("no results directory given")
    missing = [str(d) for d in dirs if not d.is_dir()]
    if missing:
        raise UsageError(f"results directory not found: {choices(missing)}")
    formats = parse_formats(formats)
    out = Path(out_dir) if out_dir is not None else dirs[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # nanmean of all-NaN classes in per-class AP
        rows = results.load_all(*dirs)
        files = "md" in formats or "html" in formats
        report = build(rows, dirs, out if files else None, datasets, backbones, heads, n_resamples, seed, plots=files)
    written: dict[str, Path] = {}
    if "md" in formats:
        path = out / "leaderboard.md"
        atomic_write_bytes(path, render_markdown(report).encode())
        written["md"] = path
    if "html" in formats:
        from bench.html_report import render_html

        path = out / "report.html"
        atomic_write_bytes(path, render_html(report, out).encode())
        written["html"] = path
    _readable([*written.values(), *(out / p.path for s in report.sections for p in s.plots if not p.skipped)])
    if "console" in formats:
        render_console(report, console)
    return written
