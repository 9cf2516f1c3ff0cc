"""The Runtime: owns the worker scope and the overrides, and runs jobs (one job = one
request), with retries (``_retry.RetryPolicy``) and job timeouts.

The engine sees a runtime through ``_engine.Host``: the members it needs (the watchdog,
the backend's cancel scope class, the worker-scoped values) are private here."""

from __future__ import annotations

import contextlib
import functools
import sys
import time
from collections.abc import Callable, Coroutine, Hashable, Iterable, Iterator, Mapping
from random import getrandbits
from types import MappingProxyType, TracebackType
from typing import Any, TypeVar, overload

import anyio
from anyio.abc import TaskGroup

from ._analysis import label
from ._codegen import Runner, Runners
from ._context import JobContext
from ._errors import DependencyError, JobTimeout, LifecycleError, PayloadError, Reject, Retry
from ._job import Job, as_job
from ._log import LOG, JobLog, describe, log_failure
from ._markers import Depends
from ._observe import MetricsSink, Observer, configured_tracer_provider
from ._outcome import Failed, Outcome, Rejected, RetryLater, Succeeded
from ._plan import Plan, WorkerNode
from ._retry import RetryPolicy, Verdict
from ._watchdog import Watchdog
from ._worker_scope import WorkerScope

T = TypeVar("T")

_VERSION = "0.1.0"  # the instrumentation scope's version on spans (lifecycle.__version__)

# ``Runtime.run`` retries at once unless ``Retry(delay)`` asks for a wait.
_POLICY = RetryPolicy()
# ``Runtime.attempt``'s default backoff: the queue Worker's (``retry_backoff=1.0``), so a
# consumer loop the library does not own spaces its retries as a Worker would.
_ATTEMPT_POLICY = RetryPolicy(1.0, 300.0)


def _new_id() -> str:
    """128 random bits as 32 hex digits. An identifier, not a secret: the random module
    (seeded from the OS, reseeded in forked children) costs a third of os.urandom."""
    return getrandbits(128).to_bytes(16).hex()


def _native_scope_class() -> Callable[[], Any]:
    """The cancel scope class of the running event loop, for the one scope every job
    with a suspending teardown enters. Under trio that is trio's own: anyio's wrapper
    around it costs a quarter more per job. Under asyncio, anyio's scope class, created
    directly to skip anyio's per-call backend lookup."""
    trio = sys.modules.get("trio")
    if trio is not None:
        try:
            trio.lowlevel.current_task()
        except RuntimeError:  # trio is imported, but this is not its event loop
            pass
        else:
            return trio.CancelScope  # type: ignore[no-any-return]
    return type(anyio.CancelScope())


class Overrides(dict[Any, Any]):
    """``{original: replacement}``; a plain dict that counts its changes, so compiled
    plans are reused until the overrides actually change."""

    version = 0

    def _touch(self) -> None:
        self.version += 1

    def __setitem__(self, key: Any, value: Any) -> None:
        if not callable(value):
            raise TypeError(f"override for {key!r} must be callable, got {value!r}")
        super().__setitem__(key, value)
        self._touch()

    def __delitem__(self, key: Any) -> None:
        super().__delitem__(key)
        self._touch()

    def update(self, *args: Any, **kwargs: Any) -> None:
        for key, value in dict(*args, **kwargs).items():
            self[key] = value

    def __ior__(self, other: Any) -> Overrides:  # type: ignore[misc]
        self.update(other)
        return self

    def pop(self, *args: Any) -> Any:
        self._touch()
        return super().pop(*args)

    def popitem(self) -> tuple[Any, Any]:
        self._touch()
        return super().popitem()

    def clear(self) -> None:
        super().clear()
        self._touch()

    def setdefault(self, key: Any, default: Any = None) -> Any:
        if key not in self:
            self[key] = default
        return self[key]


class Runtime:
    """Runs jobs; holds worker-scoped dependencies from ``async with`` entry to exit.

    Args:
        dependency_overrides: ``{original: replacement}``, see ``dependency_overrides``.
        teardown_timeout: seconds each dependency's teardown may take (None: no bound).
        dependencies: ``Depends(...)`` run for every job, values not injected.
        tracer_provider: an OpenTelemetry ``TracerProvider`` to trace jobs and their
            dependencies with. None (the default): the global one, once an SDK has
            configured it; without one, tracing is off and costs nothing.
        metrics: where job and dependency numbers go (``lifecycle.prometheus.Metrics``);
            None: none are recorded.
    """

    def __init__(
        self,
        *,
        dependency_overrides: Mapping[Any, Any] | None = None,
        teardown_timeout: float | None = 30.0,
        dependencies: Iterable[Depends] = (),
        tracer_provider: Any | None = None,
        metrics: MetricsSink | None = None,
    ) -> None:
        if teardown_timeout is not None and teardown_timeout <= 0:
            raise ValueError(f"teardown_timeout must be positive or None, got {teardown_timeout!r}")
        self.teardown_timeout = teardown_timeout
        self.dependencies = tuple(dependencies)
        for index, marker in enumerate(self.dependencies):
            if not isinstance(marker, Depends) or marker.dependency is None:
                raise DependencyError(f"Runtime(dependencies=...)[{index}] must be Depends(callable), got {marker!r}")
        self._overrides = Overrides()
        self._overrides.update(dependency_overrides or {})
        self._runners: dict[Job[..., Any], tuple[int, Runners]] = {}
        self._scope = WorkerScope(teardown_timeout)
        self._task_group: TaskGroup | None = None
        self._watchdog: Watchdog | None = None
        self._watchdog_scope: anyio.CancelScope | None = None
        # The running backend's own scope class for the per-job guard (see _engine).
        self._scope_class: Callable[[], Any] = anyio.CancelScope
        self._open = False
        self.tracer_provider = tracer_provider
        self.metrics = metrics
        # None unless tracing or metrics are on (decided at entry): then plans compile
        # with observed dependencies and every attempt is observed (see _observe).
        self._observer: Observer | None = None

    # -- overrides ----------------------------------------------------------------------
    @property
    def dependency_overrides(self) -> dict[Any, Any]:
        return self._overrides

    @dependency_overrides.setter
    def dependency_overrides(self, value: Mapping[Any, Any]) -> None:
        fresh = Overrides()
        fresh.update(value)
        fresh.version = self._overrides.version + 1
        self._overrides = fresh

    @contextlib.contextmanager
    def override(self, original: Callable[..., Any], replacement: Callable[..., Any]) -> Iterator[None]:
        """Replace ``original`` for the ``with`` block, then restore the previous state."""
        overrides = self._overrides
        had = original in overrides
        previous = overrides.get(original)
        overrides[original] = replacement
        try:
            yield
        finally:
            if had:
                overrides[original] = previous
            else:
                overrides.pop(original, None)

    def plan(self, fn: Callable[..., Any]) -> Plan:
        """The compiled plan ``fn`` runs with here (after overrides and runtime deps).

        Args:
            fn: a ``@job`` or any callable ``run`` accepts.

        Raises:
            DependencyError: the graph is invalid with this runtime's overrides.
        """
        return self._compiled(as_job(fn)).plan

    def _compiled(self, job: Job[..., Any]) -> Runners:
        if self._observer is not None:
            return self._observed(job)
        if not self._overrides and not self.dependencies and job.error is None:
            return job.runners  # compiled at decoration; nothing here changes it
        version = self._overrides.version
        cached = self._runners.get(job)
        if cached is not None and cached[0] == version:
            return cached[1]
        runners = job.compile(self.dependencies, self._overrides)
        self._runners[job] = (version, runners)
        return runners

    def _observed(self, job: Job[..., Any]) -> Runners:
        observer = self._observer
        assert observer is not None
        version = self._overrides.version
        cached = self._runners.get(job)
        if cached is not None and cached[0] == version:
            return cached[1]
        runners = job.compile(self.dependencies, observer.overrides(self._overrides))
        self._runners[job] = (version, runners)
        return runners

    # -- lifetime -----------------------------------------------------------------------
    async def __aenter__(self) -> Runtime:
        if self._open:
            raise LifecycleError("this Runtime is already open")
        self._task_group = anyio.create_task_group()
        await self._task_group.__aenter__()
        self._scope_class = _native_scope_class()
        self._observe()
        self._scope = WorkerScope(self.teardown_timeout)
        self._scope.attach(self._task_group)
        if self.teardown_timeout is not None:
            self._watchdog = Watchdog(self.teardown_timeout)
            self._watchdog_scope = anyio.CancelScope()
            self._task_group.start_soon(self._run_watchdog, self._watchdog, self._watchdog_scope)
        self._open = True
        return self

    def _observe(self) -> None:
        """Decide, at entry, whether this runtime traces and measures: an explicit
        tracer provider, or the global one once an SDK configured it; ``metrics``."""
        provider = self.tracer_provider if self.tracer_provider is not None else configured_tracer_provider()
        tracer = provider.get_tracer("lifecycle", _VERSION) if provider is not None else None
        observer = Observer(tracer, self.metrics) if tracer is not None or self.metrics is not None else None
        if (observer is None) != (self._observer is None):
            self._runners.clear()  # compiled for the other mode
        self._observer = observer

    @staticmethod
    async def _run_watchdog(watchdog: Watchdog, scope: anyio.CancelScope) -> None:
        with scope:
            await watchdog.run()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        self._open = False
        task_group, self._task_group = self._task_group, None
        try:
            errors = await self._scope.close(LOG)
        finally:
            if self._watchdog_scope is not None:
                self._watchdog_scope.cancel()
                self._watchdog_scope = None
            self._watchdog = None
            # The host tasks have all finished by now. Exit the group without the
            # caller's exception so that it propagates as itself, not in a group.
            assert task_group is not None
            task_group.cancel_scope.shield = True
            await task_group.__aexit__(None, None, None)
        if errors and exc is None:
            if len(errors) == 1:
                raise errors[0]
            raise BaseExceptionGroup("teardown of worker-scoped dependencies failed", errors)
        return None

    # -- for the engine (see _engine.Host) and the worker's warm-up -----------------------
    @property
    def _worker_values(self) -> dict[Hashable, Any]:
        """The worker-scoped values created so far, by node key (read per job)."""
        return self._scope.values

    async def _worker_value(self, node: WorkerNode, log: Any) -> Any:
        """The node's value, created on first use (exactly once)."""
        return await self._scope.get(node, log)

    # -- running ------------------------------------------------------------------------
    @overload
    async def run(self, fn: Callable[..., Coroutine[Any, Any, T]], /, *args: Any, **kwargs: Any) -> T: ...
    @overload
    async def run(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T: ...

    async def run(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        """Run one job to completion, retrying while its ``@job(retries=...)`` allow.

        Args:
            fn: a ``@job``, or any callable with ``Depends`` parameters (sync or async).
            args: the job's positional payload arguments.
            kwargs: the job's payload arguments by name.

        Raises:
            PayloadError: the arguments do not fit the job (nothing was set up).
            Exception: the last attempt's error; ``Reject`` and graph errors at once.
        """
        job = as_job(fn)
        payload, extras = job.bind_payload(args, kwargs)
        runners = self._compiled(job)
        job_id = _new_id()
        attempt = 1
        while True:
            try:
                return await self._attempt(job, runners, payload, extras, job_id, attempt)
            except BaseException as exc:
                verdict, delay = _POLICY.decide(exc, attempt, job.retries)
                if verdict != Verdict.RETRY:
                    _log_final(job, job_id, attempt, exc, verdict)
                    raise
                _log_retrying(job, job_id, attempt, delay, exc)
            if delay:
                await anyio.sleep(delay)
            attempt += 1
            runners = self._compiled(job)

    async def run_attempt(
        self,
        fn: Callable[..., Any],
        payload: dict[str, Any],
        extras: dict[str, Any] | None = None,
        *,
        job_id: str | None = None,
        attempt: int = 1,
    ) -> Any:
        """Run exactly one attempt of an already-bound payload; for queue workers, which
        own the retry policy (and so the failure logging) themselves.

        Args:
            fn: the job.
            payload: the validated arguments by name (``Job.bind_payload``).
            extras: the arguments only a ``**kwargs`` parameter takes, or None.
            job_id: the job's id (a message id); None: a fresh random one.
            attempt: the attempt's number, from 1.
        """
        job = as_job(fn)
        return await self._attempt(job, self._compiled(job), payload, extras, job_id or _new_id(), attempt)

    async def attempt(
        self,
        fn: Callable[..., Any],
        payload: Mapping[str, Any],
        *,
        attempt: int = 1,
        job_id: str | None = None,
        backoff: float | None = 1.0,
        backoff_max: float = 300.0,
    ) -> Outcome:
        """Run one attempt of a job for a consumer loop the library does not own, and
        return what to do with its message instead of raising.

        The retry rules are the ones ``run`` and ``Worker`` follow (README,
        "Semantics"): ``Reject`` and a payload that does not fit are ``Rejected``;
        a graph error, or any failure on the job's last attempt (a ``Retry`` included),
        is ``Failed``; any other ``Exception`` (a ``JobTimeout`` too) with attempts
        left is ``RetryLater``. The outcome is logged as ``run`` logs it
        (``job.succeeded``, ``job.retrying``, ``job.rejected``, ``job.failed``).

        Args:
            fn: a ``@job``, or any callable with ``Depends`` parameters (sync or async).
            payload: the job's arguments by name (a decoded message body); validated
                before anything is set up. Not a mapping: ``Rejected``.
            attempt: this attempt's number, from 1, as the caller's message carries it;
                attempt ``retries + 1`` is the job's last.
            job_id: the job's id in logs and ``JobContext.id`` (a message id); None: a
                fresh random one.
            backoff: seconds before the first retry when the job gave no
                ``Retry(delay)``, doubled per attempt with jitter (half to all of it);
                None: retry at once (``RetryLater.delay`` is 0).
            backoff_max: the cap on that backoff, in seconds.

        Returns:
            ``Succeeded(result)``, ``RetryLater(delay, error)``, ``Rejected(reason,
            error)`` or ``Failed(error)``.

        Raises:
            ValueError: ``attempt`` is not a positive int.
            LifecycleError: the runtime is not open.
            BaseException: cancellation (the caller's, a shutdown's) and anything else
                that is not an ``Exception`` propagates: it is never an outcome.
        """
        if isinstance(attempt, bool) or not isinstance(attempt, int) or attempt < 1:
            name = getattr(fn, "name", None) or getattr(fn, "__qualname__", repr(fn))
            raise ValueError(f"job {name!r}: attempt must be an int >= 1 (1 is the first attempt), got {attempt!r}")
        if not self._open:
            raise LifecycleError("the Runtime is not open; use `async with Runtime() as rt:`")
        job_id = job_id or _new_id()
        try:
            job = as_job(fn)
        except DependencyError as exc:
            # A plain callable whose graph cannot be read: no job name to log under.
            LOG.error("job.failed", job=label(fn), job_id=job_id, attempt=attempt, error=describe(exc))
            return Failed(exc)
        try:
            if not isinstance(payload, Mapping):
                raise PayloadError(
                    f"job {job.name!r}: the payload must be a mapping, got {type(payload).__name__}", job=job.name
                )
            bound, extras = job.bind_payload((), payload)
        except PayloadError as exc:
            LOG.warning("job.rejected", job=job.name, job_id=job_id, attempt=attempt, reason=describe(exc))
            return Rejected(str(exc), exc)
        policy = _ATTEMPT_POLICY if (backoff, backoff_max) == (1.0, 300.0) else RetryPolicy(backoff, backoff_max)
        try:
            runners = self._compiled(job)
            result = await self._attempt(job, runners, bound, extras, job_id, attempt)
        except Exception as exc:
            verdict, delay = policy.decide(exc, attempt, job.retries)
            if verdict == Verdict.RETRY:
                delay = delay or 0.0
                _log_retrying(job, job_id, attempt, delay, exc)
                return RetryLater(delay, exc)
            _log_final(job, job_id, attempt, exc, verdict)
            if verdict == Verdict.REJECTED and isinstance(exc, Reject):
                return Rejected(exc.reason, exc)
            return Failed(exc)
        return Succeeded(result)

    async def _attempt(
        self,
        job: Job[..., Any],
        runners: Runners,
        payload: dict[str, Any],
        extras: dict[str, Any] | None,
        job_id: str,
        attempt: int,
    ) -> Any:
        if not self._open:
            raise LifecycleError("the Runtime is not open; use `async with Runtime() as rt:`")
        log = JobLog(job.name, job_id, attempt)
        ctx = None
        if runners.plan.needs_context:
            ctx = JobContext(job_id, job.name, attempt, MappingProxyType(payload))
            ctx._log = log
        if self._observer is not None:
            with self._observer.attempt(job.name, job_id, attempt):
                return await self._execute(job, runners, payload, extras, ctx, log, attempt)
        started = time.perf_counter() if log.info_enabled else 0.0
        if log.debug_enabled:
            log.debug("job.started")
            runner = runners.traced  # with a debug event per dependency
        else:
            runner = runners.run
        if job.timeout is None:
            result = await runner(payload, extras, ctx, self, log)
        else:
            result = await _run_with_timeout(job, runner, payload, extras, ctx, self, log, attempt)
        if log.info_enabled:
            log.info("job.succeeded", duration_ms=round((time.perf_counter() - started) * 1000, 3))
        return result

    async def _execute(
        self,
        job: Job[..., Any],
        runners: Runners,
        payload: dict[str, Any],
        extras: dict[str, Any] | None,
        ctx: JobContext | None,
        log: JobLog,
        attempt: int,
    ) -> Any:
        """The rest of ``_attempt``, for an observed attempt (the plain path stays inline)."""
        started = time.perf_counter() if log.info_enabled else 0.0
        if log.debug_enabled:
            log.debug("job.started")
        runner = runners.traced if log.debug_enabled else runners.run
        if job.timeout is None:
            result = await runner(payload, extras, ctx, self, log)
        else:
            result = await _run_with_timeout(job, runner, payload, extras, ctx, self, log, attempt)
        if log.info_enabled:
            log.info("job.succeeded", duration_ms=round((time.perf_counter() - started) * 1000, 3))
        return result

    def bind(self, fn: Callable[..., Any]) -> Callable[..., Coroutine[Any, Any, Any]]:
        """An async callable taking only the job's payload (for queue consumers)."""
        job = as_job(fn)

        @functools.wraps(job.fn)
        async def bound(*args: Any, **kwargs: Any) -> Any:
            return await self.run(job, *args, **kwargs)

        return bound


def _log_final(job: Job[..., Any], job_id: str, attempt: int, exc: BaseException, verdict: Verdict) -> None:
    """Log an attempt that ends the job (any verdict but ``RETRY``)."""
    if verdict == Verdict.EXHAUSTED and isinstance(exc, Retry):
        used_up = _POLICY.used_up(attempt, job.retries)
        exc.add_note(f"lifecycle: job {job.name!r} asked to retry but has {used_up}")
        # A deliberate outcome: one line, no traceback.
        LOG.error("job.failed", job=job.name, job_id=job_id, attempt=attempt, error=f"{describe(exc)}; {used_up}")
    else:
        # job.cancelled / job.rejected / job.timed_out in one line, job.failed with the
        # traceback only for an unexpected error (see _log.log_failure).
        log_failure(LOG, exc, job=job.name, job_id=job_id, attempt=attempt)


def _log_retrying(job: Job[..., Any], job_id: str, attempt: int, delay: float | None, exc: BaseException) -> None:
    LOG.warning("job.retrying", job=job.name, job_id=job_id, attempt=attempt, delay=delay, error=describe(exc))


async def _run_with_timeout(
    job: Job[..., Any],
    runner: Runner,
    payload: dict[str, Any],
    extras: dict[str, Any] | None,
    ctx: Any,
    host: Runtime,
    log: Any,
    attempt: int,
) -> Any:
    """Run one attempt under the job's timeout (the runner does the rest).

    The timeout bounds the whole attempt, teardown included. A runner that returns
    after the deadline (it passed in code no cancellation reaches: a threaded teardown,
    any teardown once shielded by rule 6, sync code blocking the loop) has its result
    discarded and fails with ``JobTimeout`` too: the job did not finish in time, and a
    queue worker acknowledges a message only after the whole teardown anyway."""
    timeout = job.timeout
    assert timeout is not None
    deadline = anyio.current_time() + timeout
    with anyio.CancelScope(deadline=deadline):
        result = await runner(payload, extras, ctx, host, log)
        late = anyio.current_time() - deadline
        if late < 0:
            return result
        message = (
            f"job {job.name!r} ({job.body.label}) timed out after {timeout}s (attempt {attempt}): "
            f"it finished {late:.3f}s after its deadline, in code the timeout could not interrupt "
            "(a worker thread, or a teardown, which is shielded); its result is discarded"
        )
        raise JobTimeout(message)
    raise JobTimeout(f"job {job.name!r} ({job.body.label}) timed out after {timeout}s (attempt {attempt})")


@overload
def run(fn: Callable[..., Coroutine[Any, Any, T]], /, *args: Any, backend: str = "asyncio", **kwargs: Any) -> T: ...
@overload
def run(fn: Callable[..., T], /, *args: Any, backend: str = "asyncio", **kwargs: Any) -> T: ...


def run(fn: Callable[..., Any], /, *args: Any, backend: str = "asyncio", **kwargs: Any) -> Any:
    """Open a runtime, run one job, close it: for scripts and one-shot tasks. Typed as
    returning the job's result (an async job's awaited result).

    Args:
        fn: the job (a ``@job`` or any callable ``Runtime.run`` accepts).
        args: the job's positional payload arguments.
        backend: the anyio backend to run on, ``"asyncio"`` or ``"trio"``.
        kwargs: the job's payload arguments by name.
    """

    async def main() -> Any:
        async with Runtime() as rt:
            return await rt.run(fn, *args, **kwargs)

    return anyio.run(main, backend=backend)
