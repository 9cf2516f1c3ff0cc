"""An in-process queue: for tests, for one-process pipelines, and as the reference
behaviour of the Queue protocol. Works on asyncio and trio."""

from __future__ import annotations

import heapq
import itertools
import json
import time
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

import anyio

from ._base import Delivery


class MemoryQueue:
    """Payloads go through JSON on the way in, as they would through a broker, so a
    payload that could not cross a real queue fails here too."""

    def __init__(self) -> None:
        self._ready: deque[Delivery] = deque()
        self._delayed: list[tuple[float, int, Delivery]] = []
        self._in_flight: dict[str, Delivery] = {}
        self._ids = itertools.count(1)
        self._wakeup: anyio.Event | None = None
        self.dead_letters: list[dict[str, Any]] = []
        self.acked = 0

    def __len__(self) -> int:
        """Messages not yet done: ready, delayed or in flight."""
        return len(self._ready) + len(self._delayed) + len(self._in_flight)

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    async def enqueue(
        self, job: str, payload: Mapping[str, Any] | None = None, *, delay: float | None = None, attempt: int = 1
    ) -> str:
        return self.enqueue_nowait(job, payload, delay=delay, attempt=attempt)

    def enqueue_nowait(
        self, job: str, payload: Mapping[str, Any] | None = None, *, delay: float | None = None, attempt: int = 1
    ) -> str:
        """``enqueue`` from sync code (a module filling a queue at import, a test)."""
        body = json.loads(json.dumps(dict(payload or {})))
        delivery = Delivery(str(next(self._ids)), job, body, attempt, 0, time.time())
        self._schedule(delivery, delay)
        return delivery.id

    def _schedule(self, delivery: Delivery, delay: float | None) -> None:
        if delay:
            heapq.heappush(self._delayed, (time.monotonic() + delay, next(self._ids), delivery))
        else:
            self._ready.append(delivery)
        self._wake()

    def _wake(self) -> None:
        if self._wakeup is not None:
            self._wakeup.set()
            self._wakeup = None

    def _promote_due(self) -> float | None:
        """Move due delayed messages to ready; return seconds until the next one."""
        now = time.monotonic()
        while self._delayed and self._delayed[0][0] <= now:
            self._ready.append(heapq.heappop(self._delayed)[2])
        return self._delayed[0][0] - now if self._delayed else None

    async def receive(self, limit: int, timeout: float) -> list[Delivery]:
        deadline = time.monotonic() + timeout
        while True:
            next_due = self._promote_due()
            if self._ready:
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return []
            wait = remaining if next_due is None else min(remaining, next_due)
            self._wakeup = wakeup = anyio.Event()
            with anyio.move_on_after(wait):
                await wakeup.wait()
        batch: list[Delivery] = []
        while self._ready and len(batch) < limit:
            delivery = self._ready.popleft()
            delivery.deliveries += 1
            self._in_flight[delivery.id] = delivery
            batch.append(delivery)
        return batch

    async def ack(self, delivery: Delivery) -> None:
        self._in_flight.pop(delivery.id, None)
        self.acked += 1

    async def retry(self, delivery: Delivery, delay: float, error: str) -> None:
        self._in_flight.pop(delivery.id, None)
        again = Delivery(delivery.id, delivery.job, delivery.payload, delivery.attempt + 1, 0, delivery.enqueued_at)
        self._schedule(again, delay)

    async def dead_letter(self, delivery: Delivery, record: Mapping[str, Any]) -> None:
        self._in_flight.pop(delivery.id, None)
        self.dead_letters.append(dict(record))

    async def release(self, delivery: Delivery) -> None:
        if self._in_flight.pop(delivery.id, None) is not None:
            self._ready.appendleft(delivery)
            self._wake()

    async def heartbeat(self, deliveries: Sequence[Delivery]) -> None:
        return None

    async def close(self) -> None:
        return None
