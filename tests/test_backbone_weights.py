"""User weight files for torchvision and timm backbones: every supported layout reloads to
IDENTICAL outputs; every unfit file is a UsageError naming the problem; nothing is downloaded."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import pytest
import timm
import torch
import torchvision

from bench.core.errors import UsageError
from bench.models.backbones import (
    Backbone,
    build_backbone,
    is_known_backbone,
    list_backbones,
    load_state_dict_file,
)


def _refuse(*args, **kwargs):
    raise AssertionError("a download function was called; nothing may be downloaded")


@pytest.fixture(autouse=True)
def no_downloads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", _refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", _refuse)
    import timm.models._builder as builder

    for name in ("load_pretrained", "load_state_dict_from_hf", "load_state_dict_from_url", "download_cached_file", "load_custom_from_hf"):
        if hasattr(builder, name):
            monkeypatch.setattr(builder, name, _refuse)
    try:
        import huggingface_hub
        import huggingface_hub.file_download
    except ImportError:
        return
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", _refuse)
    monkeypatch.setattr(huggingface_hub.file_download, "hf_hub_download", _refuse)


def _randomised(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights AND random BatchNorm statistics, so that every buffer matters."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) + 0.5)
            module.num_batches_tracked.fill_(7)
    return model.eval()


@pytest.fixture(scope="module")
def resnet18() -> torch.nn.Module:
    torch.manual_seed(1234)
    return _randomised(torchvision.models.resnet18(), 1)


@pytest.fixture(scope="module")
def probe() -> torch.Tensor:
    return torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def reference(resnet18, probe) -> torch.Tensor:
    """The features the saved weights must give, computed from the original model itself."""
    m = resnet18
    with torch.no_grad():
        x = m.maxpool(m.relu(m.bn1(m.conv1(probe))))
        return m.layer4(m.layer3(m.layer2(m.layer1(x))))


def _features(backbone: Backbone, probe: torch.Tensor) -> torch.Tensor:
    backbone.eval()
    with torch.no_grad():
        return backbone(probe)


# ---------------------------------------------------------------------------------------------
# Every layout reloads to identical outputs


LAYOUTS = {
    "plain.pth": lambda sd: sd,
    "state_dict.pth": lambda sd: {"state_dict": sd, "epoch": 3, "optimizer": {"lr": torch.tensor(0.1)}},
    "model.pth": lambda sd: {"model": sd, "args": ["--lr", "0.1"]},
    "ddp.pth": lambda sd: {f"module.{k}": v for k, v in sd.items()},
    "compiled_ddp.pth": lambda sd: {"state_dict": {f"_orig_mod.module.{k}": v for k, v in sd.items()}},
    "no_classifier.pth": lambda sd: {k: v for k, v in sd.items() if not k.startswith("fc.")},
    "other_classifier.pth": lambda sd: {**sd, "fc.weight": torch.zeros(20, 512), "fc.bias": torch.zeros(20)},
    "no_num_batches_tracked.pth": lambda sd: {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")},
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_layouts_reload_identically(tmp_path, resnet18, probe, reference, layout):
    path = tmp_path / layout
    torch.save(LAYOUTS[layout](resnet18.state_dict()), path)
    backbone = build_backbone("resnet18", weights=str(path))
    assert torch.equal(_features(backbone, probe), reference)
    assert backbone.origin == f"file: {path.resolve()} (sha256 {hashlib.sha256(path.read_bytes()).hexdigest()[:12]})"


def test_random_init_differs(resnet18, probe, reference):
    backbone = build_backbone("resnet18")
    assert backbone.origin == "random init"
    assert not torch.allclose(_features(backbone, probe), reference)


def test_safetensors_file(tmp_path, resnet18, probe, reference):
    from safetensors.torch import save_file

    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in resnet18.state_dict().items()}, str(path))
    assert torch.equal(_features(build_backbone("resnet18", weights=str(path)), probe), reference)


def test_hub_cache_file_name(tmp_path, monkeypatch, resnet18, probe, reference):
    """A bare file name that does not exist as given is looked up in $TORCH_HOME/hub/checkpoints."""
    torch_home = tmp_path / "torch_home"
    checkpoints = torch_home / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    staging = tmp_path / "staging.pth"
    torch.save(resnet18.state_dict(), staging)
    sha = hashlib.sha256(staging.read_bytes()).hexdigest()
    name = f"resnet18-{sha[:8]}.pth"  # torchvision's naming: the first 8 hex digits of the sha256
    staging.rename(checkpoints / name)
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    monkeypatch.chdir(tmp_path)  # the bare name does not exist relative to the working directory
    backbone = build_backbone("resnet18", weights=name)
    assert torch.equal(_features(backbone, probe), reference)
    assert backbone.origin == f"file: {(checkpoints / name).resolve()} (sha256 {sha[:12]}; torch hub cache)"


def test_hub_cache_file_with_wrong_hash(tmp_path, monkeypatch, resnet18):
    checkpoints = tmp_path / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save(resnet18.state_dict(), checkpoints / "resnet18-00000000.pth")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError, match="truncated or corrupted"):
        build_backbone("resnet18", weights="resnet18-00000000.pth")


def test_missing_file_names_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError) as info:
        build_backbone("resnet18", weights="resnet18-f37072fd.pth")
    message = str(info.value)
    assert "does not exist" in message and str(tmp_path / "th" / "hub" / "checkpoints" / "resnet18-f37072fd.pth") in message
    assert "never downloaded" in message
    with pytest.raises(UsageError, match="does not exist"):
        build_backbone("resnet18", weights=str(tmp_path / "nowhere" / "w.pth"))
    with pytest.raises(UsageError, match="is not a file"):
        build_backbone("resnet18", weights=str(tmp_path))


# ---------------------------------------------------------------------------------------------
# Unfit files


def test_resnet34_into_resnet18_names_the_keys(tmp_path):
    path = tmp_path / "r34.pth"
    torch.save(torchvision.models.resnet34().state_dict(), path)
    with pytest.raises(UsageError) as info:
        build_backbone("resnet18", weights=str(path))
    message = str(info.value)
    assert f"weights file {path.resolve()} does not fit this backbone" in message
    assert "unexpected keys: layer1.2.conv1.weight" in message
    assert re.search(r"\(\d+ in all\)", message)  # long lists are cut, with the count
    assert "missing keys" not in message and "fc." not in message


def test_mis_shaped_and_missing_keys_are_named(tmp_path, resnet18):
    sd = dict(resnet18.state_dict())
    sd["conv1.weight"] = torch.zeros(64, 3, 5, 5)
    del sd["layer4.1.bn2.running_mean"]
    path = tmp_path / "bad.pth"
    torch.save(sd, path)
    with pytest.raises(UsageError) as info:
        build_backbone("resnet18", weights=str(path))
    message = str(info.value)
    assert "missing keys: layer4.1.bn2.running_mean" in message
    assert "shape mismatches: conv1.weight: file (64, 3, 5, 5) vs model (64, 3, 7, 7)" in message


@pytest.mark.parametrize(
    "content, needle",
    [
        ([torch.zeros(3)], "holds a list, not a state dict"),
        ({"conv1.weight": torch.zeros(1), "epoch": 3}, "entries that are not tensors: 'epoch' (int)"),
        ({}, "is empty"),
        ({"state_dict": {}}, "is empty"),
        (torch.zeros(3), "holds a Tensor, not a state dict"),
    ],
)
def test_not_a_state_dict(tmp_path, content, needle):
    path = tmp_path / "odd.pth"
    torch.save(content, path)
    with pytest.raises(UsageError) as info:
        build_backbone("resnet18", weights=str(path))
    assert needle in str(info.value)


def test_not_a_torch_file_and_unsafe_pickles(tmp_path):
    text = tmp_path / "notes.pth"
    text.write_text("not weights")
    with pytest.raises(UsageError, match="not a readable torch state dict"):
        build_backbone("resnet18", weights=str(text))
    unsafe = tmp_path / "unsafe.pth"
    torch.save({"conv1.weight": torch.zeros(1), "hook": Path("/tmp")}, unsafe)  # needs full unpickling
    with pytest.raises(UsageError, match="weights_only=True"):
        build_backbone("resnet18", weights=str(unsafe))


def test_prefix_collision(tmp_path, resnet18):
    sd = resnet18.state_dict()
    path = tmp_path / "clash.pth"
    torch.save({**sd, "module.conv1.weight": sd["conv1.weight"]}, path)
    with pytest.raises(UsageError, match="collide"):
        load_state_dict_file(path)


# ---------------------------------------------------------------------------------------------
# timm backbones


def test_known_names():
    assert is_known_backbone("timm:resnet18") and is_known_backbone("timm:tf_efficientnet_lite0")
    assert not is_known_backbone("timm:no_such_model") and not is_known_backbone("no_such_model")
    assert all(is_known_backbone(n) for n in list_backbones())
    with pytest.raises(UsageError, match="timm has no model 'no_such_model'"):
        build_backbone("timm:no_such_model")
    with pytest.raises(UsageError, match="timm:<timm model name>"):
        build_backbone("no_such_model")


def test_timm_random_init():
    backbone = build_backbone("timm:resnet18")
    assert backbone.origin == "random init"
    assert backbone.out_channels == 512 and backbone.stride == 32
    assert backbone.mean == (0.485, 0.456, 0.406) and backbone.std == (0.229, 0.224, 0.225)
    out = _features(backbone, torch.rand(2, 3, 96, 128))
    assert out.shape == (2, 512, 3, 4)
    assert not any(k.startswith("body.model.fc") for k in backbone.state_dict())  # classifier dropped


def test_timm_from_file(tmp_path, probe):
    torch.manual_seed(7)
    model = _randomised(timm.create_model("resnet18", pretrained=False), 3)
    path = tmp_path / "timm_r18.pth"
    torch.save({"model": {f"module.{k}": v for k, v in model.state_dict().items()}}, path)
    backbone = build_backbone("timm:resnet18", weights=str(path))
    assert backbone.origin.startswith(f"file: {path.resolve()} (sha256 ")
    out = _features(backbone, probe)
    # the backbone runs channels_last: the same layout gives identical numbers, the default one
    # the same up to float rounding
    cl_model = model.to(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = cl_model.forward_features(probe.contiguous(memory_format=torch.channels_last))
        default = model.to(memory_format=torch.contiguous_format).forward_features(probe)
    assert out.shape == (2, 512, 2, 2) and torch.equal(out, expected)
    torch.testing.assert_close(out, default, rtol=1e-4, atol=1e-4)


def test_timm_unfit_and_missing_files(tmp_path, resnet18):
    path = tmp_path / "tv_r34.pth"
    torch.save(torchvision.models.resnet34().state_dict(), path)
    with pytest.raises(UsageError, match="unexpected keys: layer1.2.conv1.weight"):
        build_backbone("timm:resnet18", weights=str(path))
    with pytest.raises(UsageError, match="does not exist"):
        build_backbone("timm:resnet18", weights=str(tmp_path / "absent.pth"))


def test_timm_token_models_are_refused():
    """Token models other than plain ViTs built with dynamic_img_size (those: tests/test_vit_backbones.py)."""
    with pytest.raises(UsageError, match="not a spatial"):
        build_backbone("timm:test_vit_relpos")


def test_timm_channels_last_output_is_permuted(tmp_path):
    """timm's hierarchical models (Swin, MambaOut, ...) give NHWC from forward_features; the
    backbone gives NCHW: out[b, c, i, j] == nhwc[b, i, j, c]. A non-square input tells a
    permute that swaps h and w, and the values tell a reshape that keeps the shape."""
    torch.manual_seed(3)
    model = _randomised(timm.create_model("test_mambaout", pretrained=False), 5).eval()
    assert str(model.output_fmt) == "NHWC"
    path = tmp_path / "mambaout.pth"
    torch.save(model.state_dict(), path)
    backbone = build_backbone("timm:test_mambaout", weights=str(path))
    assert backbone.out_channels == 64 and backbone.stride == 32
    probe = torch.rand(2, 3, 96, 160)
    out = _features(backbone, probe)
    assert out.shape == (2, 64, 3, 5) and out.is_contiguous()
    with torch.no_grad():
        nhwc = model.forward_features(probe).double()  # [2, 3, 5, 64], default memory format
    expected = torch.empty(2, 64, 3, 5, dtype=torch.float64)
    for i in range(3):
        for j in range(5):
            expected[:, :, i, j] = nhwc[:, i, j, :]
    assert expected.std() > 0.1  # the features vary over channels and positions
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-4)


def test_environment_is_offline():
    assert os.environ["HF_HUB_OFFLINE"] == "1"
