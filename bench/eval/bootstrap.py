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
from typing import Callable, Sequence

import numpy as np
import torch

from bench.eval.metrics import average_precision
from bench.eval.resampling import (
    DEFAULT_SEED,
    DIRECT_BLOCK_ENTRIES,
    FLOAT32_EXACT_INT,
    RankedRun,
    bootstrap_ap,
    count_blocks,
    rank_classes,
    ranked_ap,
    report_device,
)
from bench.eval.significance import bootstrap_p_value

__all__ = [
    "BLOCK_ENTRIES",
    "Bootstrapper",
    "DEFAULT_RESAMPLES",
    "DEFAULT_SEED",
    "DeltaResult",
    "PairingError",
    "RunScores",
    "RunStats",
    "canonical",
    "check_pair",
    "delta_from_ap",
    "full_ap",
    "paired_bootstrap",
    "pairing_digest",
    "percentile_interval",
    "resampled_ap",
    "resampled_ap_direct",
]

DEFAULT_RESAMPLES = 1000
LEVEL = 0.95
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


def resampled_ap_direct(run: RunScores, n_resamples: int, seed: int = DEFAULT_SEED) -> np.ndarray:
    """float64 [R, C]: the resampled AP of a canonical run, computed as before issue 15.

    :func:`bootstrap_ap` over blocks of ``max(1, 2**20 // (C * N))`` resamples: every block sorts
    every class again, so above 2**20 entries every resample pays a full sort of the matrix. Kept
    as the reference :func:`resampled_ap` is tested and timed against (same numbers).
    """
    n, c = run.scores.shape
    rows = max(1, DIRECT_BLOCK_ENTRIES // (c * n))
    return np.concatenate([bootstrap_ap(run.scores, run.targets, run.ignore, w) for w in count_blocks(n, n_resamples, seed, rows)])


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
    for w in count_blocks(n, n_resamples, seed, rows, np.float32 if n < FLOAT32_EXACT_INT else np.float64):
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
