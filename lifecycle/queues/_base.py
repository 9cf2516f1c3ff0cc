"""What a worker needs from a queue. A message names a job and carries its JSON
payload; it is acknowledged only after the job and its whole teardown succeeded."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(slots=True)
class Delivery:
    """One received message."""

    id: str
    job: str
    payload: Any
    attempt: int = 1  # 1-based; a retry re-enqueues with attempt + 1
    deliveries: int = 1  # times handed to a consumer (a crashed worker's message comes again)
    enqueued_at: float = 0.0
    raw: Any = field(default=None, repr=False)  # backend-specific handle


class Queue(Protocol):
    async def enqueue(
        self, job: str, payload: Mapping[str, Any] | None = None, *, delay: float | None = None, attempt: int = 1
    ) -> str:
        """Add a message; return its id."""
        ...

    async def receive(self, limit: int, timeout: float) -> list[Delivery]:
        """Up to ``limit`` messages, waiting up to ``timeout`` seconds for the first."""
        ...

    async def ack(self, delivery: Delivery) -> None:
        """The job and its teardown succeeded: the message is done."""
        ...

    async def retry(self, delivery: Delivery, delay: float, error: str) -> None:
        """Run it again after ``delay`` seconds as attempt + 1; done with this delivery."""
        ...

    async def dead_letter(self, delivery: Delivery, record: Mapping[str, Any]) -> None:
        """Park it with the failure recorded; done with this delivery."""
        ...

    async def release(self, delivery: Delivery) -> None:
        """Not finished (shutdown): leave it for another consumer."""
        ...

    async def heartbeat(self, deliveries: Sequence[Delivery]) -> None:
        """Still working on these: keep other consumers from reclaiming them."""
        ...

    async def close(self) -> None: ...
