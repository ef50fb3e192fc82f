"""Stable public name: the plugin registry lives in :mod:`bench.api` (``bench.api.registry``)."""

from bench.api.registry import *  # noqa: F401,F403
from bench.api.registry import __all__  # noqa: F401
