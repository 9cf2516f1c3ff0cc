"""Bounding teardowns without a timer per teardown.

Arming a cancel-scope deadline costs a timer on asyncio (about 5 µs each); jobs tear
down several generators each. Instead one watchdog task per runtime keeps a deadline
per job in teardown, keyed by the job's guard scope: ``arm`` (re)starts the clock as
each suspending teardown begins (it keeps running through the inline sync teardowns
between them) and ``disarm`` stops it. A deadline is always set to now plus the one
shared timeout, so a new deadline is never earlier than one already set: the watchdog
can sleep until the earliest deadline it saw and never wake late. When a deadline
passes it removes it and cancels that guard; the job sees its guard gone from
``deadlines`` (only the watchdog removes an armed guard before the job's teardown
ends) and reports the overrun.

This class is the whole protocol: ``arm``, ``restart``, ``fired`` and ``disarm`` are
all the engine's teardown loop and the generated code ever call."""

from __future__ import annotations

import time
from typing import Any

import anyio


class Watchdog:
    """Bounds every suspending teardown of one runtime's jobs by ``timeout`` seconds.

    Args:
        timeout: the runtime's ``teardown_timeout``, in seconds, per teardown.
    """

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._deadlines: dict[Any, float] = {}  # guard cancel scope -> monotonic deadline
        self._wakeup: anyio.Event | None = None
        self._first = 0.0  # the deadline that woke the idle watchdog

    def arm(self, guard: Any) -> None:
        """Start, or restart, the clock for the teardown now running under ``guard``."""
        deadline = self._deadlines[guard] = time.monotonic() + self.timeout
        if self._wakeup is not None:
            self._first = deadline
            self._wakeup.set()
            self._wakeup = None

    def restart(self, guard: Any) -> None:
        """Restart the clock of a ``guard`` armed earlier in the same teardown (and not
        fired): ``arm`` without its wake-up check, for the next suspending teardown. An
        earlier deadline is already set, so the watchdog is on a timer, not asleep."""
        self._deadlines[guard] = time.monotonic() + self.timeout

    def fired(self, guard: Any) -> bool:
        """Whether the armed ``guard`` overran (and was cancelled)."""
        return guard not in self._deadlines

    def disarm(self, guard: Any) -> None:
        """Stop the clock of ``guard``: its job's teardown has ended."""
        self._deadlines.pop(guard, None)

    async def run(self) -> None:
        """Cancel each guard whose deadline passed, until cancelled itself."""
        deadlines = self._deadlines
        while True:
            if deadlines:
                now = time.monotonic()
                for guard in [guard for guard, deadline in deadlines.items() if deadline <= now]:
                    del deadlines[guard]
                    guard.cancel()
            if deadlines:
                until = min(deadlines.values())
            else:
                self._wakeup = wakeup = anyio.Event()
                await wakeup.wait()
                # Sleep until the deadline that woke us even if that teardown has ended by
                # then: later deadlines are later still, and jobs arming meanwhile find the
                # watchdog on a timer, with nothing to wake (one wake-up per timeout
                # period, not one per job).
                until = self._first
            # Never negative (trio refuses that): the loop may run us after `until`.
            await anyio.sleep(max(0.0, until - time.monotonic()))
