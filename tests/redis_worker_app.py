"""A worker process for the Redis fault tests: ``python tests/redis_worker_app.py URL STREAM``.

Jobs record what they do in Redis keys prefixed by the stream name, so the test can
count executions across processes. SIGTERM/SIGINT stop the worker gracefully."""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

import anyio
import structlog
from redis.asyncio import Redis

from lifecycle import Depends, Worker, dependency, job
from lifecycle.queues import RedisStreamQueue


def build(url: str, stream: str) -> list[Any]:
    """The jobs, recording into keys prefixed by ``stream``."""

    @dependency(scope="worker")
    async def client() -> Any:
        redis = Redis.from_url(url, decode_responses=True)
        yield redis
        await redis.aclose()

    @job(name="count")
    async def count(i: int, r: Redis = Depends(client)) -> None:
        async with r.pipeline(transaction=True) as pipe:
            pipe.hincrby(f"{stream}:counts", str(i), 1)
            pipe.hincrby(f"{stream}:by_worker", str(os.getpid()), 1)
            await pipe.execute()

    @job(name="hang_first")
    async def hang_first(i: int, r: Redis = Depends(client)) -> None:
        """The first execution hangs (its process gets killed); a later one completes."""
        runs = await r.incr(f"{stream}:runs:{i}")
        await r.rpush(f"{stream}:started", f"{i}:{os.getpid()}")
        if runs == 1:
            await anyio.sleep(3600)
        await r.rpush(f"{stream}:finished", f"{i}:{os.getpid()}")

    return [count, hang_first]


async def main(url: str, stream: str) -> None:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))
    claim_idle = float(os.environ.get("CLAIM_IDLE", "1.0"))
    queue = RedisStreamQueue(url, stream=stream, group="workers", claim_idle=claim_idle)
    worker = Worker(
        queue,
        build(url, stream),
        concurrency=int(os.environ.get("CONCURRENCY", "32")),
        poll_interval=0.2,  # leases are renewed every claim_idle / 3 (the Worker's default)
    )
    async with anyio.create_task_group() as tg:

        async def on_signal() -> None:
            with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    worker.stop()
                    return

        tg.start_soon(on_signal)
        await worker.run()
        tg.cancel_scope.cancel()
    await queue.close()


if __name__ == "__main__":
    anyio.run(main, sys.argv[1], sys.argv[2])
