"""p-values, Holm's adjustment, ties for first and ranks across sections (issue 14).

References are hand-computed here (Holm's steps, Friedman's statistic with its tie correction,
Demšar's Nemenyi table, the exact Wilcoxon distribution for three blocks); the end-to-end checks
write synthetic score files and read ``comparisons.parquet`` back.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.stats import chi2

from bench.eval import significance as sig
from bench.eval.metrics import multilabel_metrics
from bench.report import build
from bench.report.markdown import render_markdown
from bench.results import store as results

# ---------------------------------------------------------------------------------------------
# Pure functions against hand-computed cases
# ---------------------------------------------------------------------------------------------


def test_holm_against_a_hand_computed_case() -> None:
    p = np.array([0.01, 0.04, 0.03, 0.005, np.nan])
    # m = 4 finite p-values, sorted 0.005, 0.01, 0.03, 0.04, multiplied by 4, 3, 2, 1:
    # 0.02, 0.03, 0.06, 0.04 -> running maximum 0.02, 0.03, 0.06, 0.06
    np.testing.assert_allclose(sig.holm(p)[:4], [0.03, 0.06, 0.06, 0.02], rtol=0, atol=1e-15)
    assert np.isnan(sig.holm(p)[4])
    np.testing.assert_allclose(sig.holm([0.5, 0.9]), [1.0, 1.0])  # capped at 1
    assert sig.holm([]).size == 0


def test_bootstrap_p_value_by_hand() -> None:
    # one Δ_b <= 0 of 4 finite: two-sided p = 2 * (1 + 1) / (1 + 4)
    assert sig.bootstrap_p_value(np.array([-1.0, 1.0, 2.0, 3.0, np.nan])) == pytest.approx(0.8, abs=1e-15)
    assert sig.bootstrap_p_value(np.zeros(1000)) == 1.0  # an identical head
    assert sig.bootstrap_p_value(np.array([0.1, 0.2, 0.3])) == pytest.approx(0.5, abs=1e-15)  # none crossed: 2 * 1 / 4
    assert sig.bootstrap_p_value(np.full(999, 0.1)) == pytest.approx(0.002, abs=1e-15)  # the smallest with 999 resamples
    assert sig.bootstrap_p_value(np.array([-0.1, -0.2, 0.0, 0.3, 0.4])) == 1.0  # 0 counts on both sides: 2 * 3 / 6
    assert np.isnan(sig.bootstrap_p_value(np.array([np.nan])))
    # the resolution limit of a family: 50 comparisons, 1,000 resamples -> 50 * 2 / 1001 ~ 0.0999
    assert sig.smallest_adjusted_p(50, 1000) == pytest.approx(100 / 1001)
    assert sig.resamples_needed(50) == 4000 and sig.smallest_adjusted_p(50, 4000) < 0.05 / 2


def test_critical_difference_of_a_hand_checked_three_section_example() -> None:
    # 3 sections (rows) x 4 configurations A, B, C, D (columns); higher mAP is better
    values = np.array([
        [0.90, 0.80, 0.70, 0.60],  # ranks 1, 2, 3, 4
        [0.85, 0.86, 0.70, 0.60],  # ranks 2, 1, 3, 4
        [0.50, 0.40, 0.40, 0.45],  # ranks 1, 3.5, 3.5, 2 (B and C tie)
    ])
    np.testing.assert_allclose(sig.ranks_within_blocks(values), [[1, 2, 3, 4], [2, 1, 3, 4], [1, 3.5, 3.5, 2]])
    result = sig.critical_difference(values)
    np.testing.assert_allclose(result.mean_ranks, [4 / 3, 6.5 / 3, 9.5 / 3, 10 / 3], rtol=0, atol=1e-12)
    # Friedman: rank sums 4, 6.5, 9.5, 10; 12 / (n k (k + 1)) * sum R_j^2 - 3 n (k + 1) = 0.2 * 248.5 - 45 = 4.7,
    # divided by the tie correction 1 - sum(t^3 - t) / (n (k^3 - k)) = 1 - 6 / 180
    statistic = 4.7 / (1 - 6 / 180)
    assert result.friedman_statistic == pytest.approx(statistic, abs=1e-12)
    assert result.friedman_p == pytest.approx(chi2.sf(statistic, 3), abs=1e-12)
    # Nemenyi: q_0.05 = 2.569 for k = 4 (Demšar 2006, Table 5a), CD = q sqrt(k (k + 1) / (6 n))
    assert result.nemenyi_cd == pytest.approx(2.569 * np.sqrt(20 / 18), abs=2e-3)
    # Wilcoxon A vs D: differences 0.30, 0.25, 0.05, all positive: exact two-sided p = 2 / 2^3
    assert result.wilcoxon_p[0, 3] == pytest.approx(0.25, abs=1e-12)
    # with three sections no p-value can be below 0.25: nothing differs, one group holds all four
    assert not result.significant.any()
    assert result.cliques == [[0, 1, 2, 3]]


def test_cliques_from_a_significance_matrix() -> None:
    # five configurations, already in rank order; significant pairs: (a, d), (a, e), (b, e)
    significant = np.zeros((5, 5), dtype=bool)
    for i, j in ((0, 3), (0, 4), (1, 4)):
        significant[i, j] = significant[j, i] = True
    assert sig.cliques(np.array([1.0, 2.0, 3.0, 4.0, 5.0]), significant) == [[0, 1, 2], [1, 2, 3], [2, 3, 4]]
    # the columns need not be in rank order
    assert sig.cliques(np.array([5.0, 4.0, 3.0, 2.0, 1.0]), significant[::-1, ::-1]) == [[4, 3, 2], [3, 2, 1], [2, 1, 0]]
    assert sig.cliques(np.array([1.0, 2.0]), np.ones((2, 2), dtype=bool)) == []


def test_friedman_and_wilcoxon_edge_cases() -> None:
    assert all(np.isnan(sig.friedman(np.ones((3, 2)))))  # k < 3
    assert sig.friedman(np.ones((3, 4))) == (0.0, 1.0)  # all tied
    p = sig.pairwise_wilcoxon(np.array([[0.5, 0.5], [0.6, 0.6]]))
    assert p[0, 1] == 1.0 and np.isnan(p[0, 0])


# ---------------------------------------------------------------------------------------------
# End to end: score files -> report -> comparisons.parquet
# ---------------------------------------------------------------------------------------------

CLASSES = ["a", "b", "c", "d", "e"]
N = 120
RECIPE = {"protocol": "finetune", "epochs": 1, "lr": 0.01, "optimizer": "adamw", "batch_size": 16}


def _hash(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _targets(dataset: str) -> np.ndarray:
    rng = np.random.default_rng(len(dataset))
    targets = (rng.random((N, len(CLASSES))) < 0.3).astype(np.uint8)
    targets[0] = 1
    return targets


def write_run(folder: Path, head: str, hparams: dict, seed: int, scores: np.ndarray, dataset: str = "shapes", backbone: str = "tiny_cnn") -> dict:
    targets = _targets(dataset)
    ignore = np.zeros_like(targets, dtype=bool)
    config = {
        "dataset": {"name": dataset, "options": {}, "train_split": "train", "test_split": "test"},
        "backbone": {"name": backbone, "weights": None}, "head": {"name": head, "hparams": hparams}, "recipe": RECIPE, "seed": seed,
    }
    row = {
        "run_id": _hash(config), "group_id": _hash({k: v for k, v in config.items() if k != "seed"}), "status": "finished",
        "dataset": dataset, "backbone": backbone, "protocol": "finetune", "head": head, "hparams": hparams, "seed": seed,
        "recipe": RECIPE, "dataset_options": {}, "train_split": "train", "test_split": "test", "config": config,
        "test_images": N, "finished_at": "2026-01-01T00:00:00",
    }
    row.update(multilabel_metrics(scores, targets, ignore))
    results.save_scores(folder, row["run_id"], [f"im{i:04d}" for i in range(N)], scores, targets, ignore, CLASSES)
    results.write_row(folder, row)
    return row


def report_of(folder: Path, resamples: int) -> tuple[pd.DataFrame, str]:
    """(comparisons.parquet's table, the leaderboard markdown) of a results folder, without plots."""
    report = build(results.load_all(folder), [folder], n_resamples=resamples, plots=False)
    return report.comparisons, render_markdown(report)


def noisy_scores(dataset: str, key: object, quality: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(int(_hash(key), 16))
    logits = (1.0 + quality) * (2.0 * _targets(dataset) - 1.0) + rng.normal(0, 1.6, (N, len(CLASSES)))
    return (1 / (1 + np.exp(-logits))).astype(np.float32)


def holm_by_definition(p: np.ndarray) -> np.ndarray:
    """Holm (1979), written from its definition: with the m p-values sorted ascending,
    p_(1) <= ... <= p_(m), the adjusted p_(i) is max_{j <= i} min(1, (m - j + 1) p_(j))."""
    p = [float(v) for v in p]
    m = len(p)
    order = sorted(range(m), key=lambda i: p[i])
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order, start=1):
        running = max(running, min(1.0, (m - rank + 1) * p[i]))
        adjusted[i] = running
    return np.array(adjusted)


def test_fifty_null_heads_in_two_sections_give_few_uncorrected_and_no_holm_stars(tmp_path: Path) -> None:
    """Two sections (backbones) of 30 and 20 null configurations: each section is its own Holm
    family (of 30 and of 20), and no adjusted p-value reaches 0.05."""
    sizes = {"tiny_cnn": 30, "resnet18": 20}
    for backbone, size in sizes.items():
        write_run(tmp_path, "baseline", {"pool": "avg"}, 0, noisy_scores("shapes", ("reference", backbone)), backbone=backbone)
        for i in range(size):  # scores from the same distribution as the reference's
            scores = noisy_scores("shapes", ("null", backbone, i))
            write_run(tmp_path, "csra", {"num_heads": 1, "lam": round(0.01 * (i + 1), 2)}, 0, scores, backbone=backbone)
    # 4,000 resamples: fine enough that a family of 30 COULD reach Holm significance (2 * 30 / 4001 < 0.05)
    frame, text = report_of(tmp_path, 4000)
    assert "no Holm-adjusted p-value can be below" not in text
    vs_ref = frame[frame["comparison"] == "vs_reference"]
    assert len(vs_ref) == 50
    uncorrected = int((vs_ref["p_value"] < 0.05).sum())
    # each section's configurations share one reference run, so their p-values are correlated;
    # at most a few fall below 0.05
    assert uncorrected <= 5 and vs_ref["p_value"].min() < 0.5
    assert not vs_ref["significant"].any() and (vs_ref["p_holm"] >= 0.05).all()
    for backbone, size in sizes.items():
        family = vs_ref[vs_ref["backbone"] == backbone]
        assert len(family) == size and (family["family_size"] == size).all(), backbone
        # Holm's adjustment of the section's own family, recomputed from the definition
        np.testing.assert_allclose(family["p_holm"], holm_by_definition(family["p_value"].to_numpy()), rtol=0, atol=1e-12)
        # the table marks no row `*` and shows the adjusted p-values
        section = text.split(f"## shapes · {backbone} · finetune", 1)[1].split("## ", 1)[0]
        assert " *" not in section and "p (Holm)" in section
    # one pooled family of 50 would give other adjusted values: the test tells the two apart
    pooled = holm_by_definition(vs_ref["p_value"].to_numpy())
    assert not np.allclose(pooled, vs_ref["p_holm"].to_numpy())


def test_holm_families_are_kept_per_section(tmp_path: Path) -> None:
    """A section of clearly better configurations keeps its stars next to a section of null ones:
    with a pooled family the null section's many large p-values would not matter, but a
    family per section is the documented unit (docs/report.md); checked against Holm per section."""
    for backbone, size, quality in (("tiny_cnn", 4, 2.0), ("resnet18", 12, 0.0)):
        write_run(tmp_path, "baseline", {"pool": "avg"}, 0, noisy_scores("shapes", ("reference", backbone)), backbone=backbone)
        for i in range(size):
            scores = noisy_scores("shapes", ("family", backbone, i), quality=quality)
            write_run(tmp_path, "csra", {"num_heads": 1, "lam": round(0.01 * (i + 1), 2)}, 0, scores, backbone=backbone)
    frame, _ = report_of(tmp_path, 2000)
    vs_ref = frame[frame["comparison"] == "vs_reference"]
    for backbone, size in (("tiny_cnn", 4), ("resnet18", 12)):
        family = vs_ref[vs_ref["backbone"] == backbone]
        assert len(family) == size and (family["family_size"] == size).all()
        expected = holm_by_definition(family["p_value"].to_numpy())
        np.testing.assert_allclose(family["p_holm"], expected, rtol=0, atol=1e-12)
        assert (family["significant"].to_numpy() == (expected < 0.05)).all()
    assert vs_ref[vs_ref["backbone"] == "tiny_cnn"]["significant"].all()
    assert not np.allclose(holm_by_definition(vs_ref["p_value"].to_numpy()), vs_ref["p_holm"].to_numpy())


def test_identical_head_is_delta_zero_p_one_and_ties_for_first(tmp_path: Path) -> None:
    for seed in (0, 1):
        reference = noisy_scores("shapes", ("reference", seed))
        write_run(tmp_path, "baseline", {"pool": "avg"}, seed, reference)
        write_run(tmp_path, "csra_free", {"lam": 0.0}, seed, reference.copy())  # scores equal to the reference's
        write_run(tmp_path, "baseline", {"pool": "max"}, seed, noisy_scores("shapes", ("strong", seed), quality=1.5))
        write_run(tmp_path, "csra", {"num_heads": 2, "lam": 0.5}, seed, noisy_scores("shapes", ("strong2", seed), quality=1.45))
        write_run(tmp_path, "csra", {"num_heads": 1, "lam": 0.1}, seed, noisy_scores("shapes", ("weak", seed), quality=0.0))
    frame, text = report_of(tmp_path, 500)
    for column in ("dataset", "backbone", "protocol", "head", "hparams", "reference", "delta_mAP", "ci_low", "ci_high", "p_value", "p_holm", "significant", "seeds"):
        assert column in frame.columns, column
    same = frame[(frame["head"] == "csra_free") & (frame["comparison"] == "vs_reference")].iloc[0]
    assert (same["delta_mAP"], same["ci_low"], same["ci_high"], same["p_value"]) == (0.0, 0.0, 0.0, 1.0)
    assert not same["significant"] and same["seeds"] == 2 and json.loads(same["hparams"]) == {"lam": 0.0}
    # ties for first: the two strong configurations are within noise of each other, the weak ones are not
    section = text.split("## shapes · tiny_cnn · finetune", 1)[1].split("## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and "rank" not in line]
    tied = [r for r in rows if r.startswith("| 1 (tied)")]
    assert len(tied) == 2 and all(("max pool" in r) or ("csra" in r and "λ=0.5" in r) for r in tied)
    vs_best = frame[frame["comparison"] == "vs_best"]
    assert len(vs_best) == 4 and (vs_best["family_size"] == 4).all()
    weak = vs_best[vs_best["head"].isin(["csra_free"]) | (vs_best["hparams"] == json.dumps({"lam": 0.1, "num_heads": 1}))]
    assert weak["significant"].all() and (weak["delta_mAP"] < 0).all()


def test_default_resamples_are_enough_for_the_largest_holm_family(tmp_path: Path) -> None:
    write_run(tmp_path, "baseline", {"pool": "avg"}, 0, noisy_scores("shapes", "reference"))
    for i in range(30):  # 30 clearly better configurations: a family of m = 30
        write_run(tmp_path, "csra", {"num_heads": 1, "lam": round(0.01 * (i + 1), 2)}, 0, noisy_scores("shapes", ("good", i), quality=2.0))
    # with R = 1000 no Holm-adjusted p-value can be below 2 * 30 / 1001 = 0.0599: nothing can be `*`
    frame, text = report_of(tmp_path, 1000)
    assert "no Holm-adjusted p-value can be below 0.060" in text
    assert not frame["significant"].any()
    # the default picks R >= 80 m = 2400, rounded up to 3000: floor 2 * 30 / 3001 = 0.02
    report = build(results.load_all(tmp_path), [tmp_path], plots=False)
    assert report.resamples == 3000
    vs_ref = report.comparisons[report.comparisons["comparison"] == "vs_reference"]
    assert len(vs_ref) == 30 and vs_ref["significant"].all()
    assert "no Holm-adjusted p-value can be below" not in render_markdown(report)
