"""Plain ViT backbones (``timm:vit_*`` / ``deit*`` / DINOv2 with registers): the feature map is the
patch tokens of timm's ``forward_features`` with the prefix tokens dropped, reshaped row-major to
[B, d, H/p, W/p], at any input size divisible by the patch size; weights from a local file."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch

from bench.core.errors import UsageError
from bench.models.backbones import build_backbone

# (model, prefix tokens: class / class + distillation / class + 4 registers, patch, two input sizes)
MODELS = [
    ("vit_tiny_patch16_224", 1, 16, [(32, 32), (48, 64)]),
    ("deit_tiny_distilled_patch16_224", 2, 16, [(32, 48), (64, 64)]),
    ("vit_small_patch14_reg4_dinov2", 5, 14, [(28, 28), (42, 56)]),
]


@pytest.mark.parametrize("model_name, prefix, patch, sizes", MODELS, ids=[m[0] for m in MODELS])
def test_map_is_forward_features_without_prefix_tokens(tmp_path: Path, model_name: str, prefix: int, patch: int, sizes: list) -> None:
    torch.manual_seed(0)
    reference = timm.create_model(model_name, pretrained=False, dynamic_img_size=True).eval()
    assert reference.num_prefix_tokens == prefix
    path = tmp_path / f"{model_name}.pth"
    torch.save(reference.state_dict(), path)  # random init, timm's own checkpoint layout (head included)

    backbone = build_backbone(f"timm:{model_name}", weights=str(path)).eval()
    assert backbone.out_channels == reference.num_features and backbone.stride == patch
    assert backbone.origin.startswith(f"file: {path.resolve()}")
    cfg = reference.pretrained_cfg
    assert backbone.mean == tuple(cfg["mean"]) and backbone.std == tuple(cfg["std"])

    for height, width in sizes:
        images = torch.randn(2, 3, height, width)
        with torch.no_grad():
            got = backbone(images)
            tokens = reference.forward_features(images)  # [B, prefix + h*w, d]
        h, w = height // patch, width // patch
        assert tokens.shape[1] == prefix + h * w
        assert got.shape == (2, reference.num_features, h, w) and got.is_contiguous()
        for i in range(h):  # row-major: token prefix + i*w + j is position (i, j)
            for j in range(w):
                torch.testing.assert_close(got[:, :, i, j], tokens[:, prefix + i * w + j, :], rtol=1e-5, atol=1e-5)


def test_random_init_builds_and_trains_at_64_px() -> None:
    """The smoke-vit setting: 64 px -> a 4 x 4 map of 192-d tokens, gradients reach the patch embedding."""
    torch.manual_seed(0)
    backbone = build_backbone("timm:vit_tiny_patch16_224")
    assert backbone.origin == "random init"
    out = backbone(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 192, 4, 4)
    out.square().mean().backward()
    assert backbone.body.model.patch_embed.proj.weight.grad.abs().sum() > 0


def test_sizes_not_divisible_by_the_patch_are_refused_with_the_patch_size() -> None:
    backbone = build_backbone("timm:vit_tiny_patch16_224")
    with pytest.raises(ValueError, match="multiples of its patch size 16"):
        backbone(torch.randn(1, 3, 40, 48))


def test_a_file_of_another_model_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "deit.pth"
    torch.save(timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False).state_dict(), path)
    with pytest.raises(UsageError, match="dist_token"):
        build_backbone("timm:vit_tiny_patch16_224", weights=str(path))
