"""PostgresQueue against the real PostgreSQL (asyncio only): "another consumer" is a
second queue object on the same table. Skipped with a reason when the server is
unreachable, failing under CI=true (``LIFECYCLE_TEST_POSTGRES_DSN`` names another)."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from support import require_service

from . import Harness

POSTGRES_DSN = os.environ.get("LIFECYCLE_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")

CASES = [pytest.param(("postgres", "asyncio"), id="postgres-asyncio", marks=pytest.mark.postgres)]


def check_postgres() -> None:
    """Reach the server's port (a skip, or a failure under CI=true, names why not); a
    sync check, since the harness runs inside the test's event loop."""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(POSTGRES_DSN)
    socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 5432), timeout=3).close()


async def drop_tables(table: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(POSTGRES_DSN)
    try:
        await conn.execute(
            f'DROP TABLE IF EXISTS "{table}", "{table}_dead", "{table}_dedup"; DROP SEQUENCE IF EXISTS "{table}_seq"'
        )
    finally:
        await conn.close()


@asynccontextmanager
async def harness(request: pytest.FixtureRequest, lease: float) -> AsyncIterator[Harness]:
    from lifecycle.queues import PostgresQueue

    require_service("PostgreSQL", check_postgres)
    table = f"lc_contract_{uuid.uuid4().hex[:12]}"

    def make() -> PostgresQueue:
        return PostgresQueue(POSTGRES_DSN, table=table, lease=lease, poll_interval=0.05)

    postgres = Harness(make(), make)
    postgres.other = postgres.track(make)
    try:
        yield postgres
    finally:
        await postgres.close()
        await drop_tables(table)
