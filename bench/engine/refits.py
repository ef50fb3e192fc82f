"""Refits (``[tune] refit = true``, docs/tuning.md): after every point of a tune group has a row,
the chosen point is trained again on the whole training split (train + validation).

A refit cell of the grid (``Grid.refits``, bench/config/tune.py) carries the grid's recipe with
``select = "last"`` and no holdout, and the run ids of its group's points (``tune_sources``). Once
the points' rows are all there, the choice (:func:`bench.eval.tuning.select_points`: best
validation mAP, ties to the earliest point, failed points never win) gives the point, and the run
that trains is the *effective* cell: the refit cell with ``refit_recipe(recipe, point)`` and the
point's ``tune_point`` / ``tune_index``. Its run id hashes that recipe, so it is fixed by the rows:
a rerun finds it finished, and a choice that changes (a failed point retried and now best) gives
a new run, while the old refit's row stays and the report ignores it (its point is no longer the
choice). Refits run one at a time, each a job of its own, after the grid's other jobs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from bench.config.grid import Cell
from bench.config.tune import refit_recipe
from bench.eval.tuning import select_points
from bench.results import store as results
from bench.results.locks import RunLock


class NoPointCanWin(RuntimeError):
    """Every point of a refit's tune group failed (or has no finite validation mAP)."""


@dataclass(frozen=True)
class RefitPlan:
    """What a launch does with one refit cell: ``run`` the ``cell`` (the effective refit), ``fail``
    the refit cell with ``error`` (no point can win), or ``wait`` with ``reason``: ``claimed``
    (another launch is training one of its points) or ``points-unfinished`` (a point has no row and
    nobody holds it: a later launch of the grid, or of its shard, runs it)."""

    action: str
    cell: Cell
    reason: str = ""
    error: str = ""


def plan_refit(refit: Cell, points: dict[str, Cell], results_dir: Path) -> RefitPlan:
    """Main process: the plan for ``refit`` from its group's rows in ``results_dir``.

    Args:
        refit: a cell of ``Grid.refits`` (``tune_refit``, ``tune_sources``).
        points: the grid's point cells by run id (the source of each chosen point's values).
    """
    sources = refit.tune_sources
    # the lock before the row, as for a derived head: its holder writes the row before releasing it
    if any(RunLock(results_dir, run_id).is_claimed() for run_id in sources):
        return RefitPlan("wait", refit, reason="claimed")
    if any(results.run_status(results_dir, run_id) is None for run_id in sources):
        return RefitPlan("wait", refit, reason="points-unfinished")
    rows = [results.run_row(results_dir, run_id) for run_id in sources]
    choice = select_points(rows).get(str(refit.tune_group))
    if choice is None or choice.run_id is None:
        failed = len(choice.failed) if choice else len(rows)
        unscored = len(choice.unscored) if choice else 0
        return RefitPlan("fail", refit, error=(
            f"no point of the tune group can win ({failed} of {len(sources)} failed, {unscored} without a finite "
            f"validation mAP), so there is no chosen point to refit; fix the points and rerun with --retry-failed"))
    point = points.get(choice.run_id)
    if point is None or point.tune_point is None:
        return RefitPlan("fail", refit, error=f"the chosen point {choice.run_id} is not a point of this grid")
    cell = dataclasses.replace(refit, recipe=refit_recipe(refit.recipe, point.tune_point),
                               tune_point=dict(point.tune_point), tune_index=point.tune_index)
    return RefitPlan("run", cell)
