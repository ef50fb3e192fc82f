"""The frozen-feature protocol: heads see the tensors a frozen backbone would give them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator

from bench.api.registry import build_dataset, build_head
from bench.data import feature_cache as features
from bench.data import image_cache
from bench.data.augment import to_float
from bench.models.backbones import build_backbone
from bench.models.classifier import Classifier, HeadOnly


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    cache = tmp_path_factory.mktemp("features")
    ds = build_dataset("shapes", split="test", num_train=64, num_test=37)
    images = image_cache.load_or_build(ds, 32, cache)
    torch.manual_seed(0)
    backbone = build_backbone("tiny_cnn")
    head = build_head("baseline", backbone.out_channels, len(ds.classes), pool="max")
    model = Classifier(backbone, head, freeze_backbone=True).eval()
    return cache, ds, images, model


def logits_finetune_frozen(model: Classifier, images: image_cache.CachedSplit, batch: int) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(to_float(torch.from_numpy(np.array(images.images[i : i + batch])))) for i in range(0, len(images.targets), batch)])


def logits_frozen(model: Classifier, split: features.FeatureSplit, batch: int) -> torch.Tensor:
    head = HeadOnly(model.head).eval()
    with torch.no_grad():
        return torch.cat([head(torch.from_numpy(np.array(split.features[i : i + batch]))) for i in range(0, len(split.targets), batch)])


def test_float32_features_give_identical_logits(setup) -> None:
    cache, _ds, images, model = setup
    split = features.load_or_build(model.features, images, "k32", cache, Accelerator(cpu=True), batch_size=16, dtype="float32")
    assert split.features.shape == (37, 128, 4, 4) and split.features.dtype == np.float32
    assert torch.equal(logits_frozen(model, split, 16), logits_finetune_frozen(model, images, 16))


def test_float16_features_give_logits_within_half_precision(setup) -> None:
    cache, _ds, images, model = setup
    split = features.load_or_build(model.features, images, "k16", cache, Accelerator(cpu=True), batch_size=16)
    assert split.features.dtype == np.float16
    a, b = logits_frozen(model, split, 16), logits_finetune_frozen(model, images, 16)
    assert torch.allclose(a, b, rtol=2e-3, atol=2e-3) and not torch.equal(a, b)


def test_damaged_feature_files_are_detected_and_rebuilt(setup) -> None:
    cache, _ds, images, model = setup
    acc = Accelerator(cpu=True)
    split = features.load_or_build(model.features, images, "kdmg", cache, acc, batch_size=16)
    good = np.array(split.features)
    path = Path(cache) / "features" / "kdmg.npy"
    size = path.stat().st_size
    with open(path, "r+b") as f:  # truncated
        f.truncate(size - 1000)
    with pytest.warns(UserWarning, match="kdmg.npy is damaged"):
        again = features.load_or_build(model.features, images, "kdmg", cache, acc, batch_size=16)
    assert np.array_equal(np.array(again.features), good) and path.stat().st_size == size
    with open(path, "r+b") as f:  # same size, overwritten at the end
        f.seek(size - 64)
        f.write(b"\xff" * 64)
    with pytest.warns(UserWarning, match="contents do not match"):
        again = features.load_or_build(model.features, images, "kdmg", cache, acc, batch_size=16)
    assert np.array_equal(np.array(again.features), good)


def test_feature_key_changes_with_what_defines_the_features(tmp_path: Path) -> None:
    weights = tmp_path / "w.pth"
    torch.save(build_backbone("tiny_cnn").body.state_dict(), weights)

    def key(image_key: str = "img", name: str = "tiny_cnn", w: str | None = str(weights), seed: int = 0, dtype: str = "float16") -> str:
        b = build_backbone(name, w)
        return features.feature_key(image_key, name, features.backbone_identity(b.origin, b.mean, b.std, seed), dtype)

    base = key()
    assert base == key(seed=5)  # the seed is irrelevant when the weights come from a file
    assert key(w=None, seed=0) != key(w=None, seed=1)  # ... but draws a random initialisation
    assert base != key(image_key="img2") and base != key(dtype="float32")
    assert key(w=None) != key(name="resnet18", w=None)
    torch.save({k: v + 1 for k, v in build_backbone("tiny_cnn").body.state_dict().items()}, weights)
    assert base != key()  # same path, new content
    assert features.backbone_identity("x", (0.5,) * 3, (0.5,) * 3, 0) != features.backbone_identity("x", (0.485, 0.456, 0.406), (0.5,) * 3, 0)


def test_frozen_recipe_requires_unaugmented_images() -> None:
    from bench.config.recipe import resolve_recipe
    from bench.core.errors import UsageError

    with pytest.raises(UsageError, match="protocol = 'frozen'.*set augment = 'none'"):
        resolve_recipe({"protocol": "frozen", "augment": "flip"}, "g.toml")
