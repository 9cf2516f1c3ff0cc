"""Running one attempt of one job: setup in plan order, the body, then teardown in
exact reverse with the pending exception thrown into each generator at its ``yield``
(the semantics of nested ``async with`` / ``contextlib.AsyncExitStack``).

Each async generator gets its own guard cancel scope, entered just before the
generator starts. At teardown the guard is shielded and given the teardown deadline.
Because the guard encloses any cancel scope or task group the generator opened across
its ``yield``, scopes are always exited in LIFO order on both asyncio and trio."""

from __future__ import annotations

import contextlib
import contextvars
import sys
import time
from collections.abc import Callable, Generator
from typing import Any, Protocol

import anyio
from anyio import CancelScope

from ._analysis import Kind, Provider
from ._context import JobContext
from ._errors import DependencyError, JobTimeout, TeardownTimeout
from ._plan import CONST, CONTEXT, PAYLOAD, SLOT, Arguments, Plan, WorkerNode

_MISSING: Any = object()


class Host(Protocol):
    """What the engine needs from the runtime that runs it."""

    teardown_timeout: float | None

    async def worker_value(self, node: WorkerNode, log: Any) -> Any: ...


# -- argument building -------------------------------------------------------------------


def build(
    arguments: Arguments, values: list[Any], payload: dict[str, Any], ctx: JobContext
) -> tuple[list[Any], dict[str, Any]]:
    positional = [_source(tag, ref, values, payload, ctx) for tag, ref in arguments.positional]
    keyword = {name: _source(tag, ref, values, payload, ctx) for name, (tag, ref) in arguments.keyword}
    return positional, keyword


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


class Exit:
    """One set-up generator waiting for its teardown."""

    __slots__ = ("context", "gen", "guard", "provider", "tokens")

    def __init__(
        self, provider: Provider, gen: Any, guard: CancelScope | None, context: contextvars.Context | None
    ) -> None:
        self.provider = provider
        self.gen = gen
        self.guard = guard
        self.context = context
        self.tokens: dict[contextvars.ContextVar[Any], Any] | None = {} if context is not None else None

    async def close(self, pending: BaseException | None, job: str, teardown_timeout: float | None) -> bool:
        """Finish the generator with ``pending`` thrown in. True if it swallowed it."""
        if self.provider.kind == Kind.ASYNC_GENERATOR:
            return await self._close_async(pending, job, teardown_timeout)
        if self.context is None:  # inline sync generator: nothing to bound
            return self._verdict(_finish_sync(self.gen, pending), pending, job)
        return await self._close_threaded(pending, job, teardown_timeout)

    def _verdict(self, status: int, pending: BaseException | None, job: str) -> bool:
        if status == _AGAIN:
            err = second_yield_error(self.provider, job)
            err.__context__ = pending
            raise err
        return status == _SWALLOWED

    async def _close_async(self, pending: BaseException | None, job: str, teardown_timeout: float | None) -> bool:
        guard = self.guard
        assert guard is not None
        guard.shield = True
        if teardown_timeout is not None:
            guard.deadline = anyio.current_time() + teardown_timeout
        agen = self.gen
        try:
            try:
                if pending is None:
                    await agen.__anext__()
                else:
                    await agen.athrow(pending)
            except StopAsyncIteration:
                status = _SWALLOWED if pending is not None else _DONE
            else:
                await agen.aclose()
                status = _AGAIN
        except BaseException as exc:
            if guard.__exit__(type(exc), exc, exc.__traceback__):
                raise self._timeout(job, teardown_timeout, exc) from None
            raise
        guard.__exit__(None, None, None)  # (trio returns True here: not a verdict)
        if guard.cancelled_caught:
            raise self._timeout(job, teardown_timeout, pending)
        return self._verdict(status, pending, job)

    async def _close_threaded(self, pending: BaseException | None, job: str, teardown_timeout: float | None) -> bool:
        ctx = self.context
        assert ctx is not None
        _refresh(ctx)
        deadline = anyio.current_time() + teardown_timeout if teardown_timeout is not None else float("inf")
        with CancelScope(shield=True, deadline=deadline) as scope:
            outcome = await anyio.to_thread.run_sync(
                _captured, ctx, _finish_sync, self.gen, pending, abandon_on_cancel=True
            )
        if scope.cancelled_caught:
            raise self._timeout(job, teardown_timeout, pending)
        _merge_into_current(ctx, self.tokens)
        return self._verdict(_unwrap(outcome), pending, job)

    def _timeout(self, job: str, limit: float | None, cause: BaseException | None) -> TeardownTimeout:
        err = TeardownTimeout(
            f"job {job!r}: teardown of dependency {self.provider.label} overran the runtime's "
            f"teardown_timeout ({limit}s) and was cancelled"
        )
        err.__context__ = cause
        return err


# -- one attempt -------------------------------------------------------------------------


async def setup_step(provider: Provider, args: list[Any], kwargs: dict[str, Any], stack: list[Exit], job: str) -> Any:
    """Create one job-scoped value; generators are pushed onto ``stack`` for teardown."""
    kind = provider.kind
    call = provider.call
    if kind == Kind.COROUTINE:
        return await call(*args, **kwargs)
    if kind == Kind.FUNCTION:
        if provider.options.threaded:
            return await call_threaded(call, args, kwargs)
        return call(*args, **kwargs)
    if kind == Kind.ASYNC_GENERATOR:
        guard = CancelScope()
        guard.__enter__()
        try:
            agen = call(*args, **kwargs)
            value = await agen.__anext__()
        except StopAsyncIteration:
            guard.__exit__(None, None, None)
            raise no_yield_error(provider, job) from None
        except BaseException:
            if guard.__exit__(*sys.exc_info()):  # pragma: no cover - the guard is never cancelled here
                raise RuntimeError("guard scope swallowed an exception") from None
            raise
        stack.append(Exit(provider, agen, guard, None))
        return value
    # sync generator
    if provider.options.threaded:
        ctx = contextvars.copy_context()
        gen, started, value = _unwrap(await anyio.to_thread.run_sync(_captured, ctx, _start_sync, call, args, kwargs))
        entry = Exit(provider, gen, None, ctx)
        _merge_into_current(ctx, entry.tokens)
    else:
        gen, started, value = _start_sync(call, args, kwargs)
        entry = Exit(provider, gen, None, None)
    if not started:
        raise no_yield_error(provider, job)
    stack.append(entry)
    return value


async def unwind(
    stack: list[Exit], exc: BaseException | None, job: str, teardown_timeout: float | None, log: Any
) -> None:
    """Tear down ``stack`` in reverse, threading the pending exception through it."""
    pending = exc
    while stack:
        entry = stack.pop()
        started = time.perf_counter()
        try:
            swallowed = await entry.close(pending, job, teardown_timeout)
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
        log.debug(
            "dependency.teardown",
            dependency=entry.provider.label,
            duration_ms=round((time.perf_counter() - started) * 1000, 3),
        )
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
    values: list[Any] = [None] * plan.slots
    stack: list[Exit] = []
    job = plan.job_name
    teardown_timeout = host.teardown_timeout
    deadline = anyio.current_time() + timeout if timeout is not None else float("inf")
    result: Any = None
    with CancelScope(deadline=deadline) as limit:
        try:
            for step in plan.steps:
                started = time.perf_counter()
                if step.worker is not None:
                    values[step.slot] = await host.worker_value(step.worker, log)
                    continue
                args, kwargs = build(step.arguments, values, payload, ctx)
                values[step.slot] = await setup_step(step.provider, args, kwargs, stack, job)
                log.debug(
                    "dependency.setup",
                    dependency=step.provider.label,
                    duration_ms=round((time.perf_counter() - started) * 1000, 3),
                )
            args, kwargs = build(plan.body_arguments, values, payload, ctx)
            if extras:
                kwargs.update(extras)
            body = plan.body
            if body.kind == Kind.COROUTINE:
                result = await body.call(*args, **kwargs)
            elif body.options.threaded:
                result = await anyio.to_thread.run_sync(_call, body.call, args, kwargs)
            else:
                result = body.call(*args, **kwargs)
        except BaseException as exc:
            await unwind(stack, exc, job, teardown_timeout, log)
        else:
            await unwind(stack, None, job, teardown_timeout, log)
    if limit.cancelled_caught:
        raise JobTimeout(f"job {job!r} ({plan.job_label}) timed out after {timeout}s (attempt {ctx.attempt})")
    return result
