"""Jobs driven by tests/test_cli.py through the real command line. Every setup and
teardown appends a line to the file named by $EVIDENCE, so the tests can see what ran
even after the process was signalled.

With $SLOW_IMPORT set, importing this module notes "import waiting" and then waits until
the test notes "signal sent": the test's signal then surely arrives during the import."""

from __future__ import annotations

import datetime
import enum
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any, Literal

import anyio
from pydantic import Field

from lifecycle import Depends, JobContext, Worker, dependency, job
from lifecycle.queues import MemoryQueue


def note(text: str) -> None:
    with open(os.environ["EVIDENCE"], "a") as fh:
        fh.write(text + "\n")


def _wait_for_the_signal() -> None:
    note("import waiting")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with open(os.environ["EVIDENCE"]) as fh:
            if "signal sent\n" in fh.read():
                break
        time.sleep(0.02)
    note("import done")


if os.environ.get("SLOW_IMPORT"):
    _wait_for_the_signal()


class Color(enum.Enum):
    red = "r"
    blue = "b"


@dependency(scope="worker")
async def pool() -> AsyncIterator[str]:
    note("pool up")
    try:
        yield "pool"
    finally:
        note("pool down")


async def session(p: Annotated[str, Depends(pool)], ctx: JobContext) -> AsyncIterator[str]:
    note(f"session up {ctx.args}")
    try:
        yield "session"
    except BaseException as exc:
        note(f"session saw {type(exc).__name__}")
        raise
    finally:
        await anyio.sleep(0)  # teardown may await even when cancelled: it is shielded
        note("session down")


@job
async def convert(
    count: int,
    ratio: float = 0.5,
    loud: bool = False,
    path: Path | None = None,
    color: Color = Color.red,
    mode: Literal["fast", "slow"] = "fast",
    tags: list[str] = [],  # noqa: B006 - a CLI default, never mutated
    limit: int | None = None,
) -> dict[str, object]:
    """Echo converted options back as JSON.

    Args:
        count: How many.
        loud: Shout.
    """
    return {
        "count": count,
        "ratio": ratio,
        "loud": loud,
        "path": str(path) if path else None,
        "color": color.name,
        "mode": mode,
        "tags": tags,
        "limit": limit,
    }


@job
async def work(n: int, s: Annotated[str, Depends(session)], pause: float = 0.0) -> str:
    if pause:
        note(f"working {n}")
        await anyio.sleep(pause)
    if n < 0:
        raise ValueError(f"negative n: {n}")
    return f"{s} {n}"


async def stuck_teardown() -> AsyncIterator[None]:
    note("stuck up")
    try:
        yield
    finally:
        note("stuck teardown started")
        with anyio.CancelScope(shield=True):
            await anyio.sleep(60)
        note("stuck teardown finished")


@job
async def hang(s: Annotated[None, Depends(stuck_teardown)]) -> None:
    note("hang running")
    await anyio.sleep(60)


@job
async def interrupt_self(s: Annotated[None, Depends(stuck_teardown)]) -> None:
    """Signals before its first await: the earliest a SIGINT can reach the CLI."""
    os.kill(os.getpid(), signal.SIGINT)
    note("interrupt sent")
    await anyio.sleep(60)


queue = MemoryQueue()
for i in range(3):
    queue.enqueue_nowait("work", {"n": i})
worker = Worker(queue, [work], concurrency=2)


@job
async def fail_in_parts() -> None:
    """Fails with an exception group, as a job running a task group does."""
    raise ExceptionGroup("job parts", [ValueError("left part"), KeyError("right part")])


@job
async def leak_secret() -> None:
    """Fails with a password in its error message."""
    raise ConnectionError("cannot reach postgresql://app:s3cret-pw@db.internal:5432/app")


busy_queue = MemoryQueue()
busy_queue.enqueue_nowait("work", {"n": 7, "pause": 2.0})
busy_worker = Worker(busy_queue, [work], shutdown_grace=30)  # in-flight jobs may finish

stuck_queue = MemoryQueue()
stuck_queue.enqueue_nowait("hang", {})
stuck_worker = Worker(stuck_queue, [hang], shutdown_grace=0)  # cancelled at once; teardown hangs


class CrashingWorker(Worker):
    """Crashes inside a task group after starting, as a worker whose reader broke would."""

    async def run(self) -> None:
        async def read() -> None:
            await anyio.sleep(0)
            raise RuntimeError("broker exploded: connection to redis://:s3cret-pw@127.0.0.1:1/0 reset")

        note("crashing")
        async with anyio.create_task_group() as tg:
            tg.start_soon(read)


crashing_worker = CrashingWorker(MemoryQueue(), [work])


@job
async def shapes(kind: str) -> object:
    """Returns results JSON can and cannot carry, for the --jsonl output."""
    results: dict[str, Any] = {
        "plain": {"a": [1, 2.5, None, True]},
        "none": None,
        "text": "just text",
        "objects": {"when": datetime.date(2024, 1, 2), "ids": {7}},
        "nan": float("nan"),
        "tuple_keys": {(1, 2): "x"},
    }
    return results[kind]


@job
async def containers(
    counts: dict[str, int] | None = None,
    pair: tuple[int, int] | None = None,
    many: tuple[int, ...] = (),
    matrix: list[list[int]] = [],  # noqa: B006 - a CLI default, never mutated
    by_id: dict[int, float] | None = None,
) -> dict[str, object]:
    """Echo container options back, with their Python types."""
    return {
        "counts": counts,
        "pair": pair,
        "pair_type": type(pair).__name__,
        "many": many,
        "many_type": type(many).__name__,
        "matrix": matrix,
        "by_id": by_id,
    }


@job
async def positive(n: Annotated[int, Field(gt=0)]) -> int:
    """Its payload validation (pydantic) rejects what click accepts: n <= 0."""
    return n
