"""A worker app with schedules, driven by tests/test_schedules.py and
tests/test_schedule_fleet.py through the real command line.

$QUEUE_URL names the queue (default ``memory://``); $EVERY the interval of ``beat`` in
seconds. Every run of ``beat`` appends ``<tick> <pid>`` to the file named by $EVIDENCE,
so the tests can count the runs of each tick across processes, even after a SIGKILL."""

from __future__ import annotations

import os
from datetime import datetime

from lifecycle import Schedule, Worker, job
from lifecycle.queues import queue_from_url


def note(text: str) -> None:
    with open(os.environ["EVIDENCE"], "a") as fh:
        fh.write(text + "\n")


@job
async def beat(tick: datetime, region: str = "eu") -> None:
    note(f"{tick.timestamp():.3f} {os.getpid()} {region}")


@job(cron="0 3 * * *", timezone="Europe/Berlin")
async def nightly() -> None:
    note("nightly")


every = float(os.environ.get("EVERY", "1"))
beats = Schedule(beat, every=every, tick_param="tick", catch_up="latest", payload={"region": "eu"})
worker = Worker(
    queue_from_url(os.environ.get("QUEUE_URL", "memory://")),
    [beat],
    schedules=[beats],
    poll_interval=0.2,
    shutdown_grace=5,
)
