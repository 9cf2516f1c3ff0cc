"""Running one attempt of one job: setup in plan order, the body, then teardown in
exact reverse with the pending exception thrown into each generator at its ``yield``
(the semantics of nested ``async with`` / ``contextlib.AsyncExitStack``).

A job whose teardown can suspend gets one guard cancel scope, entered before its first
dependency. It encloses every scope a generator opens across its ``yield``, so scopes
are exited in LIFO order on asyncio and trio alike; at teardown it is shielded from
outer cancellation. Each suspending teardown takes a watchdog ticket (see
``_watchdog``), which cancels the guard if that teardown overruns. After an overrun the
guard stays cancelled, so the remaining teardowns each get a fresh shielded scope with
their own deadline."""

from __future__ import annotations

import contextlib
import contextvars
import time
from collections.abc import Callable, Generator
from typing import Any, Protocol

import anyio
from anyio import CancelScope

from ._analysis import Kind, Provider
from ._context import JobContext
from ._errors import DependencyError, JobTimeout, TeardownTimeout
from ._plan import CONST, CONTEXT, PAYLOAD, SLOT, Arguments, Plan, WorkerNode
from ._watchdog import Watchdog

_MISSING: Any = object()
_ASYNC_GENERATOR = Kind.ASYNC_GENERATOR
_COROUTINE = Kind.COROUTINE
_FUNCTION = Kind.FUNCTION


class Host(Protocol):
    """What the engine needs from the runtime that runs it."""

    teardown_timeout: float | None
    watchdog: Watchdog | None
    scope_class: Callable[[], CancelScope]

    async def worker_value(self, node: WorkerNode, log: Any) -> Any: ...


# -- argument building -------------------------------------------------------------------


def build(
    arguments: Arguments, values: list[Any], payload: dict[str, Any], ctx: JobContext
) -> tuple[list[Any], dict[str, Any]]:
    keyword = {name: values[ref] for name, ref in arguments.kw_slots}
    for name, ref in arguments.kw_payload:
        keyword[name] = payload[ref]
    for name in arguments.kw_context:
        keyword[name] = ctx
    if not arguments.positional:
        return [], keyword
    return [_source(tag, ref, values, payload, ctx) for tag, ref in arguments.positional], keyword


def _source(tag: int, ref: Any, values: list[Any], payload: dict[str, Any], ctx: JobContext) -> Any:
    if tag == SLOT:
        return values[ref]
    if tag == PAYLOAD:
        return payload[ref]
    if tag == CONTEXT:
        return ctx
    assert tag == CONST
    return ref


# -- threads and context variables ------------------------------------------------------
#
# A sync provider in a worker thread runs in a Context of its own; afterwards the
# variables it changed are copied into the job's context, so that ``var.set()`` before
# ``yield`` is visible to the job, and ``var.reset(token)`` after ``yield`` (which runs
# in that same Context) works and is copied back too.


def _captured(ctx: contextvars.Context, fn: Callable[..., Any], *args: Any) -> tuple[bool, Any]:
    try:
        return True, ctx.run(fn, *args)
    except BaseException as exc:
        return False, exc


def _unwrap(outcome: tuple[bool, Any]) -> Any:
    ok, value = outcome
    if ok:
        return value
    raise value


def _merge_into_current(src: contextvars.Context, tokens: dict[contextvars.ContextVar[Any], Any] | None) -> None:
    current = contextvars.copy_context()
    for var, value in src.items():
        if current.get(var, _MISSING) is not value:
            token = var.set(value)
            if tokens is not None:
                tokens.setdefault(var, token)
    if tokens:
        for var, token in tokens.items():
            if var not in src and var in current:
                with contextlib.suppress(ValueError, RuntimeError):
                    var.reset(token)


def _apply(changes: dict[contextvars.ContextVar[Any], Any]) -> None:
    for var, value in changes.items():
        var.set(value)


def _refresh(dep_ctx: contextvars.Context) -> None:
    """Bring variables the job changed since setup into the dependency's Context."""
    changes = {
        var: value for var, value in contextvars.copy_context().items() if dep_ctx.get(var, _MISSING) is not value
    }
    if changes:
        dep_ctx.run(_apply, changes)


async def call_threaded(fn: Callable[..., Any], args: list[Any], kwargs: dict[str, Any]) -> Any:
    ctx = contextvars.copy_context()
    outcome = await anyio.to_thread.run_sync(_captured, ctx, _call, fn, args, kwargs)
    _merge_into_current(ctx, None)
    return _unwrap(outcome)


def _call(fn: Callable[..., Any], args: list[Any], kwargs: dict[str, Any]) -> Any:
    return fn(*args, **kwargs)


# -- generators ------------------------------------------------------------------------

_DONE, _SWALLOWED, _AGAIN = 0, 1, 2


def _start_sync(
    call: Callable[..., Any], args: list[Any], kwargs: dict[str, Any]
) -> tuple[Generator[Any, None, None], bool, Any]:
    gen = call(*args, **kwargs)
    try:
        return gen, True, next(gen)
    except StopIteration:
        return gen, False, None


def _finish_sync(gen: Generator[Any, None, None], pending: BaseException | None) -> int:
    try:
        if pending is None:
            next(gen)
        else:
            gen.throw(pending)
    except StopIteration:
        return _SWALLOWED if pending is not None else _DONE
    gen.close()
    return _AGAIN


def no_yield_error(provider: Provider, job: str) -> DependencyError:
    return DependencyError(
        f"job {job!r}: generator dependency {provider.label} finished without yielding; "
        "a generator dependency must yield exactly once"
    )


def second_yield_error(provider: Provider, job: str) -> DependencyError:
    return DependencyError(
        f"job {job!r}: generator dependency {provider.label} yielded a second time; "
        "a generator dependency must yield exactly once"
    )


class Guard:
    """The job-level scope that shields (and, through the watchdog, bounds) teardown."""

    __slots__ = ("degraded", "scope", "timeout", "watchdog")

    def __init__(self, scope: CancelScope, watchdog: Watchdog | None, timeout: float | None) -> None:
        self.scope = scope
        self.watchdog = watchdog
        self.timeout = timeout
        self.degraded = False


class Exit:
    """One set-up generator waiting for its teardown."""

    __slots__ = ("context", "gen", "provider", "tokens")

    def __init__(self, provider: Provider, gen: Any, context: contextvars.Context | None) -> None:
        self.provider = provider
        self.gen = gen
        self.context = context
        self.tokens: dict[contextvars.ContextVar[Any], Any] | None = {} if context is not None else None

    async def close(self, pending: BaseException | None, job: str, guard: Guard | None) -> bool:
        """Finish the generator with ``pending`` thrown in. True if it swallowed it."""
        if self.provider.kind != _ASYNC_GENERATOR and self.context is None:
            return self._verdict(_finish_sync(self.gen, pending), pending, job)  # inline: cannot suspend
        assert guard is not None
        if guard.degraded:
            return await self._close_in_fresh_scope(pending, job, guard.timeout)
        watchdog = guard.watchdog
        ticket = watchdog.arm(guard.scope) if watchdog is not None else None
        try:
            status = await self._finish(pending)
        except BaseException:
            if ticket is not None and ticket.fired:
                guard.degraded = True
                raise self._timeout(job, guard.timeout, pending) from None
            raise
        finally:
            if ticket is not None:
                watchdog.disarm(ticket)  # type: ignore[union-attr]
        if ticket is not None and ticket.fired:
            guard.degraded = True
            raise self._timeout(job, guard.timeout, pending)
        return self._verdict(status, pending, job)

    async def _close_in_fresh_scope(self, pending: BaseException | None, job: str, limit: float | None) -> bool:
        deadline = anyio.current_time() + limit if limit is not None else float("inf")
        with CancelScope(shield=True, deadline=deadline) as scope:
            status = await self._finish(pending)
        if scope.cancelled_caught:
            raise self._timeout(job, limit, pending)
        return self._verdict(status, pending, job)

    async def _finish(self, pending: BaseException | None) -> int:
        if self.provider.kind == _ASYNC_GENERATOR:
            agen = self.gen
            try:
                if pending is None:
                    await agen.__anext__()
                else:
                    await agen.athrow(pending)
            except StopAsyncIteration:
                return _SWALLOWED if pending is not None else _DONE
            await agen.aclose()
            return _AGAIN
        ctx = self.context
        assert ctx is not None
        _refresh(ctx)
        outcome = await anyio.to_thread.run_sync(
            _captured, ctx, _finish_sync, self.gen, pending, abandon_on_cancel=True
        )
        _merge_into_current(ctx, self.tokens)
        return int(_unwrap(outcome))

    def _verdict(self, status: int, pending: BaseException | None, job: str) -> bool:
        if status == _AGAIN:
            err = second_yield_error(self.provider, job)
            err.__context__ = pending
            raise err
        return status == _SWALLOWED

    def _timeout(self, job: str, limit: float | None, cause: BaseException | None) -> TeardownTimeout:
        err = teardown_timeout_error(self.provider, limit, job)
        err.__context__ = cause
        return err

    async def close_alone(self, limit: float | None) -> None:
        """Finish a worker-scoped generator at runtime close: normal exit, bounded."""
        if self.provider.kind != _ASYNC_GENERATOR and self.context is None:
            self._verdict(_finish_sync(self.gen, None), None, WORKER_SCOPE)
        else:
            await self._close_in_fresh_scope(None, WORKER_SCOPE, limit)


WORKER_SCOPE = "<worker scope>"


def teardown_timeout_error(provider: Provider, limit: float | None, job: str = WORKER_SCOPE) -> TeardownTimeout:
    owner = "worker-scoped dependency" if job == WORKER_SCOPE else f"job {job!r}: dependency"
    return TeardownTimeout(
        f"{owner} {provider.label}: teardown overran the runtime's teardown_timeout ({limit}s) and was cancelled"
    )


# -- one attempt -------------------------------------------------------------------------


def _ms_since(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 3)


async def setup_generator(
    provider: Provider, args: list[Any], kwargs: dict[str, Any], stack: list[Exit], job: str, propagate: bool = True
) -> Any:
    """Start a generator dependency and push it onto ``stack`` for teardown.
    ``propagate=False`` keeps a threaded generator's context variables to itself (a
    worker-scoped value must not leak them into whichever job created it)."""
    call = provider.call
    if provider.kind == _ASYNC_GENERATOR:
        agen = call(*args, **kwargs)
        try:
            value = await agen.__anext__()
        except StopAsyncIteration:
            raise no_yield_error(provider, job) from None
        stack.append(Exit(provider, agen, None))
        return value
    if provider.options.threaded:
        ctx = contextvars.copy_context()
        gen, started, value = _unwrap(await anyio.to_thread.run_sync(_captured, ctx, _start_sync, call, args, kwargs))
        entry = Exit(provider, gen, ctx)
        if propagate:
            _merge_into_current(ctx, entry.tokens)
    else:
        gen, started, value = _start_sync(call, args, kwargs)
        entry = Exit(provider, gen, None)
    if not started:
        raise no_yield_error(provider, job)
    stack.append(entry)
    return value


async def unwind(
    stack: list[Exit], exc: BaseException | None, job: str, guard: Guard | None, log: Any, trace: Any
) -> None:
    """Tear down ``stack`` in reverse, threading the pending exception through it.
    ``trace`` is ``log`` when per-dependency debug events are wanted, else None."""
    pending = exc
    started = 0.0
    while stack:
        entry = stack.pop()
        if trace is not None:
            started = time.perf_counter()
        try:
            swallowed = await entry.close(pending, job, guard)
        except BaseException as new:
            if isinstance(new, TeardownTimeout):
                log.error("dependency.teardown_timeout", dependency=entry.provider.label, error=str(new))
            pending = new
        else:
            if swallowed and pending is not None:
                log.warning(
                    "dependency.swallowed_exception",
                    dependency=entry.provider.label,
                    error=f"{type(pending).__name__}: {pending}",
                )
                note = (
                    f"lifecycle: dependency {entry.provider.label} swallowed "
                    f"{type(pending).__name__}({pending}) during teardown; job {job!r} still fails"
                )
                if exc is not None and note not in getattr(exc, "__notes__", ()):
                    exc.add_note(note)
                pending = None
        if trace is not None:
            trace.debug("dependency.teardown", dependency=entry.provider.label, duration_ms=_ms_since(started))
    if pending is not None:
        raise pending
    if exc is not None:
        raise exc


async def execute(
    plan: Plan,
    payload: dict[str, Any],
    extras: dict[str, Any] | None,
    ctx: JobContext,
    host: Host,
    timeout: float | None,
    log: Any,
) -> Any:
    """Set up, run and tear down one attempt; return the body's result."""
    if timeout is None:
        return await _guarded(plan, payload, extras, ctx, host, log)
    with CancelScope(deadline=anyio.current_time() + timeout):
        return await _guarded(plan, payload, extras, ctx, host, log)
    raise JobTimeout(f"job {plan.job_name!r} ({plan.job_label}) timed out after {timeout}s (attempt {ctx.attempt})")


async def _guarded(
    plan: Plan, payload: dict[str, Any], extras: dict[str, Any] | None, ctx: JobContext, host: Host, log: Any
) -> Any:
    if not plan.guarded:
        return await _attempt(plan, payload, extras, ctx, host, None, log)
    guard = Guard(host.scope_class(), host.watchdog, host.teardown_timeout)
    with guard.scope:
        return await _attempt(plan, payload, extras, ctx, host, guard, log)
    # Only the watchdog cancels the guard, and unwind() turns that into TeardownTimeout.
    raise AssertionError("unreachable: the guard scope swallowed an exception")  # pragma: no cover


async def _attempt(
    plan: Plan,
    payload: dict[str, Any],
    extras: dict[str, Any] | None,
    ctx: JobContext,
    host: Host,
    guard: Guard | None,
    log: Any,
) -> Any:
    values: list[Any] = [None] * plan.slots
    stack: list[Exit] = []
    job = plan.job_name
    trace = log if log.debug_enabled else None  # per-dependency events cost; skip when filtered
    started = 0.0
    try:
        for step in plan.steps:
            if trace is not None:
                started = time.perf_counter()
            provider = step.provider
            if step.worker is not None:
                values[step.slot] = await host.worker_value(step.worker, log)
                continue
            args, kwargs = build(step.arguments, values, payload, ctx)
            kind = provider.kind
            if kind == _COROUTINE:
                value = await provider.call(*args, **kwargs)
            elif kind == _FUNCTION:
                if provider.options.threaded:
                    value = await call_threaded(provider.call, args, kwargs)
                else:
                    value = provider.call(*args, **kwargs)
            else:
                value = await setup_generator(provider, args, kwargs, stack, job)
            values[step.slot] = value
            if trace is not None:
                trace.debug("dependency.setup", dependency=provider.label, duration_ms=_ms_since(started))
        args, kwargs = build(plan.body_arguments, values, payload, ctx)
        if extras:
            kwargs.update(extras)
        body = plan.body
        if body.kind == _COROUTINE:
            result = await body.call(*args, **kwargs)
        elif body.options.threaded:
            result = await anyio.to_thread.run_sync(_call, body.call, args, kwargs)
        else:
            result = body.call(*args, **kwargs)
    except BaseException as exc:
        if guard is not None:
            guard.scope.shield = True
        await unwind(stack, exc, job, guard, log, trace)
        raise  # pragma: no cover - unwind always raises here
    if stack:
        if guard is not None:
            guard.scope.shield = True
        await unwind(stack, None, job, guard, log, trace)
    return result
