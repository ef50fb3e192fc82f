"""The ``[tune]`` table of a grid: an equal tuning budget for every head (docs/tuning.md).

::

    [tune]
    lr = [0.0003, 0.003, 0.03]       # a list of values per tuned recipe key
    weight_decay = [0.0, 0.01]
    refit = false                    # optional: retrain the chosen point on train + validation

The points are the product of the lists (keys in name order, values in file order: that order is
the *grid order* of the points, which breaks ties). Every head configuration x seed of the grid
is expanded at every point, so every head gets the same points: the budget is equal by
construction. Each point is a cell of its own (its recipe differs, so its ``run_id`` does); the
cells of one head configuration x seed x data x backbone share a ``tune_group``. The choice
(:func:`bench.eval.tuning.select_points`) is the point with the best validation mAP, so the
grid's recipe must hold out a validation split: ``select = "best_val"``.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from typing import Any

from bench.config.identity import config_hash
from bench.config.recipe import KEYS, Recipe, resolve_recipe
from bench.core.errors import UsageError, choices

#: recipe keys a ``[tune]`` table may list: the optimisation of the head (a point's recipe may
#: differ from another's only in these, so points of a frozen backbone share one pass over the
#: same batches, each member with its own optimizer, schedule, loss and clipping)
TUNABLE: tuple[str, ...] = (
    "optimizer", "lr", "lrp", "momentum", "nesterov", "weight_decay",
    "schedule", "warmup_epochs", "step_size", "gamma",
    "loss", "asl_gamma_neg", "asl_gamma_pos", "asl_clip", "grad_clip",
)
#: why the other recipe keys cannot be tuned (shown in the error)
NOT_TUNABLE: dict[str, str] = {
    "protocol": "it changes what is trained (the backbone), not how the head is optimised",
    "freeze_backbone": "it changes what is trained (the backbone), not how the head is optimised",
    "epochs": "the budget is the points at a fixed training length; give epochs in [recipe]",
    "batch_size": "points of a frozen backbone share one pass over the same batches",
    "eval_batch_size": "it changes no result",
    "image_size": "it changes the data (the cached images and features), not the head",
    "augment": "it changes the data pipeline that points of one pass share",
    "crop_scale_min": "it changes the data pipeline that points of one pass share",
    "input_normalization": "it changes the data (the backbone's input)",
    "feature_dtype": "it changes the cached features, not the head",
    "mixed_precision": "an execution setting, not a recipe choice to tune",
    "select": "the choice among points is made on validation mAP; model selection must be select = 'best_val'",
    "val_fraction": "the validation split is what the points are chosen on: one split for every point",
}
OPTIONS = ("refit",)
#: the recipe's model selection a tuned grid needs (the validation mAP the choice is made on)
TUNE_SELECT = "best_val"


@dataclass(frozen=True)
class TuneSpec:
    """A parsed ``[tune]`` table: ``space`` maps each tuned key (name order) to its values (file
    order); ``refit``: retrain each chosen point on train + validation."""

    space: tuple[tuple[str, tuple[Any, ...]], ...]
    refit: bool = False

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(k for k, _ in self.space)

    def points(self) -> list[dict[str, Any]]:
        """Every point, in grid order: ``itertools.product`` of the value lists, keys in name order."""
        keys = self.keys
        return [dict(zip(keys, combo)) for combo in itertools.product(*(values for _, values in self.space))]

    def identity(self) -> dict[str, list[Any]]:
        """The search space as JSON (part of every tune group's id: another space is another choice)."""
        return {k: list(v) for k, v in self.space}


def parse_tune(table: Any, recipe_table: dict[str, Any], where: str) -> TuneSpec | None:
    """Validate a grid's ``[tune]`` table (None when the grid has none).

    Refused (UsageError, exit 2, naming the file and the key): a key that is not tunable
    (:data:`NOT_TUNABLE`, with the reason) or unknown; a value that is not a non-empty list without
    repeats; a base recipe without a validation split (``select`` other than ``"best_val"``).
    The values themselves are checked when each point's recipe is resolved (:func:`point_recipes`).
    """
    if table is None:
        return None
    if not isinstance(table, dict):
        raise UsageError(f"{where}: 'tune' must be a table [tune] of recipe keys with lists of values")
    space: dict[str, tuple[Any, ...]] = {}
    for key, values in table.items():
        if key in OPTIONS:
            continue
        if key in NOT_TUNABLE:
            raise UsageError(f"{where}: [tune] key {key!r} cannot be tuned ({NOT_TUNABLE[key]}); tunable keys: {choices(TUNABLE)}")
        if key not in KEYS:
            raise UsageError(f"{where}: unknown [tune] key {key!r}; tunable keys: {choices(TUNABLE)}; options: {choices(OPTIONS)}")
        if not isinstance(values, list) or not values:
            raise UsageError(
                f"{where}: [tune] {key} = {values!r} must be a non-empty list of values (a single value belongs in [recipe])"
            )
        if len({repr(v) for v in values}) != len(values):
            raise UsageError(f"{where}: [tune] {key} = {values!r} repeats a value (every point would be trained twice)")
        space[key] = tuple(values)
    if not space:
        raise UsageError(f"{where}: [tune] lists no key to tune; tunable keys: {choices(TUNABLE)}")
    refit = table.get("refit", False)
    if not isinstance(refit, bool):
        raise UsageError(f"{where}: [tune] refit = {refit!r} must be true or false")
    base = resolve_recipe(recipe_table, where)
    if base.select != TUNE_SELECT:
        why = ("it keeps the epoch with the best TEST mAP, so the choice would see the test labels"
               if base.select == "best_test" else "it holds out no validation split, so there is no validation mAP to choose on")
        raise UsageError(
            f"{where}: [tune] needs a validation split to choose on: recipe key 'select' = {base.select!r} is not allowed with "
            f"[tune] ({why}); set select = {TUNE_SELECT!r} in [recipe] (and val_fraction, default {KEYS['val_fraction'].default})"
        )
    return TuneSpec(tuple(sorted(space.items())), refit)


def point_recipes(spec: TuneSpec, recipe_table: dict[str, Any], where: str) -> list[tuple[dict[str, Any], Recipe]]:
    """(point values, resolved recipe) for every point in grid order: the grid's ``[recipe]``
    table with the point's values on top, validated as any recipe. A point where a tuned key has
    no effect (e.g. ``asl_clip`` when the point's loss is not ASL) or two points with the same
    recipe are usage errors: they would train one thing twice."""
    out: list[tuple[dict[str, Any], Recipe]] = []
    seen: dict[str, int] = {}
    for i, point in enumerate(spec.points()):
        label = f"{where} [tune] point {i + 1} ({', '.join(f'{k}={v!r}' for k, v in point.items())})"
        recipe = resolve_recipe({**recipe_table, **point}, label)
        resolved = recipe.to_dict()
        idle = [k for k in point if not KEYS[k].in_effect(resolved)]
        if idle:
            key = idle[0]
            cond, value = KEYS[key].applies_when  # type: ignore[misc]
            raise UsageError(
                f"{label}: tuned key {key!r} has no effect unless {cond} = {value!r}; tune it only where it applies "
                f"(set {cond} = {value!r} in [recipe] or drop {key!r} from [tune])"
            )
        text = repr(sorted(recipe.identity().items()))
        if text in seen:
            raise UsageError(f"{label}: gives the same recipe as point {seen[text] + 1}; remove the repeated value")
        seen[text] = i
        out.append((point, recipe))
    return out


def refit_recipe(recipe: Recipe, point: dict[str, Any]) -> Recipe:
    """The recipe a refit cell trains with once its group's point is chosen: the chosen point's
    values on the refit cell's recipe (which keeps the whole training split: ``select = "last"``)."""
    unknown = sorted(set(point) - set(TUNABLE))
    if unknown:
        raise ValueError(f"a chosen point holds keys that cannot be tuned: {unknown}")
    return recipe.replace(**point)


def refit_base(recipe: Recipe) -> Recipe:
    """A refit cell's recipe before the choice: the grid's recipe training on train + validation
    (``select = "last"``, no held-out split)."""
    return recipe.replace(select="last", val_fraction=KEYS["val_fraction"].default)


def refit_cells(cells: list[Any], recipe: Recipe) -> list[Any]:
    """``[tune] refit = true``: per tune group of a trained head (a derived head, which has a
    ``source_run_id``, is not refit), one cell with the grid's recipe on train + validation
    (:func:`refit_base`) that depends on every point of its group (``tune_sources``).

    Args:
        cells: the expanded cells (``bench.config.grid.Cell``) of a tuned grid.
        recipe: the grid's resolved ``[recipe]``.
    """
    groups: dict[str, list[Any]] = {}
    for cell in cells:
        if cell.tune_space is not None and cell.source_run_id is None:
            groups.setdefault(cell.tune_group, []).append(cell)
    return [
        dataclasses.replace(members[0], recipe=refit_base(recipe), tune_point=None, tune_index=None, tune_refit=True,
                            tune_sources=tuple(c.run_id for c in members))
        for members in groups.values()
    ]


def tune_group(cell: Any) -> str | None:
    """The identity of a tuned cell (``bench.config.grid.Cell``) up to its point: head
    configuration x seed x data x backbone x protocol x the untuned recipe x the search space.
    A group's points and its refit share it; the choice is made among a group's points."""
    if cell.tune_space is None:
        return None
    config = cell.config()
    untuned = set(cell.tune_space) | {"select", "val_fraction"}
    config["recipe"] = {k: v for k, v in config["recipe"].items() if k not in untuned}
    config["tune"] = {"space": cell.tune_space}
    return config_hash(config)


def tune_fields(cell: Any) -> dict[str, Any]:
    """The result-row columns of a tuned cell (bench/results/schema.py); empty when untuned. A
    refit's ``tune_point`` / ``tune_index`` are its chosen point's, set when it runs."""
    if cell.tune_space is None:
        return {}
    points = 1
    for values in cell.tune_space.values():
        points *= len(values)
    return {"tune_group": tune_group(cell), "tune_point": cell.tune_point, "tune_index": cell.tune_index,
            "tune_points": points, "tune_default": cell.tune_default, "tune_refit": cell.tune_refit}


def tune_family(cell: Any) -> str:
    """The ``--shard`` family of a tuned cell: its tune group (points and refit), or on a frozen
    backbone the tune groups of every head that shares its pass (the key ignores the head)."""
    if not (cell.recipe.protocol == "frozen" or cell.recipe.freeze_backbone):
        return "tune:" + str(tune_group(cell))
    return "tune:" + config_hash({"group": tune_group(dataclasses.replace(cell, head="", hparams={})), "root": cell.root})
