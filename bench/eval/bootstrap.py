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
3. **AP per resample.** ``AP_c(w_b)`` is :func:`bench.eval.metrics.average_precision` with
   ``sample_weight = w_b``: the AP of the data set in which image i appears ``w_b[i]`` times
   (SPEC §1: ties form one threshold; ignored entries take no part). How it is computed (the
   numbers do not depend on it): :func:`resampled_ap` sorts each class ONCE per run
   (:func:`rank_classes`), then evaluates a block of resamples at a time as weighted sums over that
   fixed order, only where the positives' tie groups end (:func:`ranked_ap`; torch, every core, or
   the GPU when there is one). :func:`bootstrap_ap` and :func:`resampled_ap_direct` are the direct
   computation it replaced (one sort per block of resamples), kept as the reference that tests and
   ``python -m bench.perf --only report`` compare it with.
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
7. **p-value** (two-sided, from the same ``Δ_b``; :func:`bench.eval.significance.bootstrap_p_value`):
   ``p = min(1, 2 · (1 + min(#{b: Δ_b ≤ 0}, #{b: Δ_b ≥ 0})) / (1 + R'))`` over the R' finite
   ``Δ_b``: the share of resamples on the far side of 0, doubled, with a Monte Carlo +1 (never
   below 2 / (1 + R')). An identical head has every ``Δ_b = 0``, hence p = 1. The report adjusts
   these p-values with Holm's method over a section's family of comparisons.

The interval reflects the uncertainty due to the finite test set (which images were drawn), with the
trained models held fixed; seed-to-seed variation shows in the leaderboard's ± std over seeds.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from bench.eval.metrics import average_precision
from bench.eval.significance import bootstrap_p_value

__all__ = [
    "BLOCK_ENTRIES",
    "Bootstrapper",
    "DEFAULT_RESAMPLES",
    "DEFAULT_SEED",
    "DeltaResult",
    "PairingError",
    "RankedRun",
    "RunScores",
    "RunStats",
    "bootstrap_ap",
    "canonical",
    "check_pair",
    "delta_from_ap",
    "full_ap",
    "paired_bootstrap",
    "pairing_digest",
    "percentile_interval",
    "rank_classes",
    "ranked_ap",
    "report_device",
    "resample_counts",
    "resample_indices",
    "resampled_ap",
    "resampled_ap_direct",
]

DEFAULT_RESAMPLES = 1000
DEFAULT_SEED = 0
LEVEL = 0.95
# Entries of a [resamples, C, N] block handled at once by bootstrap_ap (8 MB per float64 array).
_BLOCK_ENTRIES = 1 << 20
_FLOAT32_EXACT_INT = 1 << 24
#: The fast path's memory bound: a block of B resamples holds B x max(N, positive runs) entries
#: per array (a handful of float32 / float64 arrays of that size: ~100 MB at 2**21).
BLOCK_ENTRIES = 1 << 21


class PairingError(ValueError):
    """Two runs cannot be compared image by image (different images, classes or labels)."""


@dataclass
class RunScores:
    """One run's per-image test output (as saved by :func:`bench.results.store.save_scores`)."""

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

    p_value: float = float("nan")  # two-sided bootstrap p-value (step 7), not adjusted

    @property
    def significant(self) -> bool:
        """True when the interval excludes 0 (one comparison on its own: the report marks `*`
        from the Holm-adjusted p-value of the section's family instead)."""
        return bool(self.low > 0 or self.high < 0)


def canonical(run: RunScores) -> RunScores:
    """The run with its images in sorted image-id order (step 1 of the procedure)."""
    ids = run.image_ids
    if all(str(a) < str(b) for a, b in zip(ids, ids[1:])):  # already canonical (strictly increasing: no duplicate)
        return run
    if len(set(ids)) != len(ids):
        raise PairingError("a score file lists the same image id twice")
    order = np.argsort(np.asarray(ids, dtype=object).astype(str), kind="stable")
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


def resampled_ap_direct(run: RunScores, n_resamples: int, seed: int = DEFAULT_SEED) -> np.ndarray:
    """float64 [R, C]: the resampled AP of a canonical run, computed as before issue 15.

    :func:`bootstrap_ap` over blocks of ``max(1, 2**20 // (C * N))`` resamples: every block sorts
    every class again, so above 2**20 entries every resample pays a full sort of the matrix. Kept
    as the reference :func:`resampled_ap` is tested and timed against (same numbers).
    """
    n, c = run.scores.shape
    rows = max(1, _BLOCK_ENTRIES // (c * n))
    return np.concatenate([bootstrap_ap(run.scores, run.targets, run.ignore, w) for w in _counts_blocks(n, n_resamples, seed, rows)])


@dataclass(frozen=True)
class RankedRun:
    """One run's classes, each sorted once by descending score: what any resample's AP needs.

    Per class c, the non-ignored entries in descending score order, cut after the last tie group
    that holds a positive (entries below it change no AP), concatenated over the classes. A
    *positive run* is a tie group holding a positive (SPEC §1: one threshold per distinct score);
    its *segment* is the entries after the previous positive run of its class up to its own end.
    Segments cover the concatenation in order, so under weights ``w`` the weight predicted
    positive at a run's threshold is the cumulative sum of its class's segment sums, and its
    true-positive weight the cumulative sum of the runs' positive weights.
    """

    n: int  # images
    c: int  # classes
    entry_image: np.ndarray  # int64 [L]: image of each kept entry (classes concatenated, in rank order)
    segment_start: np.ndarray  # int64 [P]: where each positive run's segment starts in entry_image
    positive_image: np.ndarray  # int64 [Q]: image of each positive entry, in the same order
    positive_start: np.ndarray  # int64 [P]: where each positive run's positives start in positive_image
    run_class: np.ndarray  # int64 [P]: the class of each positive run (non-decreasing)

    @property
    def runs(self) -> int:
        return int(self.run_class.size)


def rank_classes(scores: np.ndarray, targets: np.ndarray, ignore: np.ndarray | None) -> RankedRun:
    """Sort every class once (descending scores) and find its positive runs (see :class:`RankedRun`).

    Args:
        scores: float [N, C]; targets: {0, 1} [N, C]; ignore: bool [N, C] or None.
    """
    s = np.asarray(scores)
    n, c = s.shape
    y = np.asarray(targets).astype(bool)
    keep = np.ones((n, c), dtype=bool) if ignore is None else ~np.asarray(ignore, dtype=bool)
    order = np.argsort(s.T, axis=1, kind="stable")[:, ::-1]  # [C, N], descending scores
    entry_image, segment_start, positive_image, positive_start, run_class = [], [], [], [], []
    entries = positives = 0
    for k in range(c):
        o = order[k]
        o = o[keep[o, k]]  # non-ignored entries of class k, descending
        pos = y[o, k]
        if not pos.any():
            continue
        sk = s[o, k]
        group_end = np.flatnonzero(np.append(sk[1:] != sk[:-1], True))  # last entry of each tie group
        q = np.flatnonzero(pos)
        q_end = group_end[np.searchsorted(group_end, q)]  # the end of each positive's tie group
        run_end = np.unique(q_end)  # one per positive run, in rank order
        q_run = np.searchsorted(run_end, q_end)  # the run of each positive
        entry_image.append(o[: run_end[-1] + 1])
        segment_start.append(entries + np.concatenate(([0], run_end[:-1] + 1)))
        positive_image.append(o[q])
        positive_start.append(positives + np.searchsorted(q_run, np.arange(run_end.size)))
        run_class.append(np.full(run_end.size, k))
        entries += run_end[-1] + 1
        positives += q.size

    def cat(parts: list[np.ndarray]) -> np.ndarray:
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)

    return RankedRun(n, c, cat(entry_image), cat(segment_start), cat(positive_image), cat(positive_start), cat(run_class))


def report_device() -> torch.device:
    """Where the bootstrap's block arithmetic runs: the first GPU when there is one, else the CPU
    (torch then uses every core)."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _weights_dtype(counts: np.ndarray) -> torch.dtype:
    """float32 when every weight is an integer and a class's total weight stays below 2**24 (all
    sums are then exact integers in float32), else float64."""
    counts = np.asarray(counts)
    integer = np.issubdtype(counts.dtype, np.integer) or bool(np.all(counts == np.floor(counts)))
    return torch.float32 if integer and float(counts.sum(axis=1).max(initial=0)) < _FLOAT32_EXACT_INT else torch.float64


def ranked_ap(ranked: RankedRun, counts: np.ndarray | torch.Tensor, device: torch.device | str | None = None) -> np.ndarray:
    """AP of every class under each row of ``counts``: ``== bootstrap_ap(s, y, ig, counts)``.

    For each positive run r of class c (segments and runs as in :class:`RankedRun`):
    ``TP_r = Σ_{r' ≤ r} (positive weight of r')``, ``PRED_r = Σ_{r' ≤ r} (weight of the segment
    of r')`` (both cumulative within the class), and
    ``AP_c = Σ_r (positive weight of r) · TP_r / PRED_r / TP_last`` (SPEC §1, the weighted form of
    ``Σ_t (R_t − R_{t−1}) P_t``). Segment and run sums of all rows at once are two
    ``embedding_bag`` sums of the weight matrix's rows (nothing of size rows x C x N is formed),
    then cumulative sums along the runs; with integer weights these sums are exact integers in
    float32, and the precision and the area are computed in float64.

    Args:
        ranked: from :func:`rank_classes`.
        counts: non-negative weights [B, N] (integer counts for the bootstrap).
        device: where to compute (default :func:`report_device`).

    Returns:
        float64 [B, C]; NaN where a class has no positive, non-ignored target of non-zero weight.
    """
    device = report_device() if device is None else torch.device(device)
    counts_np = counts.numpy() if isinstance(counts, torch.Tensor) else np.asarray(counts)
    if counts_np.ndim != 2 or counts_np.shape[1] != ranked.n:
        raise ValueError(f"counts must have shape [B, {ranked.n}], got {counts_np.shape}")
    b, c = counts_np.shape[0], ranked.c
    out = torch.full((b, c), float("nan"), dtype=torch.float64, device=device)
    if not (ranked.runs and b):
        return out.cpu().numpy()
    dtype = _weights_dtype(counts_np)
    # [N, B]: one row of B weights per image, so each bag sum adds contiguous rows
    weights = torch.as_tensor(counts_np).to(device=device, dtype=dtype).T.contiguous()

    def bag_sums(images: np.ndarray, starts: np.ndarray) -> torch.Tensor:
        """[B, P]: per resample, the weight summed over each run's entries (then one run per column)."""
        sums = F.embedding_bag(torch.as_tensor(images, device=device), weights, torch.as_tensor(starts, device=device), mode="sum")
        # row-wise from here on (cumulative sums along contiguous memory); a fresh tensor, because
        # .contiguous() keeps the strides of a size-1 dimension, which segment_reduce misreads
        return torch.empty((b, sums.shape[0]), dtype=sums.dtype, device=device).copy_(sums.T)

    predicted = bag_sums(ranked.entry_image, ranked.segment_start)  # weight of each positive run's segment
    gained = bag_sums(ranked.positive_image, ranked.positive_start)  # positive weight of each positive run
    del weights
    run_class = ranked.run_class
    first = np.flatnonzero(np.append(True, run_class[1:] != run_class[:-1]))  # first run of each class with a positive
    classes = torch.as_tensor(run_class[first], device=device)
    lengths = torch.as_tensor(np.diff(np.append(first, ranked.runs)), device=device).repeat(b, 1)  # [B, classes]
    later_firsts = torch.as_tensor(first[1:], device=device)

    def class_sums(x: torch.Tensor) -> torch.Tensor:
        """[B, classes with a positive]: x summed over each class's runs (in order: deterministic)."""
        return torch.segment_reduce(x, "sum", lengths=lengths, axis=1)

    def cumsum_within_classes(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """In place: x -> its cumulative sum along the runs, restarted at every class; and the class
        totals. Subtracting the previous class's total at each class's first run restarts the
        running sum without it ever exceeding one class's total (integer sums stay exact in float32)."""
        totals = class_sums(x)
        x[:, later_firsts] -= totals[:, :-1]
        return torch.cumsum(x, 1, out=x), totals

    tp, total = cumsum_within_classes(gained.clone())
    predicted, _ = cumsum_within_classes(predicted)
    if dtype == torch.float32:
        predicted.clamp_(min=1)  # integer weights: PRED = 0 only where TP = gained = 0, so the term is 0
        precision = tp.double().div_(predicted.double())
    else:
        precision = torch.where(predicted > 0, tp / predicted, torch.zeros((), dtype=tp.dtype, device=device))
    del predicted, tp
    area = class_sums(precision.mul_(gained))
    total = total.double()
    out[:, classes] = torch.where(total > 0, area / total, torch.full((), float("nan"), dtype=torch.float64, device=device))
    return out.clamp(0.0, 1.0).cpu().numpy()


def _count_blocks32(n: int, n_resamples: int, seed: int, rows: int) -> Iterator[np.ndarray]:
    """The rows of :func:`resample_counts` (the same stream), ``rows`` at a time, as float32 when
    exact (counts of fewer than 2**24 images), else float64."""
    stream = resample_indices(n, n_resamples, seed)
    dtype = np.float32 if n < _FLOAT32_EXACT_INT else np.float64
    for start in range(0, n_resamples, rows):
        k = min(rows, n_resamples - start)
        block = np.empty((k, n), dtype=dtype)
        for j in range(k):
            block[j] = np.bincount(next(stream), minlength=n)
        yield block


def resampled_ap(
    run: RunScores,
    n_resamples: int,
    seed: int = DEFAULT_SEED,
    block_entries: int = BLOCK_ENTRIES,
    device: torch.device | str | None = None,
    ranked: RankedRun | None = None,
) -> np.ndarray:
    """float64 [R, C]: AP of a canonical run under resamples 0..R-1 (steps 2-3), fast.

    Equal to :func:`resampled_ap_direct` (same resamples, same ties and drop-out rule, ~1e-15):
    each class is sorted once (:func:`rank_classes`), then blocks of B resamples are evaluated by
    :func:`ranked_ap`, with B such that B x max(N, positive runs) <= ``block_entries``: memory is
    bounded by the block, not by R x N x C. Time O(R · (entries kept + runs)) + one sort.
    """
    ranked = rank_classes(run.scores, run.targets, run.ignore) if ranked is None else ranked
    n = ranked.n
    rows = max(1, min(n_resamples, block_entries // max(n, ranked.runs, 1)))
    device = report_device() if device is None else torch.device(device)
    blocks = []
    for w in _count_blocks32(n, n_resamples, seed, rows):
        try:
            blocks.append(ranked_ap(ranked, w, device))
        except RuntimeError as exc:  # e.g. out of GPU memory: the CPU gives the same numbers
            if device.type == "cpu":
                raise
            warnings.warn(f"bootstrap on {device} failed ({exc}); continuing on the CPU", stacklevel=2)
            device = torch.device("cpu")
            blocks.append(ranked_ap(ranked, w, device))
    return np.concatenate(blocks)


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
    """Per-class AP [C] on the full test set (:func:`bench.eval.metrics.average_precision`)."""
    return average_precision(run.scores, run.targets, run.ignore)


@dataclass
class RunStats:
    """What comparing a run needs, kept instead of its scores (a few kB per class)."""

    pairing: str  # digest of the canonical image ids, classes, targets and ignore mask (:func:`pairing_digest`)
    evaluated: np.ndarray  # bool [C]: classes with a positive, non-ignored target
    full: np.ndarray  # float64 [C]: AP on the full test set (NaN for a class not evaluated)
    resampled: np.ndarray  # float64 [R, C]: AP under resamples 0..R-1


def pairing_digest(run: RunScores) -> str:
    """A digest of what two runs must share to be paired (:func:`check_pair`): the canonical image
    ids, the classes, the targets and the ignore mask (not the scores)."""
    h = hashlib.sha256()
    h.update("\0".join(map(str, run.image_ids)).encode())
    h.update(b"\1" + "\0".join(map(str, run.classes)).encode())
    h.update(b"\1" + np.ascontiguousarray(np.asarray(run.targets, dtype=bool)).tobytes())
    h.update(b"\1" + np.ascontiguousarray(np.asarray(run.ignore, dtype=bool)).tobytes())
    return h.hexdigest()[:32]


RunSource = RunScores | Callable[[], RunScores]  # a run, or a function that loads it (only when needed)


def _load(source: RunSource) -> RunScores:
    return canonical(source() if callable(source) else source)


class Bootstrapper:
    """Computes (and memoises per run key) each run's :class:`RunStats` — full-set AP and the
    [R, C] resampled AP — so that a baseline shared by many heads is resampled once, and a run is
    loaded only when its statistics are not known yet. Keys are any hashable run identity (the
    run id)."""

    def __init__(self, n_resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED) -> None:
        if n_resamples < 1:
            raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
        self.n_resamples = n_resamples
        self.seed = seed
        self._stats: dict[object, RunStats] = {}
        self._full: dict[object, np.ndarray] = {}

    def compute(self, run: RunScores) -> RunStats:
        """The statistics of a canonical run (the expensive part: :func:`resampled_ap`)."""
        return RunStats(pairing_digest(run), _evaluated(run), full_ap(run), resampled_ap(run, self.n_resamples, self.seed))

    def run_stats(self, key: object, source: RunSource) -> RunStats:
        """The :class:`RunStats` of run ``key`` (``source``: the run or a loader of it)."""
        if key not in self._stats:
            self._stats[key] = self.compute(_load(source))
        return self._stats[key]

    def resampled_ap(self, key: object, run: RunSource) -> np.ndarray:
        """[R, C] AP of a run under resamples 0..R-1 of its N images (:func:`resampled_ap`)."""
        return self.run_stats(key, run).resampled

    def full(self, key: object, run: RunSource) -> np.ndarray:
        """[C] AP of a run on its full test set."""
        if key in self._stats:
            return self._stats[key].full
        if key not in self._full:
            self._full[key] = full_ap(_load(run))
        return self._full[key]

    def delta(self, pairs: Sequence[tuple[tuple[object, RunSource], tuple[object, RunSource]]], level: float = LEVEL) -> DeltaResult:
        """Δ mAP of ``[((head key, head run), (baseline key, baseline run)), ...]`` (one per seed);
        a run may be given as a function that loads it."""
        if not pairs:
            raise ValueError("no seed pair to compare")
        per_seed, resampled = [], []
        for (hk, head), (bk, base) in pairs:
            h, b = self.run_stats(hk, head), self.run_stats(bk, base)
            if h.pairing != b.pairing:
                check_pair(_load(head), _load(base))  # raises, saying what differs
                raise PairingError("the runs were evaluated on different test data")
            per_seed.append(float(delta_from_ap(h.full, b.full, b.evaluated)))
            resampled.append(delta_from_ap(h.resampled, b.resampled, b.evaluated))
        deltas = np.mean(np.stack(resampled), axis=0)  # NaN in any seed -> NaN (dropped)
        low, high = percentile_interval(deltas, level)
        return DeltaResult(
            delta=float(np.mean(per_seed)), low=low, high=high, seeds=len(pairs), resamples=self.n_resamples,
            dropped=int((~np.isfinite(deltas)).sum()), per_seed=per_seed, level=level, p_value=bootstrap_p_value(deltas),
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
