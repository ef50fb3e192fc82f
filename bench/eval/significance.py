"""Significance of many comparisons: bootstrap p-values, Holm's adjustment, ranks across sections.

Pure functions, arrays in, arrays out (the report feeds them; nothing here reads files).

- :func:`bootstrap_p_value`: the two-sided p-value of "Δ = 0" from resampled Δ_b (the same
  resamples as the percentile interval, :mod:`bench.eval.bootstrap` step 7).
- :func:`holm`: Holm's (1979) step-down adjustment of a family of p-values (family-wise error).
- Across sections (Demšar 2006, "Statistical comparisons of classifiers over multiple data
  sets"): :func:`average_ranks` of k configurations over n blocks, Friedman's test
  (``scipy.stats.friedmanchisquare``), pairwise Wilcoxon signed-rank tests
  (``scipy.stats.wilcoxon``) adjusted by Holm (Benavoli et al. 2016 recommend this over the
  Nemenyi post-hoc test), the Nemenyi critical difference (drawn as a scale), and
  :func:`cliques`: the groups of configurations adjacent in mean rank with no significant
  difference inside (the bars of a critical-difference diagram).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
from scipy import stats as scipy_stats

__all__ = [
    "ALPHA",
    "CriticalDifference",
    "average_ranks",
    "bootstrap_p_value",
    "cliques",
    "critical_difference",
    "friedman",
    "holm",
    "nemenyi_cd",
    "pairwise_wilcoxon",
    "ranks_within_blocks",
    "resamples_needed",
    "smallest_adjusted_p",
]

ALPHA = 0.05


def bootstrap_p_value(deltas: np.ndarray) -> float:
    """Two-sided p-value of Δ = 0 from resampled ``deltas`` [R] (NaN entries are left out).

    ``p = min(1, 2 · (1 + min(#{Δ_b ≤ 0}, #{Δ_b ≥ 0})) / (1 + R'))`` over the R' finite values:
    the share of resamples on the far side of 0 (Efron & Tibshirani's achieved significance level,
    1993, §16.4), doubled for two sides, with the +1 of a Monte Carlo p-value (Davison & Hinkley
    1997, eq. 4.11) so that it never claims more than R' resamples can show: the smallest value is
    2 / (1 + R'). p < α matches the percentile interval at level 1 − α excluding 0 (up to that +1
    and the interpolation at the interval's ends). A Δ_b exactly 0 counts on both sides, so all
    ``Δ_b = 0`` (an identical head) gives p = 1. NaN when no Δ_b is finite.
    """
    d = np.asarray(deltas, dtype=float)
    d = d[np.isfinite(d)]
    if d.size == 0:
        return float("nan")
    beyond = min(np.count_nonzero(d <= 0), np.count_nonzero(d >= 0))
    return float(min(1.0, 2 * (1 + beyond) / (1 + d.size)))


def smallest_adjusted_p(family: int, resamples: int) -> float:
    """The smallest Holm-adjusted p-value a family of ``family`` bootstrap comparisons with
    ``resamples`` resamples can reach: ``family · 2 / (1 + resamples)``. At or above α no
    comparison can be significant, whatever the data: more resamples are needed."""
    return family * 2 / (1 + resamples)


def resamples_needed(family: int, alpha: float = ALPHA) -> int:
    """Resamples (a multiple of 1,000) at which the resolution limit of a family is at most α / 2."""
    need = 4 * family / alpha
    return int(np.ceil(need / 1000) * 1000)


def holm(p_values: np.ndarray) -> np.ndarray:
    """Holm's step-down adjusted p-values of one family (same shape; NaN stays NaN and is not
    counted in the family).

    With the m finite p-values sorted ``p_(1) ≤ … ≤ p_(m)``:
    ``p̃_(i) = max_{j ≤ i} min(1, (m − j + 1) · p_(j))``. Rejecting where ``p̃ < α`` keeps the
    family-wise error rate ≤ α under any dependence between the tests.
    """
    p = np.asarray(p_values, dtype=float)
    out = np.full(p.shape, np.nan)
    flat = p.reshape(-1)
    finite = np.flatnonzero(np.isfinite(flat))
    m = finite.size
    if m:
        order = finite[np.argsort(flat[finite], kind="stable")]
        scaled = np.minimum(1.0, (m - np.arange(m)) * flat[order])
        out.reshape(-1)[order] = np.maximum.accumulate(scaled)
    return out


def ranks_within_blocks(values: np.ndarray) -> np.ndarray:
    """float [n, k]: rank of each of k configurations within each of n blocks (row), 1 = the
    highest value; tied values share the mean of their ranks (Demšar 2006, §3.2.2)."""
    v = np.asarray(values, dtype=float)
    return np.stack([scipy_stats.rankdata(-row, method="average") for row in v]) if v.size else np.zeros(v.shape)


def average_ranks(values: np.ndarray) -> np.ndarray:
    """float [k]: mean over the n blocks of :func:`ranks_within_blocks` (1 = best)."""
    return ranks_within_blocks(values).mean(axis=0)


def friedman(values: np.ndarray) -> tuple[float, float]:
    """(χ²_F, p) of Friedman's test that all k configurations (columns) rank alike over the n
    blocks (rows), by ``scipy.stats.friedmanchisquare`` (with its tie correction). Needs k ≥ 3
    and n ≥ 2 (else NaN, NaN). Every block all tied: (0, 1)."""
    v = np.asarray(values, dtype=float)
    if v.ndim != 2 or v.shape[1] < 3 or v.shape[0] < 2:
        return float("nan"), float("nan")
    if all(np.all(row == row[0]) for row in v):
        return 0.0, 1.0
    result = scipy_stats.friedmanchisquare(*v.T)
    return float(result.statistic), float(result.pvalue)


def pairwise_wilcoxon(values: np.ndarray) -> np.ndarray:
    """float [k, k] (symmetric, NaN diagonal): the two-sided p-value of the Wilcoxon signed-rank
    test (``scipy.stats.wilcoxon``, its default exact / normal choice; zero differences dropped
    as Wilcoxon did) between each pair of columns over the n blocks. A pair whose values are
    equal in every block gets p = 1."""
    v = np.asarray(values, dtype=float)
    k = v.shape[1]
    out = np.full((k, k), np.nan)
    for i in range(k):
        for j in range(i + 1, k):
            diff = v[:, i] - v[:, j]
            if np.all(diff == 0):
                p = 1.0
            else:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # "sample size too small for normal approximation"
                    p = float(scipy_stats.wilcoxon(v[:, i], v[:, j]).pvalue)
            out[i, j] = out[j, i] = p
    return out


def nemenyi_cd(k: int, n: int, alpha: float = ALPHA) -> float:
    """The Nemenyi critical difference of mean ranks, ``q_α · sqrt(k (k + 1) / (6 n))``, with
    ``q_α`` the studentized range quantile (k groups, infinite df) over √2 (Demšar 2006, eq. 5 and
    Table 5: q_0.05 = 1.960, 2.343, 2.569, 2.728 for k = 2..5). NaN for k < 2 or n < 1."""
    if k < 2 or n < 1:
        return float("nan")
    q = float(scipy_stats.studentized_range.ppf(1 - alpha, k, np.inf)) / np.sqrt(2)
    return q * float(np.sqrt(k * (k + 1) / (6.0 * n)))


def cliques(mean_ranks: np.ndarray, significant: np.ndarray) -> list[list[int]]:
    """Groups of configurations, adjacent in mean rank, with no significant pair inside.

    Sort by mean rank; for each start i take the longest run i..j of consecutive configurations
    in which no pair is significant; keep the runs of two or more that no other run contains.

    Args:
        mean_ranks: float [k]; significant: bool [k, k] (symmetric; the diagonal is ignored).

    Returns:
        Lists of column indices, each ordered by mean rank; the lists in order of their first member.
    """
    ranks = np.asarray(mean_ranks, dtype=float)
    sig = np.asarray(significant, dtype=bool)
    order = np.argsort(ranks, kind="stable")
    k = order.size
    spans: list[tuple[int, int]] = []
    for i in range(k):
        j = i
        while j + 1 < k and not sig[np.ix_(order[i : j + 2], order[i : j + 2])][np.triu_indices(j + 2 - i, 1)].any():
            j += 1
        if j > i and not any(a <= i and j <= b for a, b in spans):
            spans.append((i, j))
    return [[int(x) for x in order[a : b + 1]] for a, b in spans]


@dataclass
class CriticalDifference:
    """Ranks of k configurations over n blocks and the tests between them (arrays over columns)."""

    blocks: int  # n
    mean_ranks: np.ndarray  # float [k], 1 = best
    friedman_statistic: float
    friedman_p: float
    wilcoxon_p: np.ndarray  # float [k, k], unadjusted
    wilcoxon_holm: np.ndarray  # float [k, k], Holm over the k (k - 1) / 2 pairs
    significant: np.ndarray  # bool [k, k]: wilcoxon_holm < alpha
    nemenyi_cd: float  # Nemenyi's critical difference of mean ranks at alpha
    cliques: list[list[int]] = field(default_factory=list)
    alpha: float = ALPHA


def critical_difference(values: np.ndarray, alpha: float = ALPHA) -> CriticalDifference:
    """Everything a critical-difference diagram shows, for ``values`` [n blocks, k configurations]
    (higher is better, e.g. mean mAP of each configuration in each section)."""
    v = np.asarray(values, dtype=float)
    n, k = v.shape
    ranks = average_ranks(v)
    chi2, p = friedman(v)
    raw = pairwise_wilcoxon(v)
    adjusted = np.full((k, k), np.nan)
    iu = np.triu_indices(k, 1)
    adjusted[iu] = holm(raw[iu])
    adjusted.T[iu] = adjusted[iu]
    significant = np.nan_to_num(adjusted, nan=1.0) < alpha
    return CriticalDifference(n, ranks, chi2, p, raw, adjusted, significant, nemenyi_cd(k, n, alpha), cliques(ranks, significant), alpha)
