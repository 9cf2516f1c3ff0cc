"""A Dramatiq app for tests/test_dramatiq.py, started with the usual command:
``dramatiq dramatiq_app --processes N --threads M --queues QUEUE``. The broker (RabbitMQ
or Redis), the queue, the loop's anyio backend and a broken worker-scoped dependency are
chosen by environment variables; results go to Redis. Every setup and teardown appends
``PID text`` to the file named by $EVIDENCE."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Annotated

import anyio
import dramatiq
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from dramatiq.brokers.redis import RedisBroker
from dramatiq.results import Results
from dramatiq.results.backends import RedisBackend

from lifecycle import Depends, JobContext, Reject, Retry, dependency
from lifecycle.dramatiq import DramatiqLifecycle

QUEUE = os.environ.get("LIFECYCLE_DRAMATIQ_QUEUE", "lifecycle-tests")
KIND = os.environ.get("LIFECYCLE_DRAMATIQ_BROKER", "rabbitmq")
_AMQP = os.environ.get("LIFECYCLE_TEST_BROKER", "amqp://guest:guest@127.0.0.1:5672//")
# pika reads the default vhost "/" only percent-encoded (kombu's trailing "//" is "" to it).
RABBIT_URL = _AMQP[:-1] + "%2F" if _AMQP.endswith("//") else _AMQP
REDIS_URL = os.environ.get("LIFECYCLE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")

broker: dramatiq.Broker = RabbitmqBroker(url=RABBIT_URL) if KIND == "rabbitmq" else RedisBroker(url=REDIS_URL)
results = RedisBackend(url=REDIS_URL)
broker.add_middleware(Results(backend=results, result_ttl=600_000))
dramatiq.set_broker(broker)
lc = DramatiqLifecycle(broker, teardown_timeout=5, backend=os.environ.get("LIFECYCLE_DRAMATIQ_BACKEND", "asyncio"))


def note(text: str) -> None:
    with open(os.environ.get("EVIDENCE", os.devnull), "a") as fh:
        fh.write(f"{os.getpid()} {text}\n")


@dependency(scope="worker")
async def pool() -> AsyncIterator[str]:
    note("pool up")
    yield "pool"
    await anyio.sleep(0)
    note("pool down")


@dependency(scope="worker")
async def settings(p: Annotated[str, Depends(pool)]) -> AsyncIterator[str]:
    if os.environ.get("LIFECYCLE_DRAMATIQ_BROKEN_SETTINGS"):
        raise RuntimeError("settings file missing")
    note("settings up")
    yield "settings"
    note("settings down")


async def session(p: Annotated[str, Depends(pool)], ctx: JobContext) -> AsyncIterator[str]:
    note(f"session up {ctx.name} attempt={ctx.attempt}")
    try:
        yield "session"
    except BaseException as exc:
        note(f"session saw {type(exc).__name__}")
        raise
    finally:
        await anyio.sleep(0.05)  # an awaiting teardown: it must survive the cancellation
        note("session down")


async def bad_commit() -> AsyncIterator[None]:
    yield
    raise RuntimeError("commit failed")


@lc.actor(queue_name=QUEUE, store_results=True)
async def add(a: int, b: int, s: Annotated[str, Depends(session)], cfg: Annotated[str, Depends(settings)]) -> int:
    return a + b


@lc.actor(queue_name=QUEUE, store_results=True)
async def whoami(p: Annotated[str, Depends(pool)]) -> int:
    await anyio.sleep(0.05)
    return os.getpid()


@lc.actor(queue_name=QUEUE, store_results=True, max_retries=2)
async def flaky(ctx: JobContext, s: Annotated[str, Depends(session)]) -> int:
    if ctx.attempt < 3:
        raise Retry(delay=0.1)
    return ctx.attempt


@lc.actor(queue_name=QUEUE, store_results=True, max_retries=1)
async def stubborn(s: Annotated[str, Depends(session)]) -> None:
    raise Retry(delay=0.1)


@lc.actor(queue_name=QUEUE, store_results=True, max_retries=5)
async def rejected(s: Annotated[str, Depends(session)]) -> None:
    raise Reject("not for us")


@lc.actor(queue_name=QUEUE, store_results=True, max_retries=0)
async def fails_in_teardown(s: Annotated[str, Depends(session)], b: Annotated[None, Depends(bad_commit)]) -> int:
    return 1


@lc.actor(queue_name=QUEUE, store_results=True, max_retries=0, time_limit=1000)
async def slow(s: Annotated[str, Depends(session)]) -> None:
    await anyio.sleep(60)
