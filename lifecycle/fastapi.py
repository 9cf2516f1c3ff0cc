"""FastAPI bridge: one ``Runtime`` owned by an app's lifespan, shared by its routes and
by the jobs it runs in-process, and a door for routes to enqueue jobs with the payload
validated before it reaches the broker.

Why it is shaped this way:

- Dependencies are shared with routes by being *the same functions*: a job may declare
  its dependencies with FastAPI's own ``Depends`` (the core reads that marker without
  importing FastAPI, see ``_markers.marker_of``), so one ``get_db`` serves both.
  Request-only parameters (``Request``, ``Header()``...) are a ``DependencyError`` when
  a job's graph is built; a job has no HTTP request.
- FastAPI has no worker scope: it would call a ``@dependency(scope="worker")`` generator
  (a pool) afresh for every request. The lifespan therefore overrides each worker-scoped
  dependency the app's routes use (``app.dependency_overrides``) with a getter that
  returns the runtime's one value, so routes and jobs share one pool, created once and
  torn down when the app stops, in reverse order, as a ``Worker``'s would be.
- The getter runs a one-dependency job on the runtime rather than reading its cache,
  so the runtime's own ``dependency_overrides`` (test fakes) apply to routes too, and
  "created exactly once even when many ask at the same moment" is the runtime's rule,
  not a second implementation of it.
- ``enqueue`` turns a ``PayloadError`` into FastAPI's ``RequestValidationError`` (a
  422 answer listing every problem), so a bad payload is refused at the door, never
  dead-lettered later by a worker."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Mapping
from typing import Annotated, Any, TypeVar, overload

from ._analysis import label
from ._errors import LifecycleError, PayloadError
from ._job import Job, job
from ._markers import Depends, options_of
from ._runtime import Runtime
from .queues import Queue

try:
    import fastapi
    from fastapi.exceptions import RequestValidationError
except ImportError:  # pragma: no cover - exercised by test_packaging without the extra
    raise ImportError(
        "lifecycle.fastapi needs FastAPI, which is not installed: pip install 'lifecycle[fastapi]'"
    ) from None

__all__ = ["FastAPILifecycle"]

T = TypeVar("T")


class FastAPILifecycle:
    """Owns a ``Runtime`` for a FastAPI app's lifetime (``FastAPI(lifespan=lc.lifespan)``).

    Worker-scoped dependencies are shared by the app's routes and the jobs it runs
    in-process (``run``), created once, torn down when the app stops. Routes enqueue
    jobs for a worker process with ``enqueue``.

    Args:
        queue: the queue ``enqueue`` sends to by default (any lifecycle queue), opened
            when the app starts and closed when it stops; None: ``enqueue`` needs its
            ``queue`` argument.
        dependency_overrides: ``{original: replacement}`` for the runtime (see
            ``Runtime``); they apply to shared worker-scoped values in routes too.
        teardown_timeout: the runtime's bound on each teardown, in seconds; None: no
            bound.
        dependencies: ``Depends(...)`` run for every job of the runtime, values unused.
        share_worker_scope: True (the default): when the app starts, every
            ``@dependency(scope="worker")`` provider that its routes use (directly or
            through other dependencies) is overridden in ``app.dependency_overrides``
            with the runtime's shared value, unless the app overrides it already; the
            overrides are removed when the app stops. False: only what you wire with
            ``shared`` is shared.
    """

    def __init__(
        self,
        *,
        queue: Queue | None = None,
        dependency_overrides: Mapping[Any, Any] | None = None,
        teardown_timeout: float | None = 30.0,
        dependencies: Iterable[Depends] = (),
        share_worker_scope: bool = True,
    ) -> None:
        self.queue = queue
        self.share_worker_scope = share_worker_scope
        # Built now so that bad options fail at import time, not at the app's start.
        self._idle = Runtime(
            dependency_overrides=dependency_overrides, teardown_timeout=teardown_timeout, dependencies=dependencies
        )
        self._runtime: Runtime | None = None
        self._fetchers: dict[Any, Job[..., Any]] = {}

    @property
    def runtime(self) -> Runtime:
        """The open runtime (only while the app runs).

        Raises:
            LifecycleError: the app's lifespan is not running.
        """
        if self._runtime is None:
            raise LifecycleError(
                "FastAPILifecycle: the runtime exists only while the app runs; "
                "pass lifespan=lc.lifespan to FastAPI(...) (or enter `async with lc.lifespan(app):`)"
            )
        return self._runtime

    @contextlib.asynccontextmanager
    async def lifespan(self, app: fastapi.FastAPI) -> AsyncIterator[None]:
        """The app's lifespan: open the runtime (and the queue), share worker scope with
        the routes, and at shutdown tear it all down. To combine it with a lifespan of
        your own, enter it there: ``async with lc.lifespan(app): yield``.

        Args:
            app: the FastAPI app; ``app.state.lifecycle`` is set to this object.
        """
        if self._runtime is not None:
            raise LifecycleError("FastAPILifecycle: this lifespan is already running")
        installed: list[Any] = []
        async with contextlib.AsyncExitStack() as stack:
            self._runtime = await stack.enter_async_context(self._idle)
            stack.callback(self._closed)
            if self.queue is not None:
                await self.queue.open()
                stack.push_async_callback(self.queue.close)
            if self.share_worker_scope:
                overrides = app.dependency_overrides
                for call in _worker_scoped(app):
                    if call not in overrides:
                        overrides[call] = self.shared(call)
                        installed.append(call)
                stack.callback(_remove, overrides, installed)
            app.state.lifecycle = self
            yield

    def _closed(self) -> None:
        self._runtime = None

    def shared(self, dependency: Callable[..., Any]) -> Callable[[], Coroutine[Any, Any, Any]]:
        """A FastAPI dependency returning the runtime's value of a worker-scoped
        dependency: ``Depends(lc.shared(pool))``, or an entry of
        ``app.dependency_overrides``. The value is created on first use (exactly once)
        and torn down when the app stops.

        Args:
            dependency: a ``@dependency(scope="worker")`` provider.

        Raises:
            ValueError: ``dependency`` is not worker-scoped (a job-scoped value would be
                torn down before the route could use it).
        """
        fetch = self._fetchers.get(dependency)
        if fetch is None:
            if options_of(dependency).scope != "worker":
                raise ValueError(
                    f'FastAPILifecycle.shared({label(dependency)}): only a @dependency(scope="worker") '
                    "provider has one value to share; use FastAPI's Depends for a per-request one"
                )
            fetch = self._fetchers[dependency] = _fetcher(dependency)

        async def shared_value() -> Any:
            return await self.runtime.run(fetch)

        shared_value.__qualname__ = shared_value.__name__ = f"shared_{getattr(dependency, '__name__', 'value')}"
        return shared_value

    @overload
    async def run(self, fn: Callable[..., Coroutine[Any, Any, T]], /, *args: Any, **kwargs: Any) -> T: ...
    @overload
    async def run(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T: ...

    async def run(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        """Run a job in this process on the app's runtime (``Runtime.run``): it shares
        worker-scoped values with the routes. A ``PayloadError`` propagates (the
        arguments come from your code, not from the client).

        Args:
            fn: a ``@job`` or any callable ``Runtime.run`` accepts.
            args: the job's positional payload arguments.
            kwargs: the job's payload arguments by name.
        """
        return await self.runtime.run(fn, *args, **kwargs)

    async def enqueue(
        self,
        job: Job[..., Any],
        payload: Mapping[str, Any] | None = None,
        *,
        queue: Queue | None = None,
        delay: float | None = None,
        at: float | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> str:
        """Validate ``payload`` against ``job`` and enqueue it for a worker; return the
        message id. A payload that does not fit is refused here: FastAPI answers 422 with
        every problem (``loc`` is the path inside the payload), and nothing is sent.

        Args:
            job: the ``@job`` to run (its name crosses the broker, its parameters
                validate the payload).
            payload: the job's arguments, a JSON-serialisable mapping; None: none.
            queue: where to send it; None: the queue given to ``FastAPILifecycle``.
            delay: seconds from now; None or <= 0 means now. Not with ``at``.
            at: when to run it, in seconds since the epoch. Not with ``delay``.
            headers: string metadata carried with the message (a W3C ``traceparent``
                from the request, say); see ``Queue.enqueue``.

        Raises:
            fastapi.exceptions.RequestValidationError: the payload does not fit the job.
            TypeError: ``job`` is not a ``Job`` (a bare name could not be validated).
            LifecycleError: no queue was given here or to ``FastAPILifecycle``.
        """
        if not isinstance(job, Job):
            raise TypeError(
                f"FastAPILifecycle.enqueue takes a @job so that its payload is validated at the door, got {job!r}"
            )
        target = queue if queue is not None else self.queue
        if target is None:
            raise LifecycleError(
                f"FastAPILifecycle.enqueue({job.name!r}): no queue; pass queue= here or to FastAPILifecycle(queue=...)"
            )
        try:
            return await target.enqueue(job, payload, delay=delay, at=at, headers=headers)
        except PayloadError as exc:
            raise RequestValidationError(exc.errors) from exc


def _fetcher(dependency: Callable[..., Any]) -> Job[..., Any]:
    """A job whose only work is to ask for ``dependency``'s value."""

    async def fetch(value: Any) -> Any:
        return value

    # Set, not written, so the marker holds this dependency rather than a name to look up.
    fetch.__annotations__ = {"value": Annotated[Any, Depends(dependency)], "return": Any}
    return job(name=f"lifecycle.fastapi.shared:{label(dependency)}")(fetch)


def _worker_scoped(app: fastapi.FastAPI) -> list[Any]:
    """Every worker-scoped provider the app's routes reach.

    Reads each route's ``dependant`` tree, which FastAPI builds when the route is added
    (routers included with ``include_router`` are routes of the app by then)."""
    found: dict[int, Any] = {}
    pending = [route.dependant for route in app.router.routes if hasattr(route, "dependant")]
    seen: set[int] = set()
    while pending:
        dependant = pending.pop()
        if id(dependant) in seen:
            continue
        seen.add(id(dependant))
        call = getattr(dependant, "call", None)
        if call is not None and options_of(call).scope == "worker":
            found.setdefault(id(call), call)
        pending.extend(getattr(dependant, "dependencies", ()))
    return list(found.values())


def _remove(overrides: dict[Any, Any], installed: list[Any]) -> None:
    for call in installed:
        overrides.pop(call, None)
