"""Shared fixtures: every async test runs on asyncio and on trio."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from typing import Any

import pytest
import structlog
from hypothesis import HealthCheck, settings
from support import REDIS_URL, require_service, structlog_level

settings.register_profile(
    "ci", max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)
settings.register_profile("dev", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


def _drop(_logger: Any, _name: str, _event: Any) -> Any:
    raise structlog.DropEvent


# The library never configures structlog; the test suite silences it so that the
# default console renderer does not flood the output. capture_logs() still works.
# INFO, as in production: jobs then take the untraced runner (no per-dependency debug
# events). Tests of the traced runner ask for the ``debug_logs`` fixture.
structlog.configure(processors=[_drop], wrapper_class=structlog.make_filtering_bound_logger(logging.INFO))


@pytest.fixture(params=["untraced", "traced"])
def both_runners(request: pytest.FixtureRequest) -> Iterator[None]:
    """Run the test with each of a plan's two runners: the untraced one (generated clean
    teardown after a successful body) and the traced one (the general teardown loop)."""
    with structlog_level(logging.DEBUG if request.param == "traced" else logging.INFO):
        yield


@pytest.fixture
def debug_logs() -> Iterator[None]:
    """DEBUG level for one test: jobs run the traced plan runner."""
    with structlog_level(logging.DEBUG):
        yield


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)




@pytest.fixture
def redis_url() -> str:
    def ping() -> None:
        import redis

        client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
        try:
            client.ping()
        finally:
            client.close()

    require_service("Redis", ping)
    return REDIS_URL
