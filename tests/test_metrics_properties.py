"""Property tests of bench.eval.metrics (hypothesis)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.eval.metrics import average_precision, multilabel_metrics

pytestmark = pytest.mark.filterwarnings("ignore::bench.eval.metrics.MetricsWarning")

SETTINGS = settings(max_examples=60, deadline=None)
GRID = 64  # scores are k / 64, k in 0..64: exact binary fractions, ties are common


@st.composite
def cases(draw, with_ignore: bool = True):
    """(scores float64 [N, C] on the k/64 grid, targets int [N, C], ignore bool [N, C] or None);
    at least one class has a positive, non-ignored target."""
    n = draw(st.integers(1, 25))
    c = draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, GRID + 1, (n, c)) / GRID
    targets = (rng.random((n, c)) < draw(st.floats(0.05, 0.9))).astype(int)
    ignore = None
    if with_ignore and draw(st.booleans()):
        ignore = rng.random((n, c)) < 0.2
    i, j = rng.integers(n), rng.integers(c)
    targets[i, j] = 1
    if ignore is not None:
        ignore[i, j] = False
    return scores, targets, ignore


@SETTINGS
@given(case=cases(), data=st.data(), top_k=st.integers(1, 4), threshold=st.sampled_from([0.25, 0.5, 0.75]))
def test_invariant_to_sample_permutation(case, data, top_k, threshold):
    scores, targets, ignore = case
    perm = np.array(data.draw(st.permutations(range(len(scores)))))
    a = multilabel_metrics(scores, targets, ignore, threshold, top_k)
    ignore_p = None if ignore is None else ignore[perm]
    b = multilabel_metrics(scores[perm], targets[perm], ignore_p, threshold, top_k)
    assert a == pytest.approx(b, abs=1e-12)


TRANSFORMS = {
    # strictly increasing and exact or far from merging on the k/64 grid (values >= 1/64 apart)
    "cube": lambda x: x**3,  # k^3 / 2^18: exact in float64
    "affine": lambda x: 2 * x - 1,  # exact, negative values too
    "sqrt": np.sqrt,
    "exp": np.exp,
}


@SETTINGS
@given(case=cases(), name=st.sampled_from(sorted(TRANSFORMS)))
def test_map_invariant_to_strictly_increasing_transform(case, name):
    scores, targets, ignore = case
    transformed = TRANSFORMS[name](scores)
    # the transform neither creates nor merges ties on these values
    assert len(np.unique(transformed)) == len(np.unique(scores))
    a = multilabel_metrics(scores, targets, ignore)["mAP"]
    b = multilabel_metrics(transformed, targets, ignore)["mAP"]
    assert a == pytest.approx(b, abs=1e-12)
    np.testing.assert_allclose(
        average_precision(scores, targets, ignore),
        average_precision(transformed, targets, ignore),
        atol=1e-12,
    )


@SETTINGS
@given(case=cases(), top_k=st.integers(1, 7), threshold=st.sampled_from([0.0, 0.3, 0.5, 1.0, 2.0]))
def test_values_in_unit_interval(case, top_k, threshold):
    scores, targets, ignore = case
    m = multilabel_metrics(scores, targets, ignore, threshold, top_k)
    assert len(m) == 15
    for key, value in m.items():
        assert isinstance(value, float) and 0.0 <= value <= 1.0, (key, value)


@SETTINGS
@given(case=cases())
def test_map_is_one_when_positives_outrank_negatives(case):
    scores, targets, ignore = case
    # Positives on [33/64, 1], negatives on [0, 31/64]; ignored entries keep an arbitrary score
    # (an ignored negative may outrank positives: it takes no part).
    separated = np.where(targets == 1, 0.5 + (scores + 1 / GRID) / 2, scores / 2 - 1 / (2 * GRID))
    separated = np.clip(separated, 0.0, 1.0)
    if ignore is not None:
        separated = np.where(ignore, scores, separated)
    assert multilabel_metrics(separated, targets, ignore)["mAP"] == 1.0


@SETTINGS
@given(case=cases(), seed=st.integers(0, 2**32 - 1))
def test_integer_weights_equal_repeated_samples(case, seed):
    scores, targets, ignore = case
    counts = np.random.default_rng(seed).integers(0, 4, len(scores))
    idx = np.repeat(np.arange(len(scores)), counts)
    weighted = average_precision(scores, targets, ignore, counts)
    if len(idx) == 0:
        assert np.isnan(weighted).all()
        return
    repeated = average_precision(scores[idx], targets[idx], None if ignore is None else ignore[idx])
    np.testing.assert_allclose(weighted, repeated, atol=1e-12)  # NaN where no weighted positive
