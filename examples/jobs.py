"""Jobs for the command line: ``lifecycle list examples/jobs.py`` (or, from the
repository's root, the dotted ``lifecycle list examples.jobs``).

lifecycle run examples/jobs.py:greet --name Ada --times 2
lifecycle run examples/jobs.py:greet -h
lifecycle graph examples/jobs.py:greet --format mermaid
printf '{"name": "Ada"}\\n{"name": "Bob"}\\n' | lifecycle run examples/jobs.py:greet --jsonl -
    # stdout: {"line": 1, "ok": true, "result": "hello Ada"} ... one object per line
lifecycle run examples/jobs.py:worker          # consumes 5 queued messages; Ctrl-C to stop
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated

import anyio

from lifecycle import Depends, JobContext, Worker, dependency, job
from lifecycle.queues import MemoryQueue

AUDIT_LOG = Path(os.environ.get("LIFECYCLE_EXAMPLE_AUDIT", "/tmp/lifecycle-example-audit.log"))


@dependency(scope="worker")
async def audit_file() -> AsyncIterator[Path]:
    """Opened once per process; every job appends to it, closed at shutdown."""
    AUDIT_LOG.touch()
    yield AUDIT_LOG
    with AUDIT_LOG.open("a") as fh:
        fh.write("worker scope closed\n")


async def audit(path: Annotated[Path, Depends(audit_file)], ctx: JobContext) -> AsyncIterator[None]:
    """Records the outcome of each job, whatever happens in it."""
    try:
        yield
    except BaseException as exc:
        with path.open("a") as fh:
            fh.write(f"{ctx.name} {ctx.id} failed: {type(exc).__name__}\n")
        raise
    with path.open("a") as fh:
        fh.write(f"{ctx.name} {ctx.id} ok\n")


@job(dependencies=[Depends(audit)])
async def greet(name: str, times: int = 1, shout: bool = False, pause: float = 0.0) -> str:
    """Greet someone.

    Args:
        name: Who to greet.
        times: How many times.
        shout: Upper-case the greeting.
        pause: Seconds to wait first (to try Ctrl-C).
    """
    await anyio.sleep(pause)
    text = " ".join([f"hello {name}"] * times)
    return text.upper() if shout else text


queue = MemoryQueue()
for who in ("Ada", "Bob", "Cy", "Di", "Ed"):
    queue.enqueue_nowait("greet", {"name": who})

worker = Worker(queue, [greet], concurrency=2)
