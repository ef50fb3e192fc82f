"""Paired bootstrap of Δ mAP (bench.eval.bootstrap) against hand-computed cases and a slow reference."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from bench.eval import bootstrap as stats
from bench.eval.bootstrap import (
    PairingError,
    RunScores,
    delta_from_ap,
    paired_bootstrap,
    percentile_interval,
)
from bench.eval.metrics import average_precision
from bench.eval.resampling import bootstrap_ap, resample_counts


def run(scores, targets, ignore=None, ids=None, classes=None) -> RunScores:
    scores = np.asarray(scores, dtype=np.float32).reshape(len(scores), -1)
    targets = np.asarray(targets, dtype=np.uint8).reshape(scores.shape)
    ignore = np.zeros(scores.shape, dtype=bool) if ignore is None else np.asarray(ignore, dtype=bool)
    ids = ids or [f"img{i:03d}" for i in range(len(scores))]
    classes = classes or [f"c{j}" for j in range(scores.shape[1])]
    return RunScores(list(ids), scores, targets, ignore, list(classes))


# ---------------------------------------------------------------------------------------------
# Hand-computed cases
# ---------------------------------------------------------------------------------------------

# One class, four images. Targets: images 0 and 2 are positive.
HEAD = [0.9, 0.8, 0.3, 0.1]
BASE = [0.2, 0.7, 0.6, 0.1]
TARGETS = [1, 0, 1, 0]
# Resampling counts (how many times each image is drawn), and the AP of each run by hand:
HAND = [
    # counts        AP head                               AP baseline                  Δ
    ((1, 1, 1, 1), (1 + 2 / 3) / 2, (1 / 2 + 2 / 3) / 2, 1 / 4),  # ranks: head + - + -, baseline - + + -
    ((2, 0, 1, 1), 1.0, 1.0, 0.0),  # no negative ranks above a positive in either run
    ((0, 2, 1, 1), 1 / 3, 1 / 3, 0.0),  # the one positive (x1) comes after the negative (x2) in both
    ((1, 1, 0, 2), 1.0, 1 / 2, 1 / 2),  # positive image 0 is first for the head, second for the baseline
    ((0, 1, 0, 3), np.nan, np.nan, np.nan),  # no positive drawn: the class drops out -> resample dropped
    ((1, 3, 0, 0), 1.0, 1 / 4, 3 / 4),  # the baseline ranks the negative (x3) above the positive
]


def test_bootstrap_ap_and_delta_on_a_hand_computed_case() -> None:
    counts = np.array([c for c, *_ in HAND])
    ap_head = bootstrap_ap(np.array(HEAD)[:, None], np.array(TARGETS)[:, None], None, counts)[:, 0]
    ap_base = bootstrap_ap(np.array(BASE)[:, None], np.array(TARGETS)[:, None], None, counts)[:, 0]
    np.testing.assert_allclose(ap_head, [h for _, h, _, _ in HAND], rtol=0, atol=1e-12)
    np.testing.assert_allclose(ap_base, [b for _, _, b, _ in HAND], rtol=0, atol=1e-12)
    deltas = delta_from_ap(ap_head[:, None], ap_base[:, None])
    np.testing.assert_allclose(deltas, [d for *_, d in HAND], rtol=0, atol=1e-12)
    # The 95 % percentile interval of the five finite Δ (0, 0, 1/4, 1/2, 3/4), linear interpolation:
    # 2.5 % -> position 0.1 of the sorted values (between 0 and 0) = 0;
    # 97.5 % -> position 3.9 = 1/2 + 0.9 * (3/4 - 1/2) = 0.725.
    low, high = percentile_interval(deltas)
    assert low == pytest.approx(0.0, abs=1e-12)
    assert high == pytest.approx(0.725, abs=1e-12)


def test_tied_scores_form_one_threshold_under_weights() -> None:
    # two images with the same score, one positive: one threshold, precision = positive share
    scores, targets = np.array([[0.5], [0.5]]), np.array([[1], [0]])
    ap = bootstrap_ap(scores, targets, None, np.array([[1, 1], [2, 1], [1, 3], [0, 1]]))[:, 0]
    np.testing.assert_allclose(ap[:3], [1 / 2, 2 / 3, 1 / 4], atol=1e-12)
    assert np.isnan(ap[3])


def test_bootstrap_ap_equals_average_precision_for_every_resample() -> None:
    rng = np.random.default_rng(0)
    n, c = 57, 6
    scores = np.round(rng.random((n, c)), 1)  # many ties
    targets = (rng.random((n, c)) < 0.3).astype(np.uint8)
    targets[:, 5] = 0  # a class without positives
    targets[3, 4] = 1
    targets[:, 4] = 0
    targets[3, 4] = 1  # a class with ONE positive: NaN whenever image 3 is not drawn
    ignore = rng.random((n, c)) < 0.1
    ignore[3, 4] = False
    counts = resample_counts(n, 300, seed=5)
    got = bootstrap_ap(scores, targets, ignore, counts)
    want = np.stack([average_precision(scores, targets, ignore, sample_weight=w) for w in counts])
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    assert np.isnan(got[:, 5]).all() and np.isnan(got[counts[:, 3] == 0, 4]).all()
    # non-integer weights take the float64 path
    weights = rng.random((5, n))
    np.testing.assert_allclose(
        bootstrap_ap(scores, targets, ignore, weights), np.stack([average_precision(scores, targets, ignore, sample_weight=w) for w in weights]), atol=1e-12
    )


def test_resample_stream_is_one_integers_call_per_resample() -> None:
    rng = np.random.default_rng(7)
    expected = np.stack([np.bincount(rng.integers(0, 9, size=9), minlength=9) for _ in range(4)])
    np.testing.assert_array_equal(resample_counts(9, 4, seed=7), expected)
    assert (resample_counts(9, 4, seed=7).sum(axis=1) == 9).all()


# ---------------------------------------------------------------------------------------------
# The whole procedure against an independent slow reference
# ---------------------------------------------------------------------------------------------


def slow_reference(heads: list[RunScores], bases: list[RunScores], n_resamples: int, seed: int) -> tuple[float, float, float]:
    """The documented procedure, written independently: scikit-learn AP, explicit loops."""

    def by_id(r: RunScores) -> dict[str, int]:
        return {image: i for i, image in enumerate(r.image_ids)}

    ids = sorted(heads[0].image_ids)
    n = len(ids)
    rng = np.random.default_rng(seed)
    draws = [np.bincount(rng.integers(0, n, size=n), minlength=n) for _ in range(n_resamples)]

    def mean_ap_diff(h: RunScores, b: RunScores, weight: np.ndarray) -> float:
        hi, bi = by_id(h), by_id(b)
        hx = [hi[i] for i in ids]
        bx = [bi[i] for i in ids]
        diffs = []
        for c in range(h.scores.shape[1]):
            keep = ~h.ignore[hx, c]
            y = h.targets[hx, c][keep]
            w = weight[keep]
            if (w * y).sum() == 0:  # no positive in this resample: the class drops out of both
                continue
            ap_h = average_precision_score(y, h.scores[hx, c][keep], sample_weight=w)
            ap_b = average_precision_score(y, b.scores[bx, c][keep], sample_weight=w)
            diffs.append(ap_h - ap_b)
        return float(np.mean(diffs)) if diffs else float("nan")

    point = np.mean([mean_ap_diff(h, b, np.ones(n)) for h, b in zip(heads, bases)])
    deltas = np.array([np.mean([mean_ap_diff(h, b, w) for h, b in zip(heads, bases)]) for w in draws])
    deltas = deltas[np.isfinite(deltas)]
    return float(point), float(np.percentile(deltas, 2.5)), float(np.percentile(deltas, 97.5))


def synthetic_pair(seed: int, n: int = 40, c: int = 3, gap: float = 0.5) -> tuple[RunScores, RunScores]:
    rng = np.random.default_rng(100 + seed)
    label_rng = np.random.default_rng(1)  # the same test labels for every seed
    targets = (label_rng.random((n, c)) < 0.3).astype(np.uint8)
    targets[0] = 1
    ignore = label_rng.random((n, c)) < 0.05
    ignore[0] = False
    ids = [f"im{i:03d}" for i in range(n)]
    head_scores = np.round((1 + gap) * targets + rng.normal(0, 1, (n, c)), 2)
    base_scores = np.round(targets + rng.normal(0, 1, (n, c)), 2)
    ph, pb = rng.permutation(n), rng.permutation(n)  # each file lists the images in its own order
    head = run(head_scores[ph], targets[ph], ignore[ph], [ids[i] for i in ph])
    base = run(base_scores[pb], targets[pb], ignore[pb], [ids[i] for i in pb])
    return head, base


@pytest.mark.parametrize("seeds", [1, 2])
def test_paired_bootstrap_matches_a_slow_reference(seeds: int) -> None:
    pairs = [synthetic_pair(s) for s in range(seeds)]
    heads, bases = [h for h, _ in pairs], [b for _, b in pairs]
    result = paired_bootstrap(heads, bases, n_resamples=100, seed=3)
    point, low, high = slow_reference(heads, bases, 100, 3)
    assert result.delta == pytest.approx(point, abs=1e-12)
    assert result.low == pytest.approx(low, abs=1e-12)
    assert result.high == pytest.approx(high, abs=1e-12)
    assert result.seeds == seeds and result.resamples == 100
    # the point estimate is the difference of the runs' full-set mAP, averaged over seeds
    maps = [np.nanmean(average_precision(h.scores, h.targets, h.ignore)) - np.nanmean(average_precision(b.scores, b.targets, b.ignore)) for h, b in pairs]
    assert result.delta == pytest.approx(np.mean(maps), abs=1e-12)


def test_a_head_identical_to_the_baseline_gets_zero_and_the_interval_zero_zero() -> None:
    head, _ = synthetic_pair(0)
    same = RunScores(list(reversed(head.image_ids)), head.scores[::-1].copy(), head.targets[::-1].copy(), head.ignore[::-1].copy(), head.classes)
    result = paired_bootstrap([head, head], [same, same])
    assert result.delta == 0.0 and result.low == 0.0 and result.high == 0.0
    assert result.low <= 0 <= result.high and not result.significant
    assert result.resamples == stats.DEFAULT_RESAMPLES >= 1000


def test_a_clearly_better_head_gets_an_interval_excluding_zero() -> None:
    pairs = [synthetic_pair(s, n=120, gap=2.0) for s in range(3)]
    result = paired_bootstrap([h for h, _ in pairs], [b for _, b in pairs])
    assert result.delta > 0.1 and result.low > 0 and result.significant
    worse = paired_bootstrap([b for _, b in pairs], [h for h, _ in pairs])
    assert worse.high < 0 and worse.significant and worse.delta == pytest.approx(-result.delta)


def test_the_same_seed_gives_the_same_interval() -> None:
    head, base = synthetic_pair(0)
    a = paired_bootstrap(head, base, n_resamples=200, seed=1)
    b = paired_bootstrap(head, base, n_resamples=200, seed=1)
    c = paired_bootstrap(head, base, n_resamples=200, seed=2)
    assert (a.low, a.high) == (b.low, b.high)
    assert (a.low, a.high) != (c.low, c.high) and a.delta == c.delta


def test_runs_that_cannot_be_paired_are_refused() -> None:
    head, base = synthetic_pair(0)
    other_ids = run(base.scores, base.targets, base.ignore, [f"x{i}" for i in range(len(base.image_ids))])
    with pytest.raises(PairingError, match="different test images"):
        paired_bootstrap(head, other_ids, n_resamples=10)
    other_classes = RunScores(base.image_ids, base.scores, base.targets, base.ignore, ["a", "b", "c"])
    with pytest.raises(PairingError, match="different classes"):
        paired_bootstrap(head, other_classes, n_resamples=10)
    flipped = RunScores(base.image_ids, base.scores, 1 - base.targets, base.ignore, base.classes)
    with pytest.raises(PairingError, match="different test labels"):
        paired_bootstrap(head, flipped, n_resamples=10)
    with pytest.raises(ValueError, match="pair them by seed"):
        paired_bootstrap([head, head], [base], n_resamples=10)
