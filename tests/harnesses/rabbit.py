"""RabbitQueue against the real RabbitMQ (asyncio only): "another consumer" is a second
queue object on the same quorum queue, with a connection of its own."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from . import Harness

CASES = [pytest.param(("rabbit", "asyncio"), id="rabbit-asyncio", marks=pytest.mark.rabbitmq)]
RABBIT_URL = os.environ.get("LIFECYCLE_TEST_RABBIT_URL", "amqp://guest:guest@127.0.0.1:5672/")


async def delete_queues(url: str, name: str) -> None:
    """Delete a test's queues: the main one, its dead-letter stream and delay queues."""
    import aio_pika

    from lifecycle.queues._rabbit import DELAY_BUCKETS

    connection = await aio_pika.connect(url)
    try:
        for queue in [name, f"{name}.dead", *(f"{name}.delay.{b}" for b in DELAY_BUCKETS)]:
            channel = await connection.channel()
            await channel.queue_delete(queue, if_unused=False, if_empty=False)
            await channel.close()
    finally:
        await connection.close()


def reachable(url: str = RABBIT_URL) -> None:
    """Raise if the broker does not accept a connection (for ``require_service``)."""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 5672), timeout=2).close()


@asynccontextmanager
async def harness(request: pytest.FixtureRequest, lease: float) -> AsyncIterator[Harness]:
    from support import require_service

    from lifecycle.queues import RabbitQueue

    require_service("RabbitMQ", reachable)
    name = f"lifecycle-contract-{uuid.uuid4().hex[:12]}"

    def make() -> RabbitQueue:
        return RabbitQueue(RABBIT_URL, queue=name, lease=lease)

    rabbit = Harness(make(), make, cancels_due=False)
    rabbit.other = rabbit.track(make)
    try:
        yield rabbit
    finally:
        await rabbit.close()
        await delete_queues(RABBIT_URL, name)
