"""The fast paired bootstrap (issue 15) against the direct per-resample computation.

References: ``bench.eval.resampling.bootstrap_ap`` / ``resampled_ap_direct`` (the computation the
fast path replaced: one sort per block of resamples) and scikit-learn's weighted
``average_precision_score`` written out per resample and class here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import average_precision_score

from bench.eval import bootstrap as stats
from bench.eval import resampling
from bench.eval.bootstrap import RunScores, paired_bootstrap, resampled_ap, resampled_ap_direct
from bench.eval.resampling import rank_classes, ranked_ap


def random_case(seed: int, n: int, c: int) -> RunScores:
    """Scores with many ties (rounded), ~15 % ignored entries, and classes built to drop out of
    some resamples: class 0 has one positive, class 1 two, class 2 none at all, class 3 has all
    its positives ignored but one."""
    rng = np.random.default_rng(seed)
    scores = np.round(rng.random((n, c)), int(rng.integers(1, 3))).astype(np.float32)
    targets = (rng.random((n, c)) < 0.3).astype(np.uint8)
    ignore = rng.random((n, c)) < 0.15
    targets[:, 0] = 0
    targets[rng.integers(n), 0] = 1
    targets[:, 1] = 0
    targets[rng.choice(n, 2, replace=False), 1] = 1
    targets[:, 2] = 0
    positives = np.flatnonzero(targets[:, 3])
    ignore[positives[1:], 3] = True
    ignore[positives[:1], 3] = False
    for k in (0, 1):
        ignore[targets[:, k] == 1, k] = False
    ids = [f"im{i:04d}" for i in range(n)]
    return RunScores(ids, scores, targets, ignore, [f"c{k}" for k in range(c)])


def sklearn_ap(run: RunScores, weights: np.ndarray) -> np.ndarray:
    """[C] AP under ``weights`` [N] with scikit-learn (NaN without a positive of non-zero weight)."""
    out = np.full(run.scores.shape[1], np.nan)
    for k in range(run.scores.shape[1]):
        keep = ~run.ignore[:, k] & (weights > 0)
        y, w = run.targets[keep, k], weights[keep]
        if (y * w).sum() > 0:
            out[k] = average_precision_score(y, run.scores[keep, k], sample_weight=w)
    return out


@pytest.mark.parametrize("seed,n,c", [(0, 40, 6), (1, 97, 7), (2, 250, 9), (3, 13, 5)])
def test_fast_equals_the_direct_computation_with_ties_ignored_entries_and_drop_outs(seed: int, n: int, c: int) -> None:
    run = random_case(seed, n, c)
    counts = resampling.resample_counts(n, 200, seed=seed)
    direct = resampling.bootstrap_ap(run.scores, run.targets, run.ignore, counts)
    fast = ranked_ap(rank_classes(run.scores, run.targets, run.ignore), counts, "cpu")
    np.testing.assert_array_equal(np.isnan(fast), np.isnan(direct))
    np.testing.assert_allclose(fast, direct, rtol=0, atol=1e-12)
    # the cases exercise what they claim: classes drop out of some resamples (but not all), one never counts
    assert np.isnan(fast[:, 2]).all() and not np.isnan(fast[:, 0]).all()
    assert np.isnan(fast[:, 0]).any() and np.isnan(fast[:, 1]).any()
    assert (counts[:, np.flatnonzero(run.targets[:, 0])[0]] == 0).sum() == np.isnan(fast[:, 0]).sum()


@pytest.mark.parametrize("positives", [[1], [1, 4]])
def test_a_single_positive_run(positives: list[int]) -> None:
    # one class, one tie group holding every positive: one positive run in all (the smallest block)
    scores = np.array([[0.2], [0.7], [0.1], [0.4], [0.7]])
    targets = np.zeros((5, 1), dtype=np.uint8)
    targets[positives] = 1
    counts = resampling.resample_counts(5, 40, seed=1)
    fast = ranked_ap(rank_classes(scores, targets, None), counts, "cpu")
    direct = resampling.bootstrap_ap(scores, targets, None, counts)
    np.testing.assert_array_equal(np.isnan(fast), np.isnan(direct))
    np.testing.assert_allclose(fast, direct, rtol=0, atol=1e-15)


def test_fast_equals_scikit_learn_per_resample() -> None:
    run = random_case(4, 60, 6)
    counts = resampling.resample_counts(60, 25, seed=9)
    fast = ranked_ap(rank_classes(run.scores, run.targets, run.ignore), counts, "cpu")
    want = np.stack([sklearn_ap(run, w) for w in counts])
    np.testing.assert_array_equal(np.isnan(fast), np.isnan(want))
    np.testing.assert_allclose(fast, want, rtol=0, atol=1e-12)


def test_non_integer_weights_take_the_float64_path() -> None:
    run = random_case(5, 70, 6)
    rng = np.random.default_rng(0)
    weights = rng.random((6, 70)) * (rng.random((6, 70)) < 0.8)
    fast = ranked_ap(rank_classes(run.scores, run.targets, run.ignore), weights, "cpu")
    want = np.stack([sklearn_ap(run, w) for w in weights])
    np.testing.assert_array_equal(np.isnan(fast), np.isnan(want))
    np.testing.assert_allclose(fast, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("block_entries", [1, 500, 1 << 21])
def test_every_block_size_gives_the_same_resamples_and_numbers(block_entries: int) -> None:
    run = random_case(6, 120, 8)
    direct = resampled_ap_direct(run, 150, seed=4)
    fast = resampled_ap(run, 150, seed=4, block_entries=block_entries, device="cpu")
    np.testing.assert_array_equal(np.isnan(fast), np.isnan(direct))
    np.testing.assert_allclose(fast, direct, rtol=0, atol=1e-12)
    # and the resamples are the documented stream: one rng.integers call per resample
    counts = resampling.resample_counts(120, 150, seed=4)
    np.testing.assert_allclose(resampling.bootstrap_ap(run.scores, run.targets, run.ignore, counts), fast, rtol=0, atol=1e-12)


def test_memory_is_bounded_by_the_block(monkeypatch: pytest.MonkeyPatch) -> None:
    run = random_case(7, 300, 10)
    ranked = rank_classes(run.scores, run.targets, run.ignore)
    shapes = []
    original = stats.ranked_ap

    def spy(r, counts, device=None):
        shapes.append(np.shape(counts))
        return original(r, counts, device)

    monkeypatch.setattr(stats, "ranked_ap", spy)
    budget = 4 * max(300, ranked.runs)
    out = resampled_ap(run, 37, seed=0, block_entries=budget, device="cpu")
    assert out.shape == (37, 10)
    assert [s[0] for s in shapes] == [4] * 9 + [1]  # 37 resamples in blocks of 4 rows
    assert all(b * max(300, ranked.runs) <= budget for b, _ in shapes)


def test_ranked_run_keeps_only_what_any_resample_needs() -> None:
    # one class, 6 images, descending scores 0.9 0.8 0.8 0.5 0.3 0.1, positives at 0.8 (one of the tie) and 0.5
    scores = np.array([[0.5], [0.9], [0.8], [0.1], [0.8], [0.3]])
    targets = np.array([[1], [0], [1], [0], [0], [0]])
    ranked = rank_classes(scores, targets, None)
    # two positive runs: the tie group {0.8, 0.8} and {0.5}; entries after 0.5 are never needed
    assert ranked.runs == 2 and ranked.entry_image.size == 4
    assert ranked.entry_image[0] == 1 and set(ranked.entry_image[1:3]) == {2, 4} and ranked.entry_image[3] == 0
    assert ranked.segment_start.tolist() == [0, 3] and ranked.positive_image.tolist() == [2, 0]
    # AP by hand with weights (1, 1, 1, 1, 1, 1): thresholds 0.8 -> P = 1/3, R = 1/2; 0.5 -> P = 2/4, R = 1
    ap = ranked_ap(ranked, np.ones((1, 6)), "cpu")
    assert ap[0, 0] == pytest.approx(0.5 * (1 / 3) + 0.5 * (2 / 4), abs=1e-15)


def test_an_identical_head_gets_zero_and_the_interval_zero_zero_and_p_one() -> None:
    run = random_case(8, 150, 6)
    same = RunScores(list(reversed(run.image_ids)), run.scores[::-1].copy(), run.targets[::-1].copy(), run.ignore[::-1].copy(), run.classes)
    result = paired_bootstrap([run, run], [same, same])
    assert result.delta == 0.0 and result.low == 0.0 and result.high == 0.0
    assert result.p_value == 1.0 and not result.significant


def test_a_rebuild_reads_cached_statistics_without_loading_scores(tmp_path: Path) -> None:
    from bench.report.comparisons import CachedBootstrapper

    head, base = random_case(9, 80, 5), random_case(10, 80, 5)
    base = RunScores(head.image_ids, base.scores, head.targets, head.ignore, head.classes)

    class Store:  # what CachedBootstrapper asks of a ScoreStore: the score file's digest
        def digest(self, run_id: str) -> str:
            return {"h": "d1", "b": "d2"}[run_id]

    def never() -> RunScores:
        raise AssertionError("the score file was loaded although its statistics are cached")

    first = CachedBootstrapper(300, 0, Store(), tmp_path / "a" / ".cache")
    want = first.delta([(("h", head), ("b", base))])
    # another machine's cache folder is read (not written) when merging results directories
    second = CachedBootstrapper(300, 0, Store(), tmp_path / "out", also=[tmp_path / "a" / ".cache"])
    got = second.delta([(("h", never), ("b", never))])
    assert (got.delta, got.low, got.high, got.p_value) == (want.delta, want.low, want.high, want.p_value)
    assert not (tmp_path / "out").exists()
    # a damaged cache file is recomputed, not trusted
    for path in (tmp_path / "a" / ".cache").iterdir():
        path.write_bytes(b"not a cache")
    third = CachedBootstrapper(300, 0, Store(), tmp_path / "a" / ".cache")
    with pytest.warns(UserWarning, match="damaged"):
        again = third.delta([(("h", head), ("b", base))])
    assert (again.low, again.high) == (want.low, want.high)


def test_score_store_memory_does_not_grow_with_runs(tmp_path: Path) -> None:
    from bench.report.comparisons import ScoreStore
    from bench.results import store as results

    ids = [f"{i:016x}" for i in range(6)]
    for i, run_id in enumerate(ids):
        run = random_case(i, 30, 4)
        results.save_scores(tmp_path, run_id, run.image_ids, run.scores, run.targets, run.ignore, run.classes)
    store = ScoreStore([tmp_path], pd.DataFrame(), max_cached=2)
    for run_id in ids:
        assert store.get(run_id).scores.shape == (30, 4)
    assert len(store._cache) == 2
