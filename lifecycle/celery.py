"""Celery integration: async task bodies with ``Depends`` parameters, each task one job,
worker-scoped dependencies once per worker process.

Each worker process gets one long-lived event loop, running in a thread of its own
behind an anyio blocking portal, with one Runtime hosted in it. It is created on the
first task the process runs (so never before a prefork fork) and closed when the
process shuts down (``worker_process_shutdown`` for prefork children,
``worker_shutdown`` for the solo and threads pools), tearing down worker scope in
reverse order. Task threads submit jobs to that loop and wait for them; a Celery soft
time limit raised while waiting cancels the job, whose teardown still runs."""

from __future__ import annotations

import concurrent.futures
import inspect
import os
import threading
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager
from typing import Any

import anyio
import structlog
from anyio.from_thread import BlockingPortal, start_blocking_portal
from celery import Celery, signals
from celery.exceptions import Reject as CeleryReject
from celery.exceptions import SoftTimeLimitExceeded

from ._errors import Reject, Retry
from ._job import Job
from ._markers import Depends
from ._runtime import Runtime

log = structlog.get_logger("lifecycle.celery")


class _ProcessRuntime:
    """The event loop thread and the Runtime of one worker process."""

    def __init__(self, make_runtime: Callable[[], Runtime], backend: str) -> None:
        self.make_runtime = make_runtime
        self.backend = backend
        self.pid = os.getpid()
        self.runtime: Runtime | None = None
        self._portal_cm: AbstractContextManager[BlockingPortal] | None = None
        self.portal: BlockingPortal | None = None
        self._stop: anyio.Event | None = None
        self._host: concurrent.futures.Future[None] | None = None

    def start(self) -> None:
        self._portal_cm = start_blocking_portal(self.backend)
        self.portal = self._portal_cm.__enter__()
        ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._host = self.portal.start_task_soon(self._serve, ready)
        ready.result()

    async def _serve(self, ready: concurrent.futures.Future[None]) -> None:
        self._stop = anyio.Event()
        try:
            async with self.make_runtime() as runtime:
                self.runtime = runtime
                ready.set_result(None)
                await self._stop.wait()
        except BaseException as exc:
            if not ready.done():
                ready.set_exception(exc)
            raise

    def close(self) -> None:
        """Tear down worker scope (reverse creation order) and stop the loop thread."""
        if self.portal is None or self._stop is None:
            return
        portal, self.portal = self.portal, None
        try:
            portal.call(self._stop.set)
            assert self._host is not None
            self._host.result()
        except Exception as exc:
            log.error("celery.worker_scope_teardown_failed", error=f"{type(exc).__name__}: {exc}", pid=self.pid)
        finally:
            assert self._portal_cm is not None
            self._portal_cm.__exit__(None, None, None)


class CeleryLifecycle:
    """Registers lifecycle jobs as Celery tasks on ``app``."""

    def __init__(
        self,
        app: Celery,
        *,
        dependency_overrides: Mapping[Any, Any] | None = None,
        teardown_timeout: float | None = 30.0,
        dependencies: Iterable[Depends] = (),
        backend: str = "asyncio",
    ) -> None:
        self.app = app
        self.backend = backend
        self._runtime_options: dict[str, Any] = {
            "dependency_overrides": dependency_overrides,
            "teardown_timeout": teardown_timeout,
            "dependencies": tuple(dependencies),
        }
        self.jobs: dict[str, Job[..., Any]] = {}
        self._process: _ProcessRuntime | None = None
        self._lock = threading.Lock()
        signals.worker_process_shutdown.connect(self._on_shutdown, weak=False)
        signals.worker_shutdown.connect(self._on_shutdown, weak=False)
        os.register_at_fork(after_in_child=self._forget_parent_loop)

    # -- per-process runtime ---------------------------------------------------------------
    def _forget_parent_loop(self) -> None:
        # A forked child must never touch its parent's loop thread (it does not exist here).
        self._process = None
        self._lock = threading.Lock()

    def process_runtime(self) -> _ProcessRuntime:
        process = self._process
        if process is not None and process.pid == os.getpid():
            return process
        with self._lock:
            if self._process is None or self._process.pid != os.getpid():
                fresh = _ProcessRuntime(lambda: Runtime(**self._runtime_options), self.backend)
                fresh.start()
                self._process = fresh
            return self._process

    def _on_shutdown(self, *args: Any, **kwargs: Any) -> None:
        process = self._process
        if process is not None and process.pid == os.getpid():
            self._process = None
            process.close()

    def shutdown(self) -> None:
        """Close this process's runtime now (for embedding and tests)."""
        self._on_shutdown()

    # -- tasks -----------------------------------------------------------------------------
    def task(
        self,
        *args: Any,
        retries: int = 3,
        timeout: float | None = None,
        dependencies: Iterable[Depends] = (),
        **options: Any,
    ) -> Any:
        """``@lc.task(name=..., acks_late=True)``: every Celery option passes through.
        ``retries`` bounds ``raise Retry(...)`` (Celery's max_retries), ``timeout`` is the
        job's own timeout; use Celery's soft_time_limit for a broker-side one."""

        def decorate(fn: Callable[..., Any]) -> Any:
            name = options.get("name") or f"{fn.__module__}.{fn.__name__}"
            job = Job(fn, name=name, retries=retries, timeout=timeout, dependencies=dependencies)
            self.jobs[name] = job
            owner = self

            def run(task: Any, *call_args: Any, **call_kwargs: Any) -> Any:
                return owner._run(task, job, call_args, call_kwargs)

            run.__name__ = fn.__name__
            run.__qualname__ = fn.__qualname__
            run.__module__ = fn.__module__
            run.__doc__ = fn.__doc__
            # Celery checks delay()/apply_async() arguments against this signature: the
            # job's payload parameters only, dependencies are not part of the message.
            payload = [
                inspect.Parameter(p.name, p.kind, default=p.default)
                for p in job.params
                if p.kind is not inspect.Parameter.VAR_KEYWORD
            ]
            run.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
                [inspect.Parameter("task", inspect.Parameter.POSITIONAL_ONLY), *payload]
            )
            task_options = {"max_retries": retries, **options, "name": name, "bind": True}
            return self.app.task(**task_options)(run)

        if args and callable(args[0]) and len(args) == 1:
            return decorate(args[0])
        if args:
            raise TypeError("CeleryLifecycle.task takes keyword options only")
        return decorate

    def _run(self, task: Any, job: Job[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        payload, extras = job.bind_payload(args, kwargs)
        request = task.request
        attempt = int(request.retries or 0) + 1
        process = self.process_runtime()
        assert process.portal is not None
        assert process.runtime is not None
        runtime = process.runtime
        finished = threading.Event()  # set when the job, teardown included, is over

        async def attempt_job() -> Any:
            try:
                return await runtime.run_attempt(job, payload, extras, job_id=request.id, attempt=attempt)
            finally:
                finished.set()

        future = process.portal.start_task_soon(attempt_job)
        try:
            return self._wait(future, finished)
        except Retry as exc:
            delay = exc.delay if exc.delay is not None else None
            raise task.retry(exc=exc, countdown=delay, max_retries=job.retries) from exc
        except Reject as exc:
            raise CeleryReject(exc.reason, requeue=False) from exc

    def _wait(self, future: concurrent.futures.Future[Any], finished: threading.Event) -> Any:
        try:
            return future.result()
        except SoftTimeLimitExceeded:
            # Raised in this thread by Celery while we waited: cancel the job on the
            # loop and let its teardown finish before reporting the time limit.
            future.cancel()
            limit = self._runtime_options["teardown_timeout"]
            finished.wait(None if limit is None else limit * 4 + 5)
            raise
