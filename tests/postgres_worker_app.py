"""Processes for the PostgresQueue tests: ``python tests/postgres_worker_app.py DSN TABLE EVIDENCE``.

A Worker over the queue in TABLE until SIGTERM/SIGINT (graceful stop). Its jobs
(``count``, ``slow``) append what they did to ``EVIDENCE/<what>-<pid>`` with one
unbuffered ``os.write`` per line, so a SIGKILLed process loses no line it wrote.
Environment: ``CONCURRENCY`` (32), ``LEASE`` (seconds, 1.0)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import structlog

from lifecycle import Worker, job
from lifecycle.queues import PostgresQueue


class Evidence:
    """Append-only lines, one ``os.write`` each (O_APPEND: atomic for short lines)."""

    def __init__(self, directory: str, what: str) -> None:
        self.fd = os.open(Path(directory) / f"{what}-{os.getpid()}", os.O_WRONLY | os.O_CREAT | os.O_APPEND)

    def write(self, line: str) -> None:
        os.write(self.fd, f"{line}\n".encode())


_files: dict[str, Evidence] = {}


def record(what: str, line: str) -> None:
    """Append ``line`` to ``$POSTGRES_APP_EVIDENCE/<what>-<pid>``."""
    if what not in _files:
        _files[what] = Evidence(os.environ["POSTGRES_APP_EVIDENCE"], what)
    _files[what].write(line)


@job(name="count")
async def count(i: int) -> None:
    record("done", str(i))


@job(name="slow")
async def slow(i: int, seconds: float = 0.3) -> None:
    record("started", str(i))
    await asyncio.sleep(seconds)
    record("done", str(i))


async def main(dsn: str, table: str) -> None:
    concurrency = int(os.environ.get("CONCURRENCY", "32"))
    queue = PostgresQueue(
        dsn,
        table=table,
        lease=float(os.environ.get("LEASE", "1.0")),
        poll_interval=0.2,
        pool_size=4,
        application_name=f"lc-test-{table}",
    )
    runner = Worker(queue, [count, slow], concurrency=concurrency, poll_interval=0.5)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, runner.stop)
    record("ready", "ready")
    try:
        await runner.run()
    finally:
        await queue.close()


if __name__ == "__main__":
    os.environ["POSTGRES_APP_EVIDENCE"] = sys.argv[3]
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))
    asyncio.run(main(sys.argv[1], sys.argv[2]))
