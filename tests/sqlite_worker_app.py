"""Processes for the SqliteQueue tests: ``python tests/sqlite_worker_app.py MODE DB EVIDENCE``.

- ``worker``: a Worker over the queue in DB until SIGTERM/SIGINT (graceful stop). Its
  jobs (``count``, ``slow``) append what they did to ``EVIDENCE/<what>-<pid>`` with one
  unbuffered ``os.write`` per line, so a SIGKILLed process loses no line it wrote. The
  module is also a target for ``lifecycle worker`` (evidence directory in the
  environment variable ``SQLITE_APP_EVIDENCE``). Environment:
  ``CONCURRENCY`` (32), ``LEASE`` (seconds, 1.0), ``BACKEND`` (asyncio or trio).
- ``churn``: enqueues and settles in a loop, recording each step in ``EVIDENCE/churn``
  before (``settle``) and after (``enq``, ``settled``) it, until it is killed; the test
  kills it with SIGKILL mid-write and checks the database against the record.
  ``START`` (environment) is the first payload number."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import anyio
import structlog

from lifecycle import Worker, job
from lifecycle.queues import SqliteQueue


class Evidence:
    """Append-only lines, one ``os.write`` each (O_APPEND: atomic for short lines)."""

    def __init__(self, directory: str, what: str) -> None:
        self.fd = os.open(Path(directory) / f"{what}-{os.getpid()}", os.O_WRONLY | os.O_CREAT | os.O_APPEND)

    def write(self, line: str) -> None:
        os.write(self.fd, f"{line}\n".encode())


_files: dict[str, Evidence] = {}


def record(what: str, line: str) -> None:
    """Append ``line`` to ``$SQLITE_APP_EVIDENCE/<what>-<pid>``."""
    if what not in _files:
        _files[what] = Evidence(os.environ["SQLITE_APP_EVIDENCE"], what)
    _files[what].write(line)


@job(name="count")
def count(i: int) -> None:
    record("done", str(i))


@job(name="slow")
async def slow(i: int, seconds: float = 0.3) -> None:
    record("started", str(i))
    await anyio.sleep(seconds)
    record("done", str(i))


async def worker(db: str, evidence: str) -> None:
    queue = SqliteQueue(db, lease=float(os.environ.get("LEASE", "1.0")), poll_interval=0.02)
    runner = Worker(queue, [count, slow], concurrency=int(os.environ.get("CONCURRENCY", "32")), poll_interval=0.2)
    async with anyio.create_task_group() as tg:

        async def on_signal() -> None:
            with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    runner.stop()
                    return

        tg.start_soon(on_signal)
        record("ready", "ready")
        await runner.run()
        tg.cancel_scope.cancel()
    await queue.close()


async def churn(db: str, evidence: str) -> None:
    """Enqueue two, settle up to two (ack, retry or dead-letter by payload), forever."""
    queue = SqliteQueue(db, lease=0.5, poll_interval=0.01)
    log = Evidence(evidence, "churn")
    number = int(os.environ.get("START", "0"))
    while True:
        for _ in range(2):
            message_id = await queue.enqueue("count", {"i": number})
            log.write(f"enq {number} {message_id}")
            number += 1
        for delivery in await queue.receive(2, 0):
            i = delivery.payload["i"]
            op = ("ack", "retry", "dead_letter")[i % 3] if delivery.attempt == 1 else "ack"
            log.write(f"settle {op} {i}")
            if op == "ack":
                settled = await queue.ack(delivery)
            elif op == "retry":
                settled = await queue.retry(delivery, 0, "E: again")
            else:
                settled = await queue.dead_letter(delivery, {"job": "count", "payload": {"i": i}, "reason": "failed"})
            log.write(f"settled {op} {i} {settled}")


if __name__ == "__main__":
    os.environ["SQLITE_APP_EVIDENCE"] = sys.argv[3]
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))
    mode, db, directory = sys.argv[1:4]
    main = {"worker": worker, "churn": churn}[mode]
    anyio.run(main, db, directory, backend=os.environ.get("BACKEND", "asyncio"))
