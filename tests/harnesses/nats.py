"""NatsQueue against the real NATS server with JetStream (asyncio only): "another
consumer" is a second queue object on the same durable consumer. Each test gets
streams of its own, deleted afterwards."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress

import pytest
from support import require_service

from . import Harness

NATS_URL = os.environ.get("LIFECYCLE_TEST_NATS_URL", "nats://127.0.0.1:4222")
CASES = [pytest.param(("nats", "asyncio"), id="nats-asyncio", marks=pytest.mark.nats)]


def nats_url() -> str:
    """The test server's URL; skipped with a reason when it is unreachable (a failure
    under CI=true)."""

    def connect() -> None:
        from urllib.parse import urlsplit

        parts = urlsplit(NATS_URL)
        socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 4222), timeout=2).close()

    require_service("NATS", connect)
    return NATS_URL


async def delete_streams(url: str, stream: str) -> None:
    """Delete a queue's three streams (those that exist)."""
    import nats
    from nats.js.errors import NotFoundError

    client = await nats.connect(url)
    try:
        js = client.jetstream()
        for name in (stream, f"{stream}_DELAYED", f"{stream}_DEAD", f"{stream}_DEDUP"):
            with suppress(NotFoundError):
                await js.delete_stream(name)
    finally:
        await client.close()


@asynccontextmanager
async def harness(request: pytest.FixtureRequest, lease: float) -> AsyncIterator[Harness]:
    from lifecycle.queues import NatsQueue

    url = nats_url()
    stream = f"lifecycle-contract-{uuid.uuid4().hex[:12]}"

    def make() -> NatsQueue:
        return NatsQueue(url, stream=stream, subject=f"test.{stream}", lease=lease)

    made = Harness(make(), make)
    made.other = made.track(make)
    try:
        yield made
    finally:
        await made.close()
        await delete_streams(url, stream)
