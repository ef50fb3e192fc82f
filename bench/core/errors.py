"""The harness's error types.

Every error a user can cause (a typo in a grid file, an unknown head, a missing dataset root, a
weights file that does not fit) is raised as a :class:`UsageError` whose message names the file or
key at fault and what would be valid. The CLI prints the message alone (no traceback) and exits
with status 2.
"""

from __future__ import annotations

from collections.abc import Iterable


class UsageError(Exception):
    """A problem with the user's input: a config, a name, a path or a file. Exit status 2."""


class DataError(UsageError):
    """A dataset on disk is missing, empty or malformed."""


class UnreadableImage(Exception):
    """Raised by ``load_image`` for a file that exists but cannot be decoded (skipped, counted)."""


def choices(values: Iterable[object]) -> str:
    """Render allowed values for an error message: ``'a', 'b', 'c'``."""
    return ", ".join(repr(v) for v in values)


class NoSpaceError(UsageError):
    """A write failed because the file system is full (``ENOSPC``, ``EDQUOT``). ``str()`` names
    the folder, the space it has and the space needed. Exit status 2, like any usage error: the
    fix is on the user's side (free space, or another results directory), and a rerun resumes."""

    def __init__(self, folder: object, needed: int | None, free: int | None, what: str = "") -> None:
        self.folder, self.needed, self.free = folder, needed, free
        need = f"at least {format_bytes(needed)}" if needed else "more space"
        have = f"{format_bytes(free)} free" if free is not None else "no free space"
        super().__init__(
            f"no space left in {folder}{f' writing {what}' if what else ''}: it has {have}, {need} is needed; "
            "free some space there (or give another results directory) and run the same command again: "
            "everything already finished is kept and nothing was half-written"
        )


def format_bytes(n: int | float) -> str:
    """``1536`` -> ``'1.5 KiB'``; bytes, KiB, MiB, GiB, TiB."""
    value = float(n)
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if abs(value) < 1024:
            return f"{value:.0f} bytes" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"
