"""The training recipe: its keys, their types and allowed values, defaults and named presets.

A grid's ``[recipe]`` table may name a ``preset`` from ``configs/recipes.toml`` and override any
key. The resolved recipe (every key filled in) is part of a run's identity (its ``run_id``).
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.errors import UsageError, choices

RECIPES_FILE = Path(__file__).resolve().parent.parent / "configs" / "recipes.toml"


@dataclass(frozen=True)
class Key:
    """One recipe key: accepted Python types, default, and the allowed values or a range."""

    types: tuple[type, ...]
    default: Any
    allowed: tuple[Any, ...] | None = None
    minimum: float | None = None
    maximum: float | None = None
    doc: str = ""

    def describe(self) -> str:
        if self.allowed is not None:
            return f"one of {choices(self.allowed)}"
        names = " or ".join(t.__name__ for t in self.types)
        bounds = []
        if self.minimum is not None:
            bounds.append(f">= {self.minimum}")
        if self.maximum is not None:
            bounds.append(f"<= {self.maximum}")
        return f"a {names}" + (f" {' and '.join(bounds)}" if bounds else "")


KEYS: dict[str, Key] = {
    "protocol": Key((str,), "finetune", ("finetune", "frozen"), doc="frozen: heads train on cached backbone features"),
    "epochs": Key((int,), 10, minimum=1),
    "batch_size": Key((int,), 64, minimum=1, doc="global batch size, split across processes"),
    "eval_batch_size": Key((int,), 128, minimum=1),
    "image_size": Key((int,), 64, minimum=8, doc="images are resized to image_size x image_size"),
    "optimizer": Key((str,), "adamw", ("sgd", "adamw")),
    "lr": Key((float,), 1e-3, minimum=0.0, doc="learning rate of the head"),
    "lrp": Key((float,), 1.0, minimum=0.0, doc="backbone learning rate = lr * lrp"),
    "momentum": Key((float,), 0.9, minimum=0.0, maximum=1.0),
    "nesterov": Key((bool,), False),
    "weight_decay": Key((float,), 1e-4, minimum=0.0),
    "schedule": Key((str,), "cosine", ("cosine", "step", "constant")),
    "warmup_epochs": Key((float,), 1.0, minimum=0.0),
    "step_size": Key((int,), 4, minimum=1, doc="epochs between decays of the step schedule"),
    "gamma": Key((float,), 0.1, minimum=0.0, maximum=1.0),
    "loss": Key((str,), "bce", ("bce", "multilabel_soft_margin")),
    "augment": Key((str,), "flip", ("none", "flip", "flip_crop")),
    "crop_scale_min": Key((float,), 0.7, minimum=0.05, maximum=1.0, doc="random-resized-crop area range [min, 1]"),
    "grad_clip": Key((float,), 0.0, minimum=0.0, doc="max gradient norm; 0 = no clipping"),
    "mixed_precision": Key((str,), "no", ("no", "fp16", "bf16")),
    "freeze_backbone": Key((bool,), False, doc="finetune protocol with the backbone's weights fixed"),
    "input_normalization": Key(
        (str,), "backbone", ("backbone", "none"),
        doc="backbone: the mean/std the backbone's weights were trained with; none: pixels in [0, 1] (CSRA's release)",
    ),
    "feature_dtype": Key((str,), "float16", ("float16", "float32"), doc="storage of cached features (frozen protocol)"),
}


def _check_value(key: str, value: Any, where: str) -> Any:
    spec = KEYS[key]
    if float in spec.types and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, spec.types) or (isinstance(value, bool) and bool not in spec.types):
        raise UsageError(f"{where}: recipe key {key!r} = {value!r} has the wrong type; expected {spec.describe()}")
    if spec.allowed is not None and value not in spec.allowed:
        raise UsageError(f"{where}: recipe key {key!r} = {value!r} is not allowed; expected {spec.describe()}")
    if (spec.minimum is not None and value < spec.minimum) or (spec.maximum is not None and value > spec.maximum):
        raise UsageError(f"{where}: recipe key {key!r} = {value!r} is out of range; expected {spec.describe()}")
    return value


def load_presets(path: Path = RECIPES_FILE) -> dict[str, dict[str, Any]]:
    """Read the named presets file; every preset is validated like a grid's recipe."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{path}: not valid TOML: {exc}") from exc
    for name, table in data.items():
        if not isinstance(table, dict):
            raise UsageError(f"{path}: top-level key {name!r} must be a table [{name}]")
        for key, value in table.items():
            if key == "description":
                continue
            if key not in KEYS:
                raise UsageError(f"{path} [{name}]: unknown recipe key {key!r}; valid: {choices(sorted(KEYS))}")
            _check_value(key, value, f"{path} [{name}]")
    return data


def resolve_recipe(table: dict[str, Any], where: str) -> dict[str, Any]:
    """Defaults, then the named preset (if any), then the table's own keys; every key validated.

    The preset's name is not part of the result: two recipes with the same values are the same
    recipe, whichever way they were written.

    Args:
        table: a grid's ``[recipe]`` table (may hold ``preset = "name"``).
        where: the file name, for error messages.
    """
    table = dict(table)
    recipe = {key: spec.default for key, spec in KEYS.items()}
    preset = table.pop("preset", None)
    if preset is not None:
        presets = load_presets()
        if preset not in presets:
            raise UsageError(f"{where}: recipe preset {preset!r} is not defined in {RECIPES_FILE}; valid: {choices(sorted(presets))}")
        recipe.update({k: v for k, v in presets[preset].items() if k != "description"})
    for key, value in table.items():
        if key not in KEYS:
            raise UsageError(f"{where}: unknown recipe key {key!r}; valid: {choices(['preset', *sorted(KEYS)])}")
        recipe[key] = value
    recipe = {key: _check_value(key, value, where) for key, value in recipe.items()}
    if recipe["protocol"] == "frozen" and recipe["augment"] != "none":
        raise UsageError(
            f"{where}: recipe protocol = 'frozen' computes features once from unaugmented images; "
            f"set augment = 'none' (it is {recipe['augment']!r})"
        )
    return recipe
