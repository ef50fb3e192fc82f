"""Clean stops on SIGINT / SIGTERM: finish the current step, write nothing half-done, exit.

The first signal sets a flag that the training loop reads between steps (combined across
processes, so all stop together); the run's last epoch checkpoint stays for the next launch. A
second SIGINT interrupts at once.
"""

from __future__ import annotations

import signal
from types import FrameType


class Interrupted(Exception):
    """A stop was requested by a signal; raised between training steps."""


class StopRequest:
    """Installs SIGINT/SIGTERM handlers while active (``with StopRequest() as stop: ...``)."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signal is not None

    @property
    def exit_status(self) -> int:
        """128 + the signal number, as a shell reports a process stopped by it."""
        return 128 + (self.signal or 0)

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        self.signal = signum
        if signum == signal.SIGINT:  # a second Ctrl-C stops at once
            signal.signal(signal.SIGINT, signal.default_int_handler)

    def __enter__(self) -> "StopRequest":
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no handlers, no clean stop
                pass
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
