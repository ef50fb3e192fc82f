"""Multi-label classification metrics, exactly as defined in SPEC §1.

Pure computation: numpy arrays in, Python floats / numpy arrays out; no files, no global state.
Everything is vectorised over samples and classes. Large inputs (e.g. N=100,000 x C=1,000) are
processed in blocks of whole columns (AP) or whole rows (P/R/F1 counts), each block vectorised,
so that intermediate arrays stay bounded (a few hundred MB at most) whatever N x C is.

Shapes: N samples, C classes.
"""

from __future__ import annotations

import numbers
import warnings

import numpy as np

__all__ = [
    "MetricsWarning",
    "average_precision",
    "evaluated_classes",
    "multilabel_metrics",
]

# Entries of an [N, C] array handled by one vectorised block.
_BLOCK_ENTRIES = 1 << 21
# float32 holds every integer below 2**24 exactly, so integer-valued cumulative sums below that
# bound are exact in float32 (half the memory of float64).
_FLOAT32_EXACT_INT = 1 << 24


class MetricsWarning(UserWarning):
    """Some classes were left out of the class averages (no positive, non-ignored target)."""


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------


def evaluated_classes(targets: np.ndarray, ignore: np.ndarray | None = None) -> np.ndarray:
    """Which classes take part in the class averages (SPEC §1).

    Args:
        targets: {0, 1} array [N, C] (bool, integer or float holding only 0 and 1).
        ignore: bool array [N, C] or None; True marks an entry that takes no part in any metric.

    Returns:
        bool array [C]: True for a class with at least one positive, non-ignored target.
    """
    y = _check_binary("targets", targets, None)
    pos, _ = _positives_negatives(y, ignore)
    return pos.any(axis=0)


def average_precision(
    scores: np.ndarray,
    targets: np.ndarray,
    ignore: np.ndarray | None = None,
    sample_weight: np.ndarray | None = None,
) -> np.ndarray:
    """Non-interpolated average precision of every class (SPEC §1).

    The same definition as ``sklearn.metrics.average_precision_score`` (with its ``sample_weight``
    too): ``AP = sum_t (R_t - R_{t-1}) * P_t`` over the distinct score thresholds t, so tied scores
    form ONE threshold and the result does not depend on the order of samples.

    Args:
        scores: real array [N, C], finite.
        targets: {0, 1} array [N, C].
        ignore: bool array [N, C] or None; ignored entries get weight 0 (take no part).
        sample_weight: non-negative array [N] or None. Integer weights give the AP of the data with
            sample i repeated ``sample_weight[i]`` times (the paired bootstrap uses this).

    Returns:
        float64 array [C] in [0, 1]; NaN for a class with no positive, non-ignored target of
        non-zero weight.
    """
    s = _check_scores(scores)
    y = _check_binary("targets", targets, s.shape)
    pos, neg = _positives_negatives(y, ignore)
    w = _check_sample_weight(sample_weight, s.shape[0])
    return _average_precision(s, pos, neg, w)


def multilabel_metrics(
    scores: np.ndarray,
    targets: np.ndarray,
    ignore: np.ndarray | None = None,
    threshold: float = 0.5,
    top_k: int = 3,
) -> dict[str, float]:
    """All SPEC §1 metrics of one evaluation, as fractions in [0, 1].

    Args:
        scores: probabilities (after sigmoid), real array [N, C], finite.
        targets: {0, 1} array [N, C].
        ignore: bool array [N, C] or None; an ignored entry (a VOC "difficult" label) takes no
            part in any count, AP or class evaluability.
        threshold: entry (i, c) is predicted positive when ``scores[i, c] >= threshold`` (an
            entry exactly at the threshold is positive), compared in the dtype of ``scores``
            (float32 scores: ``0.3`` means ``float32(0.3)``).
        top_k: the top-k variants also require (i, c) to be among the k highest scores of row i;
            ties are broken by the LOWER class index first. The ranking is over all C scores of
            the row (ignored entries included: the prediction is the model's, whatever the labels
            say); ignored entries are then left out of the counts like everywhere else. With
            ``top_k >= C`` the top-k condition holds for every entry.

    Returns:
        ``{"mAP", "CP", "CR", "CF1", "mF1", "OP", "OR", "OF1"}`` and ``CP_top{k}``, ``CR_top{k}``,
        ``CF1_top{k}``, ``mF1_top{k}``, ``OP_top{k}``, ``OR_top{k}``, ``OF1_top{k}``:

        - ``mAP``, ``CP``, ``CR``, ``mF1``: means over the evaluated classes (see
          :func:`evaluated_classes`) of AP_c, P_c (0 when nothing is predicted for c), R_c and the
          per-class F1 (0 when P_c + R_c = 0). ``CF1 = 2*CP*CR/(CP+CR)`` (0 when both are 0).
        - ``OP``, ``OR``, ``OF1`` (micro): TP, FP and FN summed over ALL classes, the classes
          left out of the class averages included. Those classes have no non-ignored positive,
          so they add nothing to TP or FN, but their predictions are real false positives and
          count in OP's denominator. ``OP`` is 0 when nothing is predicted; ``OF1`` is 0 when
          OP and OR are both 0.

    Warns:
        MetricsWarning: once per call, naming the class indices left out of the class averages.

    Raises:
        ValueError: on a bad shape or dtype, NaN/inf scores, targets outside {0, 1}, a bad
            ``threshold``/``top_k``, or when no class has a positive, non-ignored target.
    """
    s = _check_scores(scores)
    y = _check_binary("targets", targets, s.shape)
    pos, neg = _positives_negatives(y, ignore)
    with np.errstate(over="ignore"):  # beyond float32's range the threshold becomes +-inf: same predictions
        threshold = s.dtype.type(_check_threshold(threshold))
    k = _check_top_k(top_k)

    evaluated = pos.any(axis=0)
    if not evaluated.any():
        raise ValueError(
            "no class has a positive, non-ignored target: mAP and the class averages are "
            f"undefined (targets shape {s.shape})"
        )
    if not evaluated.all():
        left_out = np.flatnonzero(~evaluated).tolist()
        warnings.warn(
            f"{len(left_out)} of {s.shape[1]} classes have no positive, non-ignored target and "
            f"are left out of the class averages (mAP, CP, CR, CF1, mF1): class indices {left_out}",
            MetricsWarning,
            stacklevel=2,
        )

    ap = _average_precision(s, pos, neg, None)
    out = {"mAP": float(ap[evaluated].mean())}
    counts, counts_top = _prediction_counts(s, pos, neg, threshold, k)
    out.update(_precision_recall_f1(*counts, evaluated, ""))
    out.update(_precision_recall_f1(*counts_top, evaluated, f"_top{k}"))
    return out


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------


def _check_scores(scores: np.ndarray) -> np.ndarray:
    s = np.asarray(scores)
    if s.ndim != 2:
        raise ValueError(f"scores must be a 2-D array [N, C], got shape {s.shape}")
    if s.shape[0] == 0 or s.shape[1] == 0:
        raise ValueError(f"scores must hold at least one sample and one class, got shape {s.shape}")
    if s.dtype.kind == "f":
        if s.dtype.itemsize < 4:
            s = s.astype(np.float32)
    elif s.dtype.kind in "iu":
        s = s.astype(np.float64)
    else:
        raise ValueError(f"scores must be a real (float or integer) array, got dtype {s.dtype}")
    # min/max propagate NaN, so this finds NaN and +-inf without an [N, C] temporary.
    if not (np.isfinite(s.min()) and np.isfinite(s.max())):
        raise ValueError("scores contain NaN or infinite values")
    return s


def _check_binary(name: str, a: np.ndarray, shape: tuple[int, ...] | None) -> np.ndarray:
    """Validate a {0, 1} array (of ``shape``, or any non-empty 2-D shape when None); return bool."""
    a = np.asarray(a)
    if shape is None:
        if a.ndim != 2 or a.size == 0:
            raise ValueError(f"{name} must be a non-empty 2-D array [N, C], got shape {a.shape}")
    elif a.shape != shape:
        raise ValueError(f"{name} has shape {a.shape}, expected {shape} (the shape of scores)")
    kind = a.dtype.kind
    if kind == "b":
        return a
    if kind in "iu":
        ok = a.min() >= 0 and a.max() <= 1
    elif kind == "f":
        ok = bool(((a == 0) | (a == 1)).all())
    else:
        raise ValueError(f"{name} must be a bool or numeric array of 0/1, got dtype {a.dtype}")
    if not ok:
        bad = np.unique(a[(a != 0) & (a != 1)])[:5].tolist()
        raise ValueError(
            f"{name} must contain only 0 and 1, found {bad}"
            + (" (mark difficult labels through `ignore`, not as -1/0 codes)" if name == "targets" else "")
        )
    return a != 0


def _positives_negatives(y: np.ndarray, ignore: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """bool [N, C] masks of the non-ignored positive and non-ignored negative entries."""
    if ignore is None:
        return y, ~y
    keep = ~_check_binary("ignore", ignore, y.shape)
    return y & keep, ~y & keep


def _check_sample_weight(sample_weight: np.ndarray | None, n: int) -> np.ndarray | None:
    if sample_weight is None:
        return None
    w = np.asarray(sample_weight)
    if w.shape != (n,):
        raise ValueError(f"sample_weight must have shape ({n},) (one weight per sample), got {w.shape}")
    if w.dtype.kind not in "fiu":
        raise ValueError(f"sample_weight must be a real array, got dtype {w.dtype}")
    w = w.astype(np.float64)
    if not np.isfinite(w).all() or (w < 0).any():
        raise ValueError("sample_weight must be finite and non-negative")
    return w


def _check_threshold(threshold: float) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real):
        raise ValueError(f"threshold must be a real number, got {threshold!r}")
    threshold = float(threshold)
    if not np.isfinite(threshold):
        raise ValueError(f"threshold must be finite, got {threshold}")
    return threshold


def _check_top_k(top_k: int) -> int:
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 1:
        raise ValueError(f"top_k must be an integer >= 1, got {top_k!r}")
    return int(top_k)


# ----------------------------------------------------------------------------------------------
# Average precision
# ----------------------------------------------------------------------------------------------


def _average_precision(
    s: np.ndarray, pos: np.ndarray, neg: np.ndarray, w: np.ndarray | None
) -> np.ndarray:
    """AP [C] float64 of validated inputs; pos/neg: bool [N, C], w: float64 [N] or None."""
    n, c = s.shape
    if w is None:
        exact32 = n < _FLOAT32_EXACT_INT
    else:
        exact32 = bool((w == np.floor(w)).all()) and w.sum() < _FLOAT32_EXACT_INT
    acc = np.float32 if exact32 else np.float64
    ap = np.full(c, np.nan)
    step = max(1, _BLOCK_ENTRIES // n)
    for c0 in range(0, c, step):  # blocks of whole columns; each block fully vectorised
        cols = slice(c0, c0 + step)
        ap[cols] = _average_precision_block(
            np.ascontiguousarray(s[:, cols].T),
            np.ascontiguousarray(pos[:, cols].T),
            np.ascontiguousarray(neg[:, cols].T),
            w,
            acc,
        )
    return np.clip(ap, 0.0, 1.0)  # only trims float rounding; NaN passes through


def _average_precision_block(
    s: np.ndarray, pos: np.ndarray, neg: np.ndarray, w: np.ndarray | None, acc: type
) -> np.ndarray:
    """AP of each row of the transposed block s, pos, neg [B, N]; returns float64 [B]."""
    b, n = s.shape
    # The order inside a run of tied scores does not matter (only run ends are read below), so the
    # faster unstable sort is enough; with integer weights the result is bit-for-bit the same.
    order = np.argsort(s, axis=1)[:, ::-1]  # descending scores
    s_sorted = np.take_along_axis(s, order, axis=1)
    pos_sorted = np.take_along_axis(pos, order, axis=1)
    tp = pos_sorted.astype(acc)
    fp = np.take_along_axis(neg, order, axis=1).astype(acc)
    if w is not None:
        w_sorted = w.astype(acc)[order]
        tp *= w_sorted
        fp *= w_sorted
    q = np.flatnonzero(pos_sorted)  # flat positions of the positive entries
    gain = tp.ravel()[q].astype(np.float64)  # the TP weight each positive adds
    np.cumsum(tp, axis=1, out=tp)  # tp[r, j]: weighted TP among the j+1 highest scores of row r
    np.cumsum(fp, axis=1, out=fp)
    del order

    # SPEC §1: tied scores form ONE threshold, so precision is read at the last entry of each run
    # of equal scores (the operating points of sklearn's PR curve). AP = sum_t dR_t * P_t
    # = sum over positive entries q of gain_q * P(run end of q) / total positive weight.
    run_end = np.empty(s_sorted.shape, dtype=bool)
    run_end[:, -1] = True
    np.not_equal(s_sorted[:, 1:], s_sorted[:, :-1], out=run_end[:, :-1])
    ends = np.flatnonzero(run_end)  # flat, row-major; every row's last entry is an end
    e = ends[np.searchsorted(ends, q)]  # run end of each positive, in the same row
    tp_e = tp.ravel()[e].astype(np.float64)
    predicted = tp_e + fp.ravel()[e]
    precision = np.divide(tp_e, predicted, out=np.zeros_like(tp_e), where=predicted > 0)
    area = np.bincount(q // n, weights=gain * precision, minlength=b)
    total = tp[:, -1].astype(np.float64)
    return np.divide(area, total, out=np.full(b, np.nan), where=total > 0)


# ----------------------------------------------------------------------------------------------
# Thresholded predictions: precision, recall, F1
# ----------------------------------------------------------------------------------------------


def _top_k_mask(s: np.ndarray, k: int) -> np.ndarray:
    """bool [n, C]: (i, c) is among the k highest scores of row i, ties to the lower class index."""
    n, c = s.shape
    if k >= c:
        return np.ones(s.shape, dtype=bool)
    kth = np.partition(s, c - k, axis=1)[:, c - k : c - k + 1]  # k-th highest score of each row
    above = s > kth
    tied = s == kth
    # The slots left after the strictly higher scores go to the tied entries in class-index order,
    # the same choice as a stable descending sort.
    slots = k - above.sum(axis=1, keepdims=True)
    return above | (tied & (np.cumsum(tied, axis=1, dtype=np.int32) <= slots))


def _prediction_counts(
    s: np.ndarray, pos: np.ndarray, neg: np.ndarray, threshold: np.floating, k: int
) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per-class (TP, FP, FN) int64 [C], for the thresholded and the top-k predictions."""
    n, c = s.shape
    plain = np.zeros((3, c), dtype=np.int64)
    top = np.zeros((3, c), dtype=np.int64)
    step = max(1, _BLOCK_ENTRIES // c)
    for r0 in range(0, n, step):  # blocks of whole rows; each block fully vectorised
        rows = slice(r0, r0 + step)
        sb, pb, nb = s[rows], pos[rows], neg[rows]
        pred = sb >= threshold
        pred_top = pred & _top_k_mask(sb, k)
        for counts, p in ((plain, pred), (top, pred_top)):
            counts[0] += (p & pb).sum(axis=0)
            counts[1] += (p & nb).sum(axis=0)
            counts[2] += (~p & pb).sum(axis=0)
    return (plain[0], plain[1], plain[2]), (top[0], top[1], top[2])


def _ratio(num: np.ndarray | float, den: np.ndarray | float) -> np.ndarray:
    """num / den, 0 where den == 0."""
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    return np.divide(num, den, out=np.zeros(np.broadcast(num, den).shape), where=den != 0)


def _precision_recall_f1(
    tp: np.ndarray, fp: np.ndarray, fn: np.ndarray, evaluated: np.ndarray, suffix: str
) -> dict[str, float]:
    """CP, CR, CF1, mF1 (over evaluated classes) and OP, OR, OF1 (over all classes), SPEC §1."""
    p = _ratio(tp, tp + fp)
    r = _ratio(tp, tp + fn)
    f1 = _ratio(2 * p * r, p + r)
    cp = float(p[evaluated].mean())
    cr = float(r[evaluated].mean())
    op = float(_ratio(tp.sum(), (tp + fp).sum()))
    or_ = float(_ratio(tp.sum(), (tp + fn).sum()))
    return {
        f"CP{suffix}": cp,
        f"CR{suffix}": cr,
        f"CF1{suffix}": float(_ratio(2 * cp * cr, cp + cr)),
        f"mF1{suffix}": float(f1[evaluated].mean()),
        f"OP{suffix}": op,
        f"OR{suffix}": or_,
        f"OF1{suffix}": float(_ratio(2 * op * or_, op + or_)),
    }
