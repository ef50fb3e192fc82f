"""The training loss a recipe names."""

from __future__ import annotations

from torch import nn

from bench.api.registry import build_loss
from bench.config.recipe import Recipe
from bench.models.losses import loss_params


def make_loss(recipe: Recipe) -> nn.Module:
    """The loss the recipe's ``loss`` key names (``bench.models.losses``), with the recipe's
    parameters for it (keys ``<loss>_<param>``, e.g. ``asl_gamma_neg``)."""
    return build_loss(recipe.loss, **loss_params(recipe.loss, recipe.to_dict()))
