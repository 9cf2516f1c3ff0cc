"""Queues a Worker can consume: ``MemoryQueue`` (asyncio and trio) and
``RedisStreamQueue`` (Redis Streams with consumer groups; asyncio, needs ``redis``)."""

from typing import Any

from ._base import BrokerUnavailable, Delivery, Queue
from ._memory import MemoryQueue

__all__ = ["BrokerUnavailable", "Delivery", "MemoryQueue", "Queue", "RedisStreamQueue"]


def __getattr__(name: str) -> Any:
    if name == "RedisStreamQueue":  # imported lazily: redis is an optional dependency
        from ._redis import RedisStreamQueue

        return RedisStreamQueue
    raise AttributeError(f"module 'lifecycle.queues' has no attribute {name!r}")
