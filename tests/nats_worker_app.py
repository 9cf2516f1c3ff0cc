"""A worker process for the NATS tests: ``python tests/nats_worker_app.py URL STREAM DIR``.

Jobs record each run as a line appended to a file of ``DIR`` named after this process
(one small ``O_APPEND`` write per run), so the test can count executions across
processes. SIGTERM/SIGINT stop the worker gracefully."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

import anyio
import structlog

from lifecycle import Worker, job
from lifecycle.queues import NatsQueue


def record(directory: str, line: str) -> None:
    fd = os.open(Path(directory) / f"runs-{os.getpid()}.txt", os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, f"{line}\n".encode())
    finally:
        os.close(fd)


def build(directory: str) -> list[Any]:
    """The jobs, recording into files of ``directory``."""

    @job(name="count")
    def count(i: int) -> None:
        record(directory, f"count {i}")

    @job(name="hang_first")
    async def hang_first(i: int) -> None:
        """The first execution hangs (its process gets killed); a later one completes."""
        started = Path(directory) / f"started-{i}"
        first = not started.exists()
        started.touch()
        record(directory, f"started {i}")
        if first:
            await anyio.sleep(3600)
        record(directory, f"finished {i}")

    return [count, hang_first]


def runs(directory: str | Path) -> list[str]:
    """Every line the jobs recorded, from every process."""
    return [line for path in Path(directory).glob("runs-*.txt") for line in path.read_text().splitlines()]


async def main(url: str, stream: str, directory: str) -> None:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))
    lease = float(os.environ.get("LEASE", "1.0"))
    queue = NatsQueue(url, stream=stream, subject=f"test.{stream}", lease=lease)
    worker = Worker(queue, build(directory), concurrency=int(os.environ.get("CONCURRENCY", "32")), poll_interval=0.2)
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
