"""Paired bootstrap of Δ mAP between a head and its average-pooling baseline (issue 7).

Pure computation: per-image scores in, numbers out; no files (the report reads the score files).

The question answered: on this test set, is head H better than the baseline B (head ``baseline``,
``pool = "avg"``) trained on the same dataset, backbone, protocol, recipe and seed, and by how much?

Procedure (exactly what :func:`paired_bootstrap` computes)
-----------------------------------------------------------
Inputs: S seed pairs ``(H_s, B_s)``: the head's run and the baseline's run with the same seed (and
everything else equal except the head). Both runs of a pair must hold the same test images (matched
by image id), the same classes and the same targets / ignore mask, or :class:`PairingError` is raised.

1. **Canonical order.** Every run's images are put in the order of their sorted image ids, so a
   resample names images, not positions in a file.
2. **Resamples.** ``rng = numpy.random.default_rng(seed)``; resample ``b = 0 .. R-1`` draws
   ``idx_b = rng.integers(0, N, size=N)`` (N images, with replacement, one call per resample) and
   turns it into integer counts ``w_b = bincount(idx_b, minlength=N)``. The SAME ``w_b`` weights the
   head's and the baseline's images (paired), and, when all pairs share one test set (the usual
   case: every seed is evaluated on the same images), the same ``w_b`` is used for every seed pair
   too: the test set is one random sample that all seeds share, so it is resampled once per ``b``.
   (Every run draws from its own generator seeded with ``seed``; runs with the same N images in
   the same canonical order therefore get identical resamples.)
3. **AP per resample.** ``AP_c(w_b)`` is :func:`bench.metrics.average_precision` with
   ``sample_weight = w_b``: the AP of the data set in which image i appears ``w_b[i]`` times
   (SPEC §1: ties form one threshold; ignored entries take no part). :func:`bootstrap_ap` computes
   it for many resamples at once (sorting each class once); it equals the per-resample call.
4. **Same class set.** The classes evaluated on the full set are those with a positive,
   non-ignored target (SPEC §1); both runs of a pair share them (same targets). A resample in which
   such a class has no positive (all its positives drawn zero times) has no AP for that class: the
   class drops out of BOTH runs' means for that resample, so ``Δ_{s,b} = mean_{c ∈ E_{s,b}}
   (AP^H_c(w_b) − AP^B_c(w_b))`` over the classes ``E_{s,b}`` with a positive in resample b.
   (A resample with no such class at all is dropped and counted in ``dropped``.)
5. **Seeds.** ``Δ_b = mean_s Δ_{s,b}`` (the mean over seed pairs of the per-seed Δ for the same
   resample b).
6. **Result.** The point estimate is ``Δ = mean_s (mAP(H_s) − mAP(B_s))`` on the full test set (no
   resampling); the 95 % interval is the percentile interval ``[q_2.5, q_97.5]`` of the ``Δ_b``
   (``numpy.percentile``, linear interpolation). The difference is *significant* when the interval
   excludes 0 (``low > 0`` or ``high < 0``). A head whose scores equal the baseline's gets
   ``Δ_{s,b} = 0`` for every b, hence Δ = 0 and the interval ``[0, 0]``: not significant.

The interval reflects the uncertainty due to the finite test set (which images were drawn), with the
trained models held fixed; seed-to-seed variation shows in the leaderboard's ± std over seeds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np

from bench.metrics import average_precision

__all__ = [
    "Bootstrapper",
    "DEFAULT_RESAMPLES",
    "DEFAULT_SEED",
    "DeltaResult",
    "PairingError",
    "RunScores",
    "bootstrap_ap",
    "canonical",
    "check_pair",
    "delta_from_ap",
    "full_ap",
    "paired_bootstrap",
    "percentile_interval",
    "resample_counts",
    "resample_indices",
]

DEFAULT_RESAMPLES = 1000
DEFAULT_SEED = 0
LEVEL = 0.95
# Entries of a [resamples, C, N] block handled at once by bootstrap_ap (8 MB per float64 array).
_BLOCK_ENTRIES = 1 << 20
_FLOAT32_EXACT_INT = 1 << 24


class PairingError(ValueError):
    """Two runs cannot be compared image by image (different images, classes or labels)."""


@dataclass
class RunScores:
    """One run's per-image test output (as saved by :func:`bench.results.save_scores`)."""

    image_ids: list[str]
    scores: np.ndarray  # float [N, C]
    targets: np.ndarray  # {0, 1} [N, C]
    ignore: np.ndarray  # bool [N, C]
    classes: list[str]

    @classmethod
    def from_dict(cls, d: dict) -> "RunScores":
        return cls(list(d["image_ids"]), np.asarray(d["scores"]), np.asarray(d["targets"]), np.asarray(d["ignore"], dtype=bool), list(d["classes"]))


@dataclass
class DeltaResult:
    """Δ mAP (head − baseline) as fractions (0.012 = 1.2 points), with its bootstrap interval."""

    delta: float  # mean over seeds of mAP(head) - mAP(baseline), full test set
    low: float  # percentile interval of the resampled Δ_b
    high: float
    seeds: int  # seed pairs used
    resamples: int  # resamples drawn
    dropped: int = 0  # resamples without any evaluated class (left out of the interval)
    per_seed: list[float] = field(default_factory=list)  # full-set Δ of each seed pair
    level: float = LEVEL

    @property
    def significant(self) -> bool:
        """True when the interval excludes 0."""
        return bool(self.low > 0 or self.high < 0)


def canonical(run: RunScores) -> RunScores:
    """The run with its images in sorted image-id order (step 1 of the procedure)."""
    ids = np.asarray(run.image_ids, dtype=object)
    if len(set(run.image_ids)) != len(run.image_ids):
        raise PairingError("a score file lists the same image id twice")
    order = np.argsort(ids.astype(str), kind="stable")
    return RunScores([run.image_ids[i] for i in order], run.scores[order], run.targets[order], run.ignore[order], run.classes)


def resample_indices(n: int, n_resamples: int, seed: int = DEFAULT_SEED) -> Iterator[np.ndarray]:
    """Yield the image indices of each resample: ``rng.integers(0, n, size=n)`` per resample."""
    rng = np.random.default_rng(seed)
    for _ in range(n_resamples):
        yield rng.integers(0, n, size=n)


def resample_counts(n: int, n_resamples: int, seed: int = DEFAULT_SEED) -> np.ndarray:
    """int64 [R, n]: how many times each image is drawn in each resample (rows sum to n)."""
    out = np.empty((n_resamples, n), dtype=np.int64)
    for b, idx in enumerate(resample_indices(n, n_resamples, seed)):
        out[b] = np.bincount(idx, minlength=n)
    return out


def _counts_blocks(n: int, n_resamples: int, seed: int, rows: int) -> Iterator[np.ndarray]:
    """The rows of :func:`resample_counts`, ``rows`` at a time (bounded memory)."""
    stream = resample_indices(n, n_resamples, seed)
    for start in range(0, n_resamples, rows):
        k = min(rows, n_resamples - start)
        block = np.empty((k, n), dtype=np.float64)
        for j in range(k):
            block[j] = np.bincount(next(stream), minlength=n)
        yield block


def bootstrap_ap(scores: np.ndarray, targets: np.ndarray, ignore: np.ndarray | None, counts: np.ndarray) -> np.ndarray:
    """AP of every class under many resampling weights at once.

    ``bootstrap_ap(s, y, ig, W)[b] == average_precision(s, y, ig, sample_weight=W[b])`` (up to float
    rounding, ~1e-15). Each class is sorted once. AP = sum over the runs of tied scores that hold a
    positive ("positive runs") of (TP weight the run adds) x (precision at the run's end), divided
    by the class's total positive weight (SPEC §1: one threshold per distinct score). For a block
    of resamples, one cumulative sum over the sorted entries gives the predicted weight at every
    positive run's end; the TP weight comes from the (much fewer) positive entries alone.

    Args:
        scores: float [N, C]; targets: {0, 1} [N, C]; ignore: bool [N, C] or None.
        counts: non-negative weights [R, N] (integer counts for the bootstrap).

    Returns:
        float64 [R, C]; NaN where a class has no positive, non-ignored target of non-zero weight.
    """
    s = np.asarray(scores)
    n, c = s.shape
    counts = np.asarray(counts)
    if counts.ndim != 2 or counts.shape[1] != n:
        raise ValueError(f"counts must have shape [R, {n}], got {counts.shape}")
    y = np.asarray(targets).astype(bool)
    keep = None if ignore is None else ~np.asarray(ignore, dtype=bool).T  # [C, N]

    order = np.argsort(s.T, axis=1, kind="stable")[:, ::-1]  # [C, N], descending scores
    s_sorted = np.take_along_axis(s.T, order, axis=1)
    pos_sorted = np.take_along_axis(y.T if keep is None else y.T & keep, order, axis=1)
    valid_sorted = None if keep is None else np.take_along_axis(keep, order, axis=1)
    run_end = np.ones((c, n), dtype=bool)
    run_end[:, :-1] = s_sorted[:, 1:] != s_sorted[:, :-1]
    ends = np.flatnonzero(run_end)  # flat indices (into [C * N]) of every run's last entry
    q = np.flatnonzero(pos_sorted)  # the positive entries, class by class, in score order
    q_end = ends[np.searchsorted(ends, q)]  # the end of each positive's run
    last_of_run = np.ones(q.size, dtype=bool)  # the last positive of each positive run
    last_of_run[:-1] = q_end[1:] != q_end[:-1]
    runs = np.flatnonzero(last_of_run)  # index into q of each positive run's last positive
    run_class = q_end[runs] // n
    first_of_class = np.ones(runs.size, dtype=bool)
    first_of_class[1:] = run_class[1:] != run_class[:-1]
    first_runs = np.flatnonzero(first_of_class)
    class_first_q = np.where(first_runs > 0, runs[first_runs - 1] + 1, 0)  # index into q
    class_ordinal = np.cumsum(first_of_class) - 1  # run -> its class among classes with positives
    has = np.zeros(c, dtype=bool)  # classes with a positive (their runs are contiguous, in order)
    has[run_class] = True
    last_run = np.flatnonzero(np.append(first_of_class[1:], True))  # the last positive run of each

    # Integer weights summing below 2**24 are added exactly in float32 (half the memory traffic).
    exact32 = bool(np.all(counts == np.floor(counts))) and float(counts.sum(axis=1).max(initial=0)) < _FLOAT32_EXACT_INT
    counts = counts.astype(np.float32 if exact32 else np.float64)
    out = np.full((counts.shape[0], c), np.nan)
    if runs.size == 0:
        return out
    rows = max(1, _BLOCK_ENTRIES // (c * n))
    for r0 in range(0, counts.shape[0], rows):
        w = counts[r0 : r0 + rows][:, order]  # [B, C, N]: weight of each sorted entry
        if valid_sorted is not None:
            w *= valid_sorted
        b = w.shape[0]
        w = w.reshape(b, c * n)
        # TP weight up to each positive run's end: cumulative over the positives, restarted per class
        tp_q = np.cumsum(w[:, q], axis=1, dtype=np.float64)
        tp = tp_q[:, runs]
        # cumulative TP of the classes before each run's class (read just before its first positive)
        padded = np.concatenate([np.zeros((b, 1)), tp_q], axis=1)
        tp -= padded[:, class_first_q][:, class_ordinal]
        gained = np.diff(tp, axis=1, prepend=0.0)
        gained[:, first_of_class] = tp[:, first_of_class]
        predicted = np.cumsum(w.reshape(b, c, n), axis=2).reshape(b, c * n)[:, q_end[runs]].astype(np.float64)
        precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
        area = np.add.reduceat(gained * precision, first_runs, axis=1)  # [B, classes with a positive]
        total = tp[:, last_run]
        out[r0 : r0 + b, has] = np.divide(area, total, out=np.full_like(area, np.nan), where=total > 0)
    return np.clip(out, 0.0, 1.0)


def delta_from_ap(ap_head: np.ndarray, ap_base: np.ndarray, evaluated: np.ndarray | None = None) -> np.ndarray:
    """Δ mAP per row (resample) over the classes both runs evaluate in that row (step 4).

    Args:
        ap_head, ap_base: float [R, C] (or [C]); NaN marks a class without a positive.
        evaluated: bool [C], the classes evaluated on the full set (default: all).

    Returns:
        float [R] (or a scalar): mean over the shared finite classes of ``ap_head - ap_base``;
        NaN for a row without any.
    """
    ap_head, ap_base = np.asarray(ap_head, dtype=float), np.asarray(ap_base, dtype=float)
    mask = np.isfinite(ap_head) & np.isfinite(ap_base)
    if evaluated is not None:
        mask &= np.asarray(evaluated, dtype=bool)
    diff = np.where(mask, ap_head - ap_base, 0.0)
    k = mask.sum(axis=-1)
    return np.divide(diff.sum(axis=-1), k, out=np.full(np.shape(k), np.nan), where=k > 0)


def percentile_interval(deltas: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """The percentile interval of the finite values of ``deltas`` (linear interpolation)."""
    finite = np.asarray(deltas, dtype=float)
    finite = finite[np.isfinite(finite)]
    if finite.size == 0:
        return float("nan"), float("nan")
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(finite, [tail, 100 - tail])
    return float(low), float(high)


def check_pair(head: RunScores, base: RunScores) -> None:
    """Raise :class:`PairingError` unless two canonical runs hold the same images, classes and labels."""
    if list(head.classes) != list(base.classes):
        raise PairingError(f"the runs have different classes ({len(head.classes)} vs {len(base.classes)})")
    if head.image_ids != base.image_ids:
        raise PairingError(f"the runs were evaluated on different test images ({len(head.image_ids)} vs {len(base.image_ids)})")
    if not (np.array_equal(np.asarray(head.targets, bool), np.asarray(base.targets, bool)) and np.array_equal(head.ignore, base.ignore)):
        raise PairingError("the runs have different test labels or ignore masks (difficult policy?)")


def _evaluated(run: RunScores) -> np.ndarray:
    return (np.asarray(run.targets, bool) & ~run.ignore).any(axis=0)


def full_ap(run: RunScores) -> np.ndarray:
    """Per-class AP [C] on the full test set (:func:`bench.metrics.average_precision`)."""
    return average_precision(run.scores, run.targets, run.ignore)


class Bootstrapper:
    """Computes (and memoises per run key) the [R, C] resampled AP of runs, so that a baseline
    shared by many heads is resampled once. Keys are any hashable run identity (the run id)."""

    def __init__(self, n_resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED) -> None:
        if n_resamples < 1:
            raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
        self.n_resamples = n_resamples
        self.seed = seed
        self._ap: dict[object, np.ndarray] = {}
        self._full: dict[object, np.ndarray] = {}

    def resampled_ap(self, key: object, run: RunScores) -> np.ndarray:
        """[R, C] AP of a canonical run under resamples 0..R-1 of its N images."""
        if key not in self._ap:
            n, c = run.scores.shape
            rows = max(1, _BLOCK_ENTRIES // (c * n))
            blocks = [bootstrap_ap(run.scores, run.targets, run.ignore, w) for w in _counts_blocks(n, self.n_resamples, self.seed, rows)]
            self._ap[key] = np.concatenate(blocks)
        return self._ap[key]

    def full(self, key: object, run: RunScores) -> np.ndarray:
        if key not in self._full:
            self._full[key] = full_ap(run)
        return self._full[key]

    def delta(self, pairs: Sequence[tuple[tuple[object, RunScores], tuple[object, RunScores]]], level: float = LEVEL) -> DeltaResult:
        """Δ mAP of ``[((head key, head run), (baseline key, baseline run)), ...]`` (one per seed)."""
        if not pairs:
            raise ValueError("no seed pair to compare")
        per_seed, resampled = [], []
        for (hk, head), (bk, base) in pairs:
            head, base = canonical(head), canonical(base)
            check_pair(head, base)
            evaluated = _evaluated(base)
            per_seed.append(float(delta_from_ap(self.full(hk, head), self.full(bk, base), evaluated)))
            resampled.append(delta_from_ap(self.resampled_ap(hk, head), self.resampled_ap(bk, base), evaluated))
        deltas = np.mean(np.stack(resampled), axis=0)  # NaN in any seed -> NaN (dropped)
        low, high = percentile_interval(deltas, level)
        return DeltaResult(
            delta=float(np.mean(per_seed)), low=low, high=high, seeds=len(pairs), resamples=self.n_resamples,
            dropped=int((~np.isfinite(deltas)).sum()), per_seed=per_seed, level=level,
        )


def paired_bootstrap(
    heads: Sequence[RunScores] | RunScores,
    baselines: Sequence[RunScores] | RunScores,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
    level: float = LEVEL,
) -> DeltaResult:
    """Δ mAP (head − baseline) with its paired-bootstrap percentile interval (module docstring).

    Args:
        heads, baselines: one run each, or one per seed (``heads[s]`` pairs with ``baselines[s]``).
        n_resamples: R resamples of the test images (≥ 1000 for a 95 % interval).
        seed: seed of the resampling generator (fixed: the report is reproducible).
        level: the interval's coverage.
    """
    heads = [heads] if isinstance(heads, RunScores) else list(heads)
    baselines = [baselines] if isinstance(baselines, RunScores) else list(baselines)
    if len(heads) != len(baselines):
        raise ValueError(f"{len(heads)} head runs but {len(baselines)} baseline runs: pair them by seed")
    boot = Bootstrapper(n_resamples, seed)
    return boot.delta([((("h", i), h), (("b", i), b)) for i, (h, b) in enumerate(zip(heads, baselines))], level)
