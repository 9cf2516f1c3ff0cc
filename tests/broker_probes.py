"""What the multi-process queue tests need of every broker, by the URL's scheme: the
queue a worker process consumes (``make_queue``, used by ``queue_worker_app.py`` too),
a fast way to enqueue many count jobs (``fill``), and what the broker still holds for a
queue (``remaining``). Client libraries are imported when used: each is optional."""

from __future__ import annotations

import asyncio
import json
import os
import time
from contextlib import suppress
from typing import Any

from lifecycle.queues import Queue, RedisStreamQueue, queue_from_url


def make_queue(url: str, name: str, *, lease: float | None = None) -> Queue:
    """The queue named ``name`` on the broker ``url`` names: a RedisStreamQueue on
    stream ``name`` in group ``workers`` (``redis://``), a PostgresQueue on table
    ``name`` (``postgresql://``), a RabbitQueue on queue ``name`` (``amqp://``), a
    NatsQueue on stream ``name`` (``nats://``) or a SqliteQueue named ``name``
    (``sqlite:///path``). ``lease`` (seconds) defaults to $CLAIM_IDLE, else 2."""
    lease = float(os.environ.get("CLAIM_IDLE", "2")) if lease is None else lease
    scheme = url.partition("://")[0]
    if scheme == "redis":
        return RedisStreamQueue(url, stream=name, group="workers", claim_idle=lease)
    if scheme == "postgresql":
        return queue_from_url(url, table=name, lease=lease, poll_interval=0.2, pool_size=4)
    if scheme == "amqp":
        return queue_from_url(url, queue=name, lease=lease)
    if scheme == "nats":
        return queue_from_url(url, stream=name, subject=f"test.{name}", lease=lease)
    if scheme == "sqlite":
        return queue_from_url(url, name=name, lease=lease, poll_interval=0.05)
    raise ValueError(f"no test queue for the scheme of {url!r}")


async def fill(url: str, name: str, indexes: range, *, job: str = "count") -> None:
    """Enqueue ``{"i": i}`` jobs through the queue's own API: in batches where the
    queue has ``enqueue_many``, else a thousand concurrent enqueues at a time; on Redis,
    pipelined ``XADD`` in the queue's wire format (one enqueue call each is the slowest
    part of a big test there)."""
    queue = make_queue(url, name)
    await queue.open()
    try:
        if url.startswith("redis://"):
            from redis.asyncio import Redis

            client = Redis.from_url(url, socket_timeout=30)
            now = repr(time.time())
            try:
                for start in range(indexes.start, indexes.stop, 1000):
                    async with client.pipeline(transaction=False) as pipe:
                        for i in range(start, min(start + 1000, indexes.stop)):
                            fields = {"job": job, "payload": json.dumps({"i": i}), "attempt": "1", "enqueued_at": now}
                            pipe.xadd(name, fields)  # type: ignore[arg-type]
                        await pipe.execute()
            finally:
                await client.aclose()
            return
        batch = 1000
        for start in range(indexes.start, indexes.stop, batch):
            chunk = range(start, min(start + batch, indexes.stop))
            many = getattr(queue, "enqueue_many", None)
            if many is not None:
                await many(job, [{"i": i} for i in chunk])
                continue
            await asyncio.gather(*(queue.enqueue(job, {"i": i}) for i in chunk))
    finally:
        await queue.close()


async def remaining(url: str, name: str) -> int:
    """Messages the broker still holds for the queue: waiting, delayed or in flight.
    RabbitMQ counts only those not delivered: its in-flight ones are back in the queue
    once their consumer is gone, so a check after the workers stopped sees them."""
    scheme = url.partition("://")[0]
    if scheme == "redis":
        from redis.asyncio import Redis

        client = Redis.from_url(url, socket_timeout=10)
        try:
            return int(await client.xlen(name)) + int(await client.zcard(f"{name}:delayed"))
        finally:
            await client.aclose()
    if scheme == "postgresql":
        import asyncpg

        conn = await asyncpg.connect(url, timeout=10)
        try:
            return int(await conn.fetchval(f'SELECT count(*) FROM "{name}"'))
        finally:
            await conn.close()
    if scheme == "nats":
        import nats

        client = await nats.connect(url, connect_timeout=5, allow_reconnect=False)
        try:
            js = client.jetstream()
            return sum([(await js.stream_info(stream)).state.messages for stream in (name, f"{name}_DELAYED")])
        finally:
            await client.close()
    if scheme == "amqp":
        import aio_pika

        from lifecycle.queues._rabbit import DELAY_BUCKETS

        connection = await aio_pika.connect(url, timeout=10)
        try:
            total = 0
            for queue_name in [name, *(f"{name}.delay.{bucket}" for bucket in DELAY_BUCKETS)]:
                channel = await connection.channel()
                with suppress(aio_pika.exceptions.ChannelClosed):  # a delay queue never declared
                    declared = await channel.declare_queue(queue_name, passive=True)
                    total += int(declared.declaration_result.message_count or 0)
            return total
        finally:
            await connection.close()
    queue: Any = make_queue(url, name)
    try:
        counts = await queue.counts()
        return int(counts["ready"] + counts["leased"] + counts["delayed"])
    finally:
        await queue.close()


async def dead_letters(url: str, name: str) -> list[dict[str, Any]]:
    """The queue's dead letters, newest first (at most 100)."""
    queue = make_queue(url, name)
    try:
        return await queue.dead_letters(100)
    finally:
        await queue.close()
