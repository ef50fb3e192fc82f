"""The plugin contract, checked for EVERY registered head and dataset (as timm's test_models.py
checks every model of ``list_models()``): a head or dataset dropped into ``heads/`` or
``datasets/`` is covered here with no test edit."""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from bench.api import HeadContext, UsageError, build_dataset, build_head, dataset_class, head_class, head_hparams, list_datasets, list_heads
from bench.api.head import hparam_specs

SIZES = (1, 3, 7, 14)
D, C, B = 16, 5, 2


def context(c: int = C) -> HeadContext:
    rng = np.random.default_rng(0)
    targets = (rng.random((60, c)) < 0.4).astype(np.uint8)
    return HeadContext.from_labels([f"class_{i}" for i in range(c)], targets)


def make(name: str, **hparams: Any) -> nn.Module:
    """Head ``name``; a derived head adopts a freshly built source head (as the runner does)."""
    head = build_head(name, D, C, context(), **hparams)
    derived = head_class(name).derived_from
    if derived is not None:
        source_name, source_hparams = derived
        head.adopt(build_head(source_name, D, C, context(), **source_hparams))
    return head


def sweep_configs(name: str) -> list[dict[str, Any]]:
    """Every configuration of the head's declared sweep (one of defaults when none is declared)."""
    out = []
    for entry in head_class(name).sweep or ({},):
        keys = sorted(entry)
        lists = [entry[k] if isinstance(entry[k], list) else [entry[k]] for k in keys]
        out += [dict(zip(keys, combo)) for combo in itertools.product(*lists)]
    return out


@pytest.mark.parametrize("name", list_heads())
def test_head_maps_any_spatial_size_to_logits(name: str) -> None:
    torch.manual_seed(0)
    head = make(name).eval()
    for h, w in [*((s, s) for s in SIZES), (3, 14), (14, 1)]:
        out = head(torch.randn(B, D, h, w))
        assert out.shape == (B, C), (name, h, w)
        assert torch.isfinite(out).all(), (name, h, w)


@pytest.mark.parametrize("name", list_heads())
def test_one_optimisation_step_lowers_the_loss(name: str) -> None:
    torch.manual_seed(0)
    head = make(name).train()
    params = [p for p in head.parameters() if p.requires_grad]
    if head_class(name).derived_from is not None:
        pytest.skip(f"{name} is derived from a trained run: it is never trained")
    assert params, f"{name} has no trainable parameter"
    x = torch.relu(torch.randn(8, D, 4, 4))
    y = (torch.rand(8, C) < 0.4).float()
    head.eval()  # dropout off: the comparison is of the same function before and after the step
    loss_fn = nn.BCEWithLogitsLoss()
    optimizer = torch.optim.SGD(params, lr=0.01)
    before = loss_fn(head(x), y)
    optimizer.zero_grad()
    before.backward()
    optimizer.step()
    after = loss_fn(head(x), y)
    assert math.isfinite(before.item()) and after.item() < before.item(), (name, before.item(), after.item())


def wrong_value(annotation: Any) -> Any:
    """A value of a type no hyper-parameter annotation accepts for scalars."""
    return {"not": "a valid value"}


@pytest.mark.parametrize("name", list_heads())
def test_hyper_parameter_validation_rejects_a_wrong_type(name: str) -> None:
    specs = hparam_specs(head_class(name))
    if not specs:
        pytest.skip(f"{name} has no hyper-parameter")
    for key, spec in specs.items():
        with pytest.raises(UsageError, match=key):
            build_head(name, D, C, context(), **{key: wrong_value(spec.annotation)})
        if spec.annotation in (int, float) and not isinstance(spec.default, bool):
            with pytest.raises(UsageError, match=key):
                build_head(name, D, C, context(), **{key: True})  # a bool is never a number
    with pytest.raises(UsageError, match="no_such_hparam"):
        build_head(name, D, C, context(), no_such_hparam=1)


@pytest.mark.parametrize("name", list_heads())
def test_metadata_is_complete(name: str) -> None:
    cls = head_class(name)
    defaults = head_hparams(name)
    text = cls.describe_hparams(defaults)
    assert isinstance(text, str) and text.strip(), name
    configs = sweep_configs(name)
    assert configs and all(set(c) <= set(defaults) for c in configs)
    # the first and last configuration of the declared sweep build and describe themselves
    for config in {0: configs[0], 1: configs[-1]}.values():
        make(name, **config)
        assert cls.describe_hparams({**defaults, **config}).strip()
    if cls.heatmap is not None:
        assert {cls.heatmap.x, cls.heatmap.y} <= set(defaults)
    if cls.derived_from is not None:
        assert cls.derived_from[0] in list_heads() and callable(cls.adopt)


def test_exactly_one_head_is_the_reference() -> None:
    from bench.api import reference_head

    references = [n for n in list_heads() if head_class(n).reference is not None]
    assert len(references) == 1, references
    assert reference_head() == (references[0], head_class(references[0]).reference)


@pytest.mark.parametrize("name", list_heads())
def test_state_dict_round_trips(name: str) -> None:
    torch.manual_seed(0)
    head = make(name).eval()
    torch.manual_seed(1)  # another initialisation: only the loaded state may make them agree
    fresh = make(name).eval()
    x = torch.randn(B, D, 5, 3)
    # before loading, the two differ (else the round trip below would prove nothing)
    assert not torch.allclose(fresh(x), head(x), atol=1e-4), f"{name}: two initialisations give the same outputs"
    fresh.load_state_dict(head.state_dict(), strict=True)
    assert torch.allclose(fresh(x), head(x), atol=1e-6)
    assert set(fresh.state_dict()) == set(head.state_dict())


# ------------------------------------------------------------------------------------------------
# Datasets


@pytest.mark.parametrize("name", list_datasets())
def test_dataset_reads_its_own_tiny_sample(name: str, tmp_path: Path) -> None:
    cls = dataset_class(name)
    root = tmp_path / name
    options = cls.write_sample(root)
    for split in dict.fromkeys((cls.train_split, cls.test_split)):
        ds = build_dataset(name, root, split, **options)
        n, c = len(ds), len(ds.classes)
        assert n > 0 and c > 0 and len(set(ds.classes)) == c
        assert ds.targets.shape == (n, c) and set(np.unique(ds.targets)) <= {0, 1}
        assert ds.ignore.shape == (n, c) and ds.ignore.dtype == bool
        ids = [ds.image_id(i) for i in range(n)]
        assert len(set(ids)) == n and all(isinstance(i, str) and i for i in ids)
        image, target, ignore = ds[0]
        assert image.ndim == 3 and image.shape[0] == 3 and image.dtype == torch.float32
        assert 0.0 <= image.min() and image.max() <= 1.0
        assert target.shape == (c,) and ignore.shape == (c,)
        fingerprint = ds.fingerprint()
        assert isinstance(fingerprint, str) and fingerprint == build_dataset(name, root, split, **options).fingerprint()
    if cls.needs_root:
        with pytest.raises(UsageError, match="no data root"):
            build_dataset(name, None, cls.train_split, **options)
        assert cls.expected_layout, f"{name} needs a root but states no expected_layout"
