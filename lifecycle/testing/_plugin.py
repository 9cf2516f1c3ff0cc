"""The pytest plugin, registered through the ``pytest11`` entry point.

It is loaded by every pytest run once lifecycle is installed, so it does nothing until
used: it adds fixtures, one marker and one ini option, and no autouse fixture or
per-test hook, so a suite that uses none of them runs as before. Loading it imports
the ``lifecycle`` package (its parent), about 0.2 s once per session on a cold start.
It defines no ``anyio_backend`` fixture: the async fixtures run on whatever backends
the test suite chose (anyio's plugin runs them).

Fixtures:
- ``lifecycle_overrides``: ``{original: replacement}`` used by the two below; override
  this fixture (in a ``conftest.py`` or a test module) to set it once.
- ``lifecycle_runtime``: an open ``Runtime`` with those overrides; closed after the
  test, so any override a test adds dies with it.
- ``lifecycle_worker``: a factory ``lifecycle_worker(jobs, **options)`` of
  ``TestWorker`` on a fresh ``MemoryQueue``, with ``await worker.drain()``.
- ``job_context``: a frozen ``JobContext`` named after the test.
- ``lifecycle_leaks``: fails the test if it left threads, tasks, suspended generators
  or open runtimes behind (the ini option ``lifecycle_leak_grace`` sets how long it
  waits for them to finish first; default 2 seconds).
- ``lifecycle_exploration``: the ``Exploration`` of a test marked with
  ``lifecycle.testing.explore_faults``; the test fails with its report if any fault
  point broke the contract."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from lifecycle import JobContext, Runtime
    from lifecycle.testing import Exploration, TestWorker

from ._marker import MARKER


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini(
        "lifecycle_leak_grace",
        "seconds the lifecycle_leaks fixture waits for leftovers to finish before they count (default 2)",
        default="2.0",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{MARKER}(job, *args, **kwargs): explore the job's fault points before the test "
        "(use lifecycle.testing.explore_faults)",
    )


@pytest.fixture
def lifecycle_overrides() -> dict[Any, Any]:
    """``{original: replacement}`` for ``lifecycle_runtime`` and ``lifecycle_worker``;
    empty unless a test suite overrides this fixture."""
    return {}


@pytest.fixture
async def lifecycle_runtime(lifecycle_overrides: dict[Any, Any]) -> AsyncIterator[Runtime]:
    """An open ``lifecycle.Runtime`` with ``lifecycle_overrides``, closed after the test
    (its worker-scoped dependencies torn down, its overrides gone)."""
    from lifecycle import Runtime

    async with Runtime(dependency_overrides=lifecycle_overrides) as rt:
        yield rt


@pytest.fixture
def lifecycle_worker(lifecycle_overrides: dict[Any, Any]) -> Callable[..., TestWorker]:
    """A factory: ``lifecycle_worker(jobs, **options)`` makes a ``TestWorker`` (a
    ``Worker`` on its own ``MemoryQueue``) with ``lifecycle_overrides`` merged under
    any ``dependency_overrides`` given. ``await worker.drain()`` runs it until the
    queue is empty and returns what happened."""
    from lifecycle.testing import TestWorker

    def make(jobs: Any, **options: Any) -> TestWorker:
        overrides = {**lifecycle_overrides, **options.pop("dependency_overrides", {})}
        return TestWorker(jobs, dependency_overrides=overrides, **options)

    return make


@pytest.fixture
def job_context(request: pytest.FixtureRequest) -> JobContext:
    """A frozen ``JobContext`` (name: the test's name, attempt 1, no arguments), for
    calling a job or a dependency directly; ``lifecycle.testing.frozen_context`` makes
    others."""
    from lifecycle.testing import frozen_context

    return frozen_context(request.node.name)


@pytest.fixture
async def lifecycle_leaks(request: pytest.FixtureRequest) -> AsyncIterator[None]:
    """Fails the test if it left threads, tasks, suspended generators or open runtimes
    behind (``lifecycle.testing.no_leaks``), after waiting ``lifecycle_leak_grace``
    seconds (an ini option, default 2) for them to finish. Async: use it in anyio tests."""
    from lifecycle.testing import LeakError, no_leaks

    grace = float(request.config.getini("lifecycle_leak_grace"))
    found: str | None = None
    try:
        async with no_leaks(grace):
            yield
    except LeakError as exc:
        found = str(exc)
    if found is not None:  # outside the except block: the report is not chained
        pytest.fail(found, pytrace=False)


@pytest.fixture
async def lifecycle_exploration(request: pytest.FixtureRequest) -> Exploration:
    """The exploration a test's ``explore_faults`` marker asks for; fails the test with
    the report if any fault point broke the contract."""
    from lifecycle.testing import explore

    marker = request.node.get_closest_marker(MARKER)
    if marker is None:
        raise pytest.UsageError(
            f"{request.node.nodeid}: the lifecycle_exploration fixture needs the test to be decorated "
            "with @lifecycle.testing.explore_faults(job, ...)"
        )
    job, *args = marker.args
    exploration = await explore(job, *args, **marker.kwargs)
    if not exploration.ok:
        pytest.fail(exploration.report(), pytrace=False)
    return exploration
