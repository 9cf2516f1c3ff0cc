"""How fast Workers drain a SqliteQueue: one and three worker processes on one database
file, at concurrency 1 and 64, with a job that does nothing (so this measures the queue:
a claim and an ack per message, each its own transaction, plus the Worker's own cost).

    python benchmarks/sqlite_throughput.py [--jobs 10000] [--backend asyncio|trio]

For each case: fill a fresh database with ``--jobs`` messages (one transaction), start
the processes, and time from their start until every message has been acknowledged
(process start-up included, so small runs understate the rate). Prints a Markdown
table."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anyio

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lifecycle import Worker, job
from lifecycle.queues import SqliteQueue


@job(name="noop")
def noop(i: int) -> None:
    """Nothing: the benchmark measures the queue."""


async def child(db: str, concurrency: int) -> None:
    queue = SqliteQueue(db, lease=30, poll_interval=0.01)
    worker = Worker(queue, [noop], concurrency=concurrency, poll_interval=0.1)
    async with anyio.create_task_group() as tg:

        async def on_signal() -> None:
            with anyio.open_signal_receiver(signal.SIGTERM) as signals:
                async for _ in signals:
                    worker.stop()
                    return

        tg.start_soon(on_signal)
        await worker.run()
        tg.cancel_scope.cancel()
    await queue.close()


async def fill(db: str, jobs: int) -> None:
    queue = SqliteQueue(db)
    await queue.enqueue_many("noop", [{"i": i} for i in range(jobs)])
    await queue.close()


async def remaining(db: str) -> int:
    queue = SqliteQueue(db)
    counts = await queue.counts()
    await queue.close()
    return counts["ready"] + counts["leased"] + counts["delayed"]


def measure(jobs: int, processes: int, concurrency: int, backend: str) -> float:
    """Seconds for ``processes`` workers to drain ``jobs`` messages."""
    with tempfile.TemporaryDirectory() as directory:
        db = str(Path(directory) / "bench.db")
        anyio.run(fill, db, jobs)
        started = time.perf_counter()
        children = [
            subprocess.Popen(
                [sys.executable, __file__, "--child", db, "--concurrency", str(concurrency), "--backend", backend]
            )
            for _ in range(processes)
        ]
        try:
            while anyio.run(remaining, db):
                time.sleep(0.02)
            elapsed = time.perf_counter() - started
        finally:
            for process in children:
                process.send_signal(signal.SIGTERM)
            for process in children:
                process.wait(60)
        return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    parser.add_argument("--child", metavar="DB", help=argparse.SUPPRESS)
    parser.add_argument("--concurrency", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        anyio.run(child, args.child, args.concurrency, backend=args.backend)
        return
    print(f"SqliteQueue drain rate, {args.jobs} no-op jobs, {args.backend}, {os.cpu_count()} CPUs")
    print()
    print("| processes | concurrency | seconds | jobs/s |")
    print("|---:|---:|---:|---:|")
    for processes in (1, 3):
        for concurrency in (1, 64):
            elapsed = measure(args.jobs, processes, concurrency, args.backend)
            print(f"| {processes} | {concurrency} | {elapsed:.2f} | {args.jobs / elapsed:,.0f} |", flush=True)


if __name__ == "__main__":
    main()
