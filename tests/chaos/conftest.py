"""Fixtures of the chaos group: a private redis-server per test (with and without
appendonly) and the worker processes under test. (The other brokers' private servers
are fixtures of ``test_broker_restarts.py``, from ``servers.py``.)

Without a ``redis-server`` binary the group is skipped with the reason; under CI=true
that is a failure (as ``require_service`` does for the shared services)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from chaos_harness import RedisServer, WorkerPool, require_redis_server


@pytest.fixture(params=["appendonly", "volatile"])
def redis_server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test's own: ``appendonly`` (appendfsync always: a kill -9
    loses nothing acknowledged) or ``volatile`` (nothing on disk but explicit BGSAVEs).
    A test that needs one variant only parametrizes it indirectly."""
    require_redis_server()
    directory = tmp_path / "redis"
    directory.mkdir()
    server = RedisServer(directory, appendonly=request.param == "appendonly")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def stream() -> str:
    return f"chaos-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def workers(redis_server: RedisServer, stream: str, tmp_path: Path) -> Iterator[WorkerPool]:
    """Worker processes on ``stream`` (none started yet); any left are killed at the end."""
    pool = WorkerPool(redis_server, stream, tmp_path / "workers")
    pool.directory.mkdir()
    try:
        yield pool
    finally:
        pool.cleanup()
