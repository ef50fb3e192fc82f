"""Numbers read from the environment, checked like a grid's settings: a value that is not a
finite number inside its range is a :class:`~bench.core.errors.UsageError` naming the variable,
the value and the range (exit status 2 before any training), never a traceback or a silent
fallback.
"""

from __future__ import annotations

import math
import os

from bench.core.errors import UsageError


def env_number(name: str, default: float | None, lo: float, hi: float, unit: str = "") -> float | None:
    """``$name`` as a float in ``lo .. hi`` (inclusive); ``default`` when unset or empty.

    Args:
        name: the environment variable, e.g. ``HEADBENCH_LOCK_STALE_S``.
        default: returned when the variable is unset or blank (None: "not set").
        lo, hi: the allowed range; NaN and infinities are never allowed.
        unit: a word for the message (``"seconds"``, ``"MiB"``).
    """
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and lo <= value <= hi):
        unit_text = f" {unit}" if unit else ""
        fallback = f"; unset it for the default ({default:.12g}{unit_text})" if default is not None else "; unset it for the automatic choice"
        raise UsageError(f"${name} = {text!r}: expected a finite number of{unit_text or ' units'} in {lo:.12g} .. {hi:.12g}{fallback}")
    return value
