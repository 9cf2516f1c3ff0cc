"""Running one attempt of one job: setup in plan order, the body, then teardown in
exact reverse with the pending exception thrown into each generator at its ``yield``
(the semantics of nested ``async with`` / ``contextlib.AsyncExitStack``).

Setup and the body run in a function generated per plan (``_codegen``); this module
holds what that function calls: the teardown loop and the helpers for threads, under
public names the generated code binds. It knows nothing of plans or code: what a
provider needs (``Provider.teardown``, ``Provider.threaded``) was decided in
``_analysis``, and the watchdog's protocol lives in ``_watchdog``.

A job whose teardown can suspend gets one guard cancel scope, entered before its first
dependency. It encloses every scope a generator opens across its ``yield``, so scopes
are exited in LIFO order on asyncio and trio alike; at teardown it is shielded from
outer cancellation. The watchdog (see ``_watchdog``) holds a deadline for the guard,
restarted at each suspending teardown, and cancels the guard if that teardown overruns.
After an overrun the guard stays cancelled, so the remaining teardowns each get a fresh
shielded scope with their own deadline. A job whose generators cannot suspend in
teardown (sync ones inline, async ones that never await) needs none of this."""

from __future__ import annotations

import contextlib
import contextvars
import math
import time
from collections.abc import Callable, Generator, Hashable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import anyio
from anyio import CancelScope

from ._analysis import Provider, Teardown
from ._errors import DependencyError, TeardownTimeout
from ._log import describe
from ._watchdog import Watchdog

if TYPE_CHECKING:
    from ._plan import WorkerNode

MISSING: Any = object()  # a worker-scoped value not created yet
_INLINE, _ASYNC, _THREADED = Teardown.INLINE, Teardown.ASYNC, Teardown.THREADED


class Host(Protocol):
    """What the engine (and the code generated for a plan) needs from the runtime that
    runs it. The members are private on ``Runtime``: they exist for the engine only."""

    teardown_timeout: float | None
    _watchdog: Watchdog | None
    _scope_class: Callable[[], Any]  # the backend's cancel scope class

    @property
    def _worker_values(self) -> dict[Hashable, Any]: ...

    async def _worker_value(self, node: WorkerNode, log: Any) -> Any: ...


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
        if current.get(var, MISSING) is not value:
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
        var: value for var, value in contextvars.copy_context().items() if dep_ctx.get(var, MISSING) is not value
    }
    if changes:
        dep_ctx.run(_apply, changes)


async def call_threaded(fn: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    """Call a sync function in a worker thread, in a copy of the current Context whose
    changes are then copied back. No cancellation check afterwards: the worker scope
    uses this, and a worker-scoped value must be kept once it exists."""
    ctx = contextvars.copy_context()
    outcome = await anyio.to_thread.run_sync(_captured, ctx, _call, fn, args, kwargs)
    _merge_into_current(ctx, None)
    return _unwrap(outcome)


def _call(fn: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    return fn(*args, **kwargs)


# -- cancellation that came due in a thread ----------------------------------------------
#
# A worker thread cannot be interrupted, and anyio's hop back to the loop does not look
# for cancellation when the thread returns, so a job would carry on with the thread's
# result past its timeout and could succeed. After each hop of a job's setup or body we
# look once: a job whose deadline passed meanwhile gets the backend's cancellation right
# there, so its generators see it at their ``yield`` (README, "Semantics", rule 6) and
# the job fails with ``JobTimeout``. Asking whether a scope was cancelled is not enough
# on asyncio: the deadline's timer may not have run yet when the thread's result wakes
# the task. So the check compares the effective deadline with the clock, and then waits
# for the cancellation, which is due at once. Teardown hops are not checked (teardown is
# shielded); ``run_with_timeout`` catches a job that finished after its deadline.


async def deliver_due_cancellation() -> None:
    """Raise the backend's cancellation now if the effective deadline of the calling
    task has passed or an enclosing scope was cancelled; else return at once (no
    checkpoint, so a thread hop pays a few µs and nothing else)."""
    deadline = anyio.current_effective_deadline()
    if deadline < math.inf and deadline <= anyio.current_time():  # no clock read without a deadline
        # Due, so the cancellation arrives at this first suspension: on trio at its
        # next scheduler pass at the latest, on asyncio when the scope's timer (already
        # due) runs in the next loop pass. A plain checkpoint could resume before it.
        await anyio.sleep_forever()


async def setup_threaded(fn: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    """Set up a job's threaded sync (non-generator) dependency: ``call_threaded``, then a
    cancellation that came due while the thread ran (its value is then dropped)."""
    value = await call_threaded(fn, args, kwargs)  # an error the thread raised wins: the real failure
    await deliver_due_cancellation()
    return value


async def call_body_threaded(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Run a job's sync body in a worker thread; its result is discarded (the job fails
    with ``JobTimeout``) if the job's deadline passed while it ran."""
    result = await anyio.to_thread.run_sync(_call, fn, args, kwargs)
    await deliver_due_cancellation()
    return result


# -- batches: consecutive threaded setups in one hop ------------------------------------
#
# A thread hop costs far more than the sync code it usually carries (two thread
# wake-ups: tens of µs, hundreds on a loaded machine). So consecutive threaded setups
# of a plan run in one hop, in plan order, each in its own copy of the job's Context
# as it would be after the ones before it (the previous step's Context, copied), and
# on the loop afterwards their changes are merged in that order: what each step sees,
# and what the job sees after them, is what one hop per step gave. A job deadline
# counts thread time: the thread starts no further step once the deadline has passed,
# and the loop then delivers the cancellation (the generators already started see it
# at their ``yield``). A cancellation without a deadline (the caller's) lands when the
# batch returns, as it did when one step's hop returned.


class BatchItem(NamedTuple):
    """One setup in a batch; each argument is ``(produced, index)``: the value of the
    batch's step ``index`` (``produced``) or the hop's input ``index``."""

    provider: Provider
    positional: tuple[tuple[bool, int], ...]
    keyword: tuple[tuple[str, tuple[bool, int]], ...]


class _Ran(NamedTuple):
    contexts: list[contextvars.Context]  # a Context per step to merge, in order
    entries: list[Any]  # per context: the ThreadedGen to push, or None
    error: BaseException | None  # what stopped the batch (the steps after it did not run)


def _run_batch(
    items: Sequence[BatchItem],
    inputs: Sequence[Any],
    values: list[Any],
    ctx: contextvars.Context,
    stop_at: float | None,
    job: str,
) -> _Ran:
    """The worker thread's side of ``setup_batch``: runs the steps from
    ``len(values)`` on, appending their values; never raises."""
    ran = _Ran([], [], None)
    first = len(values)
    for index in range(first, len(items)):
        if index > first:
            if stop_at is not None and time.perf_counter() >= stop_at:
                break  # the job's deadline passed: start nothing more
            ctx = ctx.copy()
        item = items[index]
        args = [values[i] if produced else inputs[i] for produced, i in item.positional]
        kwargs = {name: values[i] if produced else inputs[i] for name, (produced, i) in item.keyword}
        provider = item.provider
        if not provider.is_generator:
            ran.contexts.append(ctx)  # merged even when it raised, as a single hop does
            ran.entries.append(None)
            try:
                values.append(ctx.run(provider.call, *args, **kwargs))
            except BaseException as exc:
                return ran._replace(error=exc)
            continue
        try:
            gen, started, value = ctx.run(_start_sync, provider.call, tuple(args), kwargs)
        except BaseException as exc:
            return ran._replace(error=exc)
        ran.contexts.append(ctx)
        if not started:
            ran.entries.append(None)
            return ran._replace(error=no_yield_error(provider, job))
        ran.entries.append(ThreadedGen(gen, ctx, True))
        values.append(value)
    return ran


async def setup_batch(
    items: Sequence[BatchItem], inputs: Sequence[Any], stack: list[Any] | None, job: str
) -> list[Any]:
    """Set up consecutive threaded sync dependencies of a job in one thread hop; returns
    their values in order. Generators started are pushed onto ``stack`` even when a
    later step fails, so they are torn down with that failure thrown in."""
    values: list[Any] = []
    while True:
        deadline = anyio.current_effective_deadline()
        stop_at = None
        if -math.inf < deadline < math.inf:  # the same moment on the thread's clock
            stop_at = time.perf_counter() + (deadline - anyio.current_time())
        ran = await anyio.to_thread.run_sync(
            _run_batch, items, inputs, values, contextvars.copy_context(), stop_at, job
        )
        for context, entry in zip(ran.contexts, ran.entries, strict=True):
            if entry is not None:
                _merge_into_current(context, entry.tokens)
                stack.append(entry)  # type: ignore[union-attr]  # a plan with generators has a stack
            else:
                _merge_into_current(context, None)
        if ran.error is not None:
            raise ran.error
        await deliver_due_cancellation()
        if len(values) == len(items):
            return values
        # The thread stopped at the deadline by its clock, but on the loop's it is not
        # due (the clocks differ by µs, or someone moved the deadline): go on. Each hop
        # runs at least one step, so this ends.


# -- generators ------------------------------------------------------------------------
#
# A job's teardown stack holds, in setup order, the generator objects themselves (or a
# ThreadedGen for a sync generator that runs in threads); the plan's ``exits`` names
# the provider of each position, so nothing else is allocated per dependency.

DONE, SWALLOWED, AGAIN = 0, 1, 2


class ThreadedGen:
    """A sync generator that runs in worker threads, in a Context of its own."""

    __slots__ = ("context", "gen", "tokens")

    def __init__(self, gen: Generator[Any, None, None], context: contextvars.Context, propagate: bool) -> None:
        self.gen = gen
        self.context = context
        self.tokens: dict[contextvars.ContextVar[Any], Any] | None = {} if propagate else None


def _start_sync(
    call: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[Generator[Any, None, None], bool, Any]:
    gen = call(*args, **kwargs)
    try:
        return gen, True, next(gen)
    except StopIteration:
        return gen, False, None


def finish_sync(gen: Generator[Any, None, None], pending: BaseException | None) -> int:
    try:
        if pending is None:
            next(gen)
        else:
            gen.throw(pending)
    except StopIteration:
        return SWALLOWED if pending is not None else DONE
    gen.close()
    return AGAIN


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


async def start_sync_generator(
    provider: Provider, args: tuple[Any, ...], kwargs: dict[str, Any], job: str, propagate: bool = True
) -> tuple[Any, Any]:
    """Start a sync generator dependency; returns its value and its teardown entry.
    ``propagate=False`` keeps a threaded generator's context variables to itself (a
    worker-scoped value must not leak them into whichever job created it)."""
    call = provider.call
    if provider.threaded:
        ctx = contextvars.copy_context()
        gen, started, value = _unwrap(await anyio.to_thread.run_sync(_captured, ctx, _start_sync, call, args, kwargs))
        entry: Any = ThreadedGen(gen, ctx, propagate)
        if propagate:
            _merge_into_current(ctx, entry.tokens)
    else:
        gen, started, value = _start_sync(call, args, kwargs)
        entry = gen
    if not started:
        raise no_yield_error(provider, job)
    return value, entry


async def start_threaded_generator(
    provider: Provider, args: tuple[Any, ...], kwargs: dict[str, Any], stack: list[Any], job: str
) -> Any:
    """Start a job's threaded sync generator, push its teardown entry onto ``stack`` and
    deliver a cancellation that came due while its setup ran in the thread."""
    value, entry = await start_sync_generator(provider, args, kwargs, job)
    stack.append(entry)
    await deliver_due_cancellation()  # after the push: the generator sees it at its yield
    return value


async def _finish(provider: Provider, entry: Any, pending: BaseException | None) -> int:
    """Finish a generator whose teardown can suspend: async, or sync in threads."""
    if provider.teardown is _ASYNC:
        try:
            if pending is None:
                await entry.__anext__()
            else:
                await entry.athrow(pending)
        except StopAsyncIteration:
            return SWALLOWED if pending is not None else DONE
        await entry.aclose()
        return AGAIN
    ctx = entry.context
    _refresh(ctx)
    outcome = await anyio.to_thread.run_sync(_captured, ctx, finish_sync, entry.gen, pending, abandon_on_cancel=True)
    _merge_into_current(ctx, entry.tokens)
    return int(_unwrap(outcome))


async def _finish_in_fresh_scope(
    provider: Provider, entry: Any, pending: BaseException | None, limit: float | None
) -> int:
    """Finish with a shielded scope of its own; -1 if it overran ``limit``."""
    deadline = anyio.current_time() + limit if limit is not None else float("inf")
    with CancelScope(shield=True, deadline=deadline):
        return await _finish(provider, entry, pending)
    return -1  # cancelled by its deadline


def _timeout(provider: Provider, job: str, limit: float | None, cause: BaseException | None) -> TeardownTimeout:
    err = teardown_timeout_error(provider, limit, job)
    err.__context__ = cause
    return err


async def close_alone(provider: Provider, entry: Any, limit: float | None) -> None:
    """Finish a worker-scoped sync generator at runtime close: normal exit, bounded."""
    if provider.teardown is _THREADED:
        status = await _finish_in_fresh_scope(provider, entry, None, limit)
        if status < 0:
            raise _timeout(provider, WORKER_SCOPE, limit, None)
    else:
        status = finish_sync(entry, None)
    if status == AGAIN:
        raise second_yield_error(provider, WORKER_SCOPE)


WORKER_SCOPE = "<worker scope>"


def teardown_timeout_error(provider: Provider, limit: float | None, job: str = WORKER_SCOPE) -> TeardownTimeout:
    owner = "worker-scoped dependency" if job == WORKER_SCOPE else f"job {job!r}: dependency"
    return TeardownTimeout(
        f"{owner} {provider.label}: teardown overran the runtime's teardown_timeout ({limit}s) and was cancelled"
    )


# -- teardown --------------------------------------------------------------------------


def ms_since(started: float) -> float:
    """Milliseconds since ``started`` (a ``time.perf_counter()``), for debug events."""
    return round((time.perf_counter() - started) * 1000, 3)


RAISED, YIELDED, FINISHED = 0, 1, 2  # how a teardown the generated code ran ended (see resume_unwind, resume_failure)


async def _resumed(
    entry: Any, mode: Teardown, happened: int, error: BaseException | None, pending: BaseException | None
) -> int:
    """The status of a teardown the generated code already ran (``pending`` was thrown in)."""
    if happened == RAISED:
        assert error is not None
        raise error
    if happened == FINISHED:  # the clean path: the watchdog fired meanwhile; else swallowed
        return SWALLOWED if pending is not None else DONE
    if mode is _ASYNC:
        await entry.aclose()
    else:
        entry.close()
    return AGAIN


async def unwind(
    stack: list[Any],
    exits: tuple[Provider, ...],
    exc: BaseException | None,
    job: str,
    guard: CancelScope | None,
    host: Host,
    log: Any,
    trace: Any,
    armed: bool = False,
    resume: tuple[int, BaseException | None] | None = None,
) -> None:
    """Tear down ``stack`` in reverse, threading the pending exception through it.
    ``exits[i]`` is the provider of ``stack[i]``; ``guard`` is the
    job's guard scope (None when no teardown can suspend: then nothing is armed);
    ``trace`` is ``log`` when
    per-dependency debug events are wanted, else None. The watchdog's clock for the
    guard restarts at each suspending teardown (``armed``: the caller started it).
    ``resume`` says what happened to the top entry when the generated clean path
    already tore it down."""
    pending = exc
    started = 0.0
    watchdog = host._watchdog
    degraded = False  # the watchdog fired: the guard is cancelled for good
    try:
        while stack:
            entry = stack.pop()
            provider = exits[len(stack)]
            mode = provider.teardown
            if trace is not None:
                started = time.perf_counter()
            try:
                if resume is None and mode is _INLINE:
                    status = finish_sync(entry, pending)
                elif resume is None and degraded:
                    status = await _finish_in_fresh_scope(provider, entry, pending, host.teardown_timeout)
                    if status < 0:
                        raise _timeout(provider, job, host.teardown_timeout, pending)
                else:
                    given, resume = resume, None
                    if given is None and watchdog is not None and guard is not None:
                        watchdog.arm(guard)
                        armed = True
                    try:
                        if given is not None:
                            status = await _resumed(entry, mode, *given, pending)
                        else:
                            status = await _finish(provider, entry, pending)
                    except BaseException:
                        if armed and watchdog.fired(guard):  # type: ignore[union-attr]
                            degraded = True
                            raise _timeout(provider, job, host.teardown_timeout, pending) from None
                        raise
                    if armed and watchdog.fired(guard):  # type: ignore[union-attr]
                        degraded = True
                        raise _timeout(provider, job, host.teardown_timeout, pending)
                if status == AGAIN:
                    err = second_yield_error(provider, job)
                    err.__context__ = pending
                    raise err
            except BaseException as new:
                if isinstance(new, TeardownTimeout):
                    log.error("dependency.teardown_timeout", dependency=provider.label, error=describe(new))
                pending = new
            else:
                if status == SWALLOWED:
                    assert pending is not None
                    log.warning(
                        "dependency.swallowed_exception",
                        dependency=provider.label,
                        error=describe(pending),
                    )
                    note = (
                        f"lifecycle: dependency {provider.label} swallowed "
                        f"{type(pending).__name__}({pending}) during teardown; job {job!r} still fails"
                    )
                    if exc is not None and note not in getattr(exc, "__notes__", ()):
                        exc.add_note(note)
                    pending = None
            if trace is not None:
                trace.debug("dependency.teardown", dependency=provider.label, duration_ms=ms_since(started))
    finally:
        if armed:
            watchdog.disarm(guard)  # type: ignore[union-attr]
    if pending is not None:
        raise pending
    if exc is not None:
        raise exc


async def resume_unwind(
    stack: list[Any],
    exits: tuple[Provider, ...],
    index: int,
    happened: int,
    error: BaseException | None,
    job: str,
    guard: CancelScope | None,
    host: Host,
    log: Any,
    armed: bool,
) -> None:
    """Hand a clean teardown that went wrong at ``exits[index]`` over to ``unwind``; the
    exits above it were torn down without incident. Returns (and the job succeeds) only
    if an outer dependency swallows the error, as with nested ``async with``."""
    del stack[index + 1 :]
    await unwind(stack, exits, None, job, guard, host, log, None, armed, (happened, error))


async def resume_failure(
    stack: list[Any],
    exits: tuple[Provider, ...],
    index: int,
    happened: int,
    error: BaseException | None,
    exc: BaseException,
    job: str,
    guard: CancelScope | None,
    host: Host,
    log: Any,
    armed: bool,
) -> None:
    """Hand the generated failure teardown over to ``unwind`` at ``exits[index]``, into
    which ``exc`` was thrown (``happened`` says with what result); every generator above
    it re-raised ``exc`` itself. Always raises: the job failed."""
    del stack[index + 1 :]
    await unwind(stack, exits, exc, job, guard, host, log, None, armed, (happened, error))
