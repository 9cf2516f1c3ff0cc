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
ends) and reports the overrun. The generated teardown restarts the clock by writing
``deadlines[guard]`` itself after the first ``arm``."""

from __future__ import annotations

import time
from typing import Any

import anyio


class Watchdog:
    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.deadlines: dict[Any, float] = {}  # guard cancel scope -> monotonic deadline
        self._wakeup: anyio.Event | None = None
        self._first = 0.0  # the deadline that woke the idle watchdog

    def arm(self, guard: Any) -> None:
        """Start, or restart, the clock for the teardown now running under ``guard``."""
        deadline = self.deadlines[guard] = time.monotonic() + self.timeout
        if self._wakeup is not None:
            self._first = deadline
            self._wakeup.set()
            self._wakeup = None

    def fired(self, guard: Any) -> bool:
        """Whether the armed ``guard`` overran (and was cancelled)."""
        return guard not in self.deadlines

    def disarm(self, guard: Any) -> None:
        self.deadlines.pop(guard, None)

    async def run(self) -> None:
        deadlines = self.deadlines
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
