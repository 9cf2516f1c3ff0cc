"""What ``lifecycle.dramatiq`` costs per message over Dramatiq's own async actor doing the
same work, in one run.

    python benchmarks/dramatiq_overhead.py                 # stub broker and Redis, 1 and 8 threads
    python benchmarks/dramatiq_overhead.py --messages 500  # fewer messages per measurement

The work: take a session from a pool created once per worker process, add one to the
message's number, give the session back. Three actors do it on the same broker:

- ``sync``: a plain sync Dramatiq actor with the pool as a module global (the floor:
  no event loop at all);
- ``plain async``: a plain async Dramatiq actor (Dramatiq's own ``AsyncIO`` middleware
  and event loop thread), the session an ``async with`` block on a module-global pool;
- ``lifecycle``: a ``DramatiqLifecycle`` actor, the pool a worker-scoped dependency and
  the session a job-scoped generator dependency, its int payload validated at ``send``
  and in the worker.

Each measurement enqueues the messages first, then starts a Dramatiq ``Worker`` in this
process and times it until the last message is processed. The three actors are measured
in turn, ``--rounds`` times over, and the median per-message time is reported with the
ratio of lifecycle to the plain async actor (the framework's own way to run async work).
A broker whose server is unreachable is reported as such."""

# No `from __future__ import annotations`: the actors are defined in a function, and
# lifecycle resolves their annotations at decoration.

import argparse
import contextlib
import os
import statistics
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Annotated, Any

import dramatiq
from dramatiq.brokers.redis import RedisBroker
from dramatiq.brokers.stub import StubBroker
from dramatiq.middleware import AsyncIO

from lifecycle import Depends, dependency
from lifecycle.dramatiq import DramatiqLifecycle

REDIS_URL = os.environ.get("LIFECYCLE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


class Pool:
    """A pool whose sessions cost nothing but the bookkeeping."""

    def __init__(self) -> None:
        self.out = 0

    @contextlib.asynccontextmanager
    async def session(self) -> AsyncIterator[int]:
        self.out += 1
        try:
            yield 1
        finally:
            self.out -= 1

    @contextlib.contextmanager
    def sync_session(self) -> Iterator[int]:
        self.out += 1
        try:
            yield 1
        finally:
            self.out -= 1


class Done:
    """Counts processed messages; ``event`` is set when ``total`` were."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.count = 0
        self.total = 0
        self.event = threading.Event()

    def reset(self, total: int) -> None:
        self.count, self.total = 0, total
        self.event.clear()

    def hit(self, result: int) -> None:
        # The result is checked, not stored: no Results middleware (the same for all three).
        if result < 1:
            raise AssertionError(f"wrong result {result}")
        with self.lock:
            self.count += 1
            if self.count >= self.total:
                self.event.set()


def build(broker: dramatiq.Broker, queue: str, done: Done) -> dict[str, Any]:
    """The three actors on ``broker``, each on a queue of its own."""
    broker.add_middleware(AsyncIO())
    lc = DramatiqLifecycle(broker, teardown_timeout=30)
    pool_global = Pool()

    @dramatiq.actor(broker=broker, queue_name=f"{queue}-sync", actor_name=f"{queue}_sync", max_retries=0)
    def sync_actor(n: int) -> None:
        with pool_global.sync_session() as s:
            done.hit(n + s)

    @dramatiq.actor(broker=broker, queue_name=f"{queue}-plain", actor_name=f"{queue}_plain", max_retries=0)
    async def plain_actor(n: int) -> None:
        async with pool_global.session() as s:
            done.hit(n + s)

    @dependency(scope="worker")
    async def pool() -> AsyncIterator[Pool]:
        yield Pool()

    async def session(p: Annotated[Pool, Depends(pool)]) -> AsyncIterator[int]:
        async with p.session() as s:
            yield s

    @lc.actor(queue_name=f"{queue}-lifecycle", actor_name=f"{queue}_lifecycle", max_retries=0)
    async def lifecycle_actor(n: int, s: Annotated[int, Depends(session)]) -> None:
        done.hit(n + s)

    return {"sync": sync_actor, "plain async": plain_actor, "lifecycle": lifecycle_actor}


def drain(make: Callable[[], dramatiq.Broker], label: str, messages: int, threads: int) -> float:
    """Seconds per message: on a fresh broker (Dramatiq wants one Worker per broker),
    enqueue ``messages`` for the actor ``label``, then time a Worker draining them."""
    done = Done()
    done.reset(messages)
    queue = f"bench-{uuid.uuid4().hex[:8]}"
    broker = make()
    dramatiq.set_broker(broker)
    try:
        actor = build(broker, queue, done)[label]
        for n in range(messages):
            actor.send(n)
        worker = dramatiq.Worker(broker, worker_timeout=20, worker_threads=threads)
        started = time.perf_counter()
        worker.start()
        try:
            if not done.event.wait(600):
                raise RuntimeError(f"{label}: only {done.count} of {messages} messages were processed")
            return (time.perf_counter() - started) / messages
        finally:
            worker.stop()
    finally:
        if isinstance(broker, RedisBroker):
            keys = list(broker.client.scan_iter(match=f"dramatiq:{queue}*"))
            if keys:
                broker.client.delete(*keys)
        broker.close()


def measure(name: str, make: Callable[[], dramatiq.Broker], messages: int, rounds: int, threads: int) -> list[str]:
    labels = ("sync", "plain async", "lifecycle")
    timings: dict[str, list[float]] = {label: [] for label in labels}
    for _ in range(rounds):
        for label in labels:  # interleaved, so load drifts hit all three
            timings[label].append(drain(make, label, messages, threads))
    median = {label: statistics.median(values) for label, values in timings.items()}
    rows = []
    for label, value in median.items():
        ratio = value / median["plain async"]
        rows.append(f"| {name} | {threads} | {label} | {value * 1e6:,.0f} | {1 / value:,.0f} | {ratio:.2f}x |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=2000, help="messages per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="measurements per actor (median reported)")
    options = parser.parse_args()
    brokers: list[tuple[str, Callable[[], dramatiq.Broker]]] = [
        ("stub", StubBroker),
        ("redis", lambda: RedisBroker(url=REDIS_URL)),
    ]
    load = os.getloadavg()
    print(
        f"# Dramatiq: lifecycle actor vs plain actors, one run ({time.strftime('%Y-%m-%d %H:%M')}, "
        f"{options.messages} messages x {options.rounds} rounds, load {load[0]:.1f}, {os.cpu_count()} cores)\n"
    )
    print("| broker | threads | actor | µs/message | messages/s | vs plain async |\n|---|---:|---|---:|---:|---:|")
    for name, make in brokers:
        if name == "redis":
            try:
                import redis

                redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
            except Exception as exc:
                print(f"| redis | | not measured: {type(exc).__name__}: {exc} | | | |")
                continue
        for threads in (1, 8):
            for row in measure(name, make, options.messages, options.rounds, threads):
                print(row, flush=True)


if __name__ == "__main__":
    main()
