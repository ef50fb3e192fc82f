"""The bootstrap's inner computation: the AP of every class under many resampling weights at once.

Pure array computation (scores, targets, ignore mask and integer counts in; AP out), used by
:mod:`bench.eval.bootstrap`, whose docstring states the procedure (steps 2 and 3 live here):

- :func:`resample_indices` / :func:`resample_counts` / :func:`count_blocks`: resample ``b`` draws
  ``rng.integers(0, N, size=N)`` from ``numpy.random.default_rng(seed)`` and counts each image;
- :func:`rank_classes` + :func:`ranked_ap`: each class sorted once, then a block of resamples
  evaluated as weighted sums over that fixed order (torch; every core, or the GPU);
- :func:`bootstrap_ap`: the direct computation (one sort per block) that the fast path replaced,
  kept as its reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

DEFAULT_SEED = 0
#: below this many images (or total weight per class) float32 holds every count and sum exactly
FLOAT32_EXACT_INT = 1 << 24
#: entries of a [resamples, C, N] block that bootstrap_ap handles at once (8 MB per float64 array)
DIRECT_BLOCK_ENTRIES = 1 << 20


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
    exact32 = bool(np.all(counts == np.floor(counts))) and float(counts.sum(axis=1).max(initial=0)) < FLOAT32_EXACT_INT
    counts = counts.astype(np.float32 if exact32 else np.float64)
    out = np.full((counts.shape[0], c), np.nan)
    if runs.size == 0:
        return out
    rows = max(1, DIRECT_BLOCK_ENTRIES // (c * n))
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
    return torch.float32 if integer and float(counts.sum(axis=1).max(initial=0)) < FLOAT32_EXACT_INT else torch.float64


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


def count_blocks(n: int, n_resamples: int, seed: int, rows: int, dtype: type = np.float64) -> Iterator[np.ndarray]:
    """The rows of :func:`resample_counts` (the same stream), ``rows`` at a time (bounded memory),
    as ``dtype`` [rows, n] (float32 holds the counts exactly below 2**24 images)."""
    stream = resample_indices(n, n_resamples, seed)
    for start in range(0, n_resamples, rows):
        k = min(rows, n_resamples - start)
        block = np.empty((k, n), dtype=dtype)
        for j in range(k):
            block[j] = np.bincount(next(stream), minlength=n)
        yield block
