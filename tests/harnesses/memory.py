"""MemoryQueue: in-process, so "another consumer" is the same queue object."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from lifecycle.queues import MemoryQueue

from . import Harness

CASES = [
    pytest.param(("memory", "asyncio"), id="memory-asyncio"),
    pytest.param(("memory", "trio"), id="memory-trio"),
]


@asynccontextmanager
async def harness(request: pytest.FixtureRequest, lease: float) -> AsyncIterator[Harness]:
    memory = MemoryQueue(lease=lease)
    yield Harness(memory, lambda: memory)
