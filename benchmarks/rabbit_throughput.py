"""How fast a Worker drains a RabbitQueue: one worker at concurrency 1 and 64, with a job
that does nothing (so this measures the queue: a delivery and an ack per message, plus
the Worker's own cost); and, as the floor, aio-pika alone consuming and acking the same
number of messages with a prefetch of 64.

    python benchmarks/rabbit_throughput.py [--jobs 5000] [--url amqp://guest:guest@127.0.0.1:5672/]

Each case fills a fresh quorum queue (publisher confirms, 500 in flight), then times
from the worker's start until every message was acknowledged. Prints a Markdown table.
Asyncio only (aio-pika is asyncio-only)."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import uuid
from pathlib import Path

import anyio

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lifecycle import Worker, job
from lifecycle.queues import RabbitQueue


@job(name="noop")
def noop(i: int) -> None:
    """Nothing: the benchmark measures the queue."""


async def fill(url: str, name: str, jobs: int) -> RabbitQueue:
    queue = RabbitQueue(url, queue=name)
    await queue.open()
    for start in range(0, jobs, 500):
        await asyncio.gather(*(queue.enqueue("noop", {"i": i}) for i in range(start, min(start + 500, jobs))))
    return queue


async def delete(url: str, name: str) -> None:
    import aio_pika

    connection = await aio_pika.connect(url)
    for queue in (name, f"{name}.dead"):
        channel = await connection.channel()
        await channel.queue_delete(queue, if_unused=False, if_empty=False)
    await connection.close()


async def worker_rate(url: str, jobs: int, concurrency: int) -> float:
    """Messages per second a Worker drains at ``concurrency``."""
    name = f"lifecycle-bench-{uuid.uuid4().hex[:8]}"
    producer = await fill(url, name, jobs)
    queue = RabbitQueue(url, queue=name)
    worker = Worker(queue, [noop], concurrency=concurrency, poll_interval=0.1)
    started = time.perf_counter()
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker.run)
        while worker.stats["succeeded"] < jobs:
            await anyio.sleep(0.01)
        elapsed = time.perf_counter() - started
        worker.stop()
    await queue.close()
    await producer.close()
    await delete(url, name)
    return jobs / elapsed


async def client_rate(url: str, jobs: int) -> float:
    """Messages per second aio-pika alone consumes and acks (prefetch 64): the floor
    under the queue's own cost."""
    import aio_pika

    name = f"lifecycle-bench-{uuid.uuid4().hex[:8]}"
    producer = await fill(url, name, jobs)
    connection = await aio_pika.connect(url)
    channel = await connection.channel()
    await channel.set_qos(prefetch_count=64)
    queue = await channel.get_queue(name)
    done = asyncio.Event()
    acked = 0

    async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        nonlocal acked
        await message.ack()
        acked += 1
        if acked == jobs:
            done.set()

    started = time.perf_counter()
    await queue.consume(on_message)
    await done.wait()
    elapsed = time.perf_counter() - started
    await connection.close()
    await producer.close()
    await delete(url, name)
    return jobs / elapsed


async def main(url: str, jobs: int) -> None:
    print(f"| case ({jobs} messages) | messages/s |\n|---|---:|")
    for concurrency in (1, 64):
        print(f"| Worker, concurrency {concurrency} | {await worker_rate(url, jobs, concurrency):,.0f} |")
    print(f"| aio-pika alone, prefetch 64 (floor) | {await client_rate(url, jobs):,.0f} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=5000)
    parser.add_argument("--url", default="amqp://guest:guest@127.0.0.1:5672/")
    args = parser.parse_args()
    asyncio.run(main(args.url, args.jobs))
