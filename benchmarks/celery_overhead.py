"""Celery with lifecycle against plain Celery, on the same task, in one run.

    pip install -e ".[bench]" && python benchmarks/celery_overhead.py
    python benchmarks/celery_overhead.py --jobs 2000 --rounds 3

Both apps use the local Redis (127.0.0.1:6379) as broker. The task is the same on both
sides: it counts itself (one INCR, so that the benchmark can see it finish); the
lifecycle one is an ``async def`` run by ``CeleryLifecycle`` on the process's loop.

For each pool (solo, threads, prefork) a Celery worker process is started on a
queue of its own and warmed up; the messages are published to a staging list no worker
reads, then moved onto the worker's queue with one RENAME, so the time measured (from
the RENAME until the counter reaches the number of messages) is draining only, never
publishing or worker start-up. Before timing, every pairing is checked: each message
of a smaller batch must be processed exactly once. Plain and lifecycle rounds are
interleaved, so a load change on the machine hits both; the figure is the median rate
over the rounds."""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from celery import Celery
from redis import Redis

import lifecycle
from lifecycle.celery import CeleryLifecycle

URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
HERE = Path(__file__).parent
COUNTER = os.environ.get("BENCH_COUNTER", "bench:celery:unset")
SEEN = f"{COUNTER}:seen"  # hash: message number -> times processed (the check)

_redis = Redis.from_url(URL)


def _count(i: int) -> None:
    if i < 0:  # the check's messages: record which one ran, and how often
        _redis.hincrby(SEEN, str(-i), 1)
    _redis.incr(COUNTER)


plain = Celery("bench_plain", broker=URL)
plain.conf.update(
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=4,
    broker_connection_retry_on_startup=True,
)


@plain.task(name="bench.count_plain")
def plain_count(i: int) -> None:
    _count(i)


with_lifecycle = Celery("bench_lifecycle", broker=URL)
with_lifecycle.conf.update(plain.conf)
lc = CeleryLifecycle(with_lifecycle)


@lc.task(name="bench.count_lifecycle")
async def lifecycle_count(i: int) -> None:
    _count(i)


APPS = {
    "plain": ("celery_overhead:plain", plain, "bench.count_plain"),
    "lifecycle": ("celery_overhead:with_lifecycle", with_lifecycle, "bench.count_lifecycle"),
}
POOLS = {
    "solo": ["-P", "solo", "-c", "1"],
    "threads": ["-P", "threads", "-c", "4"],
    "prefork": ["-P", "prefork", "-c", "2"],
}


class CeleryWorker:
    """A Celery worker process on a queue of its own, and the batches it drains."""

    def __init__(self, kind: str, pool_args: list[str]) -> None:
        self.kind = kind
        self.tag = f"bench-celery-{uuid.uuid4().hex[:10]}"
        self.queue = f"{self.tag}:q"
        self.counter = f"{self.tag}:count"
        env = {**os.environ, "BENCH_COUNTER": self.counter, "PYTHONPATH": str(HERE)}
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                APPS[kind][0],
                "worker",
                *pool_args,
                "-Q",
                self.queue,
                "--without-heartbeat",
                "--without-gossip",
                "--without-mingle",
                "-l",
                "warning",
            ],
            cwd=HERE,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self.redis = Redis.from_url(URL)
        self.drain(20, check=False, deadline=120)  # started and warm

    def drain(self, jobs: int, *, check: bool = False, deadline: float = 600) -> float:
        """Publish ``jobs`` messages aside, move them onto the queue at once, and
        return the rate (messages/s) at which the worker drained them."""
        _, app, task_name = APPS[self.kind]
        stage = f"{self.tag}:stage"
        self.redis.delete(self.counter, f"{self.counter}:seen")
        with app.producer_or_acquire() as producer:
            for i in range(1, jobs + 1):
                app.tasks[task_name].apply_async(
                    (-i if check else i,), queue=stage, routing_key=stage, producer=producer
                )
        started = time.perf_counter()
        self.redis.rename(stage, self.queue)
        limit = time.monotonic() + deadline
        while int(self.redis.get(self.counter) or 0) < jobs:
            if self.process.poll() is not None:
                raise RuntimeError(f"the {self.kind} worker exited: {self.process.stderr.read().decode()[-2000:]}")  # type: ignore[union-attr]
            if time.monotonic() > limit:
                raise RuntimeError(f"the {self.kind} worker drained {self.redis.get(self.counter)} of {jobs} in time")
            time.sleep(0.002)
        elapsed = time.perf_counter() - started
        if check:
            time.sleep(0.5)  # a duplicate would show up now
            seen: dict[bytes, bytes] = self.redis.hgetall(f"{self.counter}:seen")  # type: ignore[assignment]
            wrong = {k: v for k, v in seen.items() if v != b"1"}
            if len(seen) != jobs or wrong or int(self.redis.get(self.counter) or 0) != jobs:
                raise RuntimeError(f"{self.kind}: {len(seen)} of {jobs} messages processed, duplicates {len(wrong)}")
        return jobs / elapsed

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.redis.delete(self.queue, self.counter, f"{self.counter}:seen", f"{self.tag}:stage")
        self.redis.close()


def compare(pool: str, jobs: int, rounds: int) -> dict[str, Any]:
    """Plain against lifecycle on one pool: checked, then interleaved rounds."""
    workers = {kind: CeleryWorker(kind, POOLS[pool]) for kind in APPS}
    try:
        for worker in workers.values():
            worker.drain(200, check=True)
        rates: dict[str, list[float]] = {kind: [] for kind in APPS}
        for round_ in range(rounds):
            order = list(APPS) if round_ % 2 == 0 else list(reversed(APPS))
            for kind in order:
                rates[kind].append(workers[kind].drain(jobs))
    finally:
        for worker in workers.values():
            worker.stop()
    medians = {kind: statistics.median(values) for kind, values in rates.items()}
    return {"pool": pool, **medians, "ratio": medians["lifecycle"] / medians["plain"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=2000, help="messages per round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per pool")
    parser.add_argument("--pools", default="solo,threads,prefork", help="comma-separated")
    options = parser.parse_args()
    load = os.getloadavg()[0]
    print(
        f"# Celery + lifecycle vs plain Celery ({time.strftime('%Y-%m-%d %H:%M')}, "
        f"lifecycle {lifecycle.__version__ if hasattr(lifecycle, '__version__') else ''}, "
        f"{os.cpu_count()} cores, load {load:.1f}, {options.jobs} messages x {options.rounds} rounds)\n"
    )
    print("| pool | plain Celery msg/s | Celery + lifecycle msg/s | lifecycle / plain |\n|---|---:|---:|---:|")
    for pool in options.pools.split(","):
        row = compare(pool, options.jobs, options.rounds)
        print(f"| {pool} | {row['plain']:,.0f} | {row['lifecycle']:,.0f} | {row['ratio']:.0%} |", flush=True)


if __name__ == "__main__":
    main()
