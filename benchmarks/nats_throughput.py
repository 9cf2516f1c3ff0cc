"""How fast a Worker drains a NatsQueue: one worker process at concurrency 1 and 64,
with a job that does nothing (so this measures the queue: a pull, an ack confirmed by
the server, plus the Worker's own cost), next to the floor: nats-py alone pulling and
acking the same number of messages in batches, with no Worker.

    python benchmarks/nats_throughput.py [--jobs 5000] [--url nats://127.0.0.1:4222]

Each case fills fresh streams (concurrent publishes, not timed), then times from the
worker's start until the work stream is empty (process start-up included, so small runs
understate the rate), and deletes its streams. Prints a Markdown table."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import anyio

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lifecycle import Worker, job
from lifecycle.queues import NatsQueue


@job(name="noop")
def noop(i: int) -> None:
    """Nothing: the benchmark measures the queue."""


async def child(url: str, stream: str, concurrency: int) -> None:
    queue = NatsQueue(url, stream=stream, subject=f"bench.{stream}", lease=30)
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


async def fill(url: str, stream: str, jobs: int) -> None:
    import nats

    queue = NatsQueue(url, stream=stream, subject=f"bench.{stream}", lease=30)
    await queue.open()  # the streams and the consumer
    await queue.close()
    client = await nats.connect(url)
    js = client.jetstream()
    for start in range(0, jobs, 500):
        batch = range(start, min(start + 500, jobs))
        await asyncio.gather(
            *(js.publish(f"bench.{stream}", f'{{"i": {i}}}'.encode(), headers={"Lifecycle-Job": "noop"}) for i in batch)
        )
    await client.close()


async def remaining(url: str, stream: str) -> int:
    import nats

    client = await nats.connect(url)
    try:
        return int((await client.jetstream().stream_info(stream)).state.messages)
    finally:
        await client.close()


async def cleanup(url: str, stream: str) -> None:
    import nats

    client = await nats.connect(url)
    js = client.jetstream()
    for name in (stream, f"{stream}_DELAYED", f"{stream}_DEAD"):
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await js.delete_stream(name)
    await client.close()


def measure(url: str, jobs: int, concurrency: int) -> float:
    """Seconds for one worker process to drain ``jobs`` messages."""
    stream = f"bench-{uuid.uuid4().hex[:10]}"
    try:
        asyncio.run(fill(url, stream, jobs))
        started = time.perf_counter()
        process = subprocess.Popen(
            [sys.executable, __file__, "--child", stream, "--url", url, "--concurrency", str(concurrency)]
        )
        try:
            while asyncio.run(remaining(url, stream)):
                time.sleep(0.02)
            return time.perf_counter() - started
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(60)
    finally:
        asyncio.run(cleanup(url, stream))


async def client_alone(url: str, jobs: int) -> float:
    """Seconds for nats-py alone to pull and ack ``jobs`` messages (batches of 64, each
    ack confirmed by the server, as the queue does): the floor."""
    stream = f"bench-{uuid.uuid4().hex[:10]}"
    await fill(url, stream, jobs)
    import nats

    client = await nats.connect(url)
    try:
        subscription = await client.jetstream().pull_subscribe_bind("workers", stream)
        started = time.perf_counter()
        done = 0
        while done < jobs:
            messages = await subscription.fetch(64, timeout=1)
            await asyncio.gather(*(message.ack_sync() for message in messages))
            done += len(messages)
        return time.perf_counter() - started
    finally:
        await client.close()
        await cleanup(url, stream)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=5_000)
    parser.add_argument("--url", default="nats://127.0.0.1:4222")
    parser.add_argument("--child", metavar="STREAM", help=argparse.SUPPRESS)
    parser.add_argument("--concurrency", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        anyio.run(child, args.url, args.child, args.concurrency)
        return
    print(f"NatsQueue drain rate, {args.jobs} no-op jobs, one worker process, {os.cpu_count()} CPUs")
    print()
    print("| case | seconds | jobs/s |")
    print("|---|---:|---:|")
    for concurrency in (1, 64):
        elapsed = measure(args.url, args.jobs, concurrency)
        print(f"| Worker, concurrency {concurrency} | {elapsed:.2f} | {args.jobs / elapsed:,.0f} |", flush=True)
    elapsed = asyncio.run(client_alone(args.url, args.jobs))
    print(f"| nats-py alone (fetch 64, ack_sync) | {elapsed:.2f} | {args.jobs / elapsed:,.0f} |", flush=True)


if __name__ == "__main__":
    main()
