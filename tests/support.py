"""Helpers the tests import (never import from ``conftest``: ``tests/chaos`` has a
conftest of its own, and the name would be ambiguous)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import pytest
import structlog

REDIS_URL = os.environ.get("LIFECYCLE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@contextlib.contextmanager
def structlog_level(level: int) -> Iterator[None]:
    previous = structlog.get_config()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(level))
    try:
        yield
    finally:
        structlog.configure(**previous)


def require_service(name: str, check: Any) -> None:
    """Skip with the reason when a service is unreachable; under CI=true, fail instead."""
    try:
        check()
    except Exception as exc:
        message = f"{name} is not reachable: {type(exc).__name__}: {exc}"
        if os.environ.get("CI"):
            pytest.fail(f"{message} (CI=true: a missing service is a failure, not a skip)")
        pytest.skip(message)
