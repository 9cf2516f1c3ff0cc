"""A ``Worker`` for tests: on a ``MemoryQueue``, with ``drain()`` that runs it until the
queue is empty and returns what happened, and a frozen ``JobContext`` for direct calls.

Why a subclass rather than a hook in the production worker: the results of jobs are
of no use to a production worker (it acknowledges and forgets), so only the test
worker's runtime keeps them, by message id."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import anyio

from .._context import JobContext
from .._job import Job
from .._runtime import Runtime
from .._worker import Worker
from ..queues import MemoryQueue


@dataclass(slots=True)
class Drained:
    """What one ``TestWorker.drain()`` saw.

    Attributes:
        results: each succeeded job's result, by message id.
        succeeded: jobs acknowledged as done.
        retried: attempts that failed and were put back for a retry.
        dead_letters: the dead letters recorded during the drain, oldest first (each a
            dict: ``job``, ``payload``, ``reason``, ``error``, ``error_type``...).
        errors: each failed attempt's exception, by message id, in order.
    """

    results: dict[str, Any] = field(default_factory=dict)
    succeeded: int = 0
    retried: int = 0
    dead_letters: list[dict[str, Any]] = field(default_factory=list)
    errors: dict[str, list[BaseException]] = field(default_factory=dict)


class _RecordingRuntime(Runtime):
    """A runtime that keeps each attempt's result or error by job id."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.results: dict[str, Any] = {}
        self.errors: dict[str, list[BaseException]] = {}

    async def run_attempt(
        self,
        fn: Callable[..., Any],
        payload: dict[str, Any],
        extras: dict[str, Any] | None = None,
        *,
        job_id: str | None = None,
        attempt: int = 1,
    ) -> Any:
        try:
            result = await super().run_attempt(fn, payload, extras, job_id=job_id, attempt=attempt)
        except Exception as exc:
            if job_id is not None:
                self.errors.setdefault(job_id, []).append(exc)
            raise
        if job_id is not None:
            self.results[job_id] = result
        return result


class TestWorker(Worker):
    """A ``Worker`` on its own ``MemoryQueue`` (``worker.queue``), tuned for tests: it
    polls every 10 ms and retries failed jobs without backoff, unless told otherwise.
    It drives no schedules (``drain`` could never finish).

    Args:
        jobs: the jobs it runs.
        queue: the queue; None (the default) makes a fresh ``MemoryQueue``.
        dependency_overrides: ``{original: replacement}`` for its runtime.
        options: any other ``Worker`` option (``concurrency``, ``retry_backoff``...).
    """

    __test__ = False  # a class named Test... that pytest must not collect

    def __init__(
        self,
        jobs: Iterable[Job[..., Any] | Callable[..., Any]],
        *,
        queue: MemoryQueue | None = None,
        dependency_overrides: Mapping[Any, Any] | None = None,
        **options: Any,
    ) -> None:
        options.setdefault("poll_interval", 0.01)
        options.setdefault("retry_backoff", 0.0)
        super().__init__(
            queue if queue is not None else MemoryQueue(),
            jobs,
            dependency_overrides=dependency_overrides,
            **options,
        )
        # Same options, and it keeps each job's result for drain() to return.
        self.runtime = recording = _RecordingRuntime(
            dependency_overrides=self.runtime.dependency_overrides,
            teardown_timeout=self.runtime.teardown_timeout,
            dependencies=self.runtime.dependencies,
            tracer_provider=self.runtime.tracer_provider,
            metrics=self.runtime.metrics,
        )
        self.recorded = recording
        self.memory_queue: MemoryQueue = self.queue  # type: ignore[assignment]
        # drain() waits for an empty queue, which a schedule refills forever: a test
        # worker runs jobs declared with @job(cron=...) when given, never their ticks.
        self.schedules, self.scheduler = [], None

    async def enqueue(self, job: str | Job[..., Any], payload: Mapping[str, Any] | None = None, **options: Any) -> str:
        """Put a message on the worker's queue (see ``Queue.enqueue``); its id."""
        return await self.memory_queue.enqueue(job, payload, **options)

    async def drain(self, timeout: float = 60.0) -> Drained:
        """Run the worker until its queue holds nothing (ready, delayed for a retry, or
        in flight), then stop it gracefully (worker-scoped dependencies torn down).

        Args:
            timeout: seconds to wait for the queue to empty before failing.

        Raises:
            TimeoutError: the queue was not empty after ``timeout`` seconds (a job that
                never ends, or one retried forever); the worker is stopped first.
            StartupError: the worker could not start (a broken worker-scoped dependency).
        """
        before = dict(self.stats)
        dead_before = {d["message_id"] for d in await self.memory_queue.dead_letters(count=1_000_000)}
        self.recorded.results.clear()
        self.recorded.errors.clear()
        timed_out = False
        async with anyio.create_task_group() as tg:
            tg.start_soon(self.run)
            with anyio.move_on_after(timeout) as scope:
                # Poll: the queue has no "empty" event, and a retry may sit delayed.
                while len(self.memory_queue):  # noqa: ASYNC110
                    await anyio.sleep(0.005)
            timed_out = scope.cancelled_caught
            self.stop()
        if timed_out:
            raise TimeoutError(
                f"the queue still held {len(self.memory_queue)} message(s) after {timeout}s "
                "(a job that never ends, or one retried forever)"
            )
        dead = [d for d in await self.memory_queue.dead_letters(count=1_000_000) if d["message_id"] not in dead_before]
        return Drained(
            results=dict(self.recorded.results),
            succeeded=self.stats["succeeded"] - before["succeeded"],
            retried=self.stats["retried"] - before["retried"],
            dead_letters=list(reversed(dead)),
            errors={key: list(value) for key, value in self.recorded.errors.items()},
        )


class _FrozenJobContext(JobContext):
    __slots__ = ("_frozen",)

    def __setattr__(self, name: str, value: Any) -> None:
        # ``_log`` is bound lazily by the ``log`` property: the one attribute that may change.
        if name != "_log" and getattr(self, "_frozen", False):
            raise AttributeError(f"this JobContext is frozen; cannot set {name!r}")
        super().__setattr__(name, value)


def frozen_context(
    name: str = "job",
    *,
    args: Mapping[str, Any] | None = None,
    attempt: int = 1,
    id: str = "test-job",
) -> JobContext:
    """A ``JobContext`` for calling a job or a dependency directly, with fixed values
    that cannot be changed (setting an attribute raises ``AttributeError``).

    Args:
        name: the job's name.
        args: the job's payload as the job would receive it (read-only); None: empty.
        attempt: the attempt number, from 1.
        id: the job's id.
    """
    if attempt < 1:
        raise ValueError(f"attempt is 1-based, got {attempt!r}")
    ctx = _FrozenJobContext(id, name, attempt, MappingProxyType(dict(args or {})))
    ctx._frozen = True
    return ctx
