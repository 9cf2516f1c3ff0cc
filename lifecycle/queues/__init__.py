"""Queues a Worker can consume: ``MemoryQueue`` (asyncio and trio, one process),
``SqliteQueue`` (a SQLite file shared by the processes of one machine; asyncio and trio,
standard library only) and ``RedisStreamQueue`` (Redis Streams with consumer groups;
asyncio, needs ``redis``). ``queue_from_url`` builds one from a URL."""

from typing import Any

from ._base import BrokerUnavailable, Delivery, Queue
from ._memory import MemoryQueue
from ._sqlite import SqliteQueue
from ._url import queue_from_url

__all__ = [
    "BrokerUnavailable",
    "Delivery",
    "MemoryQueue",
    "Queue",
    "RedisStreamQueue",
    "SqliteQueue",
    "queue_from_url",
]


def __getattr__(name: str) -> Any:
    if name == "RedisStreamQueue":  # imported lazily: redis is an optional dependency
        from ._redis import RedisStreamQueue

        return RedisStreamQueue
    raise AttributeError(f"module 'lifecycle.queues' has no attribute {name!r}")
