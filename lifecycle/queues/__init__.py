"""Queues a Worker can consume, all keeping one contract (``Queue``): ``MemoryQueue``
(asyncio and trio, one process), ``SqliteQueue`` (a SQLite file shared by the processes
of one machine; asyncio and trio, standard library only), and on asyncio, each with its
optional client library: ``RedisStreamQueue`` (Redis Streams, ``redis``),
``PostgresQueue`` (``asyncpg``), ``RabbitQueue`` (a quorum queue, ``aio-pika``) and
``NatsQueue`` (JetStream, ``nats-py``). ``queue_from_url`` builds one from a URL."""

from typing import Any

from ._base import BrokerUnavailable, Delivery, Queue
from ._memory import MemoryQueue
from ._sqlite import SqliteQueue
from ._url import queue_from_url

__all__ = [
    "BrokerUnavailable",
    "Delivery",
    "MemoryQueue",
    "NatsQueue",
    "PostgresQueue",
    "Queue",
    "RabbitQueue",
    "RedisStreamQueue",
    "SqliteQueue",
    "queue_from_url",
]


def __getattr__(name: str) -> Any:
    if name == "RedisStreamQueue":  # imported lazily: redis is an optional dependency
        from ._redis import RedisStreamQueue

        return RedisStreamQueue
    if name == "RabbitQueue":  # imported lazily: aio-pika is an optional dependency
        from ._rabbit import RabbitQueue

        return RabbitQueue
    if name == "PostgresQueue":  # imported lazily: asyncpg is an optional dependency
        from ._postgres import PostgresQueue

        return PostgresQueue
    if name == "NatsQueue":  # imported lazily: nats-py is an optional dependency
        from ._nats import NatsQueue

        return NatsQueue
    raise AttributeError(f"module 'lifecycle.queues' has no attribute {name!r}")
