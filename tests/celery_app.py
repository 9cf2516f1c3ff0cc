"""A Celery app for tests/test_celery.py, started with the usual command:
``celery -A celery_app worker --pool prefork|threads|solo``. Every setup and teardown
appends ``PID text`` to the file named by $EVIDENCE. The tasks take lifecycle's delivery
defaults (acks_late, reject_on_worker_lost). They are not shared (``shared=False``): the
tests import this module afresh per worker and build other apps in the same process."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Annotated

import anyio
from celery import Celery
from kombu import Queue

from lifecycle import Depends, JobContext, Reject, Retry, dependency
from lifecycle.celery import CeleryLifecycle

QUEUE = os.environ.get("LIFECYCLE_CELERY_QUEUE", "lifecycle-tests")

app = Celery(
    "lifecycle_tests",
    broker=os.environ.get("LIFECYCLE_TEST_BROKER", "amqp://guest:guest@127.0.0.1:5672//"),
    backend=os.environ.get("LIFECYCLE_TEST_RESULTS", "redis://127.0.0.1:6379/1"),
)
app.conf.update(
    task_default_queue=QUEUE,
    task_queues=[Queue(QUEUE, auto_delete=True)],
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    result_expires=600,
)
lc = CeleryLifecycle(app, teardown_timeout=5)


def note(text: str) -> None:
    with open(os.environ.get("EVIDENCE", os.devnull), "a") as fh:
        fh.write(f"{os.getpid()} {text}\n")


@dependency(scope="worker")
async def pool() -> AsyncIterator[str]:
    note("pool up")
    yield "pool"
    await anyio.sleep(0)
    note("pool down")


async def session(p: Annotated[str, Depends(pool)], ctx: JobContext) -> AsyncIterator[str]:
    note(f"session up {ctx.name} attempt={ctx.attempt}")
    try:
        yield "session"
    except BaseException as exc:
        note(f"session saw {type(exc).__name__}")
        raise
    finally:
        note("session down")


async def bad_commit() -> AsyncIterator[None]:
    yield
    raise RuntimeError("commit failed")


@lc.task(name="add", shared=False, acks_late=True)
async def add(a: int, b: int, s: Annotated[str, Depends(session)]) -> int:
    return a + b


@lc.task(name="whoami", shared=False)
async def whoami(p: Annotated[str, Depends(pool)]) -> int:
    await anyio.sleep(0.05)
    return os.getpid()


@lc.task(name="flaky", shared=False, retries=2)
async def flaky(ctx: JobContext, s: Annotated[str, Depends(session)]) -> int:
    if ctx.attempt < 3:
        raise Retry(delay=0.1)
    return ctx.attempt


@lc.task(name="rejected", shared=False, acks_late=True)
async def rejected(s: Annotated[str, Depends(session)]) -> None:
    raise Reject("not for us")


@lc.task(name="fails_in_teardown", shared=False)
async def fails_in_teardown(s: Annotated[str, Depends(session)], b: Annotated[None, Depends(bad_commit)]) -> int:
    return 1


@lc.task(name="slow", shared=False, soft_time_limit=1)
async def slow(s: Annotated[str, Depends(session)]) -> None:
    await anyio.sleep(30)


@lc.task(name="victim", shared=False)  # lifecycle's delivery defaults: acks_late, reject_on_worker_lost
async def victim(marker: str, p: Annotated[str, Depends(pool)], ctx: JobContext) -> int:
    """The first delivery hangs until the test SIGKILLs its process; the redelivered
    one (the marker file exists by then) returns the pid of the process that ran it."""
    note(f"victim started attempt={ctx.attempt}")
    if not os.path.exists(marker):
        open(marker, "w").close()
        await anyio.sleep(120)
    return os.getpid()
