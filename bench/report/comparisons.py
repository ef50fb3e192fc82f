"""Δ mAP of every experiment against its section's reference, with p-values and Holm's adjustment;
ties for first; ranks across sections — from the per-image score files.

- :func:`add_deltas`: Δ mAP vs the section's reference (paired bootstrap, :mod:`bench.eval.bootstrap`),
  its two-sided bootstrap p-value, Holm's adjustment over the section's family (every
  non-reference configuration of that dataset x backbone x protocol), and the spread of the
  per-seed Δ.
- :func:`add_ties`: the section's best configuration against every other one, the same way; the
  group not significantly worse than the best is "tied for first".
- :func:`across_sections`: mean ranks of the configurations shared by two or more sections,
  Friedman's test and pairwise Wilcoxon tests with Holm's adjustment (:mod:`bench.eval.significance`).
"""

from __future__ import annotations

import hashlib
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from bench.core.atomic import atomic_write
from bench.eval import bootstrap as stats
from bench.eval import significance
from bench.report.summary import _canonical, _pair_key, is_reference
from bench.report.tables import SECTION_KEYS, experiment_label

# Bump when the resampling, the AP computation or the cache file's content changes: old bootstrap
# cache files are then ignored.
CACHE_VERSION = 2
ALPHA = significance.ALPHA


class ScoreStore:
    """Finds and loads the per-image score file of a run across several results directories.

    Only the last ``max_cached`` runs loaded are kept in memory (a COCO-size score file is ~20 MB
    once loaded): what comparisons need of a run afterwards is kept by the bootstrapper
    (:class:`bench.eval.bootstrap.RunStats`), so memory does not grow with the number of runs.
    """

    def __init__(self, results_dirs: Sequence[Path], rows: pd.DataFrame, max_cached: int = 4) -> None:
        from bench.results import store as results

        self._results = results
        self.dirs = [Path(d) for d in results_dirs]
        self.finished_at = dict(zip(rows["run_id"], rows["finished_at"])) if {"run_id", "finished_at"} <= set(rows) else {}
        self.max_cached = max(1, max_cached)
        self._cache: OrderedDict[str, stats.RunScores] = OrderedDict()
        self._digests: dict[tuple[str, int, int], str] = {}
        self._where: dict[str, Path | None] = {}

    def directory(self, run_id: str) -> Path | None:
        if run_id in self._where:
            return self._where[run_id]
        found = [d for d in self.dirs if self._results.scores_path(d, run_id).is_file()]
        chosen = found[-1] if found else None
        if len(found) > 1:  # the same run in several merged folders: the one whose row won
            want = self.finished_at.get(run_id)
            for d in reversed(found):
                row = self._results.read_row(d / self._results.RUNS / f"{run_id}.parquet")
                if row is not None and row.get("finished_at") == want:
                    chosen = d
                    break
        self._where[run_id] = chosen
        return chosen

    def has_scores(self, run_id: str) -> bool:
        """Whether a score file of the run exists in one of the results directories."""
        return self.directory(run_id) is not None

    def digest(self, run_id: str) -> str:
        """A digest of the run's score file content (so a cache follows the data, not the path)."""
        folder = self.directory(run_id)
        if folder is None:
            return "none"
        path = self._results.scores_path(folder, run_id)
        info = path.stat()
        key = (str(path), info.st_size, info.st_mtime_ns)
        if key not in self._digests:
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 22), b""):
                    h.update(chunk)
            self._digests[key] = h.hexdigest()[:16]
        return self._digests[key]

    def get(self, run_id: str) -> stats.RunScores:
        if run_id in self._cache:
            self._cache.move_to_end(run_id)
            return self._cache[run_id]
        folder = self.directory(run_id)
        if folder is None:
            raise FileNotFoundError(f"run {run_id} has no per-image score file (scores/{run_id}.parquet)")
        try:
            loaded = self._results.load_scores(folder, run_id)
        except self._results.DamagedFile as exc:  # one warning naming the file and what to do; the
            exc.warn()  # run is then left out of the comparisons like a run without a score file
            raise FileNotFoundError(str(exc)) from None
        run = stats.canonical(stats.RunScores.from_dict(loaded))
        self._cache[run_id] = run
        while len(self._cache) > self.max_cached:
            self._cache.popitem(last=False)
        return run

    def loader(self, run_id: str) -> Callable[[], stats.RunScores]:
        """A function that loads the run when called (the bootstrapper calls it only on a cache miss)."""
        return lambda: self.get(run_id)


class CachedBootstrapper(stats.Bootstrapper):
    """A :class:`bench.eval.bootstrap.Bootstrapper` that keeps each run's statistics (resampled AP
    [R, C], full-set AP, evaluated classes, pairing digest) on disk, in ``<out>/.cache/bootstrap/``,
    keyed by the score file's content, R, the seed and :data:`CACHE_VERSION`: a run is resampled
    once, however often the report is rebuilt, and a rebuild does not even load its scores.

    ``also``: further cache folders read (not written), e.g. those of every merged results
    directory, so a report over ``--results a/ --results b/`` reuses what each machine computed.
    """

    def __init__(self, n_resamples: int, seed: int, store: "ScoreStore | None", folder: Path | None, also: Sequence[Path] = ()) -> None:
        super().__init__(n_resamples, seed)
        self.store, self.folder = store, folder
        self.also = [Path(p) for p in also if folder is None or Path(p) != Path(folder)]

    def _file_name(self, key: str, digest: str) -> str:
        return f"{key}-{digest}-r{self.n_resamples}-s{self.seed}-v{CACHE_VERSION}.npz"

    def _read(self, path: Path) -> stats.RunStats | None:
        try:
            with np.load(path, allow_pickle=False) as data:
                value = stats.RunStats(str(data["pairing"]), data["evaluated"].astype(bool), data["full"], data["resampled"])
        except Exception as exc:  # noqa: BLE001 - np.load of a damaged .npz raises BadZipFile, EOFError, ...
            warnings.warn(f"bootstrap cache file {path} is damaged ({type(exc).__name__}: {exc}); recomputing it", stacklevel=2)
            return None  # a damaged cache file is recomputed
        c = value.full.shape[0] if value.full.ndim == 1 else -1
        if value.resampled.shape != (self.n_resamples, c) or value.evaluated.shape != (c,):
            return None
        return value

    def run_stats(self, key: object, source: stats.RunSource) -> stats.RunStats:
        if self.store is None or not isinstance(key, str) or key in self._stats:
            return super().run_stats(key, source)
        name = self._file_name(key, self.store.digest(key))
        for folder in [*([self.folder] if self.folder is not None else []), *self.also]:
            path = folder / name
            if path.is_file():
                cached = self._read(path)
                if cached is not None:
                    self._stats[key] = cached
                    return cached
        value = super().run_stats(key, source)
        if self.folder is not None:

            def write(tmp: Path) -> None:
                with open(tmp, "wb") as f:  # a file object: np.savez would add ".npz" to a path
                    np.savez(f, pairing=np.array(value.pairing), evaluated=value.evaluated, full=value.full, resampled=value.resampled)

            try:
                atomic_write(self.folder / name, write)
            except OSError:
                pass  # an unwritable cache only costs time
        return value


@dataclass
class Comparisons:
    """Where score files are and the (caching) bootstrapper: what Δ mAP and the per-class plot use."""

    store: ScoreStore | None
    boot: stats.Bootstrapper


def _reference_rows(rows: pd.DataFrame) -> dict[str, dict[str, Any]]:
    """pair key -> the finished reference row of that key."""
    out: dict[str, dict[str, Any]] = {}
    if rows.empty or "status" not in rows:
        return out
    for _, row in rows[rows["status"] == "finished"].iterrows():
        if is_reference(row["head"], _canonical(row.get("hparams"))):
            out[_pair_key(row)] = row.to_dict()
    return out


def _seed_spread(per_seed: Sequence[float]) -> tuple[float, float, float]:
    """(sample sd, min, max) of the per-seed Δ; NaN sd with fewer than two seeds."""
    values = np.asarray(per_seed, dtype=float)
    if values.size == 0:
        return float("nan"), float("nan"), float("nan")
    sd = float(np.std(values, ddof=1)) if values.size > 1 else float("nan")
    return sd, float(values.min()), float(values.max())


def add_deltas(
    summary: pd.DataFrame, rows: pd.DataFrame, store: ScoreStore | None, boot: stats.Bootstrapper, notes: list[str], alpha: float = ALPHA
) -> pd.DataFrame:
    """Add the comparison with the section's reference to every line of ``summary``.

    Columns added: ``delta``, ``delta_low``, ``delta_high`` (bootstrap interval), ``delta_p``
    (two-sided bootstrap p-value), ``delta_p_holm`` (Holm over the section's family: every line of
    the section with a p-value, the reference excluded), ``delta_significant`` (``delta_p_holm <
    alpha``), ``delta_ci_excludes_zero`` (the interval alone, uncorrected), ``delta_pairs``,
    ``delta_per_seed`` (list), ``delta_seed_sd`` / ``_min`` / ``_max``, ``delta_note``,
    ``reference_runs``, ``delta_any``. ``rows``: ALL rows (the references are looked up there
    even when filters hide them).
    """
    summary = summary.copy()
    for col in ("delta", "delta_low", "delta_high", "delta_p", "delta_p_holm", "delta_seed_sd", "delta_seed_min", "delta_seed_max"):
        summary[col] = np.nan
    summary["delta_significant"] = False
    summary["delta_ci_excludes_zero"] = False
    summary["delta_pairs"] = 0
    summary["delta_note"] = ""
    summary["reference_runs"] = [[] for _ in range(len(summary))]
    summary["delta_per_seed"] = [[] for _ in range(len(summary))]
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
            result = boot.delta([((h, store.loader(h)), (b, store.loader(b))) for h, b in pairs])
        except (FileNotFoundError, stats.PairingError) as exc:
            summary.at[i, "delta_note"] = "unavailable"
            notes.append(f"Δ mAP of {experiment_label(line)} on {line['dataset']} / {line['backbone']}: {exc}")
            continue
        summary.at[i, "delta"] = result.delta
        summary.at[i, "delta_low"] = result.low
        summary.at[i, "delta_high"] = result.high
        summary.at[i, "delta_p"] = result.p_value
        summary.at[i, "delta_ci_excludes_zero"] = result.significant
        summary.at[i, "delta_pairs"] = result.seeds
        summary.at[i, "delta_per_seed"] = list(result.per_seed)
        sd, low, high = _seed_spread(result.per_seed)
        summary.at[i, "delta_seed_sd"], summary.at[i, "delta_seed_min"], summary.at[i, "delta_seed_max"] = sd, low, high
        if result.dropped:
            notes.append(f"{experiment_label(line)}: {result.dropped} of {result.resamples} resamples had no evaluated class and were left out")
    if not summary.empty:
        for keys, part in summary.groupby(list(SECTION_KEYS), sort=False, dropna=False):
            where = " / ".join(map(str, keys))
            summary.loc[part.index, "delta_p_holm"] = holm_with_missing(part["delta_p"], part["delta_note"].eq("unavailable"), notes, where, "comparisons with the reference")
            _resolution_note(notes, where, "comparisons with the reference", int(part["delta_p"].notna().sum()), boot.n_resamples, alpha)
        summary["delta_significant"] = summary["delta_p_holm"].lt(alpha)
    summary["delta_any"] = summary["delta_note"].eq("ref") | summary["delta"].notna()
    return summary


def holm_with_missing(p: pd.Series, missing: pd.Series, notes: list[str], where: str, what: str) -> np.ndarray:
    """Holm's adjustment of a family in which the ``missing`` comparisons could not be computed
    (no per-image scores): they stay in the family at p = 1, so the family keeps the size it was
    meant to have and no other adjusted p-value shrinks because a file is gone; their own adjusted
    p-value stays NaN. A note says how many."""
    values = p.to_numpy(dtype=float).copy()
    gone = missing.to_numpy(dtype=bool) & np.isnan(values)
    values[gone] = 1.0
    adjusted = significance.holm(values)
    adjusted[gone] = np.nan
    if gone.any():
        notes.append(
            f"{where}: {int(gone.sum())} of the {int((~np.isnan(values)).sum())} {what} could not be made (a run without its "
            "per-image score file); each stays in the Holm family at p = 1, so the other adjusted p-values are not made "
            "smaller by the missing file"
        )
    return adjusted


def _resolution_note(notes: list[str], where: str, what: str, family: int, resamples: int, alpha: float) -> None:
    """Say so when a family is too large for the resamples to show any significant difference."""
    floor = significance.smallest_adjusted_p(family, resamples)
    if family and floor >= alpha:
        notes.append(
            f"{where}: {family} {what} with {resamples} resamples: no Holm-adjusted p-value can be below {floor:.3f} "
            f"(each p-value is at least 2/(R + 1)), so none can reach {alpha:g}; rebuild with `--resamples "
            f"{significance.resamples_needed(family, alpha)}` or more to tell."
        )


def rank_section(part: pd.DataFrame, store: "ScoreStore | None" = None) -> pd.DataFrame:
    """A section's lines ordered by mean mAP (then head, hyper-parameters) with ``rank`` (equal
    means share the smaller rank).

    With a score store, a line one of whose runs has no per-image score file (``scores_missing``)
    cannot be compared with the others: it is not ranked among them (it follows the ranked lines,
    with rank one past theirs, shown as "- (no scores)") and is never the best or tied with it."""
    part = part.copy()
    part["scores_missing"] = (
        part["run_ids"].map(lambda ids: not all(store.has_scores(r) for r in ids)) if store is not None and len(part) else False
    )
    part = part.sort_values(["scores_missing", "mAP", "head", "hparams_text"], ascending=[True, False, True, True], kind="stable").reset_index(drop=True)
    ranked = part["mAP"].where(~part["scores_missing"])
    part["rank"] = ranked.rank(method="min", ascending=False).fillna(int(ranked.notna().sum()) + 1).astype(int)
    return part


_rank = rank_section  # the name used before issue 14


def add_ties(part: pd.DataFrame, rows: pd.DataFrame, store: ScoreStore | None, boot: stats.Bootstrapper, notes: list[str], alpha: float = ALPHA) -> pd.DataFrame:
    """Compare a ranked section's best line with every other line (paired by seed, the same
    bootstrap as :func:`add_deltas`), Holm over those k − 1 comparisons, and mark the group not
    significantly worse than the best.

    Columns added: ``tie_delta`` (line − best, mean over the common seeds), ``tie_low``,
    ``tie_high``, ``tie_p``, ``tie_p_holm``, ``tie_pairs``, ``tie_note``, ``tied_first`` (the best
    line and every line whose comparison is not significantly negative; False everywhere when the
    group is the best alone), ``tied_others`` and ``tie_tested`` (on the best line: how many lines
    tie with it, how many were compared with it).
    """
    part = part.copy()
    for col in ("tie_delta", "tie_low", "tie_high", "tie_p", "tie_p_holm"):
        part[col] = np.nan
    part["tie_pairs"] = 0
    part["tie_note"] = ""
    part["tied_first"] = False
    part["tied_others"] = 0
    part["tie_tested"] = np.nan
    missing = part["scores_missing"] if "scores_missing" in part else pd.Series(False, index=part.index)
    candidates = part.index[part["mAP"].notna() & ~missing]
    for i in part.index[missing]:
        part.at[i, "tie_note"] = "no scores"
    if len(candidates) < 2:
        return part
    best_i = candidates[0]
    best = part.loc[best_i]
    seed_of = dict(zip(rows["run_id"], rows["seed"])) if {"run_id", "seed"} <= set(rows) else {}
    best_by_seed = {seed_of.get(r): r for r in best["run_ids"]}
    part.at[best_i, "tie_note"] = "best"
    for i in candidates[1:]:
        line = part.loc[i]
        pairs = [(r, best_by_seed[seed_of.get(r)]) for r in line["run_ids"] if seed_of.get(r) in best_by_seed]
        if not pairs:
            part.at[i, "tie_note"] = "no common seed"
            continue
        if store is None:
            part.at[i, "tie_note"] = "no score files"
            continue
        try:
            result = boot.delta([((h, store.loader(h)), (b, store.loader(b))) for h, b in pairs])
        except (FileNotFoundError, stats.PairingError) as exc:
            part.at[i, "tie_note"] = "unavailable"
            notes.append(f"{experiment_label(line)} vs the best of {line['dataset']} / {line['backbone']} ({experiment_label(best)}): {exc}")
            continue
        part.at[i, "tie_delta"], part.at[i, "tie_low"], part.at[i, "tie_high"] = result.delta, result.low, result.high
        part.at[i, "tie_p"], part.at[i, "tie_pairs"] = result.p_value, result.seeds
    where = f"{best['dataset']} / {best['backbone']} / {best['protocol']}"
    untestable = part["tie_note"].isin(["unavailable", "no scores"]) & (store is not None)
    part["tie_p_holm"] = holm_with_missing(part["tie_p"], untestable, notes, where, "comparisons with the best configuration")
    tested = part["tie_p_holm"].notna()
    _resolution_note(notes, where, "comparisons with the best configuration (ties for first)", int(tested.sum()), boot.n_resamples, alpha)
    worse = tested & part["tie_p_holm"].lt(alpha) & part["tie_delta"].lt(0)
    tied = tested & ~worse
    part.at[best_i, "tie_tested"] = int(tested.sum())
    if tied.any():
        part.loc[tied, "tied_first"] = True
        part.at[best_i, "tied_first"] = True
        part.at[best_i, "tied_others"] = int(tied.sum())
    return part


def comparison_records(section: pd.DataFrame, reference: str) -> list[dict[str, Any]]:
    """One record per comparison of a section (``results/comparisons.parquet``): every line vs the
    reference (``comparison = "vs_reference"``) and every line vs the best (``"vs_best"``)."""
    import json

    out = []
    best = section[section.get("tie_note", pd.Series("", index=section.index)).eq("best")]
    best_label = experiment_label(best.iloc[0]) if len(best) else ""
    # the Holm families, comparisons that could not be made (no score file) included (holm_with_missing)
    family = int(section["delta_p"].notna().sum() + section["delta_note"].eq("unavailable").sum()) if "delta_p" in section else 0
    tie_family = int(section["tie_p"].notna().sum() + section["tie_note"].isin(["unavailable", "no scores"]).sum()) if "tie_p" in section else 0
    for _, line in section.iterrows():
        base = {
            "dataset": str(line["dataset"]), "backbone": str(line["backbone"]), "protocol": str(line["protocol"]),
            "head": str(line["head"]), "hparams": json.dumps(line["hparams"] if isinstance(line["hparams"], dict) else {}, sort_keys=True, default=str),
            "hparams_text": str(line["hparams_text"]), "setup": str(line.get("setup", "")), "select": str(line.get("select", "last")),
            "group_id": str(line["group_id"]), "seeds": int(line["seeds"]), "mAP": float(line["mAP"]) if pd.notna(line["mAP"]) else np.nan,
        }
        if line.get("delta_note") != "ref" and pd.notna(line.get("delta")):
            out.append({
                **base, "comparison": "vs_reference", "reference": reference, "delta_mAP": float(line["delta"]),
                "ci_low": float(line["delta_low"]), "ci_high": float(line["delta_high"]), "p_value": float(line["delta_p"]),
                "p_holm": float(line["delta_p_holm"]), "significant": bool(line["delta_significant"]), "family_size": family,
                "paired_seeds": int(line["delta_pairs"]), "seed_delta_sd": float(line["delta_seed_sd"]),
                "seed_delta_min": float(line["delta_seed_min"]), "seed_delta_max": float(line["delta_seed_max"]),
            })
        if pd.notna(line.get("tie_p")):
            out.append({
                **base, "comparison": "vs_best", "reference": best_label, "delta_mAP": float(line["tie_delta"]),
                "ci_low": float(line["tie_low"]), "ci_high": float(line["tie_high"]), "p_value": float(line["tie_p"]),
                "p_holm": float(line["tie_p_holm"]), "significant": bool(line["tie_p_holm"] < ALPHA and line["tie_delta"] < 0),
                "family_size": tie_family, "paired_seeds": int(line["tie_pairs"]), "seed_delta_sd": np.nan,
                "seed_delta_min": np.nan, "seed_delta_max": np.nan,
            })
    return out


COMPARISON_COLUMNS = (
    "dataset", "backbone", "protocol", "head", "hparams", "hparams_text", "setup", "select", "group_id", "comparison", "reference",
    "mAP", "delta_mAP", "ci_low", "ci_high", "p_value", "p_holm", "significant", "family_size", "seeds", "paired_seeds",
    "seed_delta_sd", "seed_delta_min", "seed_delta_max",
)


def comparisons_frame(records: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """The records as the table written to ``comparisons.parquet`` (fixed columns, even when empty)."""
    frame = pd.DataFrame(list(records), columns=list(COMPARISON_COLUMNS))
    return frame.astype({"significant": bool, "family_size": "int64", "seeds": "int64", "paired_seeds": "int64"}) if len(frame) else frame


@dataclass
class AcrossSections:
    """Ranks of the configurations shared by several sections ("blocks") and the tests between them."""

    blocks: list[str]  # block labels (a section, with its setup when the section has several)
    configurations: list[str]  # labels of the k configurations present in every block
    values: np.ndarray  # float [n blocks, k]: mean mAP of each configuration in each block
    result: significance.CriticalDifference | None
    note: str = ""  # why nothing was computed, or what was left out
    left_out: list[str] = field(default_factory=list)  # configurations missing from some block


def across_sections(blocks: Sequence[tuple[str, pd.DataFrame]], alpha: float = ALPHA) -> AcrossSections:
    """Rank the configurations (head + hyper-parameters) present in every block.

    Args:
        blocks: (label, lines) per block: a section, or one setup of a section that mixes setups;
            lines carry ``head``, ``hparams``, ``hparams_text`` and ``mAP``.
    """
    import json

    def key(line: pd.Series) -> str:
        return json.dumps([str(line["head"]), line["hparams"] if isinstance(line["hparams"], dict) else {}], sort_keys=True, default=str)

    labels: dict[str, str] = {}
    per_block: list[dict[str, float]] = []
    for _, lines in blocks:
        values = {}
        for _, line in lines.iterrows():
            if pd.notna(line["mAP"]):
                values[key(line)] = float(line["mAP"])
                labels.setdefault(key(line), experiment_label(line, optimistic=False))
        per_block.append(values)
    names = [label for label, _ in blocks]
    if len(blocks) < 2:
        where = f" ({names[0]})" if names else ""
        return AcrossSections(names, [], np.zeros((len(blocks), 0)), None,
                              f"only one section{where}: ranks across sections need two or more dataset × backbone sections with the same head configurations")
    common = sorted(set.intersection(*(set(v) for v in per_block)), key=lambda k: labels[k])
    left_out = sorted({labels[k] for v in per_block for k in v} - {labels[k] for k in common})
    if len(common) < 2:
        return AcrossSections(names, [labels[k] for k in common], np.zeros((len(blocks), len(common))), None,
                              f"fewer than two head configurations are present in all {len(blocks)} sections", left_out)
    values = np.array([[v[k] for k in common] for v in per_block])
    note = f"{len(left_out)} configuration(s) not present in every section left out" if left_out else ""
    return AcrossSections(names, [labels[k] for k in common], values, significance.critical_difference(values, alpha), note, left_out)
