"""Dramatiq integration: actors whose async (or sync) bodies take ``Depends`` parameters,
each message one job, worker-scoped dependencies once per worker process.

Each worker process gets one long-lived event loop (asyncio or trio), running in a
daemon thread of its own behind an anyio ``BlockingPortal``, with one Runtime hosted in
it. A broker middleware opens it in ``before_worker_boot``, before Dramatiq starts a
consumer or a worker thread, and creates every actor's worker-scoped dependencies there
(one that fails stops the worker process at once); it closes it in
``after_worker_shutdown``, once Dramatiq's worker threads have finished their messages,
tearing worker scope down in reverse creation order. Dramatiq's worker threads submit
jobs to that loop and wait for them.

Why it is shaped this way:

- Dramatiq enforces ``time_limit`` (and ``notify_shutdown``) by raising an exception
  *asynchronously in the worker thread* (``PyThreadState_SetAsyncExc``), which lands at
  the next bytecode that thread runs and never in a blocking wait. The thread therefore
  waits in short slices, and each job is a ``Call`` it can cancel at any moment: a job
  cancelled before it started never starts, one cancelled later is cancelled on the
  loop (its generators see the backend's cancellation at their ``yield``), and the
  thread waits for the job's teardown before the exception reaches Dramatiq, which then
  retries or fails the message as it does for any actor.
- A job reaches the loop in one hop: the worker thread hands it to a callback
  (``call_soon_threadsafe`` / ``run_sync_soon``) that queues it for a dispatcher task.
  ``BlockingPortal.start_task_soon`` waits for the loop to acknowledge the task's start,
  a second hop that cost about 80 µs per message; the portal serves only the rare
  cancel and stop calls.
- The loop thread is a daemon started by hand rather than ``start_blocking_portal``'s
  executor thread: a worker process forced to exit (a second SIGTERM) must not hang in
  the interpreter's join of a loop that nothing will stop.
- A job still running when the loop closes (Dramatiq's shutdown timeout passed, or
  ``shutdown()`` was called) is cancelled and its teardown finishes before worker scope
  is torn down, so no job ever sees a torn-down worker-scoped value. When the worker's
  shutdown closed it, the worker thread then leaves the message unacknowledged
  (``DramatiqLifecycle._run``), so the broker redelivers it: at least once, like any
  message Dramatiq abandons at shutdown."""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import enum
import functools
import os
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from typing import Any, Protocol, TypeVar, overload

import anyio
import dramatiq
from anyio.abc import TaskGroup
from anyio.from_thread import BlockingPortal
from dramatiq.broker import Broker, MessageProxy
from dramatiq.middleware import Middleware, MiddlewareError, Retries
from dramatiq.worker import Worker as DramatiqWorker

from ._analysis import label
from ._errors import DependencyError, LifecycleError, PayloadError, Reject, Retry, StartupError
from ._job import Job
from ._log import LOG, describe, traceback_text
from ._markers import Depends
from ._process_loop import Call, JobHost, ProcessClosed, call_soon_threadsafe
from ._retry import RetryPolicy, Verdict
from ._runtime import Runtime

T = TypeVar("T")
R = TypeVar("R")

__all__ = ["ActorDecorator", "DramatiqLifecycle", "LifecycleActor"]

# How often a worker thread waiting for its job wakes up, in seconds: an asynchronous
# exception (time limit, shutdown notification) is raised only when the thread runs
# bytecode, so this bounds how late the job is cancelled. Dramatiq's own asyncio bridge
# uses the same interval.
_POLL = 0.1

# Seconds to wait for a job whose submission to the loop was interrupted half-way (it
# may never have reached the loop, so nothing would ever say it is done).
_UNSURE_SUBMIT_WAIT = 5.0

# The errors that must never be retried (README, "Semantics"): given to Dramatiq as the
# actor's ``throws``, so its Retries middleware fails the message (dead letter) at once.
_NEVER_RETRIED: tuple[type[BaseException], ...] = (Reject, DependencyError, PayloadError)

# Dramatiq's Retries middleware owns the backoff; the policy only classifies errors.
_POLICY = RetryPolicy()


class _StartupFailed(StartupError, MiddlewareError):
    """A ``StartupError`` Dramatiq lets through ``before_worker_boot`` (it swallows any
    other middleware error), so a worker process whose worker scope cannot be created
    stops at once instead of failing every message."""


class _State(enum.IntEnum):
    NEW = 0
    RUNNING = 1
    CLOSING = 2
    CLOSED = 3


class _ProcessLoop(JobHost):
    """The event loop thread and the Runtime of one worker process.

    Every method may be called from any thread except the loop thread. ``start`` is
    idempotent and raises ``ProcessClosed`` once closing began; ``close`` is idempotent
    and waits for a close already under way in another thread.

    Args:
        make_runtime: builds the Runtime hosted on the loop (called once, on the loop).
        backend: the anyio backend of the loop, ``"asyncio"`` or ``"trio"``.
    """

    def __init__(self, make_runtime: Callable[[], Runtime], backend: str) -> None:
        super().__init__()
        self.make_runtime = make_runtime
        self.backend = backend
        self._thread: threading.Thread | None = None
        self._teardown_error: BaseException | None = None
        # Loop-thread state (with JobHost's): the stop signal and the jobs waiting for
        # the dispatcher. Only the loop thread touches these.
        self._stop: anyio.Event | None = None
        self._wake: anyio.Event | None = None  # set when _queue has jobs to start
        self._queue: collections.deque[tuple[Any, Call, concurrent.futures.Future[Any]]] = collections.deque()
        self._call_soon: Callable[..., Any] | None = None
        # Thread-side state, under _lock.
        self._lock = threading.Lock()
        self._state = _State.NEW
        self._closed = threading.Event()

    @property
    def running(self) -> bool:
        """True from a completed ``start`` until ``close`` begins."""
        return self._state is _State.RUNNING

    @property
    def closing(self) -> bool:
        """True once ``close`` has begun."""
        return self._state >= _State.CLOSING

    # -- start ----------------------------------------------------------------------------
    def start(self) -> None:
        """Start the loop thread and open the Runtime in it (no-op when running)."""
        if self.running:
            return
        with self._lock:
            if self.running:
                return
            if self._state is not _State.NEW:
                raise ProcessClosed(f"the lifecycle runtime of worker process {self.pid} is closed")
            ready: concurrent.futures.Future[None] = concurrent.futures.Future()
            thread = threading.Thread(
                target=self._main, args=(ready,), name=f"lifecycle-dramatiq-{self.pid}", daemon=True
            )
            thread.start()
            try:
                ready.result()
            except BaseException:
                thread.join()
                raise
            self._thread = thread
            self._state = _State.RUNNING

    def _main(self, ready: concurrent.futures.Future[None]) -> None:
        try:
            anyio.run(self._serve, ready, backend=self.backend)
        except BaseException as exc:
            if not ready.done():
                ready.set_exception(exc)
            else:  # worker scope's teardown failed; close() reports it
                self._teardown_error = exc

    async def _serve(self, ready: concurrent.futures.Future[None]) -> None:
        self._stop = anyio.Event()
        self._drained = anyio.Event()
        async with BlockingPortal() as portal, self.make_runtime() as runtime, anyio.create_task_group() as jobs:
            self.runtime = runtime
            self.portal = portal
            self._wake = anyio.Event()
            dispatcher = anyio.CancelScope()

            async def dispatch() -> None:
                with dispatcher:
                    await self._dispatch(jobs)

            jobs.start_soon(dispatch)
            self._call_soon = call_soon_threadsafe(self.backend)
            self._accepting = True
            ready.set_result(None)
            await self._stop.wait()
            # Jobs still in flight are orphans now (Dramatiq no longer waits for them):
            # cancel them and let their teardown finish while worker scope, which they
            # may still use, is alive. Jobs not started yet never start.
            self._accepting = False
            dispatcher.cancel()
            self._refuse_queued()
            await self.cancel_inflight()

    def _request_stop(self) -> None:  # on the loop thread
        assert self._stop is not None
        self._stop.set()

    def warm_up(self, jobs: Iterable[Job[..., Any]]) -> None:
        """Create every worker-scoped dependency of ``jobs`` now, in declaration order.

        Raises:
            StartupError: one of them failed (naming it and the job).
        """

        async def create(runtime: Runtime) -> None:
            for job in jobs:
                for step in runtime.plan(job).steps:
                    if step.worker is None:
                        continue
                    try:
                        await runtime._worker_value(step.worker, LOG)
                    except Exception as exc:
                        raise StartupError(
                            f"dramatiq worker process {self.pid} could not start: worker-scoped dependency "
                            f"{step.provider.label} of actor {job.name!r} failed: {describe(exc)}"
                        ) from exc

        self.run(create)

    # -- jobs -----------------------------------------------------------------------------
    def run(self, work: Callable[[Runtime], Awaitable[T]]) -> T:
        """Run ``work(runtime)`` on the loop and wait for it.

        If the wait is interrupted (Dramatiq's time limit or shutdown notification
        raises in this thread, at any moment), the job is cancelled (one that had not
        started never starts) and its teardown finishes before the exception propagates.

        Args:
            work: the job, called on the loop with the process's Runtime.

        Raises:
            ProcessClosed: the runtime is closed (the job never started), or closing
                cancelled the job (after its teardown ran).
        """
        call = Call()
        submitted = False
        future: concurrent.futures.Future[T] | None = None
        try:
            call_soon, thread = self._call_soon, self._thread
            if call_soon is None or thread is None or self._state is not _State.RUNNING:
                raise ProcessClosed(f"the lifecycle runtime of worker process {self.pid} is not running")
            submitted = True
            pending: concurrent.futures.Future[T] = concurrent.futures.Future()
            try:
                # One hop to the loop, which starts the job's task without answering
                # back (anyio's BlockingPortal.start_task_soon waits for the task's
                # start: a second hop, which doubled the cost per message).
                call_soon(self._spawn, work, call, pending)
            except RuntimeError as exc:  # the loop stopped between the check and here
                raise ProcessClosed(f"the lifecycle runtime of worker process {self.pid} is closed") from exc
            future = pending
            # Short slices, so that an asynchronous exception is raised within _POLL.
            while True:
                try:
                    return future.result(timeout=_POLL)
                except TimeoutError:
                    if future.done():
                        raise  # the job's own TimeoutError, not the wait's
                    if not thread.is_alive():  # the loop ended before it could start the job
                        raise ProcessClosed(f"the lifecycle runtime of worker process {self.pid} is closed") from None

        except BaseException:
            if submitted and not call.done.is_set():
                # A submission interrupted half-way may never reach the loop: bound the
                # wait then. Otherwise the wait is bounded by the job's teardown.
                self._abandon(call, None if future is not None else _UNSURE_SUBMIT_WAIT)
            raise

    def _spawn(
        self, work: Callable[[Runtime], Awaitable[T]], call: Call, future: concurrent.futures.Future[T]
    ) -> None:  # on the loop thread, as a callback outside any task: it must never raise
        if not self._accepting or self._wake is None:
            future.set_exception(ProcessClosed(f"the lifecycle runtime of worker process {self.pid} is closing"))
            call.done.set()
            return
        # A callback cannot start a task (anyio needs a task to know its backend); the
        # dispatcher task does. Setting the backend's event is fine from a callback.
        self._queue.append((work, call, future))
        self._wake.set()

    async def _dispatch(self, jobs: TaskGroup) -> None:
        while True:
            assert self._wake is not None
            await self._wake.wait()
            # No checkpoint from here to the end of the loop body, so no callback can
            # append between the new event and the drain.
            self._wake = anyio.Event()
            while self._queue:
                jobs.start_soon(self._host, *self._queue.popleft())

    def _refuse_queued(self) -> None:
        while self._queue:
            _work, call, future = self._queue.popleft()
            future.set_exception(ProcessClosed(f"the lifecycle runtime of worker process {self.pid} is closing"))
            call.done.set()

    async def _host(
        self, work: Callable[[Runtime], Awaitable[T]], call: Call, future: concurrent.futures.Future[T]
    ) -> None:
        try:
            result = await self.host_call(work, call)
        except BaseException as exc:
            future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise  # a cancellation from outside the job's own scope goes on
        else:
            future.set_result(result)

    def _abandon(self, call: Call, limit: float | None) -> None:
        # Cancel the job and wait for its teardown, to the end: a second asynchronous
        # exception (a shutdown notification after a time limit) landing in here starts
        # the cancel over (it is idempotent) instead of cutting the wait short. The
        # caller re-raises the first exception.
        while True:
            try:
                self.cancel(call)
                self._wait_done(call, limit)
                return
            except BaseException:
                continue

    def _wait_done(self, call: Call, limit: float | None) -> None:
        # The job's teardown is bounded by teardown_timeout per dependency. A second
        # asynchronous exception (a shutdown notification after a time limit) must not
        # end the wait either: the caller re-raises the first one once teardown is over.
        deadline = None if limit is None else time.monotonic() + limit
        while True:
            try:
                if call.done.wait(_POLL) or self._state is _State.CLOSED:
                    return
                if deadline is not None and time.monotonic() > deadline:
                    return
            except BaseException:
                continue

    # -- close ----------------------------------------------------------------------------
    def close(self) -> None:
        """Cancel the jobs in flight and wait for their teardown, tear down worker scope
        (reverse creation order) and stop the loop thread. Safe to call more than once
        and from any thread but the loop's; errors of the teardown are logged."""
        with self._lock:
            state = self._state
            if state is _State.NEW:
                self._state = _State.CLOSED
                self._closed.set()
                return
            if state is _State.RUNNING:
                self._state = _State.CLOSING
        if state is not _State.RUNNING:  # closing or closed by another thread
            self._closed.wait()
            return
        try:
            portal, thread = self.portal, self._thread
            assert portal is not None
            assert thread is not None
            if threading.current_thread() is thread:
                raise RuntimeError("close() was called on the lifecycle loop thread; it would wait for itself")
            with contextlib.suppress(RuntimeError):  # the loop ended already
                portal.call(self._request_stop)
            thread.join()
            if self._teardown_error is not None:
                LOG.error(
                    "dramatiq.worker_scope_teardown_failed",
                    error=describe(self._teardown_error),
                    exception=traceback_text(self._teardown_error),
                    pid=self.pid,
                )
        finally:
            self.portal = None
            self._state = _State.CLOSED
            self._closed.set()


class _Current(threading.local):
    """The message each Dramatiq worker thread is processing (set by the middleware)."""

    message: MessageProxy | None = None


class LifecycleActor(dramatiq.Actor[..., R]):
    """The Dramatiq actor ``@lc.actor`` registers: a ``dramatiq.Actor`` whose messages
    carry the job's payload only, validated in the producer.

    ``send()``, ``send_with_options()``, ``message()`` and ``message_with_options()``
    bind the arguments to the job's payload parameters, validate them against its
    pydantic model (a bad payload raises ``PayloadError`` naming the actor and every
    parameter at fault, and nothing is sent) and send them by name in pydantic's JSON
    mode, so dates, UUIDs and models cross the broker and come back converted.
    Dependencies are never part of a message. Calling the actor runs the job here and
    now in this process's runtime.

    Attributes:
        job: the lifecycle ``Job`` the actor runs.
    """

    def __init__(self, fn: Callable[..., Any], *, job: Job[..., Any], **actor_args: Any) -> None:
        self.job: Job[..., Any] = job  # before Actor.__init__, which declares the actor
        super().__init__(fn, **actor_args)

    def message_with_options(
        self, *, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None, **options: Any
    ) -> dramatiq.Message[R]:
        """Build a message for the validated payload (see the class docstring).

        Args:
            args: the payload's positional arguments, in parameter order.
            kwargs: the payload's arguments by name.
            options: Dramatiq message options, passed through.

        Raises:
            PayloadError: the arguments do not fit the job's payload.
        """
        job = self.job
        given, by_name = tuple(args), dict(kwargs or {})
        job.bind_payload(given, by_name)  # every problem at once: missing, unexpected, doubled, invalid
        names = [param.name for param in job.params]
        payload = job.dump_payload({**dict(zip(names, given, strict=False)), **by_name})
        return super().message_with_options(args=(), kwargs=payload, **options)


class ActorDecorator(Protocol):
    """What ``@lc.actor(...)`` with options returns: registers the function it decorates."""

    @overload
    def __call__(self, fn: Callable[..., Coroutine[Any, Any, R]], /) -> LifecycleActor[R]: ...
    @overload
    def __call__(self, fn: Callable[..., R], /) -> LifecycleActor[R]: ...


class _LifecycleMiddleware(Middleware):
    """Opens the process's runtime at worker boot, closes it at worker shutdown, and
    tells each worker thread which message it is processing (its id and attempt)."""

    def __init__(self, owner: DramatiqLifecycle) -> None:
        self.owner = owner

    def before_worker_boot(self, broker: Broker, worker: DramatiqWorker) -> None:
        self.owner._boot()

    def before_worker_shutdown(self, broker: Broker, worker: DramatiqWorker) -> None:
        self.owner._worker_stopping = True

    def after_worker_shutdown(self, broker: Broker, worker: DramatiqWorker) -> None:
        self.owner._on_shutdown()

    def before_process_message(self, broker: Broker, message: MessageProxy) -> None:
        self.owner._current.message = message

    def after_process_message(
        self,
        broker: Broker,
        message: MessageProxy,
        *,
        result: Any | None = None,
        exception: BaseException | None = None,
    ) -> None:
        self.owner._current.message = None

    def after_skip_message(self, broker: Broker, message: MessageProxy) -> None:
        self.owner._current.message = None


class DramatiqLifecycle:
    """Registers lifecycle jobs as Dramatiq actors on ``broker``; each worker process
    hosts one Runtime on an event loop of its own (see the module docstring).

    Creating it adds a middleware to the broker that, in every ``dramatiq`` worker
    process, opens the runtime and creates every actor's worker-scoped dependencies
    before the first message is read (one that fails stops the process with a
    ``StartupError``), and tears them down, in reverse creation order, after Dramatiq's
    worker threads have finished their messages at shutdown. Producers never start a
    loop.

    Outcomes map onto Dramatiq's own: a result is the actor's result (Dramatiq's Results
    middleware stores it); ``raise Retry(delay)`` becomes ``dramatiq.Retry`` with that
    delay; any other error is retried by Dramatiq's Retries middleware (its backoff,
    bounded by ``max_retries``); ``Reject``, ``DependencyError`` and ``PayloadError``
    are in every actor's ``throws``, so the message fails at once and goes to the dead
    letter queue; a ``time_limit`` cancels the job, whose teardown finishes before
    Dramatiq sees ``TimeLimitExceeded``.

    Args:
        broker: the Dramatiq broker (None: ``dramatiq.get_broker()``).
        dependency_overrides: ``{original: replacement}`` for every actor's Runtime.
        teardown_timeout: seconds each teardown may take (per dependency; ``None``: no
            bound); see the README's "Semantics", rule 6.
        dependencies: run for every actor, their values not injected.
        backend: the anyio backend of each process's loop, ``"asyncio"`` or ``"trio"``.
    """

    def __init__(
        self,
        broker: Broker | None = None,
        *,
        dependency_overrides: Mapping[Any, Any] | None = None,
        teardown_timeout: float | None = 30.0,
        dependencies: Iterable[Depends] = (),
        backend: str = "asyncio",
    ) -> None:
        if backend not in ("asyncio", "trio"):
            raise ValueError(f"DramatiqLifecycle backend must be 'asyncio' or 'trio', got {backend!r}")
        self.broker = broker if broker is not None else dramatiq.get_broker()
        self.backend = backend
        self._runtime_options: dict[str, Any] = {
            "dependency_overrides": dependency_overrides,
            "teardown_timeout": teardown_timeout,
            "dependencies": tuple(dependencies),
        }
        Runtime(**self._runtime_options)  # check the options here, not in a worker process
        self.actors: dict[str, LifecycleActor[Any]] = {}
        self._current = _Current()
        self._process: _ProcessLoop | None = None
        self._lock = threading.Lock()
        self._worker_stopping = False  # this process's Dramatiq worker began its shutdown
        self.middleware = _LifecycleMiddleware(self)
        self.broker.add_middleware(self.middleware)
        os.register_at_fork(after_in_child=self._forget_parent_loop)

    # -- per-process runtime ---------------------------------------------------------------
    def _forget_parent_loop(self) -> None:
        # A forked child must never touch its parent's loop thread (it does not exist here).
        self._process = None
        self._lock = threading.Lock()
        self._current = _Current()
        self._worker_stopping = False

    def _loop(self) -> _ProcessLoop:
        with self._lock:
            if self._process is None or self._process.pid != os.getpid():
                self._process = _ProcessLoop(lambda: Runtime(**self._runtime_options), self.backend)
            return self._process

    def process_runtime(self) -> _ProcessLoop:
        """This process's runtime, started on first use (never before a fork).

        Raises ``ProcessClosed`` once it was closed: a process is never given a second
        worker scope that nothing would tear down."""
        process = self._process
        if process is None or process.pid != os.getpid():
            process = self._loop()
        process.start()
        return process

    def _boot(self) -> None:
        with self._lock:
            # A worker started again in this process (embedding, tests) gets a fresh
            # runtime: its own shutdown tears it down, as the previous one's did.
            if self._process is not None and self._process.closing:
                self._process = None
            self._worker_stopping = False
        try:
            process = self.process_runtime()
        except Exception as exc:
            raise _StartupFailed(
                f"dramatiq worker process {os.getpid()} could not start its lifecycle runtime: {describe(exc)}"
            ) from exc
        try:
            process.warm_up(actor.job for actor in self.actors.values())
        except BaseException as exc:
            process.close()  # tear down what was created before the failure
            if isinstance(exc, StartupError):
                raise _StartupFailed(str(exc)) from exc
            raise

    def _on_shutdown(self) -> None:
        process = self._process
        if process is not None and process.pid == os.getpid():
            process.close()

    def shutdown(self) -> None:
        """Close this process's runtime now: cancel the jobs in flight (their teardown
        runs), then tear down worker scope. A Dramatiq worker does this itself at
        shutdown; call it after running actors directly (``actor(...)``) in a process
        with no worker, whose runtime started on first use. Messages this process runs
        afterwards fail (Dramatiq retries them) with an error saying the runtime is
        closed."""
        self._loop().close()

    # -- actors ----------------------------------------------------------------------------
    @overload
    def actor(self, fn: Callable[..., Coroutine[Any, Any, R]], /) -> LifecycleActor[R]: ...
    @overload
    def actor(self, fn: Callable[..., R], /) -> LifecycleActor[R]: ...
    @overload
    def actor(
        self,
        *,
        actor_name: str | None = None,
        queue_name: str = "default",
        priority: int = 0,
        timeout: float | None = None,
        dependencies: Iterable[Depends] = (),
        **options: Any,
    ) -> ActorDecorator: ...

    def actor(
        self,
        *args: Any,
        actor_name: str | None = None,
        queue_name: str = "default",
        priority: int = 0,
        timeout: float | None = None,
        dependencies: Iterable[Depends] = (),
        **options: Any,
    ) -> Any:
        """``@lc.actor(actor_name=..., ...)``: register an async (or sync) function as a
        Dramatiq actor that runs each message as one lifecycle job.

        Args:
            actor_name: the actor's (and job's) name; None: the function's name.
            queue_name: the Dramatiq queue.
            priority: Dramatiq's actor priority (lower runs first).
            timeout: the job's own timeout in seconds (``None``: none); Dramatiq's
                ``time_limit`` option (milliseconds) is the broker-side one.
            dependencies: run for this actor, their values not injected.
            options: every Dramatiq actor option (``max_retries``, ``min_backoff``,
                ``time_limit``, ``store_results``...), checked against the broker's
                middleware as ``dramatiq.actor`` does. ``throws`` is extended with
                ``Reject``, ``DependencyError`` and ``PayloadError``.

        Raises:
            DependencyError: the job's dependency graph is invalid.
            ValueError: an option no middleware of the broker knows, or a bad queue name.
        """

        def decorate(fn: Callable[..., Any]) -> LifecycleActor[Any]:
            name = actor_name or fn.__name__
            job = Job(fn, name=name, timeout=timeout, dependencies=dependencies)
            owner = self

            @functools.wraps(fn)
            def run(*call_args: Any, **call_kwargs: Any) -> Any:
                return owner._run(job, call_args, call_kwargs)

            # Dramatiq runs coroutine functions through its own AsyncIO middleware;
            # this wrapper is sync (it waits for the job on the process's loop).
            del run.__wrapped__
            user_throws = options.get("throws")
            if user_throws is None:
                throws: tuple[type[BaseException], ...] = _NEVER_RETRIED
            elif isinstance(user_throws, tuple):
                throws = (*user_throws, *_NEVER_RETRIED)
            else:
                throws = (user_throws, *_NEVER_RETRIED)

            registered: LifecycleActor[Any] = dramatiq.actor(  # type: ignore[call-overload]
                run,
                actor_class=functools.partial(LifecycleActor, job=job),
                actor_name=name,
                queue_name=queue_name,
                priority=priority,
                broker=self.broker,
                **{**options, "throws": throws},
            )
            self.actors[name] = registered
            return registered

        if args and callable(args[0]) and len(args) == 1:
            return decorate(args[0])
        if args:
            raise TypeError("DramatiqLifecycle.actor takes keyword options only")
        return decorate

    def _run(self, job: Job[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        payload, extras = job.bind_payload(args, kwargs)
        message = self._current.message
        retries = int(message.options.get("retries", 0)) if message is not None else 0
        attempt = retries + 1
        job_id = message.message_id if message is not None else None

        async def attempt_job(runtime: Runtime) -> Any:
            return await runtime.run_attempt(job, payload, extras, job_id=job_id, attempt=attempt)

        process = self.process_runtime()
        try:
            return process.run(attempt_job)
        except Retry as exc:
            max_retries = self._max_retries(job, message)
            if _POLICY.decide(exc, attempt, max_retries).verdict == Verdict.EXHAUSTED:
                # Dramatiq would record the Retry itself ("retry requested (delay=...)"):
                # say that the attempts are used up, and name the cause.
                raise LifecycleError(_retries_exhausted(job, attempt, max_retries, exc)) from exc
            delay = None if exc.delay is None else round(exc.delay * 1000)
            raise dramatiq.Retry(str(exc), delay=delay) from exc
        except ProcessClosed:
            if self._worker_stopping and message is not None:
                # The worker's shutdown closed the runtime and cancelled this job (its
                # teardown has run): Dramatiq's shutdown timeout passed and it gave up
                # on this thread, whose consumer is closed. Leave the message
                # unacknowledged, so the broker redelivers it, rather than let the
                # Retries middleware count an attempt or dead-letter it. The thread is
                # a daemon; the process is exiting.
                threading.Event().wait()
            raise

    def _max_retries(self, job: Job[..., Any], message: MessageProxy | None) -> int:
        """The retries Dramatiq allows this message: its own ``max_retries``, the
        actor's, or the Retries middleware's; unbounded under ``retry_when``."""
        actor = self.actors[job.name]
        middleware = next((m for m in self.broker.middleware if isinstance(m, Retries)), None)
        if middleware is None:
            return 0  # without the Retries middleware Dramatiq never retries
        if actor.options.get("retry_when", middleware.retry_when) is not None:
            return sys.maxsize  # retry_when decides, not max_retries
        options = message.options if message is not None else {}
        value = options.get("max_retries", actor.options.get("max_retries", middleware.max_retries))
        return sys.maxsize if value is None else int(value)


def _retries_exhausted(job: Job[..., Any], attempt: int, max_retries: int, exc: Retry) -> str:
    cause = exc.__cause__ or exc.__context__
    why = f"{describe(exc)}, caused by {describe(cause)}" if cause is not None else describe(exc)
    return (
        f"actor {job.name!r} ({label(job.fn)}) asked to retry but its attempts are used up "
        f"({attempt} of {max_retries + 1}; max_retries={max_retries}): {why}"
    )
