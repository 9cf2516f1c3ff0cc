"""Worker-scoped values: created once per runtime, shared by every job, torn down in
reverse creation order when the runtime closes.

An async-generator provider runs in a host task of its own inside the runtime's task
group, so a provider that opens a task group or cancel scope across its ``yield`` (a
pool with a background refresher, say) is entered and exited by the same task, as
anyio and trio require, whichever job happened to create it."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Hashable
from typing import Any

import anyio
from anyio import CancelScope
from anyio.abc import TaskGroup, TaskStatus

from ._analysis import Kind, Provider
from ._engine import (
    WORKER_SCOPE,
    call_threaded,
    close_alone,
    no_yield_error,
    second_yield_error,
    start_sync_generator,
    teardown_timeout_error,
)
from ._plan import CONST, WORKER, WorkerNode

Closer = Callable[[], Awaitable[None]]


class WorkerScope:
    def __init__(self, teardown_timeout: float | None) -> None:
        self.teardown_timeout = teardown_timeout
        self.values: dict[Hashable, Any] = {}
        self._locks: dict[Hashable, anyio.Lock] = {}
        self._closers: list[tuple[Provider, Closer]] = []
        self._task_group: TaskGroup | None = None

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
            value = await self._create(node.provider, positional, keyword)
            self.values[node.key] = value
            log.info(
                "dependency.worker_setup",
                dependency=node.provider.label,
                duration_ms=round((time.perf_counter() - started) * 1000, 3),
            )
            return value

    async def _arg(self, tag: int, ref: Any, log: Any) -> Any:
        if tag == WORKER:
            return await self.get(ref, log)
        assert tag == CONST
        return ref

    async def _create(self, provider: Provider, args: list[Any], kwargs: dict[str, Any]) -> Any:
        kind = provider.kind
        call = provider.call
        if kind == Kind.COROUTINE:
            return await call(*args, **kwargs)
        if kind == Kind.FUNCTION:
            if provider.options.threaded:
                return await call_threaded(call, args, kwargs)
            return call(*args, **kwargs)
        if kind == Kind.ASYNC_GENERATOR:
            if self._task_group is None:
                raise RuntimeError("the runtime is not open")
            host = _AsyncHost(provider, self.teardown_timeout)
            value = await self._task_group.start(host.run, (args, kwargs))
            self._closers.append((provider, host.close))
            return value
        return await self._create_sync_generator(provider, args, kwargs)

    async def _create_sync_generator(self, provider: Provider, args: list[Any], kwargs: dict[str, Any]) -> Any:
        value, entry = await start_sync_generator(provider, tuple(args), kwargs, WORKER_SCOPE, propagate=False)
        limit = self.teardown_timeout
        self._closers.append((provider, lambda: close_alone(provider, entry, limit)))
        return value

    async def close(self, log: Any) -> list[BaseException]:
        """Tear everything down in reverse creation order; one failure does not stop
        the others. Returns the errors, each noted with the dependency that raised it."""
        errors: list[BaseException] = []
        while self._closers:
            provider, closer = self._closers.pop()
            started = time.perf_counter()
            try:
                with CancelScope(shield=True):
                    await closer()
            except BaseException as exc:
                exc.add_note(f"lifecycle: raised by the teardown of worker-scoped dependency {provider.label}")
                log.error(
                    "dependency.worker_teardown_failed",
                    dependency=provider.label,
                    error=f"{type(exc).__name__}: {exc}",
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


class _AsyncHost:
    """Owns one worker-scoped async generator from setup to teardown."""

    def __init__(self, provider: Provider, teardown_timeout: float | None) -> None:
        self.provider = provider
        self.teardown_timeout = teardown_timeout
        self._close = anyio.Event()
        self._done = anyio.Event()
        self._error: BaseException | None = None

    async def run(self, call_args: tuple[list[Any], dict[str, Any]], *, task_status: TaskStatus[Any]) -> None:
        args, kwargs = call_args
        provider = self.provider
        try:
            with CancelScope() as guard:
                agen = provider.call(*args, **kwargs)
                try:
                    value = await agen.__anext__()
                except StopAsyncIteration:
                    raise no_yield_error(provider, WORKER_SCOPE) from None
                guard.shield = True  # from here on only close() ends this task
                task_status.started(value)
                await self._close.wait()
                if self.teardown_timeout is not None:
                    guard.deadline = anyio.current_time() + self.teardown_timeout
                try:
                    await agen.__anext__()
                except StopAsyncIteration:
                    pass
                else:
                    await agen.aclose()
                    self._error = second_yield_error(provider, WORKER_SCOPE)
            if guard.cancelled_caught:
                self._error = teardown_timeout_error(provider, self.teardown_timeout)
        except BaseException as exc:
            if not self._close.is_set():
                raise  # setup failed: start() re-raises it to the job that asked
            self._error = exc
        finally:
            self._done.set()

    async def close(self) -> None:
        self._close.set()
        await self._done.wait()
        if self._error is not None:
            raise self._error
