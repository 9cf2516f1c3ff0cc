"""Redis-backed job queues draining the same no-op job, in one run: lifecycle's
RedisStreamQueue worker against taskiq (taskiq-redis's stream broker), arq, SAQ and
plain Celery.

    pip install -e ".[bench]" && python benchmarks/peers.py
    python benchmarks/peers.py --jobs 2000 --rounds 3

Every library uses the same Redis (127.0.0.1:6379, or ``BENCH_REDIS_URL``) and keys
of its own (a fresh uuid). Each drain runs in a fresh interpreter of its own
(``peers.py --child SPEC``, internal), so no library's global state or event-loop policy can
touch another's, and a stuck one is killed at a deadline and reported, never hanging
the run. arq pins ``redis<6`` while taskiq-redis and Celery's Redis transport need a
newer redis-py, so arq runs from a virtualenv of its own, made on first use under
``benchmarks/.venvs/arq`` (PyPI must be reachable then).

For each concurrency (1 and 64) each library is first checked: a batch of messages,
each with its own number, must be processed exactly once (a library that fails is
reported, never timed). Then the timed rounds: the messages are enqueued first, the
consumer is started, and the time from its start to the last job done is measured
inside the child (start-up of the consumer included, interpreter start-up not).
Libraries are interleaved within a round, in an order that changes per round, so a
change of load on the machine hits them all; the figure is the median over rounds.
lifecycle runs twice: at its default (no read-ahead) and with ``prefetch=8``.
Plain Celery runs in a worker process of its own (solo pool at concurrency 1, threads
pool at 64) and counts its jobs with an INCR (see ``celery_overhead.py``). arq polls
for work every ``poll_delay`` (0.05 s here; its default is 0.5 s) and takes at most
``max_jobs`` per poll, which bounds it at concurrency 1."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import statistics
import subprocess
import sys
import time
import uuid
import venv
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")

# Seconds a child may take for one drain (the check's or a timed one) before it is
# killed and its library reported as stuck.
DRAIN_DEADLINE = int(os.environ.get("BENCH_DRAIN_DEADLINE", "240"))

# A drain: (concurrency, numbers to enqueue) -> Counter of the numbers processed, and
# the seconds from the consumer's start to the last job done.
Drain = Callable[[int, list[int]], Awaitable[tuple[Counter[int], float]]]


async def _wait_for(done: Counter[int], total: int, deadline: float = DRAIN_DEADLINE - 30) -> None:
    # Shorter than the parent's deadline, so a stalled drain says how far it got.
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


async def drain_lifecycle(concurrency: int, numbers: list[int], prefetch: int = 0) -> tuple[Counter[int], float]:
    import lifecycle
    from lifecycle.queues import RedisStreamQueue

    done: Counter[int] = Counter()
    stream = f"bench-lifecycle-{uuid.uuid4().hex}"

    @lifecycle.job(name="work")
    async def work(n: int) -> None:
        done[n] += 1

    queue = RedisStreamQueue(URL, stream=stream, group="bench", prefetch=prefetch)
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


async def drain_lifecycle_prefetch(concurrency: int, numbers: list[int]) -> tuple[Counter[int], float]:
    return await drain_lifecycle(concurrency, numbers, prefetch=8)


# Library -> (its drain in a child, the extra requirements of a virtualenv of its own or
# None for this interpreter).
CONSUMERS: dict[str, tuple[Drain, list[str] | None]] = {
    "lifecycle RedisStreamQueue": (drain_lifecycle, None),
    "lifecycle RedisStreamQueue, prefetch=8": (drain_lifecycle_prefetch, None),
    "taskiq (taskiq-redis RedisStreamBroker)": (drain_taskiq, None),
    "arq": (drain_arq, ["arq>=0.25"]),
    "SAQ": (drain_saq, None),
}
OURS = "lifecycle RedisStreamQueue"


def _python_for(name: str) -> str:
    """This interpreter, or the one of the library's own virtualenv (made once)."""
    requirements = CONSUMERS[name][1]
    if requirements is None:
        return sys.executable
    home = HERE / ".venvs" / name
    python = home / "bin" / "python"
    if not python.exists():
        print(f"  making a virtualenv for {name} in {home}", file=sys.stderr, flush=True)
        venv.create(home, with_pip=True, clear=True)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", *requirements], check=True)
    return str(python)


def drain_in_child(name: str, concurrency: int, numbers: list[int]) -> tuple[Counter[int], float]:
    """One drain of ``name`` in a fresh interpreter; raises on a crash or a stall."""
    spec = json.dumps({"consumer": name, "concurrency": concurrency, "first": numbers[0], "count": len(numbers)})
    try:
        child = subprocess.run(
            [_python_for(name), __file__, "--child", spec],
            capture_output=True,
            text=True,
            timeout=DRAIN_DEADLINE,
            env={**os.environ, "PYTHONPATH": str(HERE)},
        )
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"stuck: no result in {DRAIN_DEADLINE}s") from None
    if child.returncode != 0:
        last = (child.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"exit {child.returncode}: {last}")
    result = json.loads(child.stdout.strip().splitlines()[-1])
    return Counter({int(n): times for n, times in result["done"].items()}), result["elapsed"]


def child_main(spec_text: str) -> None:
    """The child: run one drain and print what it processed and how long it took."""
    spec = json.loads(spec_text)
    step = -1 if spec["first"] < 0 else 1
    numbers = list(range(spec["first"], spec["first"] + step * spec["count"], step))
    drain = CONSUMERS[spec["consumer"]][0]
    done, elapsed = asyncio.run(drain(spec["concurrency"], numbers))
    print(json.dumps({"done": {str(n): times for n, times in done.items()}, "elapsed": elapsed}), flush=True)


class CeleryDrain:
    """Plain Celery in a worker process of its own, reused across its drains; it checks
    exactly-once itself (see ``celery_overhead.py``)."""

    def __init__(self, concurrency: int) -> None:
        self.pool = ["-P", "solo", "-c", "1"] if concurrency == 1 else ["-P", "threads", "-c", str(concurrency)]
        self.worker: Any = None

    def __call__(self, concurrency: int, numbers: list[int]) -> tuple[Counter[int], float]:
        import celery_overhead

        if self.worker is None:
            self.worker = celery_overhead.CeleryWorker("plain", self.pool)
        check = numbers[0] < 0  # the check batch: drain() verifies once-only itself
        rate = self.worker.drain(len(numbers), check=check, deadline=DRAIN_DEADLINE)
        return Counter(numbers), len(numbers) / rate

    def stop(self) -> None:
        if self.worker is not None:
            self.worker.stop()


def run(jobs: int, rounds: int, concurrencies: list[int], with_celery: bool) -> list[str]:
    rows = []
    for concurrency in concurrencies:
        drains: dict[str, Callable[[int, list[int]], tuple[Counter[int], float]]] = {
            name: (lambda c, numbers, name=name: drain_in_child(name, c, numbers)) for name in CONSUMERS
        }
        celery = CeleryDrain(concurrency) if with_celery else None
        if celery is not None:
            drains["plain Celery (" + ("solo" if concurrency == 1 else "threads") + " pool)"] = celery
        failed: dict[str, str] = {}  # failed the check: never timed
        stalls: dict[str, list[str]] = {}  # timed rounds that failed, by library
        try:
            for name, drain in drains.items():  # correctness before timing
                numbers = list(range(-1, -201, -1))
                print(f"  check: {name}, concurrency {concurrency}", file=sys.stderr, flush=True)
                try:
                    done, _ = drain(concurrency, numbers)
                except Exception as exc:
                    failed[name] = f"{type(exc).__name__}: {exc}"[:200]
                    continue
                if done != Counter(numbers):
                    failed[name] = f"processed {sum(done.values())} of {len(numbers)}, duplicates or misses"
            rates: dict[str, list[float]] = {name: [] for name in drains if name not in failed}
            for round_ in range(rounds):
                order = list(rates)
                random.Random(round_).shuffle(order)
                for name in order:
                    numbers = list(range(jobs))
                    print(f"  round {round_}: {name}, concurrency {concurrency}", file=sys.stderr, flush=True)
                    try:
                        done, elapsed = drains[name](concurrency, numbers)
                    except Exception as exc:
                        stalls.setdefault(name, []).append(f"round {round_}: {type(exc).__name__}: {exc}"[:200])
                        continue
                    if done != Counter(numbers):
                        stalls.setdefault(name, []).append(f"round {round_}: not every message once")
                        continue
                    rates[name].append(jobs / elapsed)
        finally:
            if celery is not None:
                celery.stop()
        ours = statistics.median(rates[OURS]) if rates.get(OURS) else None
        for name in drains:
            if name in failed or not rates.get(name):
                why = failed.get(name) or "; ".join(stalls.get(name, []))
                rows.append(f"| {name} | {concurrency} | not measured: {why} | - |")
                continue
            rate = statistics.median(rates[name])
            ratio = f"{ours / rate:.2f}" if ours else "-"
            # A round that failed is reported, never hidden: the median is of the others.
            note = (
                f" ({len(stalls[name])} of {rounds} rounds failed: {'; '.join(stalls[name])})" if name in stalls else ""
            )
            rows.append(f"| {name} | {concurrency} | {rate:,.0f}{note} | {ratio} |")
        for row in rows[-len(drains) :]:  # each concurrency's rows as soon as they are known
            print(row, flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=3000, help="messages per timed drain")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--concurrency", default="1,64", help="comma-separated")
    parser.add_argument("--no-celery", action="store_true", help="leave plain Celery out")
    parser.add_argument("--only", help="comma-separated parts of library names to keep (e.g. lifecycle,taskiq)")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: one drain, in a child
    options = parser.parse_args()
    if options.child:
        child_main(options.child)
        return
    load = os.getloadavg()
    print(
        f"# Redis queues, one run ({time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} cores, "
        f"load {load[0]:.1f}/{load[1]:.1f}, {options.jobs} messages x {options.rounds} rounds)\n"
    )
    print("| library | concurrency | msg/s (median) | lifecycle (default) / this |\n|---|---:|---:|---:|")
    concurrencies = [int(c) for c in options.concurrency.split(",")]
    if options.only:
        wanted = [part.strip().lower() for part in options.only.split(",")]
        for name in list(CONSUMERS):
            if not any(part in name.lower() for part in wanted):
                del CONSUMERS[name]
    with_celery = not options.no_celery and (not options.only or "celery" in options.only.lower())
    run(options.jobs, options.rounds, concurrencies, with_celery)


if __name__ == "__main__":
    main()
