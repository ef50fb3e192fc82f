"""The choice of a tuned grid (docs/tuning.md): per tune group, the point with the best validation mAP.

A tune group is one head configuration x seed x data x backbone trained at every point of the
grid's ``[tune]`` space (bench/config/tune.py). Its rows carry ``tune_group``, ``tune_index`` (the
point's 0-based position in grid order), ``tune_points`` (the budget), ``status`` and ``val_mAP``
(the validation mAP of the epoch the run kept: ``select = "best_val"``). These functions read
nothing else: the test split plays no part in the choice.

Tie rule: among equal validation mAPs the point earliest in grid order wins (the lowest
``tune_index``), so the choice does not depend on the order rows are read in.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats


@dataclass(frozen=True)
class Choice:
    """The choice of one tune group.

    ``run_id`` / ``index`` / ``val_mAP``: the chosen point (None / None / NaN when no point can
    win). ``points``: the budget. ``failed``: run ids of failed points; ``unscored``: finished
    points without a finite validation mAP; neither can win. ``missing``: points without a row yet.
    """

    tune_group: str
    run_id: str | None
    index: int | None
    val_mAP: float
    points: int
    failed: tuple[str, ...] = ()
    unscored: tuple[str, ...] = ()
    missing: int = 0

    @property
    def complete(self) -> bool:
        """Every point of the group has a row (finished or failed): the choice is final."""
        return self.missing == 0


def _missing(value: Any) -> bool:
    try:
        return value is None or bool(np.isnan(value))
    except (TypeError, ValueError):
        return False


def _finite(value: Any) -> bool:
    return not _missing(value) and isinstance(value, (int, float, np.floating, np.integer)) and math.isfinite(float(value))


def is_point(row: Mapping[str, Any]) -> bool:
    """A row of a tuned grid's point (not an untuned row, not a refit)."""
    refit = row.get("tune_refit")
    return not _missing(row.get("tune_group")) and not (not _missing(refit) and bool(refit))


def select_points(rows: Iterable[Mapping[str, Any]]) -> dict[str, Choice]:
    """Per tune group, the finished point with the highest validation mAP.

    Args:
        rows: result rows (dicts or pandas records); rows that are not points are ignored.
    Returns:
        ``{tune_group: Choice}``, groups in the order they first appear.
    """
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        if is_point(row):
            groups.setdefault(str(row["tune_group"]), []).append(row)
    out = {}
    for group, members in groups.items():
        budget = max(int(r["tune_points"]) for r in members if not _missing(r.get("tune_points"))) if any(
            not _missing(r.get("tune_points")) for r in members) else len(members)
        failed = tuple(str(r["run_id"]) for r in members if r.get("status") == "failed")
        done = [r for r in members if r.get("status") == "finished"]
        unscored = tuple(str(r["run_id"]) for r in done if not _finite(r.get("val_mAP")))
        scored = [r for r in done if _finite(r.get("val_mAP"))]
        indices = {int(r["tune_index"]) for r in members if r.get("status") in ("finished", "failed")}
        missing = max(0, budget - len(indices))
        if not scored:
            out[group] = Choice(group, None, None, float("nan"), budget, failed, unscored, missing)
            continue
        best = min(scored, key=lambda r: (-float(r["val_mAP"]), int(r["tune_index"])))
        out[group] = Choice(group, str(best["run_id"]), int(best["tune_index"]), float(best["val_mAP"]), budget, failed, unscored, missing)
    return out


def selection_flags(rows: Sequence[Mapping[str, Any]], choices: Mapping[str, Choice] | None = None) -> list[bool | float]:
    """Per row: True for its tune group's chosen point (``choices``, default
    :func:`select_points` of ``rows``), False for the group's other points and refits, NaN for an
    untuned row. Derived from ``val_mAP`` whenever rows are read, never stored, so a retried point
    cannot leave a stale flag behind."""
    choices = select_points(rows) if choices is None else choices
    chosen = {c.run_id for c in choices.values() if c.run_id is not None}
    return [bool(row.get("run_id") in chosen) if not _missing(row.get("tune_group")) else float("nan") for row in rows]


def choice_optimism(test_map: Mapping[int, float], chosen: int) -> float:
    """The optimism of choosing on the test set, for one tune group: the best test mAP over its
    finished points minus the test mAP of the validation choice (>= 0; 0 when validation picked
    the test-best point).

    Args:
        test_map: ``{tune_index: test mAP}`` of the group's finished points.
        chosen: the validation choice's ``tune_index`` (a key of ``test_map``).
    """
    values = [v for v in test_map.values() if _finite(v)]
    if chosen not in test_map or not values or not _finite(test_map[chosen]):
        return float("nan")
    return max(values) - float(test_map[chosen])


@dataclass(frozen=True)
class RankAgreement:
    """Kendall's τ-b between two rankings of the same head configurations (ties allowed), its
    two-sided p-value (scipy's), and the number of configurations compared."""

    tau: float
    p: float
    n: int


def rank_agreement(fixed: Sequence[float], tuned: Sequence[float]) -> RankAgreement:
    """Kendall's τ-b between the ranking by ``fixed`` (mAP per configuration at one point) and by
    ``tuned`` (mAP at each configuration's chosen point); configurations missing either value are
    left out. NaN with fewer than two configurations or a constant ranking."""
    a, b = np.asarray(fixed, dtype=float), np.asarray(tuned, dtype=float)
    keep = np.isfinite(a) & np.isfinite(b)
    n = int(keep.sum())
    if n < 2:
        return RankAgreement(float("nan"), float("nan"), n)
    result = stats.kendalltau(a[keep], b[keep])
    return RankAgreement(float(result.statistic), float(result.pvalue), n)
