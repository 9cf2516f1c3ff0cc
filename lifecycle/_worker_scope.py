"""Worker-scoped values: created once per runtime, shared by every job, torn down in
reverse creation order when the runtime closes.

An async-generator provider runs in a host task of its own inside the runtime's task
group, so a provider that opens a task group or cancel scope across its ``yield`` (a
pool with a background refresher, say) is entered and exited by the same task, as
anyio and trio require, whichever job happened to create it.

Teardown order is the order in which setups *completed*, not the order in which the
jobs that asked for them woke up afterwards (trio randomises that): each value takes a
ticket at the very moment its setup finished (in the host task, or in the worker
thread for a threaded sync generator), and ``close`` runs the closers by ticket, last
first.

Cancellation is safe at any point: a host is registered before it starts, so a setup
still running when the runtime closes is cancelled and waited for (it owes no
teardown); a value whose setup completes after ``close`` began is torn down at once."""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Awaitable, Callable, Generator, Hashable
from typing import Any

import anyio
from anyio import CancelScope
from anyio.abc import TaskGroup

from ._analysis import Provider, Setup
from ._engine import (
    WORKER_SCOPE,
    call_threaded,
    close_alone,
    no_yield_error,
    second_yield_error,
    start_sync_generator,
    teardown_timeout_error,
)
from ._log import describe, traceback_text
from ._plan import Arg, WorkerNode

Closer = Callable[[], Awaitable[None]]


class WorkerScope:
    """The worker-scoped values of one runtime (see the module docstring)."""

    def __init__(self, teardown_timeout: float | None) -> None:
        self.teardown_timeout = teardown_timeout
        self.values: dict[Hashable, Any] = {}
        self._locks: dict[Hashable, anyio.Lock] = {}
        self._tickets = itertools.count()
        self._closers: list[tuple[int, Provider, Closer]] = []  # (ticket, provider, closer)
        self._starting: set[_AsyncHost] = set()  # async hosts whose setup has not settled
        self._task_group: TaskGroup | None = None
        self._closed = False

    def attach(self, task_group: TaskGroup | None) -> None:
        self._task_group = task_group

    async def get(self, node: WorkerNode, log: Any) -> Any:
        """The node's value, creating it (and its own worker dependencies) on first use.
        Concurrent first requests wait on one lock, so creation happens exactly once."""
        try:
            return self.values[node.key]
        except KeyError:
            pass
        lock = self._locks.get(node.key)
        if lock is None:
            lock = self._locks[node.key] = anyio.Lock()
        async with lock:
            if node.key in self.values:
                return self.values[node.key]
            positional = [await self._arg(tag, ref, log) for tag, ref in node.arguments.positional]
            keyword = {name: await self._arg(tag, ref, log) for name, (tag, ref) in node.arguments.keyword}
            started = time.perf_counter()
            value = await self._create(node.provider, positional, keyword, node.key)
            self.values[node.key] = value
            log.info(
                "dependency.worker_setup",
                dependency=node.provider.label,
                duration_ms=round((time.perf_counter() - started) * 1000, 3),
            )
            return value

    async def _arg(self, tag: Arg, ref: Any, log: Any) -> Any:
        if tag == Arg.WORKER:
            return await self.get(ref, log)
        assert tag == Arg.CONST
        return ref

    def _check_open(self, provider: Provider) -> None:
        if self._closed:
            raise RuntimeError(f"the runtime closed while worker-scoped dependency {provider.label} was being set up")

    async def _create(self, provider: Provider, args: list[Any], kwargs: dict[str, Any], key: Hashable) -> Any:
        setup = provider.setup
        call = provider.call
        self._check_open(provider)
        if setup == Setup.AWAIT:
            return await call(*args, **kwargs)
        if setup == Setup.THREAD:
            return await call_threaded(call, args, kwargs)
        if setup == Setup.CALL:
            return call(*args, **kwargs)
        if setup == Setup.ENTER_ASYNC:
            if self._task_group is None:
                raise RuntimeError("the runtime is not open")
            return await self._create_async_generator(provider, args, kwargs, key)
        return await self._create_sync_generator(provider, args, kwargs)

    async def _create_async_generator(
        self, provider: Provider, args: list[Any], kwargs: dict[str, Any], key: Hashable
    ) -> Any:
        # Not TaskGroup.start(): when the asking job is cancelled just as the host
        # reports its value, start() cancels the host and waits for it, and a host that
        # holds a value is shielded until close(): both would wait for ever.
        assert self._task_group is not None
        host = _AsyncHost(self, provider)
        self._starting.add(host)  # before it runs: close() must know of it at once
        try:
            self._task_group.start_soon(host.run, args, kwargs)
            try:
                await host.settled.wait()
            except BaseException:
                with CancelScope(shield=True):
                    await host.abort()  # the asking job is gone: so is a setup still running
                if host.kept:  # it finished before abort(): keep it (torn down at close)
                    self.values[key] = host.value
                raise
        finally:
            self._starting.discard(host)
        if host.error is not None:
            raise host.error
        return host.value

    def completed(self, provider: Provider, closer: Closer) -> None:
        """Record a setup that just completed: its ticket fixes its teardown order."""
        self._closers.append((next(self._tickets), provider, closer))

    async def _create_sync_generator(self, provider: Provider, args: list[Any], kwargs: dict[str, Any]) -> Any:
        ticket: list[int] = []
        if provider.threaded:
            # The ticket is taken in the worker thread as the generator reaches its
            # yield; the task that waits for the thread may wake up later than others.
            provider = dataclasses.replace(provider, call=_stamping(provider.call, self._tickets, ticket))
        value, entry = await start_sync_generator(provider, tuple(args), kwargs, WORKER_SCOPE, propagate=False)
        limit = self.teardown_timeout
        closer: Closer = lambda: close_alone(provider, entry, limit)  # noqa: E731
        if self._closed:  # close() ran while the thread did: nobody else will tear it down
            with CancelScope(shield=True):
                await closer()
            self._check_open(provider)
        self._closers.append((ticket[0] if ticket else next(self._tickets), provider, closer))
        return value

    async def close(self, log: Any) -> list[BaseException]:
        """Tear everything down in reverse completion order; one failure does not stop
        the others. Returns the errors, each noted with the dependency that raised it."""
        self._closed = True
        errors: list[BaseException] = []
        for host in list(self._starting):
            with CancelScope(shield=True):
                await host.abort()  # a setup still running owes no teardown
        self._closers.sort(key=lambda item: item[0])
        while self._closers:
            _ticket, provider, closer = self._closers.pop()
            started = time.perf_counter()
            try:
                with CancelScope(shield=True):
                    await closer()
            except BaseException as exc:
                exc.add_note(f"lifecycle: raised by the teardown of worker-scoped dependency {provider.label}")
                # An unexpected error, and the log may be the only place it shows (when
                # the runtime's block raised too): with its traceback, as text.
                log.error(
                    "dependency.worker_teardown_failed",
                    dependency=provider.label,
                    error=describe(exc),
                    exception=traceback_text(exc),
                )
                errors.append(exc)
            else:
                log.info(
                    "dependency.worker_teardown",
                    dependency=provider.label,
                    duration_ms=round((time.perf_counter() - started) * 1000, 3),
                )
        self.values.clear()
        self._locks.clear()
        return errors


def _stamping(call: Callable[..., Any], tickets: itertools.count[int], ticket: list[int]) -> Callable[..., Any]:
    """``call`` as a generator function that takes a ticket right after the generator's
    first ``yield`` is reached (in whichever thread runs it), then delegates the rest."""

    def stamped(*args: Any, **kwargs: Any) -> Generator[Any, Any, Any]:
        gen = call(*args, **kwargs)
        try:
            value = next(gen)
        except StopIteration:
            return None  # no yield: reported as such by the engine
        ticket.append(next(tickets))
        yield value
        return (yield from gen)  # finishes it, or passes on a second yield

    return stamped


class _AsyncHost:
    """Owns one worker-scoped async generator from setup to teardown, in a task of its
    own. ``settled`` is set once setup completed (``value``) or failed (``error``)."""

    def __init__(self, scope: WorkerScope, provider: Provider) -> None:
        self.scope = scope
        self.provider = provider
        self.teardown_timeout = scope.teardown_timeout
        self.value: Any = None
        self.error: BaseException | None = None  # setup's
        self.completed = False
        self.settled = anyio.Event()
        self._guard: CancelScope | None = None
        self._aborted = False
        self._close = anyio.Event()
        self._done = anyio.Event()
        self._teardown_error: BaseException | None = None

    async def run(self, args: list[Any], kwargs: dict[str, Any]) -> None:
        provider = self.provider
        try:
            if self._aborted:  # abort() came before this task ran: set nothing up
                return
            with CancelScope() as guard:
                self._guard = guard
                agen = provider.call(*args, **kwargs)
                try:
                    self.value = await agen.__anext__()
                except StopAsyncIteration:
                    raise no_yield_error(provider, WORKER_SCOPE) from None
                guard.shield = True  # from here on only close() ends this task
                self.completed = True
                self.scope.completed(provider, self.close)
                self.settled.set()
                if not guard.cancel_called:
                    await self._close.wait()
                    if self.teardown_timeout is not None:
                        guard.deadline = anyio.current_time() + self.teardown_timeout
                # else: aborted, yet its setup finished: tear it down now (it sees the
                # cancellation at its first await), never leave it to the GC.
                try:
                    await agen.__anext__()
                except StopAsyncIteration:
                    pass
                else:
                    await agen.aclose()
                    self._teardown_error = second_yield_error(provider, WORKER_SCOPE)
            if guard.cancelled_caught and self.completed and not self._aborted:
                self._teardown_error = teardown_timeout_error(provider, self.teardown_timeout)
            # else: setup aborted by abort(): nothing to tear down
        except BaseException as exc:
            if self.completed:
                self._teardown_error = exc
            else:
                self.error = exc  # raised to the job that asked, by _create_async_generator
        finally:
            self.settled.set()
            self._done.set()

    @property
    def kept(self) -> bool:
        """Set up and waiting for close(), rather than aborted."""
        return self.completed and self._guard is not None and not self._guard.cancel_called

    async def abort(self) -> None:
        """Cancel a setup still running and wait until it has settled."""
        self._aborted = True
        if self._guard is not None and not self.settled.is_set():
            self._guard.cancel()
        await self.settled.wait()

    async def close(self) -> None:
        self._close.set()
        await self._done.wait()
        if self._teardown_error is not None:
            raise self._teardown_error
