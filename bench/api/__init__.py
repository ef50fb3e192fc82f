"""headbench's plugin API: the one package ``heads/*.py`` and ``datasets/*.py`` import.

A head::

    from bench.api import Head, HeadContext, register_head

    @register_head("my_head")
    class MyHead(Head):
        def __init__(self, in_channels: int, num_classes: int, context: HeadContext | None = None,
                     *, scale: float = 1.0) -> None: ...
        def forward(self, x): ...        # [B, d, h, w] -> [B, C]

The contract and the metadata a head declares: :mod:`bench.api.head`. A dataset subclasses
:class:`MultiLabelDataset` (or :class:`ImageFileDataset` for images stored as files):
:mod:`bench.api.dataset`. Registries, builders and lists for heads, datasets, backbones and
losses: :mod:`bench.api.registry`. Layers that several heads share: :mod:`bench.api.layers`.
Label states for heads that read labels (``reads_label_states``): :mod:`bench.api.label_states`.
"""

from bench.api.context import HeadContext
from bench.api.dataset import MultiLabelDataset, as_uint8_rgb, cooccurrence, write_sample_images
from bench.api.difficult_labels import DIFFICULT_POLICIES, apply_difficult_policy
from bench.api.head import Head, Heatmap, HParam, hparam_specs
from bench.api.image_files import (
    ImageFileDataset,
    files_digest,
    index_images,
    line_of,
    listed_images_digest,
    missing_images,
    open_rgb,
    safe_relpath,
    scan_files,
    stat_key,
)
from bench.api.label_states import draw_label_states, label_state_indices, max_known
from bench.api.layers import FeedForwardLayer, MultiheadAttention, TransformerEncoderLayer
from bench.api.registry import (
    build_backbone,
    build_dataset,
    build_head,
    build_loss,
    dataset_class,
    dataset_options,
    head_class,
    head_hparams,
    list_backbones,
    list_datasets,
    list_heads,
    list_losses,
    reference_head,
    register_backbone,
    register_backbone_family,
    register_dataset,
    register_head,
    register_loss,
)
from bench.core.atomic import atomic_write, atomic_write_bytes
from bench.core.errors import DataError, UnreadableImage, UsageError, choices
from bench.core.paths import cache_dir

__all__ = [
    "DIFFICULT_POLICIES", "DataError", "HParam", "Head", "HeadContext", "Heatmap", "MultiheadAttention", "ImageFileDataset",
    "MultiLabelDataset", "UnreadableImage", "UsageError", "apply_difficult_policy", "as_uint8_rgb", "atomic_write",
    "atomic_write_bytes", "build_backbone", "build_dataset", "build_head", "build_loss", "cache_dir", "choices",
    "cooccurrence", "dataset_class", "dataset_options", "files_digest", "head_class", "head_hparams", "hparam_specs",
    "index_images", "line_of", "list_backbones", "list_datasets", "list_heads", "list_losses", "missing_images",
    "open_rgb", "reference_head", "register_backbone", "register_backbone_family", "register_dataset",
    "register_head", "register_loss", "safe_relpath", "scan_files", "stat_key", "write_sample_images", "listed_images_digest",
    "draw_label_states", "label_state_indices", "max_known", "FeedForwardLayer", "TransformerEncoderLayer",
]
