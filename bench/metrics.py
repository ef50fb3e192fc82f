"""Stable public name: the SPEC §1 metrics live in :mod:`bench.eval.metrics`."""

from bench.eval.metrics import *  # noqa: F401,F403
from bench.eval.metrics import __all__  # noqa: F401
