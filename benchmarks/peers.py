"""Redis-backed job queues draining the same no-op job, in one run: lifecycle's
RedisStreamQueue worker against taskiq (taskiq-redis's stream broker), arq, SAQ and
plain Celery.

    pip install -e ".[bench]" && python benchmarks/peers.py
    python benchmarks/peers.py --jobs 2000 --rounds 3

Every library uses the same Redis (127.0.0.1:6379, or ``BENCH_REDIS_URL``) and keys
of its own (a fresh uuid). For each concurrency (1 and 64) each library is first
checked: a batch of messages, each with its own number, must be processed exactly once
(a library that fails is reported, never timed). Then the timed rounds: the messages
are enqueued first, the consumer is started, and the time from its start to the last
job done is measured (start-up included: each starts in well under the drain time).
Libraries are interleaved within a round, in an order that changes per round, so a
change of load on the machine hits them all; the figure is the median over rounds.
Plain Celery runs in a worker process of its own (solo pool at concurrency 1, threads
pool at 64) and counts its jobs with an INCR (see ``celery_overhead.py``)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import statistics
import sys
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

sys.path.insert(0, str(Path(__file__).parent))

import lifecycle

URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")

# lifecycle's read-ahead (RedisStreamQueue(prefetch=...)); taskiq-redis reads 100 ahead
# by default (xread_count), arq and SAQ poll with their own batch sizes.
PREFETCH = int(os.environ.get("BENCH_PREFETCH", "8"))

# A drain: (concurrency, numbers to enqueue) -> Counter of the numbers processed, and
# the seconds from the consumer's start to the last job done.
Drain = Callable[[int, list[int]], Awaitable[tuple[Counter[int], float]]]


async def _wait_for(done: Counter[int], total: int, deadline: float = 600) -> None:
    limit = time.monotonic() + deadline
    while sum(done.values()) < total:
        if time.monotonic() > limit:
            raise RuntimeError(f"only {sum(done.values())} of {total} jobs ran in {deadline}s")
        await asyncio.sleep(0.001)


async def _cleanup(*patterns: str) -> None:
    redis = Redis.from_url(URL)
    for pattern in patterns:
        keys = [key async for key in redis.scan_iter(match=pattern)]
        if keys:
            await redis.delete(*keys)
    await redis.aclose()


async def drain_lifecycle(concurrency: int, numbers: list[int]) -> tuple[Counter[int], float]:
    from lifecycle.queues import RedisStreamQueue

    done: Counter[int] = Counter()
    stream = f"bench-lifecycle-{uuid.uuid4().hex}"

    @lifecycle.job(name="work")
    async def work(n: int) -> None:
        done[n] += 1

    queue = RedisStreamQueue(URL, stream=stream, group="bench", prefetch=PREFETCH)
    try:
        redis = Redis.from_url(URL)
        async with redis.pipeline(transaction=False) as pipe:  # the queue's own format, fast
            for n in numbers:
                pipe.xadd(stream, {"job": "work", "payload": f'{{"n": {n}}}', "attempt": "1", "enqueued_at": "0"})
            await pipe.execute()
        await redis.aclose()
        worker = lifecycle.Worker(queue, [work], concurrency=concurrency, poll_interval=0.05)
        started = time.perf_counter()
        task = asyncio.create_task(worker.run())
        await _wait_for(done, len(numbers))
        elapsed = time.perf_counter() - started
        worker.stop()
        await asyncio.wait_for(task, 60)
    finally:
        await queue.close()
        await _cleanup(f"{stream}*")
    return done, elapsed


async def drain_taskiq(concurrency: int, numbers: list[int]) -> tuple[Counter[int], float]:
    from taskiq.api import run_receiver_task
    from taskiq_redis import RedisStreamBroker

    done: Counter[int] = Counter()
    name = f"bench-taskiq-{uuid.uuid4().hex}"
    # consumer_id "0": the group sees the messages enqueued before the worker starts.
    broker = RedisStreamBroker(URL, queue_name=name, consumer_group_name="bench", consumer_id="0")

    @broker.task(task_name="work")
    async def work(n: int) -> None:
        done[n] += 1

    await broker.startup()
    try:
        for n in numbers:
            await work.kiq(n)
        started = time.perf_counter()
        receiver = asyncio.create_task(run_receiver_task(broker, max_async_tasks=concurrency, run_startup=False))
        await _wait_for(done, len(numbers))
        elapsed = time.perf_counter() - started
        receiver.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await receiver
    finally:
        with contextlib.suppress(TimeoutError):  # a peer's shutdown must not stall the run
            await asyncio.wait_for(broker.shutdown(), 10)
        await _cleanup(f"{name}*")
    return done, elapsed


async def drain_arq(concurrency: int, numbers: list[int]) -> tuple[Counter[int], float]:
    from arq import create_pool
    from arq.connections import RedisSettings
    from arq.worker import Worker, func

    done: Counter[int] = Counter()
    name = f"bench-arq-{uuid.uuid4().hex}"

    async def work(ctx: dict[str, Any], n: int) -> None:
        done[n] += 1

    settings = RedisSettings.from_dsn(URL)
    pool = await create_pool(settings, default_queue_name=name)
    try:
        for n in numbers:
            await pool.enqueue_job("work", n, _queue_name=name)
        worker = Worker(
            functions=[func(work, name="work")],
            redis_pool=pool,
            queue_name=name,
            max_jobs=concurrency,
            poll_delay=0.05,
            keep_result=0,
            handle_signals=False,
        )
        started = time.perf_counter()
        task = asyncio.create_task(worker.async_run())
        await _wait_for(done, len(numbers))
        elapsed = time.perf_counter() - started
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        # arq's close() waits for its job tasks, which the cancel above ended.
        with contextlib.suppress(asyncio.CancelledError, TimeoutError):
            await asyncio.wait_for(worker.close(), 10)
    finally:
        await _cleanup(f"{name}*", "arq:job:*", "arq:result:*", "arq:in-progress:*", "arq:retry:*")
        await pool.aclose()
    return done, elapsed


async def drain_saq(concurrency: int, numbers: list[int]) -> tuple[Counter[int], float]:
    from saq import Queue, Worker

    done: Counter[int] = Counter()
    name = f"bench-saq-{uuid.uuid4().hex}"

    async def work(ctx: dict[str, Any], *, n: int) -> None:
        done[n] += 1

    queue = Queue.from_url(URL, name=name)
    await queue.connect()
    try:
        for n in numbers:
            await queue.enqueue("work", n=n)
        worker = Worker(queue, functions=[("work", work)], concurrency=concurrency, dequeue_timeout=0.05)
        started = time.perf_counter()
        task = asyncio.create_task(worker.start())
        await _wait_for(done, len(numbers))
        elapsed = time.perf_counter() - started
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(worker.stop(), 10)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    finally:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(queue.disconnect(), 10)
        await _cleanup(f"saq:{name}*", f"saq:job:{name}*")
    return done, elapsed


def celery_drain(concurrency: int) -> Callable[[int, list[int]], Awaitable[tuple[Counter[int], float]]]:
    """Plain Celery in its own worker process; it reports exactly-once itself."""
    import celery_overhead

    pool = ["-P", "solo", "-c", "1"] if concurrency == 1 else ["-P", "threads", "-c", str(concurrency)]
    state: dict[str, Any] = {}

    async def drain(_concurrency: int, numbers: list[int]) -> tuple[Counter[int], float]:
        if "worker" not in state:
            state["worker"] = await asyncio.to_thread(celery_overhead.CeleryWorker, "plain", pool)
        check = numbers[0] < 0  # the check batch: drain() verifies once-only itself
        rate = await asyncio.to_thread(state["worker"].drain, len(numbers), check=check)
        return Counter(numbers), len(numbers) / rate

    drain.stop = lambda: state["worker"].stop() if "worker" in state else None  # type: ignore[attr-defined]
    return drain


PEERS: dict[str, Drain] = {
    "lifecycle RedisStreamQueue": drain_lifecycle,
    "taskiq (taskiq-redis RedisStreamBroker)": drain_taskiq,
    "arq": drain_arq,
    "SAQ": drain_saq,
}


async def run(jobs: int, rounds: int, concurrencies: list[int], with_celery: bool) -> list[str]:
    rows = []
    for concurrency in concurrencies:
        peers: dict[str, Any] = dict(PEERS)
        if with_celery:
            peers["plain Celery (" + ("solo" if concurrency == 1 else "threads") + " pool)"] = celery_drain(concurrency)
        failed: dict[str, str] = {}
        for name, drain in peers.items():  # correctness before timing
            numbers = list(range(-1, -201, -1))
            print(f"  check: {name}, concurrency {concurrency}", file=sys.stderr, flush=True)
            try:
                done, _ = await asyncio.wait_for(drain(concurrency, numbers), 120)
            except Exception as exc:
                failed[name] = f"{type(exc).__name__}: {exc}"[:200]
                continue
            if done != Counter(numbers):
                failed[name] = f"processed {sum(done.values())} of {len(numbers)}, duplicates or misses"
        rates: dict[str, list[float]] = {name: [] for name in peers if name not in failed}
        for round_ in range(rounds):
            order = list(rates)
            random.Random(round_).shuffle(order)
            for name in order:
                if name in failed:
                    continue
                numbers = list(range(jobs))
                print(f"  round {round_}: {name}, concurrency {concurrency}", file=sys.stderr, flush=True)
                try:
                    done, elapsed = await asyncio.wait_for(peers[name](concurrency, numbers), 180)
                except Exception as exc:
                    failed[name] = f"round {round_}: {type(exc).__name__}: {exc}"[:200]
                    continue
                if done != Counter(numbers):
                    failed[name] = f"round {round_}: not every message once"
                rates[name].append(jobs / elapsed)
        for drain in peers.values():
            if hasattr(drain, "stop"):
                await asyncio.to_thread(drain.stop)
        ours = statistics.median(rates["lifecycle RedisStreamQueue"]) if "lifecycle RedisStreamQueue" in rates else None
        for name in peers:
            if name in failed:
                rows.append(f"| {name} | {concurrency} | not measured: {failed[name]} | - |")
                continue
            rate = statistics.median(rates[name])
            ratio = f"{ours / rate:.2f}" if ours else "-"
            rows.append(f"| {name} | {concurrency} | {rate:,.0f} | {ratio} |")
        for row in rows[-len(peers) :]:  # each concurrency's rows as soon as they are known
            print(row, flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=3000, help="messages per timed drain")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--concurrency", default="1,64", help="comma-separated")
    parser.add_argument("--no-celery", action="store_true", help="leave plain Celery out")
    options = parser.parse_args()
    load = os.getloadavg()
    print(
        f"# Redis queues, one run ({time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} cores, "
        f"load {load[0]:.1f}/{load[1]:.1f}, {options.jobs} messages x {options.rounds} rounds)\n"
    )
    print("| library | concurrency | msg/s (median) | lifecycle / this |\n|---|---:|---:|---:|")
    concurrencies = [int(c) for c in options.concurrency.split(",")]
    asyncio.run(run(options.jobs, options.rounds, concurrencies, not options.no_celery))


if __name__ == "__main__":
    main()
