"""timm models as backbones: their ``forward_features`` map, channels-last outputs turned into
[B, d, h, w], and plain ViTs' patch tokens as a token map. Always ``pretrained=False``."""

from __future__ import annotations

import torch
from torch import nn

from bench.core.errors import UsageError
from bench.models.backbones.base import Backbone, IMAGENET_MEAN, IMAGENET_STD, IMAGENET_WEIGHTS, LITE0_NAME, RANDOM_ORIGIN, TIMM_PREFIX
from bench.models.backbones.weight_files import load_state_dict_file, load_weights_into, resolve_weights_path

def import_timm(what: str):
    try:
        import timm
    except ImportError as exc:  # pragma: no cover - timm is a dependency
        raise UsageError(f"backbone {what!r} needs the 'timm' package (pip install timm)") from exc
    return timm



# --------------------------------------------------------------------------------------------
# timm models


class TimmFeatures(nn.Module):
    """A timm model's ``forward_features`` as a contiguous [B, d, h, w] tensor.

    The model runs in ``channels_last`` memory format (weights and input): on CPUs (oneDNN) it
    is about twice as fast for these convolutional nets, and on GPUs it is cuDNN's preferred
    layout. Results equal the default layout's up to float rounding. ``nhwc_output``: the model's
    ``forward_features`` gives [B, h, w, d] (timm's hierarchical transformers), permuted here.
    """

    def __init__(self, model: nn.Module, nhwc_output: bool = False, channels_last: bool = True) -> None:
        super().__init__()
        self.model = model.to(memory_format=torch.channels_last) if channels_last else model
        self.nhwc_output = nhwc_output
        self.channels_last = channels_last

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        features = self.model.forward_features(images)
        if self.nhwc_output:
            features = features.permute(0, 3, 1, 2)
        return features.contiguous()


def _probe_size(model: nn.Module) -> int:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if cfg.get("fixed_input_size"):
        return int(cfg.get("input_size", (3, 224, 224))[-1])
    return 128


def _timm_features(model: nn.Module, name: str) -> tuple[TimmFeatures, int, int]:
    """Wrap ``model`` (classifier already removed); find d and the stride by one small forward."""
    size = _probe_size(model)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model.forward_features(torch.zeros(1, 3, size, size))
    model.train(was_training)
    channels = int(getattr(model, "num_features", -1))
    if out.ndim != 4:
        raise UsageError(
            f"backbone {name!r}: forward_features gives a {out.ndim}-d tensor {tuple(out.shape)} (tokens?), "
            "not a spatial [B, d, h, w] map, and the model is not a plain ViT that timm builds with "
            "dynamic_img_size (the VisionTransformer and Eva families: vit_*, deit*, eva*, *_dinov2, whose "
            "patch tokens are used as the map); choose one of those, or a convolutional or hierarchical timm model"
        )
    nhwc = str(getattr(model, "output_fmt", "NCHW")) == "NHWC" or (out.shape[1] != channels and out.shape[-1] == channels)
    d, h = (int(out.shape[3]), int(out.shape[1])) if nhwc else (int(out.shape[1]), int(out.shape[2]))
    return TimmFeatures(model, nhwc_output=nhwc), d, max(1, round(size / h))


def _timm_classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    names = cfg.get("classifier") or ()
    names = (names,) if isinstance(names, str) else tuple(names)
    return tuple(f"{n}." for n in names)


class ViTPatchFeatures(nn.Module):
    """A plain ViT's patch tokens as a map: [B, 3, H, W] -> [B, d, H/p, W/p].

    ``forward_features`` gives [B, P + (H/p)(W/p), d] tokens (after the final norm, as timm
    defines it), P prefix tokens first (class, distillation, register tokens:
    ``num_prefix_tokens``). The prefix tokens are dropped and the patch tokens, which timm orders
    row-major (the patch embedding's [B, d, H/p, W/p] flattened), are reshaped back to
    [B, d, H/p, W/p]. The model is built with timm's ``dynamic_img_size=True``: any H, W
    divisible by the patch size p works (the position embedding is resampled to the grid).
    """

    def __init__(self, model: nn.Module, name: str) -> None:
        super().__init__()
        self.model = model
        self.name = name
        self.num_prefix_tokens = int(model.num_prefix_tokens)
        self.patch = _vit_stride(model)

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """(H/p, W/p) for an input of H x W pixels; ``ValueError`` unless p divides both."""
        ph, pw = self.patch
        if height % ph or width % pw:
            raise ValueError(
                f"backbone {self.name!r} takes images whose sides are multiples of its patch size {ph} x {pw}; "
                f"got {height} x {width} (set the recipe's image_size to a multiple of {ph})"
            )
        return height // ph, width // pw

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        gh, gw = self.grid(images.shape[-2], images.shape[-1])
        tokens = self.model.forward_features(images)  # [B, P + gh*gw, d]
        patches = tokens[:, self.num_prefix_tokens :]
        if patches.shape[1] != gh * gw:
            raise RuntimeError(
                f"backbone {self.name!r}: {tokens.shape[1]} tokens for a {gh} x {gw} grid with "
                f"{self.num_prefix_tokens} prefix tokens (expected {self.num_prefix_tokens + gh * gw})"
            )
        b, _, d = patches.shape
        return patches.transpose(1, 2).reshape(b, d, gh, gw).contiguous()  # token i*gw + j -> [:, :, i, j]


def _is_plain_vit(model: nn.Module) -> bool:
    """A timm model of the plain-ViT kind: a patch embedding and a token count of prefix tokens
    (``VisionTransformer``, ``Eva`` and the families built on them: vit_*, deit*, eva*, DINOv2)."""
    return isinstance(getattr(model, "num_prefix_tokens", None), int) and hasattr(model, "patch_embed")


def _vit_stride(model: nn.Module) -> tuple[int, int]:
    """Pixels per token along H and W (the patch size; the total stride for hybrid stems)."""
    embed = model.patch_embed
    ratio = embed.feat_ratio() if callable(getattr(embed, "feat_ratio", None)) else embed.patch_size
    ratio = (ratio, ratio) if isinstance(ratio, int) else tuple(ratio)
    return int(ratio[0]), int(ratio[1])


def _create_timm_model(timm, model_name: str) -> tuple[nn.Module, bool]:
    """``timm.create_model(model_name, pretrained=False)`` (never pretrained: no download), and
    whether it is a plain ViT built with ``dynamic_img_size=True`` (then its patch tokens are the
    feature map). Models whose constructor refuses ``dynamic_img_size`` (every CNN) fail on the
    keyword before building anything; a model that takes it but is not a plain ViT is rebuilt
    without it, so its features are exactly those of the default build."""
    try:
        model = timm.create_model(model_name, pretrained=False, dynamic_img_size=True)
    except TypeError as exc:
        if "dynamic_img_size" not in str(exc):
            raise
    else:
        if _is_plain_vit(model) and getattr(model, "dynamic_img_size", False) is True:
            return model, True
    return timm.create_model(model_name, pretrained=False), False


def _vit_features(model: nn.Module, name: str) -> tuple[ViTPatchFeatures, int, int]:
    """Wrap a plain ViT (classifier removed); check its token layout by one small forward."""
    body = ViTPatchFeatures(model, name)
    ph, pw = body.patch
    channels = int(model.num_features)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = body(torch.zeros(1, 3, 2 * ph, 2 * pw))  # a 2 x 2 grid: checks prefix count and width
    model.train(was_training)
    if tuple(out.shape[1:]) != (channels, 2, 2):
        raise UsageError(f"backbone {name!r}: patch tokens of shape {tuple(out.shape[1:])}, expected ({channels}, 2, 2)")
    return body, channels, ph


def build_timm(name: str, weights: str | None) -> Backbone:
    model_name = name[len(TIMM_PREFIX) :]
    timm = import_timm(name)
    if not timm.is_model(model_name):
        raise UsageError(f"unknown backbone {name!r}: timm has no model {model_name!r} (see timm.list_models())")
    if weights == IMAGENET_WEIGHTS:
        raise UsageError(
            f"backbone {name!r}: weights = 'imagenet' is only available for {LITE0_NAME!r} (shipped in a package); "
            "timm's hub is never used: save the weights file and pass its path"
        )
    model, vit = _create_timm_model(timm, model_name)
    origin = RANDOM_ORIGIN
    if weights:
        path, origin = resolve_weights_path(weights)
        load_weights_into(model, load_state_dict_file(path), str(path), classifier=_timm_classifier_prefixes(model))
    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean, std = tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD))
    model.reset_classifier(0)  # the harness's head replaces it; its parameters are dropped
    body, channels, stride = _vit_features(model, name) if vit else _timm_features(model, name)
    return Backbone(body, channels, stride, origin=origin, mean=mean, std=std)
