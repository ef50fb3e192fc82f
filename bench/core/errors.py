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
