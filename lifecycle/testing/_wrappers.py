"""Wrappers that inject faults around the user's own callables, and count the job's
await points, without replacing any of the user's code.

Each wrapper has the same kind as what it wraps (a sync generator function for a sync
generator, an ``async def`` for a coroutine function, and so on) and carries it as
``__wrapped__``, so lifecycle reads the same signature, the same ``@dependency``
options and the same kind through it: the dependency runs as it would in production
(in a worker thread if it is threaded), only observed. A generator wrapper drives the
user's generator step by step, so it sees exactly what lifecycle throws in at the
``yield`` and exactly what the user's teardown passes on."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Callable, Coroutine, Generator, Iterator
from typing import Any

import anyio

from .._analysis import Kind
from ._trace import YIELDED_AGAIN, Recorder


def _same_kind(wrapper: Callable[..., Any], original: Callable[..., Any]) -> Callable[..., Any]:
    # update_wrapper skips what a partial or an instance lacks (__name__, __qualname__).
    return functools.update_wrapper(wrapper, original)


def wrap_dependency(
    call: Callable[..., Any], kind: Kind, label: str, scope: str, recorder: Recorder
) -> Callable[..., Any]:
    """A wrapper of ``call`` (a dependency of kind ``kind``) that reports to
    ``recorder`` and raises the faults it arms."""
    if kind is Kind.GENERATOR:

        def sync_generator(*args: Any, **kwargs: Any) -> Iterator[Any]:
            instance = recorder.setup_begin(label, scope, True)
            try:
                gen = call(*args, **kwargs)
                value = next(gen)
            except StopIteration:  # it did not yield: neither does this (lifecycle says so)
                recorder.setup_failed(instance, None)
                return
            except BaseException as exc:
                recorder.setup_failed(instance, exc)
                raise
            recorder.setup_done(instance)
            try:
                sent = yield value
            except BaseException as exc:
                thrown: BaseException | None = exc
            else:
                thrown = None
            recorder.teardown_begin(instance, thrown)
            try:
                value = gen.send(sent) if thrown is None else gen.throw(thrown)
            except StopIteration:
                recorder.teardown_end(instance, None)
                recorder.teardown_fault(instance)
                return
            except BaseException as out:
                recorder.teardown_end(instance, out)
                raise
            recorder.teardown_end(instance, YIELDED_AGAIN)
            try:  # a second yield: show it to lifecycle, which reports the misuse
                yield value
            finally:
                gen.close()

        return _same_kind(sync_generator, call)

    if kind is Kind.ASYNC_GENERATOR:

        async def async_generator(*args: Any, **kwargs: Any) -> AsyncIterator[Any]:
            instance = recorder.setup_begin(label, scope, True)
            try:
                gen = call(*args, **kwargs)
                value = await gen.__anext__()
            except StopAsyncIteration:
                recorder.setup_failed(instance, None)
                return
            except BaseException as exc:
                recorder.setup_failed(instance, exc)
                raise
            recorder.setup_done(instance)
            try:
                sent = yield value
            except BaseException as exc:
                thrown: BaseException | None = exc
            else:
                thrown = None
            recorder.teardown_begin(instance, thrown)
            try:
                value = await (gen.asend(sent) if thrown is None else gen.athrow(thrown))
            except StopAsyncIteration:
                recorder.teardown_end(instance, None)
                recorder.teardown_fault(instance)
                return
            except BaseException as out:
                recorder.teardown_end(instance, out)
                raise
            recorder.teardown_end(instance, YIELDED_AGAIN)
            try:
                yield value
            finally:
                await gen.aclose()

        return _same_kind(async_generator, call)

    if kind is Kind.COROUTINE:

        async def coroutine(*args: Any, **kwargs: Any) -> Any:
            instance = recorder.setup_begin(label, scope, False)
            try:
                value = await call(*args, **kwargs)
            except BaseException as exc:
                recorder.setup_failed(instance, exc)
                raise
            recorder.setup_done(instance)
            return value

        return _same_kind(coroutine, call)

    def function(*args: Any, **kwargs: Any) -> Any:
        instance = recorder.setup_begin(label, scope, False)
        try:
            value = call(*args, **kwargs)
        except BaseException as exc:
            recorder.setup_failed(instance, exc)
            raise
        recorder.setup_done(instance)
        return value

    return _same_kind(function, call)


def wrap_body(fn: Callable[..., Any], kind: Kind, recorder: Recorder, *, wait: bool = False) -> Callable[..., Any]:
    """A wrapper of the job body ``fn`` that records its outcome and raises the body
    faults the recorder arms. ``wait`` (async bodies only): wait until cancelled
    before the body would run, for the timeout fault."""
    if kind is Kind.COROUTINE:

        async def async_body(*args: Any, **kwargs: Any) -> Any:
            fault = recorder.body_begin()
            try:
                if fault is not None:
                    raise fault
                if wait and recorder.trace.attempt == 1:
                    await anyio.sleep_forever()
                result = await fn(*args, **kwargs)
            except BaseException as exc:
                recorder.body_end(exc)
                raise
            recorder.body_end(None)
            return result

        return _same_kind(async_body, fn)

    def sync_body(*args: Any, **kwargs: Any) -> Any:
        fault = recorder.body_begin()
        try:
            if fault is not None:
                raise fault
            result = fn(*args, **kwargs)
        except BaseException as exc:
            recorder.body_end(exc)
            raise
        recorder.body_end(None)
        return result

    return _same_kind(sync_body, fn)


class Counted:
    """Awaits a coroutine and reports each time it suspends (yields to the event loop).

    This is what ``explore`` calls an *await point*: every suspension of the task
    running the job, whatever it waits for (a socket, a sleep, a worker thread, a
    checkpoint). It works alike on asyncio and trio because both drive a task by
    ``send``/``throw`` on its coroutine, and a suspension is a value yielded out of it."""

    __slots__ = ("_coro", "_recorder")

    def __init__(self, coro: Coroutine[Any, Any, Any], recorder: Recorder) -> None:
        self._coro = coro
        self._recorder = recorder

    def __await__(self) -> Generator[Any, Any, Any]:
        coro = self._coro
        value: Any = None
        error: BaseException | None = None
        while True:
            try:
                yielded = coro.send(value) if error is None else coro.throw(error)
            except StopIteration as stop:
                return stop.value
            finally:
                error = None
            # The task is about to suspend: a cancellation requested now is delivered
            # by the backend at this very suspension (or, if it cannot be interrupted,
            # such as a shielded teardown, at the next point that can).
            self._recorder.suspended()
            try:
                value = yield yielded
            except BaseException as exc:
                error, value = exc, None
