"""A durable worker with no server: jobs wait in a SQLite file, a Worker runs them with
a per-worker "pool" and a per-job "connection", and a failing job is retried, then
dead-lettered.

    python examples/worker.py            # asyncio; `trio` as an argument runs it on trio
    python examples/worker.py trio jobs.db

Run it twice with the same file and the second run finds what the first left (nothing,
once drained: every message is acknowledged only after its job and teardown succeeded).
Without a file argument it uses a temporary one. The same jobs run from the command
line with `lifecycle worker examples/worker.py --queue sqlite:///jobs.db`."""

from __future__ import annotations

import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any

import anyio

from lifecycle import Depends, Retry, Worker, dependency, job
from lifecycle.queues import SqliteQueue

EVENTS: list[str] = []


@dependency(scope="worker")
async def pool() -> AsyncIterator[dict[str, Any]]:
    EVENTS.append("pool opened")
    yield {"connections": 0}
    EVENTS.append("pool closed")


async def connection(pool: Annotated[dict[str, Any], Depends(pool)]) -> AsyncIterator[str]:
    pool["connections"] += 1
    name = f"conn{pool['connections']}"
    try:
        yield name
    finally:
        EVENTS.append(f"{name} returned")


@job(retries=1)
async def greet(name: str, times: int, conn: Annotated[str, Depends(connection)]) -> None:
    """Greet someone ``times`` times (a negative count fails, then is dead-lettered)."""
    if times < 0:
        raise Retry(delay=0.05)
    EVENTS.append(f"{conn}: {'hello ' * times}{name}".strip())


async def main(path: Path) -> None:
    queue = SqliteQueue(path)
    await queue.open()
    for name, times in [("Ada", 1), ("Grace", 2), ("Linus", -1)]:
        await queue.enqueue(greet, {"name": name, "times": times})  # payload checked here
    worker = Worker(queue, [greet], concurrency=4, retry_backoff=0.05, poll_interval=0.05)
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker.run)
        while (await queue.counts())["dead"] < 1 or worker.stats["succeeded"] < 2:
            await anyio.sleep(0.02)
        worker.stop()
    dead = await queue.dead_letters()
    await queue.close()
    for line in sorted(e for e in EVENTS if ":" in e):
        print(line)
    print(f"succeeded={worker.stats['succeeded']} retried={worker.stats['retried']} dead={len(dead)}")
    print(f"dead letter: {dead[0]['job']} {dead[0]['payload']} reason={dead[0]['reason']}")
    assert EVENTS[0] == "pool opened", EVENTS  # the worker scope: opened first, closed last
    assert EVENTS[-1] == "pool closed", EVENTS


if __name__ == "__main__":
    backend = sys.argv[1] if len(sys.argv) > 1 else "asyncio"
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(sys.argv[2]) if len(sys.argv) > 2 else Path(scratch) / "jobs.db"
        anyio.run(main, path, backend=backend)
