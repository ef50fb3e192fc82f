"""Stable public name: :class:`HeadContext` lives in :mod:`bench.api` (``bench.api.context``)."""

from bench.api.context import HeadContext

__all__ = ["HeadContext"]
