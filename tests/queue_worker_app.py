"""A worker process for the multi-process queue tests (``tests/test_queue_workers.py``)
and the chaos tests: ``python tests/queue_worker_app.py URL NAME``.

It runs ``lifecycle``'s Worker with the library's defaults (heartbeats included) on the
queue NAME of the broker the URL's scheme names (``broker_probes.make_queue``: Redis,
PostgreSQL, RabbitMQ, NATS JetStream or SQLite). It is configured only through the
environment:

- ``RECORD_DIR``: where each job appends one line per execution, to ``<pid>.log``;
- ``CLAIM_IDLE`` (seconds, default 2): the lease (Redis's ``claim_idle``, the other
  backends' ``lease``); ``CONCURRENCY`` (default 16), ``POLL_INTERVAL`` (seconds,
  default 0.5); ``BROKER_BACKOFF_MAX`` (seconds, default the Worker's): the cap on the
  wait between attempts to reach a broker that is down; ``JOB_SECONDS`` (default 0):
  how long each ``count`` job takes.

Why executions are counted in a local file and not in the broker: the chaos tests kill
-9 the broker, and (Redis without appendonly) that can lose whatever the jobs wrote
there, so counts kept in the broker could not tell "ran once" from "ran twice, one count lost". A line
written with ``os.write`` to an ``O_APPEND`` descriptor is in the kernel as soon as the
call returns: it survives a SIGKILL of this process (the other fault injected here)
and lines from one process never interleave. fsync would only protect against the
machine itself crashing, which no test simulates, so it is left out (it costs ~0.1 ms
a job). One file per process keeps writers apart; the test sums them.

SIGTERM/SIGINT stop the worker gracefully; it exits 0. Log events go to stderr as JSON
lines (the test redirects them to a file): warnings and errors, plus every
``worker.*`` event (broker unavailable/recovered), so that a test can show them."""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, MutableMapping
from typing import Annotated, Any

import anyio
import structlog
from broker_probes import make_queue

from lifecycle import Depends, Reject, Worker, dependency, job


class Recorder:
    """Appends one line per event to this process's record file."""

    def __init__(self, directory: str) -> None:
        self.fd = os.open(os.path.join(directory, f"{os.getpid()}.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def write(self, line: str) -> None:
        os.write(self.fd, f"{line}\n".encode())


@dependency(scope="worker")
async def recorder() -> AsyncIterator[Recorder]:
    rec = Recorder(os.environ["RECORD_DIR"])
    yield rec
    os.close(rec.fd)


JOB_SECONDS = float(os.environ.get("JOB_SECONDS", "0"))


@job(name="count")
async def count(i: int, rec: Annotated[Recorder, Depends(recorder)]) -> None:
    """One execution of message ``i`` (taking ``JOB_SECONDS``, so a drain lasts)."""
    if JOB_SECONDS > 0:
        await anyio.sleep(JOB_SECONDS)
    rec.write(f"count {i}")


@job(name="long")
async def long(i: int, seconds: float, rec: Annotated[Recorder, Depends(recorder)]) -> None:
    """A job that outlasts the queue's lease several times over: only heartbeats keep
    another consumer from taking it over."""
    rec.write(f"long-start {i}")
    await anyio.sleep(seconds)
    rec.write(f"long-end {i}")


@job(name="poison")
async def poison(i: int) -> None:
    """Genuine poison: always rejected, so it belongs in the dead letters."""
    raise Reject(f"message {i} is poison by design")


def _keep(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    # INFO is enabled so that worker.broker_recovered (if logged at info) gets through;
    # the per-job info events would only flood the file.
    if event.get("level") in ("warning", "error", "critical") or str(event.get("event", "")).startswith("worker."):
        return event
    raise structlog.DropEvent


async def main(url: str, stream: str) -> None:
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            _keep,
            structlog.processors.TimeStamper(fmt="iso"),
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )
    queue = make_queue(url, stream)
    worker = Worker(
        queue,
        [count, long, poison],
        concurrency=int(os.environ.get("CONCURRENCY", "16")),
        poll_interval=float(os.environ.get("POLL_INTERVAL", "0.5")),
        **(
            {"broker_backoff_max": float(os.environ["BROKER_BACKOFF_MAX"])}
            if "BROKER_BACKOFF_MAX" in os.environ
            else {}
        ),
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
    anyio.run(main, sys.argv[1], sys.argv[2])
