"""RedisStreamQueue's fast read and settle path against the real Redis server: the
read-ahead buffer (prefetch) and the coalesced settles never lose, duplicate or
prematurely acknowledge a message.

Skipped with a reason when Redis is unreachable; under CI=true that is a failure."""

import uuid
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis

from lifecycle import Worker, job
from lifecycle.queues import Delivery, RedisStreamQueue

pytestmark = [pytest.mark.anyio, pytest.mark.redis]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # redis-py's client is asyncio-only


@pytest.fixture
def stream() -> str:
    return f"lifecycle-test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def redis(redis_url: str, stream: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url, decode_responses=True)
    yield client
    keys = [key async for key in client.scan_iter(f"{stream}*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()


async def pending_ids(redis: Redis, stream: str) -> set[str]:
    rows: Any = await redis.xpending_range(stream, "workers", min="-", max="+", count=1000)
    return {row["message_id"] for row in rows}


async def test_prefetch_must_be_a_non_negative_int(redis_url: str) -> None:
    for bad in (-1, 1.5, "8"):
        with pytest.raises(ValueError, match="prefetch must be an int >= 0"):
            RedisStreamQueue(redis_url, prefetch=bad)  # type: ignore[arg-type]


async def test_read_ahead_is_handed_out_in_order_without_a_second_read(
    redis_url: str, stream: str, redis: Redis
) -> None:
    queue = RedisStreamQueue(redis_url, stream=stream, group="workers", prefetch=3)
    try:
        await queue.open()
        ids = [await queue.enqueue("work", {"n": n}) for n in range(4)]
        first = await queue.receive(1, 1.0)
        assert [d.id for d in first] == ids[:1]
        # All four are this consumer's now (one handed out, three read ahead).
        assert await pending_ids(redis, stream) == set(ids)
        await redis.delete(stream)  # a further read would find nothing: these come from the buffer
        rest = [d for _ in range(3) for d in await queue.receive(1, 0.1)]
        assert [d.id for d in rest] == ids[1:]
        assert [d.payload for d in rest] == [{"n": 1}, {"n": 2}, {"n": 3}]
    finally:
        await queue.close()


async def test_prefetch_zero_reads_only_what_is_asked(redis_url: str, stream: str, redis: Redis) -> None:
    queue = RedisStreamQueue(redis_url, stream=stream, group="workers", prefetch=0)
    try:
        await queue.open()
        ids = [await queue.enqueue("work", {"n": n}) for n in range(3)]
        got = await queue.receive(1, 1.0)
        assert [d.id for d in got] == ids[:1]
        assert await pending_ids(redis, stream) == set(ids[:1])
    finally:
        await queue.close()


async def test_close_puts_back_what_was_read_ahead_without_counting_a_delivery(
    redis_url: str, stream: str, redis: Redis
) -> None:
    queue = RedisStreamQueue(redis_url, stream=stream, group="workers", prefetch=5)
    await queue.open()
    for n in range(3):
        await queue.enqueue("work", {"n": n})
    (handed,) = await queue.receive(1, 1.0)
    await queue.close()
    assert await pending_ids(redis, stream) == {handed.id}  # only the one a worker holds
    other = RedisStreamQueue(redis_url, stream=stream, group="workers", prefetch=0)
    try:
        back = await other.receive(10, 1.0)
        assert sorted(d.payload["n"] for d in back) == [1, 2]
        assert all(d.deliveries == 1 and d.attempt == 1 for d in back)
    finally:
        await other.close()


async def test_renew_keeps_read_ahead_leases_and_reports_only_the_workers_lost_ids(
    redis_url: str, stream: str, redis: Redis
) -> None:
    queue = RedisStreamQueue(redis_url, stream=stream, group="workers", prefetch=4, claim_idle=0.5)
    try:
        await queue.open()
        for n in range(3):
            await queue.enqueue("work", {"n": n})
        (held,) = await queue.receive(1, 1.0)
        # Another consumer takes one of the read-ahead messages over.
        ahead = queue._buffer[0].id
        await redis.xclaim(stream, "workers", "thief", 0, [ahead], justid=True)
        assert await queue.renew([held]) == []  # the worker's own delivery is still its own
        rest = [d for _ in range(3) for d in await queue.receive(1, 0.05)]
        assert ahead not in {d.id for d in rest}  # the lost one is never handed out here
        assert len(rest) == 1
    finally:
        await queue.close()


async def test_a_read_ahead_message_that_waited_long_is_renewed_before_it_is_handed_out(
    redis_url: str, stream: str, redis: Redis
) -> None:
    queue = RedisStreamQueue(redis_url, stream=stream, group="workers", prefetch=2, claim_idle=0.6)
    try:
        await queue.open()
        for n in range(2):
            await queue.enqueue("work", {"n": n})
        await queue.receive(1, 1.0)
        ahead = queue._buffer[0].id
        await redis.xclaim(stream, "workers", "thief", 0, [ahead], justid=True)
        await anyio.sleep(0.3)  # more than claim_idle / 3: the next hand-out checks the lease first
        assert await queue.receive(1, 0.05) == []  # lost: not handed out
    finally:
        await queue.close()


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    outcomes=st.lists(st.sampled_from(["ok", "retry", "fail"]), min_size=1, max_size=40),
    concurrency=st.sampled_from([1, 3, 16]),
    prefetch=st.sampled_from([0, 1, 8]),
)
async def test_every_message_settles_once_as_its_job_says(
    redis_url: str, outcomes: list[str], concurrency: int, prefetch: int
) -> None:
    """Property, against an oracle: whatever the batching of reads and settles, each
    message ends exactly as its job decided (done once, or dead after its retries),
    and nothing stays pending."""
    stream = f"lifecycle-test-{uuid.uuid4().hex[:12]}"
    runs: dict[int, int] = {}

    @job(name="work", retries=1)
    async def work(n: int, outcome: str) -> None:
        runs[n] = runs.get(n, 0) + 1
        if outcome == "retry" and runs[n] == 1:
            raise RuntimeError("once")
        if outcome == "fail":
            raise RuntimeError("always")

    queue = RedisStreamQueue(redis_url, stream=stream, group="workers", prefetch=prefetch)
    client = Redis.from_url(redis_url, decode_responses=True)
    try:
        for n, outcome in enumerate(outcomes):
            await queue.enqueue("work", {"n": n, "outcome": outcome})
        worker = Worker(queue, [work], concurrency=concurrency, poll_interval=0.05, retry_backoff=0.01)
        expected_runs = {n: 1 if o == "ok" else 2 for n, o in enumerate(outcomes)}
        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                tg.start_soon(worker.run)
                while worker.stats["succeeded"] + worker.stats["dead_lettered"] < len(outcomes):
                    await anyio.sleep(0.01)
                worker.stop()
        assert runs == expected_runs
        assert worker.stats["succeeded"] == sum(o != "fail" for o in outcomes)
        assert worker.stats["dead_lettered"] == outcomes.count("fail")
        assert await client.xlen(stream) == 0
        info: Any = await client.xpending(stream, "workers")
        assert info["pending"] == 0
    finally:
        await queue.close()
        keys = [key async for key in client.scan_iter(f"{stream}*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()


async def test_settles_of_many_jobs_at_once_each_get_their_own_answer(
    redis_url: str, stream: str, redis: Redis
) -> None:
    queue = RedisStreamQueue(redis_url, stream=stream, group="workers", prefetch=0)
    try:
        await queue.open()
        for n in range(30):
            await queue.enqueue("work", {"n": n})
        got: list[Delivery] = await queue.receive(30, 1.0)
        assert len(got) == 30
        stranger = got[0]
        await redis.xclaim(stream, "workers", "thief", 0, [stranger.id], justid=True)
        answers: dict[str, bool] = {}

        async def ack(delivery: Delivery) -> None:
            answers[delivery.id] = await queue.ack(delivery)

        async with anyio.create_task_group() as tg:
            for delivery in got:
                tg.start_soon(ack, delivery)
        assert answers[stranger.id] is False  # owned by another consumer: untouched
        assert all(answers[d.id] for d in got[1:])
        assert await pending_ids(redis, stream) == {stranger.id}
    finally:
        await queue.close()
