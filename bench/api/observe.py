"""Which training labels are observed: the dataset option ``observe`` and the mask it draws.

Every dataset accepts three harness-level options (a grid's ``[[datasets]]`` entry), which never
reach the plugin's ``__init__`` (``bench.api.registry.build_dataset`` strips them)::

    observe = "all"              # default: every label the source annotates is observed
    observe = "single_positive"  # one positive per training image, drawn uniformly among its
                                 # observed positives; every other label unknown (none for an
                                 # image without a positive)
    observe = "fraction"         # each label observed independently with probability
    observe_fraction = 0.1       #   observe_fraction in (0, 1]
    observe_seed = 0             # the draw's seed (default 0)

The mask is applied to the TRAINING split only; the test split is always evaluated on its full
labels. It is drawn by :func:`observed_mask` from the split's targets, the source's own mask (a
``folder`` manifest may mark labels unknown) and the options alone — never from the head, the
run's seed or any head metadata — so every head and seed of a grid sees the same labels. An
unknown label is neither positive nor negative: what a loss does with it is the recipe's
``unknown_labels`` (``bench.models.losses``). This mask is a property of the DATA; it is not a
head's label state (a head that reads known labels at training time, like C-Tran, gets those
from the engine under its own metadata, never from this mask).

The draw: ``u = default_rng(observe_seed).random((N, C))`` (float64); ``fraction`` keeps the
entries with ``u < observe_fraction`` (so with one seed, the labels kept at 0.1 are a subset of
those kept at 0.5); ``single_positive`` keeps, per image, the observed positive with the largest
``u`` (uniform among its positives, as the u are i.i.d.).

With ``observe = "all"`` the options are left out of a dataset's options altogether (and so out of
the run identity): grids that never name them keep their run ids.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from bench.core.errors import UsageError, choices

OBSERVE_MODES = ("all", "single_positive", "fraction")
#: the option keys and their defaults
OBSERVE_DEFAULTS: dict[str, Any] = {"observe": "all", "observe_fraction": 1.0, "observe_seed": 0}
OBSERVE_KEYS = tuple(OBSERVE_DEFAULTS)
MAX_OBSERVE_SEED = 2**32 - 1


@dataclass(frozen=True)
class Observe:
    """A validated observe setting: ``mode`` in :data:`OBSERVE_MODES`, ``fraction`` in (0, 1]
    (used by ``"fraction"`` only), ``seed`` >= 0 (unused by ``"all"``)."""

    mode: str = "all"
    fraction: float = 1.0
    seed: int = 0

    @classmethod
    def from_options(cls, options: Mapping[str, Any], where: str = "dataset options") -> "Observe":
        """The setting in a dataset's options (missing keys take their defaults); other keys are
        not looked at. Raises :class:`UsageError` naming ``where``, the key and the allowed values."""
        mode = options.get("observe", OBSERVE_DEFAULTS["observe"])
        if mode not in OBSERVE_MODES:
            raise UsageError(f"{where}: observe = {mode!r} is not allowed; expected one of {choices(OBSERVE_MODES)}")
        fraction = options.get("observe_fraction", OBSERVE_DEFAULTS["observe_fraction"])
        if isinstance(fraction, int) and not isinstance(fraction, bool):
            fraction = float(fraction)
        if not isinstance(fraction, float) or not math.isfinite(fraction) or not 0.0 < fraction <= 1.0:
            raise UsageError(f"{where}: observe_fraction = {fraction!r} is not allowed; expected a number in (0, 1]")
        if "observe_fraction" in options and mode != "fraction":
            raise UsageError(f"{where}: observe_fraction is used only with observe = 'fraction' (observe is {mode!r}); remove it or set observe = 'fraction'")
        seed = options.get("observe_seed", OBSERVE_DEFAULTS["observe_seed"])
        if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= MAX_OBSERVE_SEED:
            raise UsageError(f"{where}: observe_seed = {seed!r} is not allowed; expected an integer in 0 .. {MAX_OBSERVE_SEED}")
        if "observe_seed" in options and mode == "all":
            raise UsageError(f"{where}: observe_seed is used only with observe = 'fraction' or 'single_positive' (observe is 'all'); remove it")
        return cls(mode, fraction if mode == "fraction" else 1.0, seed if mode != "all" else 0)

    def options(self) -> dict[str, Any]:
        """The canonical option keys of this setting, as they enter a dataset's options (and so the
        run identity): none for ``"all"``; ``observe`` and ``observe_seed`` otherwise, plus
        ``observe_fraction`` for ``"fraction"``."""
        if self.mode == "all":
            return {}
        out: dict[str, Any] = {"observe": self.mode, "observe_seed": self.seed}
        if self.mode == "fraction":
            out["observe_fraction"] = self.fraction
        return out

    def describe(self) -> str:
        """The setting in words (report section headers)."""
        if self.mode == "all":
            return "all training labels observed"
        if self.mode == "fraction":
            return f"each training label observed with probability {self.fraction:g} (observe_seed {self.seed}), the rest unknown"
        return f"one positive label per training image observed (observe_seed {self.seed}), the rest unknown"


def split_observe(options: Mapping[str, Any], where: str = "dataset options") -> tuple[dict[str, Any], Observe]:
    """A dataset's options -> (the plugin's own options, the validated observe setting)."""
    own = {k: v for k, v in options.items() if k not in OBSERVE_KEYS}
    return own, Observe.from_options({k: v for k, v in options.items() if k in OBSERVE_KEYS}, where)


def observed_mask(targets: np.ndarray, observe: Observe | Mapping[str, Any], known: np.ndarray | None = None) -> np.ndarray:
    """The observed mask of a TRAINING split.

    Args:
        targets: {0, 1} array [N, C] (the split's targets).
        observe: an :class:`Observe`, or a dataset's options holding the observe keys.
        known: bool [N, C], the labels the source itself annotates (None: all); an entry the
            source leaves unknown is never observed.

    Returns:
        bool [N, C]; True where the label is observed. It depends on ``targets``, ``known`` and
        the setting only.
    """
    setting = observe if isinstance(observe, Observe) else split_observe(observe)[1]
    targets = np.asarray(targets)
    if targets.ndim != 2:
        raise ValueError(f"targets must be [N, C], got shape {targets.shape}")
    source = np.ones(targets.shape, dtype=bool) if known is None else np.asarray(known, dtype=bool)
    if source.shape != targets.shape:
        raise ValueError(f"known {source.shape} and targets {targets.shape} disagree")
    if setting.mode == "all":
        return source.copy()
    draw = np.random.default_rng(setting.seed).random(targets.shape)
    if setting.mode == "fraction":
        return source & (draw < setting.fraction)
    positive = source & (targets > 0)
    score = np.where(positive, draw, -1.0)
    chosen = np.argmax(score, axis=1)
    mask = np.zeros(targets.shape, dtype=bool)
    rows = np.flatnonzero(positive.any(axis=1))
    mask[rows, chosen[rows]] = True
    return mask


def observe_fields(options: Mapping[str, Any], mask: np.ndarray | None) -> dict[str, Any]:
    """A run's row fields about its observed labels (``bench.results.schema``).

    Args:
        options: the run's dataset options (``cell.dataset_options``).
        mask: the training split's observed mask, bool [N, C] (None: not known, e.g. a run that
            failed before its data was read).

    Returns:
        ``observe`` (the mode), ``observe_fraction`` (the asked probability; None unless
        ``"fraction"``) and ``observed_fraction`` (the realised share of observed entries of
        the training split, N x C; None without a mask).
    """
    setting = split_observe(options)[1]
    share = None if mask is None or np.asarray(mask).size == 0 else float(np.asarray(mask, dtype=bool).mean())
    return {
        "observe": setting.mode,
        "observe_fraction": setting.fraction if setting.mode == "fraction" else None,
        "observed_fraction": share,
    }
