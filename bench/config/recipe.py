"""The training recipe: its keys, their types and allowed values, defaults and named presets.

A grid's ``[recipe]`` table may name a ``preset`` from ``configs/recipes.toml`` and override any
key. The resolved recipe (every key filled in) is part of a run's identity (its ``run_id``).
"""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Union

from bench.api.registry import list_losses
from bench.core.coerce import CoerceError, OutOfRange, coerce
from bench.core.errors import UsageError, choices
from bench.core.paths import PROJECT_ROOT

RECIPES_FILE = PROJECT_ROOT / "configs" / "recipes.toml"
#: every number gets a finite range checked on load (issue 26): a value past these trains nothing
#: useful and fails (or overflows float32) in every run. Epoch counts and batch sizes beyond them
#: are not experiments this harness runs; learning rates, decays and loss exponents beyond 100
#: overflow or diverge at once.
MAX_EPOCHS = 100_000
MAX_BATCH = 2**20


@dataclass(frozen=True)
class Key:
    """One recipe key: accepted Python types, default, and the allowed values or a range."""

    types: tuple[type, ...]
    default: Any
    allowed: tuple[Any, ...] | Callable[[], Sequence[Any]] | None = None  # a callable: read from a registry
    minimum: float | None = None
    maximum: float | None = None
    doc: str = ""
    #: False for keys added after run ids were first published: at their default they are left
    #: out of a run's identity, so adding a key does not change the run id of any existing run
    in_id_at_default: bool = True
    #: True: the range is open, minimum < value < maximum (a fraction that must leave something on both sides)
    exclusive: bool = False
    #: (key, value): this key takes effect only when the recipe's ``key`` equals ``value`` (the ASL
    #: parameters when ``loss = "asl"``; a tuple of values: any of them); reports leave it out of a
    #: recipe where it has no effect
    applies_when: tuple[str, Any] | None = None

    def in_effect(self, recipe: Mapping[str, Any]) -> bool:
        """Whether this key changes anything in ``recipe`` (see :attr:`applies_when`)."""
        if self.applies_when is None:
            return True
        key, value = self.applies_when
        return recipe.get(key) in value if isinstance(value, tuple) else recipe.get(key) == value

    def values(self) -> tuple[Any, ...] | None:
        """The allowed values (None: any value of the types within the range)."""
        return tuple(self.allowed()) if callable(self.allowed) else self.allowed

    def describe(self) -> str:
        if self.allowed is not None:
            return f"one of {choices(self.values())}"
        names = " or ".join(t.__name__ for t in self.types)
        bounds = []
        if self.minimum is not None:
            bounds.append(f"{'>' if self.exclusive else '>='} {self.minimum}")
        if self.maximum is not None:
            bounds.append(f"{'<' if self.exclusive else '<='} {self.maximum}")
        return f"a {names}" + (f" {' and '.join(bounds)}" if bounds else "")


KEYS: dict[str, Key] = {
    "protocol": Key((str,), "finetune", ("finetune", "frozen"), doc="frozen: heads train on cached backbone features"),
    "epochs": Key((int,), 10, minimum=1, maximum=MAX_EPOCHS),
    "batch_size": Key((int,), 64, minimum=1, maximum=MAX_BATCH, doc="global batch size, split across processes"),
    "eval_batch_size": Key((int,), 128, minimum=1, maximum=MAX_BATCH),
    "image_size": Key((int,), 64, minimum=8, maximum=4096, doc="images are resized to image_size x image_size (cached as uint8: N x S x S x 3 bytes)"),
    "optimizer": Key((str,), "adamw", ("sgd", "adamw")),
    "lr": Key((float,), 1e-3, minimum=0.0, maximum=100.0, doc="learning rate of the head"),
    "lrp": Key((float,), 1.0, minimum=0.0, maximum=100.0, doc="backbone learning rate = lr * lrp"),
    "momentum": Key((float,), 0.9, minimum=0.0, maximum=1.0),
    "nesterov": Key((bool,), False),
    "weight_decay": Key((float,), 1e-4, minimum=0.0, maximum=100.0),
    "schedule": Key((str,), "cosine", ("cosine", "step", "constant")),
    "warmup_epochs": Key((float,), 1.0, minimum=0.0, maximum=MAX_EPOCHS),
    "step_size": Key((int,), 4, minimum=1, maximum=MAX_EPOCHS, doc="epochs between decays of the step schedule"),
    "gamma": Key((float,), 0.1, minimum=0.0, maximum=1.0),
    "loss": Key((str,), "bce", list_losses, doc="a registered loss (bench/models/losses.py)"),
    # parameters of loss = "asl" (passed as gamma_neg / gamma_pos / clip; ignored by other losses)
    "asl_gamma_neg": Key((float,), 4.0, minimum=0.0, maximum=100.0, doc="ASL focusing exponent of the negatives", in_id_at_default=False, applies_when=("loss", "asl")),
    "asl_gamma_pos": Key((float,), 0.0, minimum=0.0, maximum=100.0, doc="ASL focusing exponent of the positives", in_id_at_default=False, applies_when=("loss", "asl")),
    "asl_clip": Key((float,), 0.05, minimum=0.0, maximum=1.0, doc="ASL probability margin of the negatives", in_id_at_default=False, applies_when=("loss", "asl")),
    # unknown (unobserved) training labels, dataset option observe (bench/api/observe.py, bench/models/losses.py)
    "unknown_labels": Key(
        (str,), "ignore", ("ignore", "negative"), in_id_at_default=False, applies_when=("loss", ("bce", "multilabel_soft_margin", "asl")),
        doc="how bce, multilabel_soft_margin and asl treat a training label the dataset leaves unknown: ignore: it takes "
        "no part in the loss; negative: it counts as a negative (assume negative). No effect when every label is observed",
    ),
    # the large-loss losses' rate (Kim et al. CVPR 2022): each epoch from the 2nd on, a further delta_rel of the
    # batch's B x C entries is rejected / corrected among the unknown ones (the release's --delta_rel, in percent, / 100)
    "ll_r_delta_rel": Key((float,), 0.002, minimum=0.0, maximum=1.0, doc="LL-R: growth of the rejected share per epoch", in_id_at_default=False, applies_when=("loss", "ll_r")),
    "ll_ct_delta_rel": Key((float,), 0.002, minimum=0.0, maximum=1.0, doc="LL-Ct: growth of the corrected share per epoch", in_id_at_default=False, applies_when=("loss", "ll_ct")),
    "ll_cp_delta_rel": Key((float,), 0.002, minimum=0.0, maximum=1.0, doc="LL-Cp: growth of the permanently corrected share per epoch", in_id_at_default=False, applies_when=("loss", "ll_cp")),
    "augment": Key((str,), "flip", ("none", "flip", "flip_crop")),
    "crop_scale_min": Key((float,), 0.7, minimum=0.05, maximum=1.0, doc="random-resized-crop area range [min, 1]"),
    "grad_clip": Key((float,), 0.0, minimum=0.0, maximum=1e6, doc="max gradient norm; 0 = no clipping"),
    "mixed_precision": Key((str,), "no", ("no", "fp16", "bf16")),
    "freeze_backbone": Key((bool,), False, doc="finetune protocol with the backbone's weights fixed"),
    "input_normalization": Key(
        (str,), "backbone", ("backbone", "none"),
        doc="backbone: the mean/std the backbone's weights were trained with; none: pixels in [0, 1] (CSRA's release)",
    ),
    "feature_dtype": Key((str,), "float16", ("float16", "float32"), doc="storage of cached features (frozen protocol)"),
    # model selection (docs/model-selection.md)
    "select": Key(
        (str,), "last", ("last", "best_val", "best_test"), in_id_at_default=False,
        doc="which epoch's weights are kept and tested: last: the final epoch; best_val: the epoch with the best mAP "
        "on a validation split carved from the training split (the test split is read once, at the end); "
        "best_test: the epoch with the best TEST mAP, as the papers' releases did (optimistic)",
    ),
    "val_fraction": Key(
        (float,), 0.1, minimum=0.0, maximum=1.0, exclusive=True, in_id_at_default=False, applies_when=("select", "best_val"),
        doc="select = best_val: the fraction of the training split held out for validation (the same images for "
        "every head and seed of a dataset; removed from training)",
    ),
}


def _check_value(key: str, value: Any, where: str) -> Any:
    spec = KEYS[key]
    try:
        value = coerce(Union[spec.types], value)  # noqa: UP007 (a tuple of types, not a literal union)
    except OutOfRange:
        what = "is not a finite number" if isinstance(value, float) else "is out of range"
        raise UsageError(f"{where}: recipe key {key!r} = {value!r} {what}; expected {spec.describe()}") from None
    except CoerceError:
        raise UsageError(f"{where}: recipe key {key!r} = {value!r} has the wrong type; expected {spec.describe()}") from None
    if spec.allowed is not None and value not in spec.values():
        raise UsageError(f"{where}: recipe key {key!r} = {value!r} is not allowed; expected {spec.describe()}")
    below = spec.minimum is not None and (value <= spec.minimum if spec.exclusive else value < spec.minimum)
    above = spec.maximum is not None and (value >= spec.maximum if spec.exclusive else value > spec.maximum)
    if below or above:
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


def _recipe_methods() -> dict[str, Any]:
    def to_dict(self) -> dict[str, Any]:
        """Every key and its value (JSON-able), in the order of :data:`KEYS`."""
        return {key: getattr(self, key) for key in KEYS}

    def identity(self) -> dict[str, Any]:
        """The part of the recipe hashed into a run's id (see :attr:`Key.in_id_at_default`)."""
        return {k: v for k, v in self.to_dict().items() if KEYS[k].in_id_at_default or v != KEYS[k].default}

    def from_dict(cls, values: dict[str, Any], where: str = "recipe") -> "Recipe":
        """A recipe from stored values (e.g. a result row's config): missing keys take their
        defaults, every value is validated."""
        unknown = sorted(set(values) - set(KEYS))
        if unknown:
            raise UsageError(f"{where}: unknown recipe key(s) {choices(unknown)}; valid: {choices(sorted(KEYS))}")
        return cls(**{k: _check_value(k, values.get(k, spec.default), where) for k, spec in KEYS.items()})

    return {"to_dict": to_dict, "identity": identity, "from_dict": classmethod(from_dict), "replace": dataclasses.replace}


#: The resolved recipe: a frozen dataclass with one field per entry of :data:`KEYS` (same name,
#: type and default), built from that one table so a new key is one line there.
Recipe = dataclasses.make_dataclass(
    "Recipe",
    [(key, spec.types[0] if len(spec.types) == 1 else Any, dataclasses.field(default=spec.default)) for key, spec in KEYS.items()],
    frozen=True,
    namespace=_recipe_methods(),
)
Recipe.__module__ = __name__
Recipe.__doc__ = "A resolved, validated recipe (fields: :data:`KEYS`). ``recipe.lr``; ``recipe.to_dict()``."


def resolve_recipe(table: dict[str, Any], where: str) -> "Recipe":
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
    if recipe["nesterov"] and (recipe["optimizer"] != "sgd" or recipe["momentum"] <= 0):
        raise UsageError(
            f"{where}: recipe nesterov = true needs optimizer = 'sgd' with momentum > 0 (optimizer is "
            f"{recipe['optimizer']!r}, momentum {recipe['momentum']!r}); set nesterov = false or change them"
        )
    if recipe["select"] != "best_val" and recipe["val_fraction"] != KEYS["val_fraction"].default:
        raise UsageError(
            f"{where}: recipe key 'val_fraction' = {recipe['val_fraction']!r} is used only with select = 'best_val' "
            f"(select is {recipe['select']!r}); remove it or set select = 'best_val'"
        )
    return Recipe(**recipe)
