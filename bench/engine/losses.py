"""The training loss a recipe names."""

from __future__ import annotations

from torch import nn

from bench.api.registry import build_loss
from bench.config.recipe import Recipe


def make_loss(recipe: Recipe) -> nn.Module:
    """The loss the recipe's ``loss`` key names (``bench.models.losses``), with the recipe's
    parameters for it (keys ``<loss>_<param>``, e.g. ``asl_gamma_neg``)."""
    name = recipe.loss
    params = {k[len(name) + 1 :]: v for k, v in recipe.to_dict().items() if k.startswith(f"{name}_")}
    return build_loss(name, **params)
