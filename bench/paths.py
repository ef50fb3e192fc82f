"""Where headbench keeps what it generates or caches (decoded images, features, generated data)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """``$HEADBENCH_CACHE`` (default ``~/.cache/headbench``), joined with ``parts``."""
    base = os.environ.get("HEADBENCH_CACHE")
    return (Path(base) if base else Path.home() / ".cache" / "headbench").joinpath(*parts)
