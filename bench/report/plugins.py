"""What the report reads from the plugins' declared metadata (never a plugin's name).

A report is rebuilt from result files alone, so it must also work where a plugin has been
removed or fails to import: every function here falls back to a neutral answer then.
"""

from __future__ import annotations

import functools
from typing import Any

from bench.api import registry
from bench.api.observe import Observe, split_observe
from bench.core.errors import UsageError
from bench.report.plots import HeatmapSpec


def _head_class(head: str) -> type | None:
    try:
        return registry.head_class(head)
    except Exception:  # a removed or broken plugin
        return None


def describe_hparams(head: str, hparams: dict[str, Any]) -> str:
    """Hyper-parameters in words, via the head's ``describe_hparams`` when it is installed."""
    cls = _head_class(head)
    describe = getattr(cls, "describe_hparams", None)
    if describe is not None:
        try:
            return describe(hparams)
        except Exception:  # rows written by another version of the plugin
            pass
    return ", ".join(f"{k}={v}" for k, v in sorted(hparams.items())) or "-"


def head_defaults(head: str) -> dict[str, Any] | None:
    """The registered defaults of a head's hyper-parameters, or None when it is not installed."""
    try:
        return registry.head_hparams(head)
    except Exception:
        return None


@functools.cache
def reference() -> tuple[str, dict[str, Any]] | None:
    """(head, hyper-parameters) of the reference every other head is compared with."""
    try:
        return registry.reference_head()
    except Exception:
        return None


def is_reference(head: str, hparams: Any) -> bool:
    """True for the reference head's run (the head that declares ``reference``)."""
    ref = reference()
    if ref is None:
        return False
    name, wanted = ref
    hparams = hparams if isinstance(hparams, dict) else {}
    return head == name and all(hparams.get(k, v) == v for k, v in wanted.items())


def reference_label() -> str:
    """The reference in words, e.g. ``baseline (avg pool)``."""
    ref = reference()
    if ref is None:
        return "reference"
    name, hparams = ref
    return f"{name} ({describe_hparams(name, {**(head_defaults(name) or {}), **hparams})})"


def heatmap_specs() -> list[HeatmapSpec]:
    """One heat map per registered head that declares one (``Head.heatmap``)."""
    specs = []
    try:
        items = registry.HEADS.items()
    except Exception:
        return specs
    for name, cls in items:
        hm = getattr(cls, "heatmap", None)
        if hm is not None:
            specs.append(HeatmapSpec(hm.slug or f"{name}_{hm.y}_x_{hm.x}", name, hm.title, hm.y, hm.y_label or hm.y, hm.x, hm.x_label or hm.x, dict(hm.where)))
    return specs


def dataset_setting_lines(dataset: str, options: dict[str, Any]) -> tuple[list[str], dict[str, Any]]:
    """The dataset's own lines about its options (e.g. VOC's difficult-label policy), and the
    options left to list as ``key=value``."""
    try:
        own, setting = split_observe(options, f"dataset {dataset!r}")
    except UsageError:  # options a later version wrote: listed as key=value
        own, setting = dict(options), Observe()
    observed = [] if setting.mode == "all" else [f"observed labels: {setting.describe()}; the test split is fully labelled"]
    try:
        cls = registry.dataset_class(dataset)
    except Exception:
        return observed, dict(own)
    lines = list(cls.describe_options(own)) + observed
    described = set(getattr(cls, "described_options", ()))
    return lines, {k: v for k, v in own.items() if k not in described}
