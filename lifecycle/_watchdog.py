"""Bounding teardowns without a timer per teardown.

Arming a cancel-scope deadline costs a timer on asyncio (about 5 µs each); jobs tear
down several generators each. Instead every teardown takes a ticket from one watchdog
task per runtime. All tickets share the same timeout, so deadlines arrive in order and
a FIFO queue is enough: the watchdog sleeps until the oldest open ticket's deadline and
cancels that ticket's scope if its teardown is still running."""

from __future__ import annotations

import time
from collections import deque

import anyio
from anyio import CancelScope


class Ticket:
    __slots__ = ("deadline", "done", "fired", "scope")

    def __init__(self, scope: CancelScope, deadline: float) -> None:
        self.scope = scope
        self.deadline = deadline
        self.done = False
        self.fired = False


class Watchdog:
    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._queue: deque[Ticket] = deque()
        self._wakeup: anyio.Event | None = None

    def arm(self, scope: CancelScope) -> Ticket:
        ticket = Ticket(scope, time.monotonic() + self.timeout)
        self._queue.append(ticket)
        if self._wakeup is not None:
            self._wakeup.set()
            self._wakeup = None
        return ticket

    def disarm(self, ticket: Ticket) -> None:
        ticket.done = True
        queue = self._queue
        while queue and queue[0].done:
            queue.popleft()

    async def run(self) -> None:
        queue = self._queue
        while True:
            if not queue:
                self._wakeup = wakeup = anyio.Event()
                await wakeup.wait()
                continue
            ticket = queue[0]
            if ticket.done:
                queue.popleft()
                continue
            delay = ticket.deadline - time.monotonic()
            if delay > 0:
                await anyio.sleep(delay)
                continue
            queue.popleft()
            ticket.fired = True
            ticket.scope.cancel()
