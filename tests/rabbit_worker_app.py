"""A worker process for the RabbitMQ tests: ``python tests/rabbit_worker_app.py URL QUEUE EVIDENCE``.

Jobs append what they did to the ``EVIDENCE`` file (one short line per write, O_APPEND,
so lines from several processes never interleave), so the test can count executions
across processes. SIGTERM/SIGINT stop the worker gracefully."""

from __future__ import annotations

import os
import signal
import sys

import anyio
import structlog

from lifecycle import Worker, job
from lifecycle.queues import RabbitQueue


def build(evidence: str) -> list[object]:
    """The jobs, recording into ``evidence``."""

    def record(line: str) -> None:
        fd = os.open(evidence, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, f"{line}\n".encode())
        finally:
            os.close(fd)

    @job(name="count")
    def count(i: int) -> None:
        record(f"count {i} {os.getpid()}")

    @job(name="hang_first")
    async def hang_first(i: int) -> None:
        """The first execution hangs (its process gets killed); a later one completes."""
        record(f"started {i} {os.getpid()}")
        try:
            os.close(os.open(f"{evidence}.{i}.first", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            record(f"finished {i} {os.getpid()}")
            return
        await anyio.sleep(3600)

    return [count, hang_first]


async def main(url: str, queue_name: str, evidence: str) -> None:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))
    queue = RabbitQueue(url, queue=queue_name)
    worker = Worker(
        queue,
        build(evidence),  # type: ignore[arg-type]
        concurrency=int(os.environ.get("CONCURRENCY", "32")),
        poll_interval=0.2,
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
    anyio.run(main, sys.argv[1], sys.argv[2], sys.argv[3])
