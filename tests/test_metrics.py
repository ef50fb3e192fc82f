"""bench.eval.metrics against independent references (sklearn, slow explicit loops, hand arithmetic)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from sklearn.metrics import (
    average_precision_score,
    f1_score,
    precision_score,
    recall_score,
)

from bench.eval.metrics import (
    MetricsWarning,
    average_precision,
    evaluated_classes,
    multilabel_metrics,
)

SEEDS = [0, 1, 2, 3, 4]
KEYS = ["mAP", "CP", "CR", "CF1", "mF1", "OP", "OR", "OF1"]
TOP3 = ["CP_top3", "CR_top3", "CF1_top3", "mF1_top3", "OP_top3", "OR_top3", "OF1_top3"]


def random_case(seed: int, n: int = 80, c: int = 7, dtype=np.float64, ignore_rate: float = 0.0):
    """Scores rounded to one decimal (many ties); targets ~30% positive; optional ignore mask."""
    rng = np.random.default_rng(seed)
    scores = np.round(rng.random((n, c)), 1).astype(dtype)
    targets = (rng.random((n, c)) < 0.3).astype(np.int64)
    targets[0] = 1  # every class has a positive ...
    ignore = rng.random((n, c)) < ignore_rate if ignore_rate else None
    if ignore is not None:
        ignore[0] = False  # ... that is not ignored
    return scores, targets, ignore


def hmean(a: float, b: float) -> float:
    return 0.0 if a + b == 0 else 2 * a * b / (a + b)


def slow_reference(scores, targets, ignore=None, threshold=0.5, k=None):
    """Explicit per-entry loops in float64: SPEC §1 with micro sums over all classes; with k, the
    top-k of each row over all C scores (ties -> lower class index), ignored entries not counted."""
    n, c = scores.shape
    ignore = np.zeros((n, c), bool) if ignore is None else ignore
    tp, fp, fn = [0] * c, [0] * c, [0] * c
    for i in range(n):
        top = set(sorted(range(c), key=lambda j: (-float(scores[i, j]), j))[:k]) if k else set(range(c))
        for j in range(c):
            if ignore[i, j]:
                continue
            pred = scores[i, j] >= threshold and j in top
            if pred and targets[i, j]:
                tp[j] += 1
            elif pred:
                fp[j] += 1
            elif targets[i, j]:
                fn[j] += 1
    ev = [j for j in range(c) if tp[j] + fn[j] > 0]
    p = [tp[j] / (tp[j] + fp[j]) if tp[j] + fp[j] else 0.0 for j in range(c)]
    r = [tp[j] / (tp[j] + fn[j]) if tp[j] + fn[j] else 0.0 for j in range(c)]
    cp = sum(p[j] for j in ev) / len(ev)
    cr = sum(r[j] for j in ev) / len(ev)
    op = sum(tp) / (sum(tp) + sum(fp)) if sum(tp) + sum(fp) else 0.0
    orr = sum(tp) / (sum(tp) + sum(fn))
    return {
        "CP": cp,
        "CR": cr,
        "CF1": hmean(cp, cr),
        "mF1": sum(hmean(p[j], r[j]) for j in ev) / len(ev),
        "OP": op,
        "OR": orr,
        "OF1": hmean(op, orr),
    }


def sklearn_ap(scores, targets, ignore=None, sample_weight=None):
    """Per-class sklearn AP on the non-ignored samples of each class."""
    out = []
    for j in range(scores.shape[1]):
        keep = np.ones(len(scores), bool) if ignore is None else ~ignore[:, j]
        w = None if sample_weight is None else sample_weight[keep]
        out.append(average_precision_score(targets[keep, j], scores[keep, j], sample_weight=w))
    return np.array(out)


# ---------------------------------------------------------------------------------------------
# Random data against sklearn and the slow reference
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_ap_matches_sklearn(seed, dtype):
    scores, targets, _ = random_case(seed, dtype=dtype)
    ref = sklearn_ap(scores, targets)
    np.testing.assert_allclose(average_precision(scores, targets), ref, rtol=0, atol=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every class is evaluated: no warning
        m = multilabel_metrics(scores, targets)
    assert m["mAP"] == pytest.approx(ref.mean(), abs=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
def test_ap_with_ignore_matches_sklearn_on_kept_samples(seed):
    scores, targets, ignore = random_case(seed, ignore_rate=0.2)
    ref = sklearn_ap(scores, targets, ignore)
    np.testing.assert_allclose(average_precision(scores, targets, ignore), ref, atol=1e-12)
    assert multilabel_metrics(scores, targets, ignore)["mAP"] == pytest.approx(ref.mean(), abs=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
def test_ap_sample_weight_matches_sklearn(seed):
    scores, targets, ignore = random_case(seed, ignore_rate=0.1)
    rng = np.random.default_rng(100 + seed)
    for w in (rng.random(len(scores)), rng.integers(0, 4, len(scores)).astype(float)):
        w[0] = 1.0  # keep the guaranteed positives
        ref = sklearn_ap(scores, targets, ignore, sample_weight=w)
        np.testing.assert_allclose(average_precision(scores, targets, ignore, w), ref, atol=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
def test_integer_sample_weight_equals_resampled_data(seed):
    # The paired bootstrap's use: weight = number of times a sample was drawn.
    scores, targets, ignore = random_case(seed, ignore_rate=0.1)
    rng = np.random.default_rng(200 + seed)
    draws = rng.integers(0, len(scores), len(scores))
    counts = np.bincount(draws, minlength=len(scores))
    weighted = average_precision(scores, targets, ignore, sample_weight=counts)
    resampled = sklearn_ap(scores[draws], targets[draws], ignore[draws])
    has_pos = ((targets[draws] == 1) & ~ignore[draws]).any(axis=0)
    np.testing.assert_allclose(weighted[has_pos], resampled[has_pos], atol=1e-12)
    assert np.isnan(weighted[~has_pos]).all()


def test_zero_weighted_positives_give_nan():
    scores = np.array([[0.9, 0.2], [0.4, 0.8], [0.1, 0.3]])
    targets = np.array([[1, 0], [0, 1], [0, 0]])
    ap = average_precision(scores, targets, sample_weight=np.array([1.0, 0.0, 1.0]))
    assert ap[0] == 1.0 and np.isnan(ap[1])


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("threshold", [0.5, 0.3])
def test_precision_recall_f1_match_sklearn(seed, threshold):
    scores, targets, _ = random_case(seed)
    targets[:, -1] = 0  # last class has no positive: out of the class averages, in the micro sums
    pred = (scores >= threshold).astype(int)
    ev = targets.any(axis=0)
    with pytest.warns(MetricsWarning):
        m = multilabel_metrics(scores, targets, threshold=threshold)
    macro = dict(average="macro", zero_division=0)
    cp = precision_score(targets[:, ev], pred[:, ev], **macro)
    cr = recall_score(targets[:, ev], pred[:, ev], **macro)
    assert m["CP"] == pytest.approx(cp, abs=1e-12)
    assert m["CR"] == pytest.approx(cr, abs=1e-12)
    assert m["CF1"] == pytest.approx(hmean(cp, cr), abs=1e-12)
    assert m["mF1"] == pytest.approx(f1_score(targets[:, ev], pred[:, ev], **macro), abs=1e-12)
    micro = dict(average="micro", zero_division=0)
    assert m["OP"] == pytest.approx(precision_score(targets, pred, **micro), abs=1e-12)
    assert m["OR"] == pytest.approx(recall_score(targets, pred, **micro), abs=1e-12)
    assert m["OF1"] == pytest.approx(f1_score(targets, pred, **micro), abs=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
def test_precision_recall_f1_with_ignore_match_sklearn(seed):
    scores, targets, ignore = random_case(seed, ignore_rate=0.2)
    pred = (scores >= 0.5).astype(int)
    m = multilabel_metrics(scores, targets, ignore)
    kw = dict(zero_division=0)
    per_class = []
    for j in range(scores.shape[1]):
        y_j, pred_j = targets[~ignore[:, j], j], pred[~ignore[:, j], j]
        per_class.append(
            [fn(y_j, pred_j, **kw) for fn in (precision_score, recall_score, f1_score)]
        )
    p, r, f = np.array(per_class).T
    assert m["CP"] == pytest.approx(p.mean(), abs=1e-12)
    assert m["CR"] == pytest.approx(r.mean(), abs=1e-12)
    assert m["mF1"] == pytest.approx(f.mean(), abs=1e-12)
    kept = ~ignore  # micro = binary scores over all kept entries
    assert m["OP"] == pytest.approx(precision_score(targets[kept], pred[kept], **kw), abs=1e-12)
    assert m["OR"] == pytest.approx(recall_score(targets[kept], pred[kept], **kw), abs=1e-12)
    assert m["OF1"] == pytest.approx(f1_score(targets[kept], pred[kept], **kw), abs=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("ignore_rate", [0.0, 0.2])
def test_all_and_top3_match_slow_reference(seed, ignore_rate):
    # Scores on a coarse grid: plenty of ties inside a row, so the tie rule of top-k matters.
    scores, targets, ignore = random_case(seed, n=50, c=8, ignore_rate=ignore_rate)
    scores = np.round(scores * 4) / 4
    m = multilabel_metrics(scores, targets, ignore, threshold=0.5, top_k=3)
    ref = slow_reference(scores, targets, ignore, 0.5)
    ref_top = slow_reference(scores, targets, ignore, 0.5, k=3)
    for key in ref:
        assert m[key] == pytest.approx(ref[key], abs=1e-12), key
        assert m[f"{key}_top3"] == pytest.approx(ref_top[key], abs=1e-12), key
    assert list(m) == KEYS + TOP3


def test_top_k_suffix_follows_k_and_k_at_least_c_is_plain():
    scores, targets, _ = random_case(0, c=4)
    m = multilabel_metrics(scores, targets, top_k=5)
    assert [k for k in m if "top" in k] == [k.replace("3", "5") for k in TOP3]
    for key in KEYS[1:]:
        assert m[f"{key}_top5"] == m[key]


# ---------------------------------------------------------------------------------------------
# Hand-computed cases
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("order", [[0, 1, 2, 3], [0, 2, 1, 3], [3, 2, 1, 0]])
def test_ap_tied_scores_form_one_threshold(order):
    # scores [0.9, 0.5, 0.5, 0.1], targets [1, 1, 0, 0]; thresholds:
    #   >= 0.9: TP 1, FP 0 -> P = 1,   R = 1/2
    #   >= 0.5: TP 2, FP 1 -> P = 2/3, R = 1     (the tie is one threshold)
    # AP = 1/2 * 1 + 1/2 * 2/3 = 5/6, whatever order the tied samples come in
    # (a per-sample walk that met the positive first would give 1).
    scores = np.array([0.9, 0.5, 0.5, 0.1])[order, None]
    targets = np.array([1, 1, 0, 0])[order, None]
    assert average_precision(scores, targets)[0] == pytest.approx(5 / 6, abs=1e-15)


def test_ap_brief_example():
    # scores [0.9, 0.5, 0.5, 0.1], targets [1, 0, 1, 0]: >= 0.9: P 1, R 1/2; >= 0.5: P 2/3, R 1
    # AP = 1/2 * 1 + 1/2 * 2/3 = 5/6
    ap = average_precision(np.array([[0.9], [0.5], [0.5], [0.1]]), np.array([[1], [0], [1], [0]]))
    assert ap[0] == pytest.approx(5 / 6, abs=1e-15)


def test_ignored_entry_changes_the_result():
    scores = np.array([[0.9], [0.8], [0.3], [0.2]])
    targets = np.array([[1], [0], [1], [0]])
    ignore = np.array([[False], [True], [False], [False]])
    # All kept: AP = 1/2 * 1 + 1/2 * 2/3 = 5/6; at 0.5: TP 1 (0.9), FP 1 (0.8), FN 1 (0.3)
    m = multilabel_metrics(scores, targets)
    assert m["mAP"] == pytest.approx(5 / 6) and m["CP"] == 0.5 and m["CR"] == 0.5
    # Ignoring the negative at 0.8: ranking 0.9(+) 0.3(+) 0.2(-) -> AP = 1/2*1 + 1/2*1 = 1;
    # at 0.5: TP 1, FP 0, FN 1 -> P = 1, R = 1/2
    m = multilabel_metrics(scores, targets, ignore)
    assert m["mAP"] == 1.0 and m["CP"] == 1.0 and m["CR"] == 0.5 and m["OP"] == 1.0


def test_hand_case_with_unevaluated_class_and_cf1_differs_from_mf1():
    scores = np.array(
        [[0.9, 0.6, 0.2],
         [0.8, 0.4, 0.7],
         [0.3, 0.7, 0.1],
         [0.1, 0.2, 0.6]]
    )
    targets = np.array(
        [[1, 1, 0],
         [0, 0, 0],
         [1, 1, 0],
         [0, 0, 0]]
    )
    with pytest.warns(MetricsWarning, match=r"\[2\]") as record:
        m = multilabel_metrics(scores, targets, threshold=0.5, top_k=1)
    assert len(record) == 1  # told once
    expected = {
        # AP_0: 0.9(+) 0.8(-) 0.3(+) 0.1(-) -> 1/2*1 + 1/2*2/3 = 5/6; AP_1: 0.7(+) 0.6(+) -> 1
        # class 2 has no positive: left out -> mAP = (5/6 + 1) / 2 = 11/12
        "mAP": 11 / 12,
        # >= 0.5: class 0 TP 1 FP 1 FN 1 (P 1/2, R 1/2, F1 1/2); class 1 TP 2 (P 1, R 1, F1 1);
        # class 2 FP 2 (0.7, 0.6) -> only in the micro sums
        "CP": (0.5 + 1) / 2,
        "CR": (0.5 + 1) / 2,
        "CF1": 0.75,  # 2 * .75 * .75 / 1.5
        "mF1": (0.5 + 1) / 2,
        "OP": 3 / 6,  # TP 1+2, predicted 2+2+2
        "OR": 3 / 4,  # TP 3, positives 4
        "OF1": 0.6,  # 2 * .5 * .75 / 1.25
        # top-1 of the rows: c0 (0.9), c0 (0.8), c1 (0.7), c2 (0.6), all >= 0.5
        # class 0 TP 1 FP 1 FN 1 (P 1/2, R 1/2, F1 1/2); class 1 TP 1 FN 1 (P 1, R 1/2, F1 2/3)
        "CP_top1": (0.5 + 1) / 2,
        "CR_top1": (0.5 + 0.5) / 2,
        "CF1_top1": 0.6,  # 2 * .75 * .5 / 1.25
        "mF1_top1": (0.5 + 2 / 3) / 2,  # = 7/12 != CF1_top1
        "OP_top1": 2 / 4,  # TP 2, predicted 4 (class 2's FP included)
        "OR_top1": 2 / 4,  # TP 2, positives 4
        "OF1_top1": 0.5,
    }
    assert list(m) == list(expected)
    for key, value in expected.items():
        assert m[key] == pytest.approx(value, abs=1e-15), key
    assert m["CF1_top1"] != pytest.approx(m["mF1_top1"])
    np.testing.assert_array_equal(evaluated_classes(targets), [True, True, False])


def test_top_k_ties_go_to_the_lower_class_index():
    # Row 0: scores [0.6, 0.8, 0.6, 0.6], top-2 = {1 (0.8), 0 (lowest index of the tied 0.6s)}.
    # Row 1 predicts nothing and holds the positives of classes 1-3.
    scores = np.array([[0.6, 0.8, 0.6, 0.6], [0.0, 0.0, 0.0, 0.0]])
    targets = np.array([[1, 0, 0, 0], [0, 1, 1, 1]])
    m = multilabel_metrics(scores, targets, top_k=2)
    # top-2: class 0 TP (P 1, R 1); class 1 FP (P 0, R 0); classes 2, 3 nothing predicted (0, 0)
    assert m["CP_top2"] == 0.25 and m["CR_top2"] == 0.25
    assert m["OP_top2"] == 0.5 and m["OR_top2"] == 0.25  # TP 1 / predicted 2; TP 1 / positives 4
    # plain threshold: row 0 predicts all four -> TP 1, FP 3
    assert m["OP"] == 0.25 and m["CP"] == 0.25


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_score_equal_to_threshold_is_positive(dtype):
    scores = np.array([[0.3, 0.29], [0.1, 0.9]], dtype=dtype)
    targets = np.array([[1, 1], [0, 0]])
    m = multilabel_metrics(scores, targets, threshold=0.3)
    # class 0: 0.3 >= 0.3 -> TP (R 1); class 1: 0.29 < 0.3 -> FN, 0.9 -> FP (P 0, R 0)
    assert m["CR"] == 0.5 and m["OP"] == 0.5 and m["OR"] == 0.5


def test_values_are_python_floats_in_unit_interval():
    scores, targets, ignore = random_case(3, ignore_rate=0.1)
    for value in multilabel_metrics(scores, targets, ignore).values():
        assert type(value) is float and 0.0 <= value <= 1.0


# ---------------------------------------------------------------------------------------------
# Order invariance
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_sample_order_invariance(seed):
    scores, targets, ignore = random_case(seed, ignore_rate=0.1)
    perm = np.random.default_rng(seed).permutation(len(scores))
    a = multilabel_metrics(scores, targets, ignore)
    b = multilabel_metrics(scores[perm], targets[perm], ignore[perm])
    assert a == pytest.approx(b, abs=1e-12)


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------

GOOD_S = np.array([[0.9, 0.1], [0.2, 0.8]])
GOOD_T = np.array([[1, 0], [0, 1]])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(targets=GOOD_T[:1]), "shape"),
        (dict(scores=GOOD_S[0]), "2-D"),
        (dict(scores=np.zeros((0, 2)), targets=np.zeros((0, 2))), "at least one"),
        (dict(ignore=np.zeros((2, 3), bool)), "ignore has shape"),
        (dict(scores=np.array([[np.nan, 0.1], [0.2, 0.8]])), "NaN"),
        (dict(scores=np.array([[np.inf, 0.1], [0.2, 0.8]])), "infinite"),
        (dict(scores=GOOD_S.astype(str)), "dtype"),
        (dict(targets=np.array([[1, -1], [0, 1]])), "only 0 and 1"),
        (dict(targets=np.array([[1, 2], [0, 1]])), "only 0 and 1"),
        (dict(targets=np.array([[1.0, 0.5], [0.0, 1.0]])), "only 0 and 1"),
        (dict(targets=np.zeros((2, 2))), "no class has a positive"),
        (dict(ignore=GOOD_T.astype(bool)), "no class has a positive"),
        (dict(top_k=0), "top_k"),
        (dict(threshold=float("nan")), "threshold"),
    ],
)
def test_errors(kwargs, match):
    args = dict(scores=GOOD_S, targets=GOOD_T, ignore=None) | kwargs
    with pytest.raises(ValueError, match=match):
        multilabel_metrics(**args)


@pytest.mark.parametrize(
    "weight, match",
    [(np.ones(3), "shape"), (np.array([1.0, -1.0]), "non-negative"), (np.array([1.0, np.nan]), "finite")],
)
def test_sample_weight_errors(weight, match):
    with pytest.raises(ValueError, match=match):
        average_precision(GOOD_S, GOOD_T, sample_weight=weight)


def test_evaluated_classes_with_ignore():
    targets = np.array([[1, 1, 0], [0, 1, 0]])
    ignore = np.array([[True, False, False], [False, True, False]])
    np.testing.assert_array_equal(evaluated_classes(targets, ignore), [False, True, False])
    with pytest.raises(ValueError, match="ignore has shape"):
        evaluated_classes(targets, ignore[:, :2])
