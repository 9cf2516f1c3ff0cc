"""An in-process queue: for tests, for one-process pipelines, and as the reference
behaviour of the Queue contract (see ``_base``). Works on asyncio and trio.

- Payloads go through JSON on the way in, as they would through a broker, so a payload
  that could not cross a real queue fails here too.
- Each handed-out delivery is its own object: settling checks that object against the
  one in flight, so a stale holder (its lease expired and the message went to another
  consumer) or a repeated settle changes nothing.
- With ``lease`` set, a delivery not renewed for ``lease`` seconds is handed out again
  with ``deliveries + 1``, as a broker does when a consumer dies."""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import json
import time
from collections import deque
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import anyio

from ._base import Delivery, encode_headers, encode_payload, job_name

if TYPE_CHECKING:
    from .._job import Job


class MemoryQueue:
    """A queue held in memory by one process.

    Args:
        lease: seconds a received message stays with its consumer without ``renew``
            before it is handed out again; None (the default) never takes it back.
    """

    def __init__(self, *, lease: float | None = None) -> None:
        if lease is not None and lease <= 0:
            raise ValueError(f"lease must be positive or None, got {lease!r}")
        self.lease = lease
        self._ready: deque[Delivery] = deque()
        self._delayed: list[tuple[float, int, Delivery]] = []
        self._in_flight: dict[str, tuple[Delivery, float]] = {}  # id -> (delivery, lease expiry)
        self._dead: dict[str, dict[str, Any]] = {}  # insertion order = age
        self._ids = itertools.count(1)
        self._wakeup: anyio.Event | None = None
        self.acked = 0

    def __len__(self) -> int:
        """Messages not yet done: ready, delayed or in flight."""
        return len(self._ready) + len(self._delayed) + len(self._in_flight)

    @property
    def in_flight(self) -> int:
        """Messages handed out and not yet settled."""
        return len(self._in_flight)

    async def open(self) -> None:
        """Nothing to connect to: always ready."""
        return None

    async def enqueue(
        self,
        job: str | Job[..., Any],
        payload: Mapping[str, Any] | None = None,
        *,
        delay: float | None = None,
        at: float | None = None,
        attempt: int = 1,
        headers: Mapping[str, str] | None = None,
    ) -> str:
        """See ``Queue.enqueue``."""
        return self.enqueue_nowait(job, payload, delay=delay, at=at, attempt=attempt, headers=headers)

    def enqueue_nowait(
        self,
        job: str | Job[..., Any],
        payload: Mapping[str, Any] | None = None,
        *,
        delay: float | None = None,
        at: float | None = None,
        attempt: int = 1,
        headers: Mapping[str, str] | None = None,
    ) -> str:
        """``enqueue`` from sync code (a module filling a queue at import, a test); the
        arguments are those of ``Queue.enqueue``."""
        if delay is not None and at is not None:
            raise ValueError("give delay or at, not both")
        name, body = job_name(job, payload)
        body = json.loads(encode_payload(body))
        text = encode_headers(name, headers)  # the same checks as a broker's, kept as a copy
        delivery = Delivery(str(next(self._ids)), name, body, attempt, 0, time.time())
        if text is not None:
            delivery.headers = json.loads(text)
        if at is not None:
            delay = at - time.time()
        self._schedule(delivery, delay)
        return delivery.id

    def _schedule(self, delivery: Delivery, delay: float | None) -> None:
        if delay is not None and delay > 0:
            heapq.heappush(self._delayed, (time.monotonic() + delay, next(self._ids), delivery))
        else:
            self._ready.append(delivery)
        self._wake()

    def _wake(self) -> None:
        if self._wakeup is not None:
            self._wakeup.set()
            self._wakeup = None

    def _promote_due(self) -> float | None:
        """Move due delayed messages, and expired leases, to ready; return seconds until
        the next one is due."""
        now = time.monotonic()
        while self._delayed and self._delayed[0][0] <= now:
            self._ready.append(heapq.heappop(self._delayed)[2])
        next_due = self._delayed[0][0] - now if self._delayed else None
        if self.lease is not None and self._in_flight:
            for key, (held, expiry) in list(self._in_flight.items()):
                if expiry <= now:  # its consumer stopped renewing: hand it out again
                    del self._in_flight[key]
                    self._ready.append(held)
                elif next_due is None or expiry - now < next_due:
                    next_due = expiry - now
        return next_due

    async def receive(self, limit: int, timeout: float) -> list[Delivery]:
        """See ``Queue.receive``; also takes back expired leases."""
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
        expiry = time.monotonic() + self.lease if self.lease is not None else float("inf")
        while self._ready and len(batch) < limit:
            queued = self._ready.popleft()
            delivery = dataclasses.replace(queued, deliveries=queued.deliveries + 1)
            self._in_flight[delivery.id] = (delivery, expiry)
            batch.append(delivery)
        return batch

    def _take(self, delivery: Delivery) -> bool:
        """Settle ``delivery`` if it is the one in flight (owner check)."""
        held = self._in_flight.get(delivery.id)
        if held is None or held[0] is not delivery:
            return False
        del self._in_flight[delivery.id]
        return True

    async def ack(self, delivery: Delivery) -> bool:
        """See ``Queue.ack``."""
        if not self._take(delivery):
            return False
        self.acked += 1
        return True

    async def retry(self, delivery: Delivery, delay: float, error: str) -> bool:
        """See ``Queue.retry``."""
        if not self._take(delivery):
            return False
        self._schedule(dataclasses.replace(delivery, attempt=delivery.attempt + 1, deliveries=0), delay)
        return True

    async def dead_letter(self, delivery: Delivery, record: Mapping[str, Any]) -> bool:
        """See ``Queue.dead_letter``."""
        if not self._take(delivery):
            return False
        dead_id = str(next(self._ids))
        self._dead[dead_id] = {**record, "dead_letter_id": dead_id}
        return True

    async def release(self, delivery: Delivery) -> bool:
        """See ``Queue.release``: back at the front of the queue."""
        if not self._take(delivery):
            return False
        # Back at the front, the delivery not counted: shutdown is not the job's fault.
        self._ready.appendleft(dataclasses.replace(delivery, deliveries=delivery.deliveries - 1))
        self._wake()
        return True

    async def renew(self, deliveries: Sequence[Delivery]) -> list[str]:
        """See ``Queue.renew``."""
        lost = []
        expiry = time.monotonic() + self.lease if self.lease is not None else float("inf")
        for delivery in deliveries:
            held = self._in_flight.get(delivery.id)
            if held is None or held[0] is not delivery:
                lost.append(delivery.id)
            else:
                self._in_flight[delivery.id] = (delivery, expiry)
        return lost

    async def dead_letters(self, count: int = 100, before: str | None = None) -> list[dict[str, Any]]:
        """See ``Queue.dead_letters``."""
        newest_first = reversed(self._dead.values())
        if before is not None:
            newest_first = (record for record in newest_first if int(record["dead_letter_id"]) < int(before))
        return [dict(record) for record in itertools.islice(newest_first, count)]

    async def replay(self, ids: Sequence[str]) -> int:
        """See ``Queue.replay``."""
        replayed = 0
        for dead_id in ids:
            record = self._dead.get(dead_id)
            if record is None or record.get("reason") == "malformed" or not isinstance(record.get("payload"), dict):
                continue
            del self._dead[dead_id]
            self.enqueue_nowait(record["job"], record["payload"], headers=record.get("headers"))
            replayed += 1
        return replayed

    async def purge(self, ids: Sequence[str] | None = None) -> int:
        """See ``Queue.purge``."""
        if ids is None:
            count = len(self._dead)
            self._dead.clear()
            return count
        return sum(self._dead.pop(dead_id, None) is not None for dead_id in ids)

    async def close(self) -> None:
        """Nothing to release."""
        return None

