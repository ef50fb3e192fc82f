"""The choice of a tuned grid (bench/eval/tuning.py) against hand-built tables: the argmax of
validation mAP, ties to the earliest point, failed points never win; Kendall's τ and the test-set
optimism on hand cases."""

from __future__ import annotations

import math
import random

import numpy as np
from scipy import stats

from bench.eval.tuning import choice_optimism, rank_agreement, select_points


def point(group: str, index: int, val: float | None, status: str = "finished", points: int = 4, **extra) -> dict:
    return {"run_id": f"{group}-{index}", "tune_group": group, "tune_index": index, "tune_points": points, "status": status,
            "val_mAP": val, "tune_refit": False, **extra}


# group -> (rows, expected chosen index); written by hand
TABLE = {
    "plain": ([point("plain", 0, 0.40), point("plain", 1, 0.55), point("plain", 2, 0.51), point("plain", 3, 0.10)], 1),
    # equal validation mAP at points 1 and 3: the earliest in grid order wins
    "tie": ([point("tie", 3, 0.60), point("tie", 0, 0.20), point("tie", 1, 0.60), point("tie", 2, 0.59)], 1),
    # a failed point never wins, even with a (stale) higher validation mAP; neither does a finished one without it
    "failed": ([point("failed", 0, 0.30), point("failed", 1, 0.99, status="failed"), point("failed", 2, float("nan")),
                point("failed", 3, None)], 0),
}


def all_rows() -> list[dict]:
    rows = [r for group, _ in TABLE.values() for r in group]
    # rows that are not points are ignored: untuned, refit
    rows.append({"run_id": "untuned", "tune_group": None, "status": "finished", "val_mAP": 1.0})
    rows.append(dict(point("plain", 0, 0.99), run_id="refit", tune_refit=True, tune_index=None))
    return rows


def test_the_choice_is_the_argmax_of_validation_map_with_ties_to_the_earliest_point() -> None:
    rows = all_rows()
    for shuffle in range(5):  # the order rows are read in does not matter
        random.Random(shuffle).shuffle(rows)
        choices = select_points(rows)
        assert set(choices) == set(TABLE)
        for group, (_, want) in TABLE.items():
            assert choices[group].index == want, group
            assert choices[group].run_id == f"{group}-{want}"
    choices = select_points(rows)
    assert choices["plain"].val_mAP == 0.55
    assert choices["failed"].failed == ("failed-1",)
    assert sorted(choices["failed"].unscored) == ["failed-2", "failed-3"]
    assert all(c.complete for c in choices.values())


def test_a_group_without_a_scored_point_has_no_choice_and_missing_points_are_counted() -> None:
    choices = select_points([point("g", 0, None, status="failed"), point("g", 2, float("nan"))])
    assert choices["g"].run_id is None and math.isnan(choices["g"].val_mAP)
    assert choices["g"].missing == 2 and not choices["g"].complete
    partial = select_points([point("h", 0, 0.2), point("h", 1, 0.3)])
    assert partial["h"].index == 1 and partial["h"].missing == 2


def test_kendall_tau_on_a_hand_case_and_against_scipy() -> None:
    # fixed order a > b > c > d; tuned order a > c > b > d: 5 concordant pairs, 1 discordant -> (5 - 1) / 6
    fixed, tuned = [0.5, 0.4, 0.3, 0.2], [0.5, 0.3, 0.4, 0.2]
    result = rank_agreement(fixed, tuned)
    assert math.isclose(result.tau, 4 / 6) and result.n == 4
    # a configuration without a value at the point is left out
    result = rank_agreement([0.5, np.nan, 0.3, 0.2, 0.1], [0.1, 0.9, 0.2, 0.3, 0.4])
    assert result.n == 4 and math.isclose(result.tau, -1.0)
    rng = np.random.default_rng(0)
    a, b = rng.random(9).round(1), rng.random(9).round(1)  # rounded: with ties (τ-b)
    want = stats.kendalltau(a, b)
    got = rank_agreement(a, b)
    assert math.isclose(got.tau, want.statistic) and math.isclose(got.p, want.pvalue)
    assert math.isnan(rank_agreement([0.3], [0.2]).tau)


def test_test_set_optimism_on_a_hand_case() -> None:
    test_map = {0: 0.50, 1: 0.70, 2: 0.60}
    assert math.isclose(choice_optimism(test_map, 2), 0.10)
    assert choice_optimism(test_map, 1) == 0.0
    assert math.isnan(choice_optimism(test_map, 5))
