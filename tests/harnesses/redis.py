"""RedisStreamQueue against the real Redis (asyncio only): "another consumer" is a
second queue object in the same consumer group."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from . import Harness

CASES = [pytest.param(("redis", "asyncio"), id="redis-asyncio", marks=pytest.mark.redis)]


@asynccontextmanager
async def harness(request: pytest.FixtureRequest, lease: float) -> AsyncIterator[Harness]:
    from redis.asyncio import Redis

    from lifecycle.queues import RedisStreamQueue

    url: str = request.getfixturevalue("redis_url")
    stream = f"lifecycle-contract-{uuid.uuid4().hex[:12]}"

    def make() -> RedisStreamQueue:
        # claim_interval=0: every receive looks for expired leases, as MemoryQueue does.
        return RedisStreamQueue(url, stream=stream, group="workers", claim_idle=lease, claim_interval=0)

    redis = Harness(make(), make)
    redis.other = redis.track(make)
    try:
        yield redis
    finally:
        await redis.close()
        client = Redis.from_url(url)
        await client.delete(stream, f"{stream}:dead", f"{stream}:delayed", f"{stream}:delayed:ids")
        async for key in client.scan_iter(match=f"{stream}:dedup:*"):  # the dedup keys of this stream only
            await client.delete(key)
        await client.aclose()
