"""The ASL loss (SPEC §2; Ridnik et al., Alibaba-MIIL/ASL): value and gradient against hand-computed
cases, the constant focusing weight, the recipe keys and the loss registry."""

from __future__ import annotations

import math

import pytest
import torch

from bench.api.registry import build_loss, list_losses
from bench.config.recipe import resolve_recipe
from bench.core.errors import UsageError
from bench.engine.losses import make_loss


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def asl_entry(x: float, y: int, gamma_neg: float, gamma_pos: float, clip: float, eps: float = 1e-8) -> tuple[float, float]:
    """One entry of SPEC §2's ASL, in float64 by hand: (loss, d loss / d x with the weight constant)."""
    p = sigmoid(x)
    if y == 1:
        w = (1 - p) ** gamma_pos
        loss = -math.log(max(p, eps)) * w
        grad = -(1 - p) * w if p > eps else 0.0  # d/dx log p = 1 - p
    else:
        shifted = 1 - p + clip
        p_neg = min(shifted, 1.0)
        w = (1 - p_neg) ** gamma_neg
        loss = -math.log(max(p_neg, eps)) * w
        # d/dx log(1 - p + clip) = -p (1 - p) / (1 - p + clip) where not clamped at 1, else 0
        grad = (p * (1 - p) / p_neg) * w if shifted < 1 and p_neg > eps else 0.0
    return loss, grad


def test_hand_computed_single_entries() -> None:
    """Worked by hand. A negative at logit 0, clip 0.05, γ₋ = 4: p = 0.5, p₋ = 0.55,
    L = -log(0.55) · 0.45⁴ = 0.597837 · 0.04100625 = 0.0245151; dL/dx = 0.04100625 · 0.25 / 0.55 = 0.0186392.
    A positive at logit 1, γ₊ = 0: L = log(1 + e⁻¹) = 0.313262; dL/dx = -(1 - σ(1)) = -0.268941."""
    loss = build_loss("asl", gamma_neg=4, gamma_pos=0, clip=0.05)
    x = torch.tensor([[0.0, 1.0]], dtype=torch.float64, requires_grad=True)
    y = torch.tensor([[0.0, 1.0]], dtype=torch.float64)
    value = loss(x, y)
    value.backward()
    assert value.item() == pytest.approx(0.0245150535 + 0.3132616875, abs=1e-7)
    assert x.grad[0, 0].item() == pytest.approx(0.0186392045, abs=1e-7)
    assert x.grad[0, 1].item() == pytest.approx(-0.2689414214, abs=1e-7)


@pytest.mark.parametrize("gamma_neg, gamma_pos, clip", [(4, 0, 0.05), (4, 1, 0.05), (2, 0, 0.0), (3, 2, 0.2), (0, 0, 0.0)])
def test_value_and_gradient_match_the_equation(gamma_neg: float, gamma_pos: float, clip: float) -> None:
    logits = [[0.0, 1.0, -4.0, 2.5], [-0.3, 6.0, -1.2, 0.7], [-25.0, 25.0, 3.0, -0.01]]
    targets = [[0, 1, 0, 0], [1, 0, 1, 1], [1, 0, 0, 1]]
    loss = build_loss("asl", gamma_neg=gamma_neg, gamma_pos=gamma_pos, clip=clip)
    x = torch.tensor(logits, dtype=torch.float64, requires_grad=True)
    value = loss(x, torch.tensor(targets, dtype=torch.float64))
    value.backward()
    entries = [[asl_entry(v, t, gamma_neg, gamma_pos, clip) for v, t in zip(row, trow)] for row, trow in zip(logits, targets)]
    assert value.item() == pytest.approx(sum(e[0] for row in entries for e in row), rel=1e-10)  # a SUM over B and C
    expected_grad = torch.tensor([[e[1] for e in row] for row in entries], dtype=torch.float64)
    torch.testing.assert_close(x.grad, expected_grad, rtol=1e-9, atol=1e-12)


def test_the_focusing_weight_is_a_constant_in_the_gradient() -> None:
    """With γ₊ = 1 on a positive at logit 1 the full derivative of -(1 - p) log p would add
    -p (1 - p) log p; the released ``disable_torch_grad_focal_loss=True`` (and this loss) leaves it out."""
    loss = build_loss("asl", gamma_neg=4, gamma_pos=1, clip=0.05)
    x = torch.tensor([[1.0]], dtype=torch.float64, requires_grad=True)
    loss(x, torch.ones(1, 1, dtype=torch.float64)).backward()
    p = sigmoid(1.0)
    constant_weight = -(1 - p) ** 2
    through_weight = constant_weight - p * (1 - p) * -math.log(p)
    assert x.grad.item() == pytest.approx(constant_weight, rel=1e-12)
    assert abs(x.grad.item() - through_weight) > 0.05


def test_without_focusing_and_clip_it_is_the_summed_binary_cross_entropy() -> None:
    torch.manual_seed(0)
    x = torch.randn(5, 7, dtype=torch.float64)
    y = (torch.rand(5, 7) < 0.4).double()
    p = 1 / (1 + torch.exp(-x))
    expected = -(y * torch.log(p) + (1 - y) * torch.log(1 - p)).sum()
    assert build_loss("asl", gamma_neg=0, gamma_pos=0, clip=0)(x, y).item() == pytest.approx(expected.item(), rel=1e-10)


def test_probabilities_are_floored_at_eps() -> None:
    """A positive at logit -40 (p = 4e-18) costs -log(1e-8) = 18.42, not 40; its gradient is 0 (clamped)."""
    x = torch.tensor([[-40.0]], dtype=torch.float64, requires_grad=True)
    value = build_loss("asl", gamma_neg=4, gamma_pos=0, clip=0.05)(x, torch.ones(1, 1, dtype=torch.float64))
    value.backward()
    assert value.item() == pytest.approx(-math.log(1e-8), rel=1e-12)
    assert x.grad.item() == 0.0


def test_half_precision_logits_give_a_float32_loss() -> None:
    x = torch.tensor([[0.0, 1.0]], dtype=torch.float16)
    value = build_loss("asl")(x, torch.tensor([[0.0, 1.0]]))
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(0.0245150535 + 0.3132616875, abs=1e-6)


def test_recipe_keys_map_onto_the_loss_parameters() -> None:
    recipe = resolve_recipe({"loss": "asl", "asl_gamma_neg": 2, "asl_gamma_pos": 1, "asl_clip": 0}, "test")
    loss = make_loss(recipe)
    assert (loss.gamma_neg, loss.gamma_pos, loss.clip) == (2.0, 1.0, 0.0)
    defaults = make_loss(resolve_recipe({"loss": "asl"}, "test"))
    assert (defaults.gamma_neg, defaults.gamma_pos, defaults.clip, defaults.eps) == (4.0, 0.0, 0.05, 1e-8)


def test_asl_keys_at_their_defaults_leave_run_ids_unchanged() -> None:
    identity = resolve_recipe({}, "test").identity()
    assert not any(k.startswith("asl_") for k in identity)
    assert resolve_recipe({"loss": "asl", "asl_clip": 0.1}, "test").identity()["asl_clip"] == 0.1


@pytest.mark.parametrize("key, value", [("asl_clip", 1.5), ("asl_gamma_neg", -1.0), ("asl_gamma_pos", -0.5), ("asl_clip", "x")])
def test_bad_recipe_values_are_usage_errors(key: str, value: object) -> None:
    with pytest.raises(UsageError, match=key):
        resolve_recipe({"loss": "asl", key: value}, "grid.toml")


def test_every_recipe_loss_is_built_by_name_and_returns_a_scalar() -> None:
    assert {"bce", "multilabel_soft_margin", "asl"} <= set(list_losses())
    x, y = torch.randn(4, 3), (torch.rand(4, 3) < 0.5).float()
    for name in list_losses():
        loss = build_loss(name)
        if not type(loss).__module__.startswith("bench."):
            continue  # a probe loss another test module registers in the same session
        value = loss(x, y)
        assert value.ndim == 0 and torch.isfinite(value)
    assert build_loss("asl", gamma_neg=4, gamma_pos=0, clip=0.05)(x, y).ndim == 0


def test_unknown_or_bad_loss_parameters() -> None:
    with pytest.raises(UsageError, match="asl"):
        build_loss("asl", gamma=2)
    with pytest.raises(ValueError, match="clip"):
        build_loss("asl", clip=2.0)
