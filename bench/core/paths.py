"""Where headbench keeps what it generates or caches (decoded images, features, generated data)."""

from __future__ import annotations

import inspect
import os
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """``$HEADBENCH_CACHE`` (default ``~/.cache/headbench``), joined with ``parts``."""
    base = os.environ.get("HEADBENCH_CACHE")
    return (Path(base) if base else Path.home() / ".cache" / "headbench").joinpath(*parts)


#: the repository root: ``configs/``, ``heads/``, ``datasets/`` and ``docs/`` live here
PROJECT_ROOT = Path(__file__).resolve().parents[2]


def source_file(obj: object) -> str:
    """The file that defines ``obj``, relative to the project when inside it (for messages)."""
    try:
        path = Path(inspect.getfile(obj))  # type: ignore[arg-type]
    except (TypeError, OSError):
        return "<unknown file>"
    try:
        return str(path.relative_to(PROJECT_ROOT))
    except ValueError:
        return str(path)
