"""How fast a Worker drains a PostgresQueue: one worker at concurrency 1 and 64, with a
job that does nothing (so this measures the queue: a claim per batch and an ack per
message, each one statement, plus the Worker's own cost), next to the floor: asyncpg
alone, with no lifecycle code, claiming (a minimal ``SKIP LOCKED`` update) and deleting
the same number of rows.

    python benchmarks/postgres_throughput.py [--jobs 5000] [--dsn postgresql://...]

Each case fills a fresh table with ``--jobs`` messages (one statement) and times from
the worker's start until every message has been acknowledged. Prints a Markdown table."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import uuid
from pathlib import Path

import asyncpg

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lifecycle import Worker, job
from lifecycle.queues import PostgresQueue


@job(name="noop")
async def noop(i: int) -> None:
    """Nothing: the benchmark measures the queue."""


async def fresh(dsn: str, jobs: int) -> PostgresQueue:
    queue = PostgresQueue(dsn, table=f"lc_bench_{uuid.uuid4().hex[:10]}", pool_size=8, poll_interval=0.05)
    await queue.open()
    await queue.enqueue_many("noop", [{"i": i} for i in range(jobs)])
    return queue


async def drop(dsn: str, queue: PostgresQueue) -> None:
    await queue.close()
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f'DROP TABLE "{queue.table}", "{queue.dead_table}"; DROP SEQUENCE "{queue.table}_seq"')
    finally:
        await conn.close()


async def drain(dsn: str, jobs: int, concurrency: int) -> float:
    """Seconds for one Worker at ``concurrency`` to acknowledge ``jobs`` messages."""
    queue = await fresh(dsn, jobs)
    worker = Worker(queue, [noop], concurrency=concurrency, poll_interval=0.1)
    started = time.perf_counter()
    task = asyncio.create_task(worker.run())
    while worker.stats["succeeded"] < jobs:
        await asyncio.sleep(0.01)
    elapsed = time.perf_counter() - started
    worker.stop()
    await task
    await drop(dsn, queue)
    return elapsed


async def floor(dsn: str, jobs: int, batch: int) -> float:
    """Seconds for asyncpg alone (no lifecycle code) to claim ``batch`` rows at a time
    with a minimal ``SKIP LOCKED`` update and delete each (the deletes of a batch
    concurrently, on a pool of 8), from a table of ``jobs`` rows."""
    table = f"lc_floor_{uuid.uuid4().hex[:10]}"
    pool = await asyncpg.create_pool(dsn, min_size=8, max_size=8)
    await pool.execute(f"CREATE TABLE {table} (id bigserial PRIMARY KEY, payload bytea, owner text)")
    await pool.execute(f"INSERT INTO {table} (payload) SELECT '{{}}'::bytea FROM generate_series(1, {jobs})")
    claim = (
        f"UPDATE {table} SET owner = 'me' WHERE id IN (SELECT id FROM {table} WHERE owner IS NULL "
        f"ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED) RETURNING id, payload"
    )
    started = time.perf_counter()
    done = 0
    while done < jobs:
        rows = await pool.fetch(claim, batch)
        await asyncio.gather(*(pool.execute(f"DELETE FROM {table} WHERE id = $1", row[0]) for row in rows))
        done += len(rows)
    elapsed = time.perf_counter() - started
    await pool.execute(f"DROP TABLE {table}")
    await pool.close()
    return elapsed


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=5000)
    parser.add_argument("--dsn", default="postgresql://postgres@127.0.0.1:5432/test")
    args = parser.parse_args()
    print("| case | messages | seconds | messages/s |")
    print("|---|---|---|---|")
    for label, run in (
        ("asyncpg alone, claim 1 + delete", lambda: floor(args.dsn, args.jobs, 1)),
        ("Worker, concurrency 1", lambda: drain(args.dsn, args.jobs, 1)),
        ("asyncpg alone, claim 64 + 64 deletes", lambda: floor(args.dsn, args.jobs, 64)),
        ("Worker, concurrency 64", lambda: drain(args.dsn, args.jobs, 64)),
    ):
        seconds = await run()
        print(f"| {label} | {args.jobs} | {seconds:.2f} | {args.jobs / seconds:,.0f} |")


if __name__ == "__main__":
    asyncio.run(main())
