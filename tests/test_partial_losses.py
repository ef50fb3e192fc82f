"""Losses that see the observed mask (issue 29): bce / multilabel_soft_margin / asl with
``unknown_labels = "ignore" | "negative"``, and the large-loss losses LL-R / LL-Ct (Kim et al.,
CVPR 2022; snucml/LargeLossMatters ``losses.py``). Every value is checked against the equations
written here in float64 with ``math``, not against the code."""

from __future__ import annotations

import math

import pytest
import torch

from bench.api.registry import build_loss
from bench.config.recipe import Recipe, resolve_recipe
from bench.engine.losses import make_loss
from bench.models.losses import loss_params

# a 2 x 5 batch: logits, targets, observed mask (True = observed)
X = [[2.0, -1.0, 0.5, 3.0, -2.0], [-0.5, 1.5, -3.0, 0.25, 1.0]]
Y = [[1, 0, 0, 1, 0], [0, 1, 0, 0, 1]]
K = [[True, False, False, True, False], [False, True, True, False, False]]


def bce(x: float, y: float) -> float:
    """-[y log σ(x) + (1 - y) log(1 - σ(x))], float64."""
    p = 1.0 / (1.0 + math.exp(-x))
    return -(y * math.log(p) + (1 - y) * math.log(1 - p))


def tensors(requires_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = torch.tensor(X, dtype=torch.float64, requires_grad=requires_grad)
    return x, torch.tensor(Y, dtype=torch.float64), torch.tensor(K)


def entries() -> list[tuple[int, int]]:
    return [(b, c) for b in range(2) for c in range(5)]


# -- bce / multilabel_soft_margin / asl ----------------------------------------------------------------


def test_bce_ignore_is_the_mean_over_observed_entries() -> None:
    x, y, k = tensors(requires_grad=True)
    value = build_loss("bce", unknown_labels="ignore")(x, y, known=k, epoch=1)
    observed = [bce(X[b][c], Y[b][c]) for b, c in entries() if K[b][c]]
    assert value.item() == pytest.approx(sum(observed) / len(observed), abs=1e-12)
    value.backward()
    unknown = ~k
    assert torch.all(x.grad[unknown] == 0)  # an unknown label teaches nothing
    assert torch.all(x.grad[k] != 0)


def test_bce_negative_treats_unknowns_as_negatives_over_all_entries() -> None:
    x, y, k = tensors()
    value = build_loss("bce", unknown_labels="negative")(x, y, known=k)
    reference = sum(bce(X[b][c], Y[b][c] if K[b][c] else 0) for b, c in entries()) / 10
    assert value.item() == pytest.approx(reference, abs=1e-12)
    # an unknown entry's target is not read: make the unknown (1, 0) a positive, same value
    y2 = y.clone()
    y2[1, 0] = 1  # (1, 0) is unknown
    assert build_loss("bce", unknown_labels="negative")(x, y2, known=k).item() == pytest.approx(reference, abs=1e-12)


def test_bce_without_a_mask_is_plain_bce_and_an_all_unknown_batch_gives_zero() -> None:
    x, y, _ = tensors(requires_grad=True)
    plain = sum(bce(X[b][c], Y[b][c]) for b, c in entries()) / 10
    assert build_loss("bce")(x, y).item() == pytest.approx(plain, abs=1e-12)
    assert build_loss("bce")(x, y, known=torch.ones(2, 5, dtype=torch.bool)).item() == pytest.approx(plain, abs=1e-12)
    none = build_loss("bce")(x, y, known=torch.zeros(2, 5, dtype=torch.bool))
    assert none.item() == 0.0
    none.backward()  # still part of the graph
    assert torch.all(x.grad == 0)


def test_multilabel_soft_margin_ignore_averages_per_sample_over_its_observed_classes() -> None:
    x, y, k = tensors()
    known = k.clone()
    value = build_loss("multilabel_soft_margin", unknown_labels="ignore")(x, y, known=known)
    per_sample = []
    for b in range(2):
        losses = [bce(X[b][c], Y[b][c]) for c in range(5) if K[b][c]]
        per_sample.append(sum(losses) / len(losses))
    assert value.item() == pytest.approx(sum(per_sample) / 2, abs=1e-12)  # (mean of 2) and (mean of 2), not the mean of 4
    # a sample with nothing observed is left out of the batch mean
    known[1] = False
    only_first = build_loss("multilabel_soft_margin")(x, y, known=known).item()
    assert only_first == pytest.approx(per_sample[0], abs=1e-12)
    negative = build_loss("multilabel_soft_margin", unknown_labels="negative")(x, y, known=k).item()
    reference = sum(sum(bce(X[b][c], Y[b][c] if K[b][c] else 0) for c in range(5)) / 5 for b in range(2)) / 2
    assert negative == pytest.approx(reference, abs=1e-12)


def asl_entry(x: float, y: int, gamma_neg: float = 4.0, clip: float = 0.05, eps: float = 1e-8) -> float:
    """SPEC §2's ASL for one entry (γ₊ = 0), float64."""
    p = 1.0 / (1.0 + math.exp(-x))
    if y == 1:
        return -math.log(max(p, eps))
    p_neg = min(1 - p + clip, 1.0)
    return -math.log(max(p_neg, eps)) * (1 - p_neg) ** gamma_neg


@pytest.mark.parametrize("mode", ["ignore", "negative"])
def test_asl_sums_over_observed_entries_or_all_with_unknowns_negative(mode: str) -> None:
    x, y, k = tensors()
    value = build_loss("asl", gamma_neg=4, gamma_pos=0, clip=0.05, unknown_labels=mode)(x, y, known=k).item()
    if mode == "ignore":
        reference = sum(asl_entry(X[b][c], Y[b][c]) for b, c in entries() if K[b][c])
    else:
        reference = sum(asl_entry(X[b][c], Y[b][c] if K[b][c] else 0) for b, c in entries())
    assert value == pytest.approx(reference, abs=1e-12)


def test_unknown_labels_recipe_key_reaches_the_losses_that_take_it() -> None:
    recipe = resolve_recipe({"loss": "bce", "unknown_labels": "negative"}, "test")
    assert loss_params("bce", recipe.to_dict()) == {"unknown_labels": "negative"}
    assert build_loss("bce", **loss_params("bce", recipe.to_dict())).unknown_labels == "negative"
    asl = resolve_recipe({"loss": "asl", "asl_clip": 0.1, "unknown_labels": "negative"}, "test")
    assert loss_params("asl", asl.to_dict()) == {"gamma_neg": 4.0, "gamma_pos": 0.0, "clip": 0.1, "unknown_labels": "negative"}
    ll = resolve_recipe({"loss": "ll_r", "ll_r_delta_rel": 0.05}, "test")
    assert loss_params("ll_r", ll.to_dict()) == {"delta_rel": 0.05}  # ll_r assumes negatives: no unknown_labels
    assert make_loss(ll).delta_rel == 0.05  # the engine's make_loss already passes <loss>_<param> keys
    assert build_loss("bce").unknown_labels == "ignore"  # the documented default


def test_new_recipe_keys_leave_existing_run_identities_alone() -> None:
    identity = Recipe().identity()
    for key in ("unknown_labels", "ll_r_delta_rel", "ll_ct_delta_rel", "ll_cp_delta_rel"):
        assert key not in identity
    assert resolve_recipe({"unknown_labels": "negative"}, "t").identity()["unknown_labels"] == "negative"


# -- LL-R / LL-Ct ---------------------------------------------------------------------------------------

# unknown entries' losses (targets 0): distinct, with a tie at (0, 4) / (1, 3) to test "ties included"
LX = [[2.0, 1.0, -0.5, 0.3, 0.7], [-1.0, 2.5, 0.7, 0.7, -2.0]]
LY = [[1, 0, 0, 0, 0], [0, 1, 0, 0, 0]]
LK = [[True, False, False, False, False], [False, True, False, False, False]]


def large_loss_reference(k: int, correct: bool) -> float:
    """The release's rule in float64: ℓ = BCE(x, y·known); t = the k-th largest of unknown·ℓ; every
    unknown entry with ℓ >= t rejected (0) or flipped (BCE(x, 1)); the sum / (B·C)."""
    cells = [(b, c) for b in range(2) for c in range(5)]
    loss = {(b, c): bce(LX[b][c], LY[b][c] if LK[b][c] else 0) for b, c in cells}
    candidates = sorted((loss[e] if not LK[e[0]][e[1]] else 0.0 for e in cells), reverse=True)
    threshold = candidates[k - 1] if k > 0 else math.inf
    total = 0.0
    for b, c in cells:
        if not LK[b][c] and loss[(b, c)] >= threshold:
            total += bce(LX[b][c], 1) if correct else 0.0
        else:
            total += loss[(b, c)]
    return total / 10


def ll_tensors() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.tensor(LX, dtype=torch.float64, requires_grad=True), torch.tensor(LY, dtype=torch.float64), torch.tensor(LK)


@pytest.mark.parametrize("name", ["ll_r", "ll_ct", "ll_cp"])
def test_large_loss_epoch_1_rejects_nothing(name: str) -> None:
    x, y, k = ll_tensors()
    value = build_loss(name, delta_rel=0.25)(x, y, known=k, epoch=1).item()
    plain = sum(bce(LX[b][c], LY[b][c] if LK[b][c] else 0) for b in range(2) for c in range(5)) / 10
    assert value == pytest.approx(plain, abs=1e-12)


@pytest.mark.parametrize("name, correct", [("ll_r", False), ("ll_ct", True), ("ll_cp", True)])
@pytest.mark.parametrize("epoch, k, expected", [
    (2, 3, {(0, 1), (0, 4), (1, 2), (1, 3)}),
    (3, 5, {(0, 1), (0, 4), (1, 2), (1, 3), (0, 3)}),
])
def test_large_loss_from_epoch_2_modifies_the_k_largest_unknown_losses(name: str, correct: bool, epoch: int, k: int, expected: set) -> None:
    """δ = 0.25, B·C = 10: clean_rate 0.75 at epoch 2 -> k = ceil(10 · 0.25) = 3; 0.5 at epoch 3 -> k = 5.
    Unknown losses by hand (target 0, ℓ = log(1 + e^x)): x = 1.0 -> 1.313; 0.7 (three entries, a
    tie) -> 1.103; 0.3 -> 0.854; -0.5 -> 0.474; -1 -> 0.313; -2 -> 0.127 (the 2.5 is an OBSERVED
    positive: never a candidate). k = 3: threshold 1.103, and all three tied entries go with it
    (the release keeps only ``u < t``): 4 entries. k = 5: threshold 0.854: 5 entries."""
    x, y, k_mask = ll_tensors()
    loss = build_loss(name, delta_rel=0.25)
    value = loss(x, y, known=k_mask, epoch=epoch)
    assert value.item() == pytest.approx(large_loss_reference(k, correct), abs=1e-12)
    modified = {(int(b), int(c)) for b, c in zip(*torch.nonzero(loss.last_modified, as_tuple=True))}
    assert modified == expected
    value.backward()
    if not correct:  # a rejected entry has no gradient; observed entries keep theirs
        for b, c in expected:
            assert x.grad[b, c] == 0
        assert x.grad[0, 0] != 0 and x.grad[1, 1] != 0
    else:  # a flipped entry is pulled UP (target 1): negative gradient
        for b, c in expected:
            assert x.grad[b, c] < 0


def test_large_loss_k_follows_the_release_clean_rate_by_repeated_subtraction() -> None:
    """δ = 0.1 at epoch 4: the release subtracts 0.1 three times, clean_rate = 0.7000000000000001,
    10 · (1 - clean_rate) = 2.9999999999999996 -> k = 3 (the closed form 1 - 0.3 = 0.7 would give
    10 · 0.30000000000000004 -> k = 4)."""
    rate = 1.0
    for _ in range(3):
        rate -= 0.1
    assert math.ceil(10 * (1 - rate)) == 3 and math.ceil(10 * (1 - (1 - 0.1 * 3))) == 4
    x = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0], [-1.0, -2.0, -3.0, -4.0, -5.0]], dtype=torch.float64)
    y = torch.zeros(2, 5, dtype=torch.float64)
    known = torch.zeros(2, 5, dtype=torch.bool)
    loss = build_loss("ll_r", delta_rel=0.1)
    loss(x, y, known=known, epoch=4)
    assert int(loss.last_modified.sum()) == 3
    assert loss.last_modified[0, :3].all()


def test_large_loss_with_every_label_observed_is_plain_bce_at_any_epoch() -> None:
    """The guard (docs): k is capped at the unknown entries, so nothing observed is rejected."""
    x = torch.tensor(X, dtype=torch.float64)
    y = torch.tensor(Y, dtype=torch.float64)
    plain = sum(bce(X[b][c], Y[b][c]) for b, c in entries()) / 10
    for name in ("ll_r", "ll_ct", "ll_cp"):
        assert build_loss(name, delta_rel=0.3)(x, y, known=None, epoch=6).item() == pytest.approx(plain, abs=1e-12)


def test_large_loss_float32_logits_match_the_float64_reference() -> None:
    x = torch.tensor(LX, dtype=torch.float32)
    value = build_loss("ll_ct", delta_rel=0.25)(x, torch.tensor(LY, dtype=torch.float32), known=torch.tensor(LK), epoch=2)
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(large_loss_reference(3, True), abs=1e-5)


def test_ll_cp_takes_its_recipe_key_and_is_the_only_loss_whose_corrections_last() -> None:
    """One LL-Cp step is LL-Ct's rule (the parametrised tests above); what differs is that the
    trainer keeps its flips (tests/test_engine_hooks.py replays a whole run against the paper's rule)."""
    cp = resolve_recipe({"loss": "ll_cp", "ll_cp_delta_rel": 0.05}, "test")
    assert loss_params("ll_cp", cp.to_dict()) == {"delta_rel": 0.05}
    assert make_loss(cp).delta_rel == 0.05
    assert resolve_recipe({"loss": "ll_cp", "ll_cp_delta_rel": 0.05}, "t").identity()["ll_cp_delta_rel"] == 0.05
    assert build_loss("ll_cp").corrects_labels
    assert not build_loss("ll_ct").corrects_labels and not build_loss("ll_r").corrects_labels
