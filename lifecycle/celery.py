"""Celery integration: async task bodies with ``Depends`` parameters, each task one job,
worker-scoped dependencies once per worker process.

Each worker process gets one long-lived event loop, running in a thread of its own
behind an anyio blocking portal, with one Runtime hosted in it. It is created on the
first task the process runs (so never before a prefork fork) and closed when the
process shuts down (``worker_process_shutdown`` for prefork children,
``worker_shutdown`` for the solo and threads pools), tearing down worker scope in
reverse order. Task threads submit jobs to that loop and wait for them.

Why it is shaped this way:

- Celery raises its soft time limit (and a revoke's termination) *in the task thread*
  at any bytecode, so everything a task thread does can be interrupted: before its job
  reached the loop, while the loop was still starting, or while it waits. Each job is
  therefore a ``Call`` that the task thread can cancel at any of those moments; a job
  cancelled before it started never starts, one cancelled later is cancelled on the
  loop, and the task thread waits for its teardown before re-raising.
- Closing (from a shutdown signal, from another thread, twice, or while the loop is
  still starting) cancels the jobs still in flight and waits for their teardown before
  worker scope is torn down, so no job ever sees a torn-down worker-scoped value. A
  job cancelled that way, or one submitted after closing began, never reports success:
  Celery gets ``Reject(requeue=True)`` and the message goes back to the broker.
- Delivery is at-least-once by default: tasks are acknowledged late and a message whose
  prefork child was killed is requeued (see ``CeleryLifecycle``)."""

from __future__ import annotations

import concurrent.futures
import enum
import inspect
import os
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from contextlib import AbstractContextManager
from typing import Any, Protocol, TypeVar, overload

import anyio
import sniffio
from anyio.abc import TaskGroup
from anyio.from_thread import BlockingPortal, start_blocking_portal
from celery import Celery, signals
from celery.exceptions import Reject as CeleryReject

from ._analysis import label
from ._errors import JobTimeout, LifecycleError, Reject, Retry
from ._job import Job
from ._log import LOG, describe, traceback_text
from ._markers import Depends
from ._observe import Carried, carried, configured_tracer_provider, inject_headers
from ._process_loop import Call, JobHost, ProcessClosed, call_soon_threadsafe
from ._retry import RetryPolicy, Verdict
from ._runtime import Runtime

T = TypeVar("T")
R = TypeVar("R")
R_co = TypeVar("R_co", covariant=True)


class TaskResult(Protocol[R_co]):
    """What a lifecycle task's ``delay()`` and ``apply_async()`` return: Celery's
    ``AsyncResult``, typed with the job's result. Its other attributes are there too,
    typed ``Any`` (Celery ships no type information)."""

    @property
    def id(self) -> str: ...

    def get(self, timeout: float | None = None, propagate: bool = True, **options: Any) -> R_co:
        """Wait for the result (Celery's ``AsyncResult.get``); a failed task raises."""
        ...

    def ready(self) -> bool: ...

    def __getattr__(self, name: str) -> Any: ...


class LifecycleTask(Protocol[R_co]):
    """The Celery task ``@lc.task`` registers, typed with its job's result (an async
    job's awaited result): calling it runs the job here and now, ``delay()`` sends it.
    Every other Celery task attribute (``s()``, ``retry``, ``name``...) is there too,
    typed ``Any``; delay-time arguments are checked by Celery at run time, not by a type
    checker (the job's parameters include injected dependencies)."""

    def delay(self, *args: Any, **kwargs: Any) -> TaskResult[R_co]: ...

    def apply_async(
        self, args: Iterable[Any] | None = None, kwargs: Mapping[str, Any] | None = None, **options: Any
    ) -> TaskResult[R_co]: ...

    def __call__(self, *args: Any, **kwargs: Any) -> R_co: ...

    def __getattr__(self, name: str) -> Any: ...


class TaskDecorator(Protocol):
    """What ``@lc.task(...)`` with options returns: registers the function it decorates."""

    @overload
    def __call__(self, fn: Callable[..., Coroutine[Any, Any, R]], /) -> LifecycleTask[R]: ...
    @overload
    def __call__(self, fn: Callable[..., R], /) -> LifecycleTask[R]: ...


# Seconds to wait for a job whose submission to the loop was interrupted half-way (it
# may never have reached the loop, so nothing would ever say it is done).
_UNSURE_SUBMIT_WAIT = 5.0
# Seconds between checks, while a task thread waits for its job, that the runtime was
# not closed under it (a job submitted as the loop stopped would never answer).
_CLOSED_POLL = 0.5

# The task options that make a task survive a killed prefork child, with the app
# setting each falls back to. Both must be true: Celery requeues on a lost worker only
# for tasks acknowledged late (celery.worker.request.Request.on_failure).
_DELIVERY_OPTIONS = (("acks_late", "task_acks_late"), ("reject_on_worker_lost", "task_reject_on_worker_lost"))


class _State(enum.IntEnum):
    NEW = 0
    STARTING = 1
    RUNNING = 2
    CLOSING = 3
    CLOSED = 4


class _ProcessRuntime(JobHost):
    """The event loop thread and the Runtime of one worker process.

    Every method may be called from any thread except the loop thread. ``start`` is
    idempotent; ``close`` is idempotent, waits for a close already under way in another
    thread, and, when called while ``start`` runs in the same thread (a signal handler),
    makes ``start`` close the runtime before it returns.

    Args:
        make_runtime: builds the Runtime hosted on the loop (called once, on the loop).
        backend: the anyio backend of the loop, ``"asyncio"`` or ``"trio"``.
    """

    cancelled_reason = "soft time limit or shutdown"

    def __init__(self, make_runtime: Callable[[], Runtime], backend: str) -> None:
        super().__init__()
        self.make_runtime = make_runtime
        self.backend = backend
        self._portal_cm: AbstractContextManager[BlockingPortal] | None = None
        self._host: concurrent.futures.Future[None] | None = None
        # Loop-thread state (with JobHost's): the stop signal. Only the loop thread
        # reads or writes it.
        self._stop: anyio.Event | None = None
        # The task group jobs run in, and the loop's own thread-safe "call this soon"
        # (set while the runtime is open). Submitting through it costs one wake-up of
        # the loop thread; a BlockingPortal's start_task_soon costs a round trip more.
        self._jobs: TaskGroup | None = None
        self._schedule: Callable[..., object] | None = None
        self._stop_requested = False
        self._loop_thread: int | None = None
        # Thread-side state, under _lock (held for the whole of start, so a close from
        # another thread waits for the loop to be up before stopping it).
        self._lock = threading.Lock()
        self._state = _State.NEW
        self._starter: int | None = None
        self._closer: int | None = None
        self._close_requested = False
        self._closed = threading.Event()

    @property
    def running(self) -> bool:
        """True from a completed ``start`` until ``close`` begins."""
        return self._state is _State.RUNNING

    # -- start ----------------------------------------------------------------------------
    def start(self) -> None:
        """Start the loop thread and open the Runtime in it (no-op when running).

        Raises ``ProcessClosed`` once closing has begun. If anything interrupts the
        start (a soft time limit in the task thread included), what was started is
        stopped again and the next call starts afresh."""
        if self.running:
            return
        with self._lock:
            if self._state is _State.RUNNING:
                return
            if self._state is not _State.NEW or self._close_requested:
                raise ProcessClosed(f"the lifecycle runtime of worker process {self.pid} is closed")
            self._state = _State.STARTING
            self._starter = threading.get_ident()
            try:
                self._open_loop()
            except BaseException:
                self._stop_loop(log_errors=False)  # the caller gets the error itself
                self._state = _State.NEW
                raise
            finally:
                self._starter = None
            self._state = _State.RUNNING
        if self._close_requested:  # a close() ran in this thread while we started
            self.close()
            raise ProcessClosed(f"the lifecycle runtime of worker process {self.pid} closed while starting")

    def _open_loop(self) -> None:
        # Started by a helper thread: Python runs signal handlers (Celery's soft time
        # limit) only in the main thread, so the helper cannot be interrupted half-way,
        # which anyio's start_blocking_portal does not survive (its cleanup joins a loop
        # thread that never stops). If *this* thread is interrupted while it waits, it
        # waits for the helper to finish and the caller stops what it started.
        outcome: concurrent.futures.Future[None] = concurrent.futures.Future()
        # A previous start that was interrupted left its (joined) loop's state behind.
        self.runtime, self._stop, self._drained, self._stop_requested = None, None, None, False

        def open_in_helper() -> None:
            try:
                self._portal_cm = start_blocking_portal(self.backend, name=f"lifecycle-loop-{self.pid}")
                self.portal = self._portal_cm.__enter__()
                ready: concurrent.futures.Future[None] = concurrent.futures.Future()
                self._host = self.portal.start_task_soon(self._serve, ready)
                # _serve fails before setting ready if the Runtime cannot open.
                concurrent.futures.wait([ready, self._host], return_when=concurrent.futures.FIRST_COMPLETED)
                if ready.done():
                    ready.result()
                else:
                    self._host.result()
                    raise RuntimeError("the lifecycle runtime's host task ended before the runtime opened")
            except BaseException as exc:
                outcome.set_exception(exc)
            else:
                outcome.set_result(None)

        helper = threading.Thread(target=open_in_helper, name=f"lifecycle-start-{self.pid}", daemon=True)
        helper.start()
        try:
            outcome.result()
        except BaseException:
            helper.join()
            raise

    async def _serve(self, ready: concurrent.futures.Future[None]) -> None:
        self._loop_thread = threading.get_ident()
        self._stop = anyio.Event()
        self._drained = anyio.Event()
        if self._stop_requested:  # _stop_loop ran before this task's first step
            self._stop.set()
        try:
            async with self.make_runtime() as runtime, anyio.create_task_group() as jobs:
                self.runtime = runtime
                self._jobs = jobs
                self._schedule = call_soon_threadsafe(self.backend)
                self._accepting = True
                ready.set_result(None)
                await self._stop.wait()
                # Jobs still in flight are orphans now (Celery no longer waits for
                # them): cancel them and let their teardown finish while worker scope,
                # which they may still use, is alive.
                await self.cancel_inflight()
        except BaseException as exc:
            if not ready.done():
                ready.set_exception(exc)
            raise
        finally:
            self._accepting = False
            self._schedule = None
            self._jobs = None

    def _request_stop(self) -> None:  # on the loop thread
        self._stop_requested = True
        if self._stop is not None:
            self._stop.set()

    # -- jobs -----------------------------------------------------------------------------
    def run(self, work: Callable[[Runtime], Awaitable[T]]) -> T:
        """Run ``work(runtime)`` on the loop and wait for it.

        If the wait is interrupted (Celery's soft time limit raises
        ``SoftTimeLimitExceeded`` in this thread, at any moment), the job is cancelled
        (one that had not started never starts) and its teardown finishes before the
        exception propagates.

        Args:
            work: the job, called on the loop with the process's Runtime.

        Raises:
            ProcessClosed: the runtime is not running (the job never started), or
                closing cancelled the job (after its teardown ran).
        """
        call = Call()
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        scheduled: bool | None = None  # None: not tried; False: interrupted half-way
        try:
            schedule = self._schedule
            if schedule is None or self._state is not _State.RUNNING:
                raise ProcessClosed(f"the lifecycle runtime of worker process {self.pid} is not running")
            scheduled = False
            try:
                schedule(self._spawn, work, call, future)
            except RuntimeError as exc:  # the loop ended between the check and here
                call.done.set()  # the callback was not queued: nothing will ever run
                raise ProcessClosed(f"the lifecycle runtime of worker process {self.pid} is closed") from exc
            scheduled = True
            return self._result(future)
        except BaseException:
            if scheduled is not None and not call.done.is_set():
                self.cancel(call)
                # A submission interrupted half-way may never reach the loop: bound the
                # wait then. Otherwise the wait is bounded by the job's teardown.
                self._wait_done(call, None if scheduled else _UNSURE_SUBMIT_WAIT)
            raise

    def _result(self, future: concurrent.futures.Future[T]) -> T:
        # A callback queued just as the loop stopped never runs: once the runtime is
        # closed (every job it spawned has finished by then), stop waiting for it.
        while True:
            try:
                return future.result(timeout=_CLOSED_POLL)
            except concurrent.futures.TimeoutError:
                if self._state is _State.CLOSED and not future.done():
                    raise ProcessClosed(f"the lifecycle runtime of worker process {self.pid} is closed") from None

    def _spawn(
        self, work: Callable[[Runtime], Awaitable[T]], call: Call, future: concurrent.futures.Future[T]
    ) -> None:  # on the loop thread, as a plain callback
        jobs = self._jobs
        # A loop callback runs outside any task, where anyio cannot tell which loop it
        # is on (asyncio has no current task): say so, for this callback only.
        library = sniffio.current_async_library_cvar.set(self.backend)
        try:
            if jobs is None:
                raise RuntimeError("the job task group is closed")
            jobs.start_soon(self._host_future, work, call, future)
        except RuntimeError:
            call.done.set()
            future.set_exception(ProcessClosed(f"the lifecycle runtime of worker process {self.pid} is closed"))
        finally:
            sniffio.current_async_library_cvar.reset(library)

    async def _host_future(
        self, work: Callable[[Runtime], Awaitable[T]], call: Call, future: concurrent.futures.Future[T]
    ) -> None:
        try:
            result = await self.host_call(work, call)
        except anyio.get_cancelled_exc_class():
            # The loop itself is being torn down (not a job's own scope: that one ends
            # in ProcessClosed inside host_call).
            future.set_exception(ProcessClosed(f"the job was cancelled in worker process {self.pid} (shutdown)"))
            raise
        except BaseException as exc:
            # Never into the task group: one job's failure must not cancel the others.
            future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
        else:
            future.set_result(result)

    def _wait_done(self, call: Call, limit: float | None) -> None:
        # The job's teardown is bounded by teardown_timeout per dependency, and Celery's
        # hard time limit ends the process. Poll so that a close() that finished
        # meanwhile also ends the wait.
        deadline = None if limit is None else time.monotonic() + limit
        while not call.done.wait(0.1):
            if self._state is _State.CLOSED or (deadline is not None and time.monotonic() > deadline):
                return

    # -- close ----------------------------------------------------------------------------
    def close(self) -> None:
        """Cancel the jobs in flight and wait for their teardown, tear down worker scope
        (reverse creation order) and stop the loop thread. Safe to call at any moment,
        more than once, and from any thread but the loop's."""
        me = threading.get_ident()
        if me == self._loop_thread:
            raise RuntimeError("close() was called on the lifecycle loop thread; it would wait for itself")
        if self._starter == me:  # a signal handler interrupting start() in this thread
            self._close_requested = True
            return
        if self._closer == me:  # a signal handler interrupting close() in this thread
            return
        with self._lock:
            state = self._state
            if state is _State.NEW:
                self._state = _State.CLOSED
                self._closed.set()
                return
            if state is _State.RUNNING:
                self._state = _State.CLOSING
                self._closer = me
        if state is not _State.RUNNING:  # closing or closed by another thread
            self._closed.wait()
            return
        try:
            self._stop_loop()
        finally:
            self._state = _State.CLOSED
            self._closed.set()

    def _stop_loop(self, *, log_errors: bool = True) -> None:
        portal, self.portal = self.portal, None
        portal_cm, self._portal_cm = self._portal_cm, None
        host, self._host = self._host, None
        if portal is None or portal_cm is None:
            return
        try:
            if host is not None:
                portal.call(self._request_stop)
                host.result()
        except Exception as exc:
            if log_errors:
                LOG.error(
                    "celery.worker_scope_teardown_failed",
                    error=describe(exc),
                    exception=traceback_text(exc),
                    pid=self.pid,
                )
        finally:
            portal_cm.__exit__(None, None, None)


class CeleryLifecycle:
    """Registers lifecycle jobs as Celery tasks on ``app``; each worker process hosts one
    Runtime (see the module docstring).

    Delivery is **at-least-once** by default: every task it registers is acknowledged
    late (``acks_late=True``) and requeued when its prefork child is killed
    (``reject_on_worker_lost=True``), so a SIGKILLed or OOM-killed child never loses a
    task. The consequence: a task can run more than once (it was part-way through, or
    even done but not yet acknowledged, when its process died), so make tasks
    idempotent. A task that kills its process every time is redelivered every time (a
    message loop, as Celery warns); bound it with a RabbitMQ quorum queue's
    ``x-delivery-limit``, or with Celery's ``retry_on_worker_lost=True`` where your
    Celery has it (then ``retries`` also bounds the redeliveries). A value given
    explicitly, per task (``@lc.task(acks_late=False)``), by a custom ``base`` class, or
    in the app's configuration (``task_acks_late``, ``task_reject_on_worker_lost``), is
    respected, and a warning (``celery.redelivery_disabled``) names each task that can
    then be lost.

    Args:
        app: the Celery app to register tasks on.
        dependency_overrides: ``{original: replacement}`` for every task's Runtime.
        teardown_timeout: seconds each teardown may take (per dependency; ``None``: no
            bound); see the README's "Semantics", rule 6.
        dependencies: run for every task, their values not injected.
        backend: the anyio backend of each process's loop, ``"asyncio"`` or ``"trio"``.
        tracer_provider: an OpenTelemetry ``TracerProvider`` for every task's spans (see
            ``Runtime``); None: the global one once an SDK configured it. ``delay()`` and
            ``apply_async()`` inside a span carry its ``traceparent`` in the message's
            headers, and the task's attempt span continues that trace.
        metrics: a ``lifecycle.prometheus.Metrics`` to record into; None: none, unless
            ``metrics_port`` is given (then ``Metrics.default()``).
        metrics_port: serve Prometheus metrics on this port from the Celery worker's
            main process (``worker_init``); with ``PROMETHEUS_MULTIPROC_DIR`` set, the
            sum of every prefork child's numbers. None: no server.
        metrics_address: the address the metrics server listens on.
    """

    def __init__(
        self,
        app: Celery,
        *,
        dependency_overrides: Mapping[Any, Any] | None = None,
        teardown_timeout: float | None = 30.0,
        dependencies: Iterable[Depends] = (),
        backend: str = "asyncio",
        tracer_provider: Any | None = None,
        metrics: Any | None = None,
        metrics_port: int | None = None,
        metrics_address: str = "0.0.0.0",
    ) -> None:
        if metrics_port is not None and (
            not isinstance(metrics_port, int) or isinstance(metrics_port, bool) or not 0 <= metrics_port <= 65535
        ):
            raise ValueError(f"metrics_port must be a TCP port number (0-65535) or None, got {metrics_port!r}")
        if metrics_port is not None and metrics is None:
            from .prometheus import Metrics  # the optional extra, imported only when asked for

            metrics = Metrics.default()
        self.app = app
        self.backend = backend
        self.metrics = metrics
        self.metrics_port = metrics_port
        self.metrics_address = metrics_address
        self.metrics_server: Any = None  # the main process's metrics server, once started
        self._runtime_options: dict[str, Any] = {
            "dependency_overrides": dependency_overrides,
            "teardown_timeout": teardown_timeout,
            "dependencies": tuple(dependencies),
            "tracer_provider": tracer_provider,
            "metrics": metrics,
        }
        self.jobs: dict[str, Job[..., Any]] = {}
        self._explicit_delivery: dict[str, dict[str, Any]] = {}  # task name -> options given
        self._warned: set[str] = set()
        self._process: _ProcessRuntime | None = None
        self._lock = threading.Lock()
        signals.worker_process_shutdown.connect(self._on_shutdown, weak=False)
        signals.worker_shutdown.connect(self._on_shutdown, weak=False)
        app.on_after_finalize.connect(self._on_finalized, weak=False)
        signals.before_task_publish.connect(self._on_publish, weak=False)
        if metrics_port is not None:
            signals.worker_init.connect(self._serve_metrics, weak=False)
            signals.worker_process_shutdown.connect(self._mark_process_dead, weak=False)
        os.register_at_fork(after_in_child=self._forget_parent_loop)

    # -- observability ---------------------------------------------------------------------
    def _on_publish(self, sender: Any = None, headers: dict[str, Any] | None = None, **kwargs: Any) -> None:
        """``before_task_publish``: carry the current trace context in one of our tasks'
        message headers (Celery's own), unless the message carries one already."""
        if headers is None or sender not in self.jobs:
            return
        carrier = inject_headers({"traceparent": headers["traceparent"]} if "traceparent" in headers else None)
        if carrier:
            for name, value in carrier.items():
                headers.setdefault(name, value)

    def _serve_metrics(self, *args: Any, **kwargs: Any) -> None:
        """``worker_init`` (the main process, before any fork): start the metrics server."""
        from .prometheus import serve_metrics

        assert self.metrics_port is not None
        registry = None if os.environ.get("PROMETHEUS_MULTIPROC_DIR") else getattr(self.metrics, "registry", None)
        self.metrics_server = serve_metrics(self.metrics_port, self.metrics_address, registry)
        LOG.info("celery.metrics_serving", address=self.metrics_address, port=self.metrics_server.server_port)

    @staticmethod
    def _mark_process_dead(*args: Any, **kwargs: Any) -> None:
        """``worker_process_shutdown`` (a prefork child): drop its live gauges."""
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]

    def _settled(self, job: str, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.job_settled(job, outcome)

    # -- delivery defaults -----------------------------------------------------------------
    def _on_finalized(self, *args: Any, **kwargs: Any) -> None:
        for name in self._explicit_delivery:
            self._apply_delivery_defaults(name)

    def _apply_delivery_defaults(self, name: str) -> None:
        # Runs once the task is bound (its options merged with the app's configuration),
        # which is when the configuration is known, whatever order the app was set up in.
        task = self.app.tasks[name]
        explicit = self._explicit_delivery[name]
        for attr, setting in _DELIVERY_OPTIONS:
            if attr not in explicit and not self.app.conf.value_set_for(setting):
                setattr(type(task), attr, True)
        if (not task.acks_late or not task.reject_on_worker_lost) and name not in self._warned:
            self._warned.add(name)
            LOG.warning(
                "celery.redelivery_disabled",
                task=name,
                acks_late=bool(task.acks_late),
                reject_on_worker_lost=bool(task.reject_on_worker_lost),
                reason=(
                    f"task {name!r} can be lost when its worker process is killed (SIGKILL, out of "
                    "memory): it is not both acknowledged late and requeued on a lost worker; "
                    "lifecycle's default is acks_late=True, reject_on_worker_lost=True"
                ),
            )

    # -- per-process runtime ---------------------------------------------------------------
    def _forget_parent_loop(self) -> None:
        # A forked child must never touch its parent's loop thread (it does not exist here).
        self._process = None
        self._lock = threading.Lock()

    def process_runtime(self) -> _ProcessRuntime:
        """This process's runtime, started on first use (never before a fork).

        Raises ``ProcessClosed`` once this process's runtime was closed: a process is
        never given a second worker scope that nothing would tear down."""
        process = self._process
        if process is None or process.pid != os.getpid():
            with self._lock:
                if self._process is None or self._process.pid != os.getpid():
                    self._process = _ProcessRuntime(lambda: Runtime(**self._runtime_options), self.backend)
                process = self._process
        process.start()
        return process

    def _on_shutdown(self, *args: Any, **kwargs: Any) -> None:
        process = self._process
        if process is not None and process.pid == os.getpid():
            process.close()

    def shutdown(self) -> None:
        """Close this process's runtime now (for embedding and tests): cancel the jobs in
        flight (their teardown runs), then tear down worker scope. Tasks this process
        receives afterwards are rejected and requeued for another worker."""
        with self._lock:
            if self._process is None or self._process.pid != os.getpid():
                self._process = _ProcessRuntime(lambda: Runtime(**self._runtime_options), self.backend)
            process = self._process
        process.close()

    # -- tasks -----------------------------------------------------------------------------
    @overload
    def task(self, fn: Callable[..., Coroutine[Any, Any, R]], /) -> LifecycleTask[R]: ...
    @overload
    def task(self, fn: Callable[..., R], /) -> LifecycleTask[R]: ...
    @overload
    def task(
        self,
        *,
        retries: int = 3,
        timeout: float | None = None,
        dependencies: Iterable[Depends] = (),
        **options: Any,
    ) -> TaskDecorator: ...

    def task(
        self,
        *args: Any,
        retries: int = 3,
        timeout: float | None = None,
        dependencies: Iterable[Depends] = (),
        **options: Any,
    ) -> Any:
        """``@lc.task(name=..., ...)``: register an async (or sync) function as a Celery
        task that runs as one lifecycle job. Returns the Celery task, typed as a
        ``LifecycleTask`` of the job's result.

        Args:
            retries: how many times ``raise Retry(...)`` may retry the task (Celery's
                ``max_retries``, default 3). A task that asks to retry once they are
                used up fails with a ``LifecycleError`` saying so and naming the cause.
            timeout: the job's own timeout in seconds (``None``: none); Celery's
                ``soft_time_limit`` is the broker-side one.
            dependencies: run for this task, their values not injected.
            options: every Celery task option, passed through. ``acks_late`` and
                ``reject_on_worker_lost`` default to True (see the class docstring).
        """

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
            base = options.get("base")
            self._explicit_delivery[name] = {
                attr: value
                for attr, _ in _DELIVERY_OPTIONS
                if (value := options.get(attr, getattr(base, attr, None))) is not None
            }
            task_options = {
                "max_retries": retries,
                **options,
                "name": name,
                "bind": True,
                "base": _validating_base(job, base or self.app.Task),
            }
            registered = self.app.task(**task_options)(run)
            if self.app.finalized:  # bound already: no on_after_finalize to wait for
                self._apply_delivery_defaults(name)
            return registered

        if args and callable(args[0]) and len(args) == 1:
            return decorate(args[0])
        if args:
            raise TypeError("CeleryLifecycle.task takes keyword options only")
        return decorate

    def _run(self, task: Any, job: Job[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        payload, extras = job.bind_payload(args, kwargs)
        request = task.request
        attempt = int(request.retries or 0) + 1

        message = None
        if self._runtime_options["tracer_provider"] is not None or configured_tracer_provider() is not None:
            message = _carried(self.app, request)

        async def attempt_job(runtime: Runtime) -> Any:
            if message is not None:
                carried.set(message)  # this attempt's task on the loop has a context of its own
            return await runtime.run_attempt(job, payload, extras, job_id=request.id, attempt=attempt)

        try:
            result = self.process_runtime().run(attempt_job)
        except Retry as exc:
            verdict, delay = _POLICY.decide(exc, attempt, job.retries)
            self._settled(job.name, "failed" if verdict == Verdict.EXHAUSTED else "retried")
            if verdict == Verdict.EXHAUSTED:
                # Celery would re-raise the Retry itself, which reaches the client as
                # "retry requested (delay=...)": say that the attempts are used up, and
                # name the cause (only the message crosses the result backend).
                raise LifecycleError(_retries_exhausted(job, attempt, exc)) from exc
            raise task.retry(exc=exc, countdown=delay, max_retries=job.retries) from exc
        except Reject as exc:
            self._settled(job.name, "rejected")
            raise CeleryReject(exc.reason, requeue=False) from exc
        except ProcessClosed as exc:
            self._settled(job.name, "released")
            # Nothing ran, or the shutdown cancelled the job after which its teardown ran:
            # give the message back to the broker for another worker (at-least-once).
            raise CeleryReject(f"task {job.name!r}: {exc}; requeued", requeue=True) from exc
        except Exception as exc:
            self._settled(job.name, "timed_out" if isinstance(exc, JobTimeout) else "failed")
            raise
        self._settled(job.name, "succeeded")
        return result


_TRACE_HEADERS = ("traceparent", "tracestate")
_SYSTEMS = {"amqp": "rabbitmq", "amqps": "rabbitmq", "pyamqp": "rabbitmq", "redis": "redis", "rediss": "redis"}


def _carried(app: Celery, request: Any) -> Carried:
    """The trace context and messaging attributes of the message a task runs for. Celery
    hands a message's custom headers to the task as attributes of its request."""
    headers: dict[str, str] = {}
    extra = getattr(request, "headers", None) or {}
    for name in _TRACE_HEADERS:
        value = getattr(request, name, None) or (extra.get(name) if isinstance(extra, dict) else None)
        if isinstance(value, str):
            headers[name] = value
    scheme = str(app.conf.broker_url or "amqp").partition("://")[0].partition("+")[0]
    attributes: dict[str, Any] = {
        "messaging.system": _SYSTEMS.get(scheme, scheme),
        "messaging.operation.type": "process",
        "messaging.operation.name": "process",
        "messaging.message.id": str(request.id),
    }
    delivery = getattr(request, "delivery_info", None) or {}
    destination = delivery.get("routing_key") if isinstance(delivery, dict) else None
    if isinstance(destination, str) and destination:
        attributes["messaging.destination.name"] = destination
    return Carried(headers, attributes)


def _validating_base(job: Job[..., Any], base: type) -> type:
    """A task class whose ``apply_async`` (and so ``delay``, and Celery's own retries)
    validates the payload against the job's model before anything is sent, and sends it
    by name in pydantic's JSON mode, so dates, UUIDs and models cross the broker and come
    back converted. A bad payload raises ``PayloadError`` in the producer; it never
    reaches a worker."""
    names = [param.name for param in job.params if param.kind is not inspect.Parameter.VAR_KEYWORD]

    class ValidatingTask(base):  # type: ignore[misc]
        def apply_async(self, args: Any = None, kwargs: Any = None, *rest: Any, **options: Any) -> Any:
            given, by_name = tuple(args or ()), dict(kwargs or {})
            job.bind_payload(given, by_name)  # every problem at once: missing, unexpected, doubled, invalid
            payload = job.dump_payload({**dict(zip(names, given, strict=False)), **by_name})
            return super().apply_async((), payload, *rest, **options)

    ValidatingTask.__name__ = ValidatingTask.__qualname__ = f"Validating{getattr(base, '__name__', 'Task')}"
    return ValidatingTask


# Under Celery only ``Retry`` retries (any other error fails the task, as Celery does);
# with no delay of its own, ``Retry()`` leaves the countdown to Celery's default.
_POLICY = RetryPolicy()


def _retries_exhausted(job: Job[..., Any], attempt: int, exc: Retry) -> str:
    cause = exc.__cause__ or exc.__context__
    why = f"{describe(exc)}, caused by {describe(cause)}" if cause is not None else describe(exc)
    return (
        f"task {job.name!r} ({label(job.fn)}) asked to retry but its attempts are used up "
        f"({attempt} of {job.retries + 1}; @lc.task(retries={job.retries})): {why}"
    )
