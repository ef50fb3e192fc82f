"""Training pieces: the learning-rate schedule, batched augmentation, optimiser groups, frozen backbones."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from bench.config.recipe import resolve_recipe
from bench.data.augment import augment, to_float
from bench.engine.losses import make_loss
from bench.engine.optim import lr_factor, make_optimizer
from bench.models.backbones import build_backbone
from bench.models.classifier import Classifier


def recipe(**overrides):
    return resolve_recipe(overrides, "test")


def test_cosine_schedule_with_warmup_matches_hand_values() -> None:
    r = recipe(epochs=4, warmup_epochs=1, schedule="cosine")
    # 10 steps per epoch: warm-up over steps 0..9 reaches 1 at step 9; cosine over the other 30
    assert lr_factor(0, 10, r) == pytest.approx(0.1)
    assert lr_factor(9, 10, r) == pytest.approx(1.0)
    assert lr_factor(10, 10, r) == pytest.approx(1.0)
    assert lr_factor(25, 10, r) == pytest.approx(0.5)  # halfway: (1 + cos(pi/2)) / 2
    assert lr_factor(39, 10, r) == pytest.approx(0.5 * (1 + math.cos(math.pi * 29 / 30)))


def test_step_schedule_matches_csra_recipe() -> None:
    r = recipe(preset="csra_voc")  # warm-up 2 epochs, x0.1 every 4 epochs
    assert lr_factor(0, 100, r) == pytest.approx(1 / 200)
    assert lr_factor(399, 100, r) == pytest.approx(1.0)
    assert lr_factor(400, 100, r) == pytest.approx(0.1)
    assert lr_factor(800, 100, r) == pytest.approx(0.01)


def test_constant_schedule_without_warmup() -> None:
    r = recipe(schedule="constant", warmup_epochs=0)
    assert {lr_factor(s, 7, r) for s in range(50)} == {1.0}


def test_augment_none_and_flip() -> None:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (64, 8, 8, 3), dtype=torch.uint8)
    expected = images.permute(0, 3, 1, 2).float() / 255
    assert torch.equal(augment(images, "none", g), expected)
    flipped = augment(images, "flip", g)
    same = [(flipped[i] == expected[i]).all().item() for i in range(64)]
    mirrored = [(flipped[i] == expected[i].flip(-1)).all().item() for i in range(64)]
    assert all(s or m for s, m in zip(same, mirrored))
    assert 10 < sum(mirrored) < 54  # p = 0.5


def test_full_crop_is_exactly_identity_or_mirror() -> None:
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (32, 16, 16, 3), dtype=torch.uint8)
    expected = to_float(images)
    out = augment(images, "flip_crop", g, crop_scale_min=1.0, ratio=(1.0, 1.0))
    for i in range(32):
        assert torch.allclose(out[i], expected[i], atol=1e-6) or torch.allclose(out[i], expected[i].flip(-1), atol=1e-6)


def test_crop_zooms_in() -> None:
    """A crop of area a shows a centred square of side s at side s / sqrt(a) (or larger)."""
    g = torch.Generator().manual_seed(2)
    images = torch.zeros(16, 32, 32, 3, dtype=torch.uint8)
    images[:, 12:20, 12:20] = 255
    out = augment(images, "flip_crop", g, crop_scale_min=0.3)
    assert out.shape == (16, 3, 32, 32) and out.min() >= 0 and out.max() <= 1
    assert (out[:, 0] > 0.5).flatten(1).sum(1).float().mean() > 64  # bigger than the 8x8 original


def test_optimizer_groups_use_lrp_for_the_backbone() -> None:
    backbone, head = nn.Linear(4, 4), nn.Linear(4, 2)
    opt = make_optimizer(backbone, head, recipe(optimizer="sgd", lr=0.1, lrp=0.1))
    lrs = sorted(g["lr"] for g in opt.param_groups)
    assert lrs == pytest.approx([0.01, 0.1])
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["momentum"] == 0.9


def test_frozen_backbone_keeps_bn_statistics_and_gets_no_gradients() -> None:
    backbone = build_backbone("tiny_cnn")
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 3))
    model = Classifier(backbone, head, freeze_backbone=True).train()
    assert not backbone.training and head.training
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    model(torch.rand(4, 3, 32, 32)).sum().backward()
    assert all(p.grad is None for p in backbone.parameters())
    assert all(torch.equal(before[k], v) for k, v in backbone.state_dict().items())
    assert len(make_optimizer(backbone, head, recipe()).param_groups) == 1


def test_both_losses_are_mean_binary_cross_entropy() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 3.0, -2.0]])
    targets = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    p = torch.sigmoid(logits)
    by_hand = -(targets * p.log() + (1 - targets) * (1 - p).log()).mean()
    for loss in ("bce", "multilabel_soft_margin"):
        assert make_loss(recipe(loss=loss))(logits, targets).item() == pytest.approx(by_hand.item(), rel=1e-6)


def test_input_normalization_none_feeds_pixels_unchanged() -> None:
    backbone = build_backbone("tiny_cnn").eval()
    images = torch.rand(2, 3, 32, 32)
    raw = Classifier(backbone, nn.Identity(), normalize=False).eval()
    assert torch.equal(raw.features(images), backbone(images))
    imagenet = Classifier(backbone, nn.Identity()).eval()
    expected = backbone((images - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))
    assert torch.allclose(imagenet.features(images), expected, atol=1e-6)
    assert recipe(preset="csra_voc").input_normalization == "none"  # CSRA's release: Normalize(0, 1)
