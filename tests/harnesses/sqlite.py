"""SqliteQueue: "another consumer" is a second queue object on the same database file."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from lifecycle.queues import SqliteQueue

from . import Harness

CASES = [
    pytest.param(("sqlite", "asyncio"), id="sqlite-asyncio"),
    pytest.param(("sqlite", "trio"), id="sqlite-trio"),
]


@asynccontextmanager
async def harness(request: pytest.FixtureRequest, lease: float) -> AsyncIterator[Harness]:
    path = request.getfixturevalue("tmp_path") / "queue.db"

    def make() -> SqliteQueue:
        return SqliteQueue(path, lease=lease, poll_interval=0.02)

    sqlite = Harness(make(), make)
    sqlite.other = sqlite.track(make)
    try:
        yield sqlite
    finally:
        await sqlite.close()
