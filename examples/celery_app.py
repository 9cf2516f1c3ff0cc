"""lifecycle inside Celery. Start a worker the usual way, from this directory:

    celery -A celery_app worker --pool prefork -c 2 --loglevel INFO

then, from a Python shell in the same directory:

    >>> from celery_app import send_welcome
    >>> send_welcome.delay(user_id=1).get(timeout=10)
    'welcome mail sent to user 1 via pool-...'

Broker: RabbitMQ at 127.0.0.1:5672 (guest/guest); results: Redis at 127.0.0.1:6379/2.

Delivery is at-least-once: CeleryLifecycle acknowledges tasks late and requeues a task
whose worker process was killed, so a crash never loses a task, but a task may then run
twice. Keep tasks idempotent (here: sending the same welcome mail twice is tolerable).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from typing import Annotated

from celery import Celery

from lifecycle import Depends, JobContext, Retry, dependency
from lifecycle.celery import CeleryLifecycle

app = Celery(
    "example",
    broker=os.environ.get("BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//"),
    backend=os.environ.get("RESULT_BACKEND", "redis://127.0.0.1:6379/2"),
)
app.conf.update(task_serializer="json", result_serializer="json", accept_content=["json"])
lc = CeleryLifecycle(app)  # worker-scoped dependencies live per worker process


@dependency(scope="worker")
async def pool() -> AsyncIterator[str]:
    """Created once per worker process, on its long-lived event loop."""
    name = f"pool-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    print(f"[{os.getpid()}] opened {name}")
    yield name
    print(f"[{os.getpid()}] closed {name}")


async def connection(p: Annotated[str, Depends(pool)], ctx: JobContext) -> AsyncIterator[str]:
    """One per task; the task's exception (if any) arrives at the yield."""
    try:
        yield f"{p}/conn-{ctx.id[:8]}"
    except Exception as exc:
        print(f"[{os.getpid()}] rolling back after {type(exc).__name__}")
        raise


@lc.task(name="send_welcome", retries=3)  # acks_late, reject_on_worker_lost: lifecycle's defaults
async def send_welcome(user_id: int, conn: Annotated[str, Depends(connection)], ctx: JobContext) -> str:
    if user_id < 0:
        raise Retry(delay=1.0)  # becomes Celery's retry(countdown=1.0)
    return f"welcome mail sent to user {user_id} via {conn}"
