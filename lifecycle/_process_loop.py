"""What the Celery and Dramatiq integrations share: one event loop per worker process,
hosting the process's Runtime, that framework threads hand jobs to and wait on.

Each integration owns how its loop thread starts and stops (Celery must survive a
soft time limit raised in the starting thread; Dramatiq starts its loop from a
middleware hook) and how a waiting thread reacts to an interruption. The job side is
the same for both and lives here: a job submitted from a framework thread is a
``Call``; on the loop it runs in a cancel scope of its own (``JobHost.host_call``), so
that the waiting thread can cancel it at any moment (``JobHost.cancel``) and closing
can cancel every job still in flight, each one's teardown finishing before the worker
scope it may still use is torn down. Neither framework is imported here."""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio
from anyio.from_thread import BlockingPortal

from ._errors import LifecycleError
from ._runtime import Runtime

T = TypeVar("T")


class ProcessClosed(LifecycleError):
    """The process's runtime is closing or closed: the job did not run, or closing
    cancelled it (after its teardown ran)."""


class Call:
    """One job submitted to the loop, cancellable from its framework thread at any moment.

    ``lock`` orders the thread's cancel against the loop's start: whichever comes first
    wins, so a job cancelled before it started never starts, and one that started has
    published its scope for the thread to cancel on the loop."""

    __slots__ = ("cancelled", "done", "lock", "scope")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.cancelled = False
        self.scope: anyio.CancelScope | None = None
        self.done = threading.Event()  # the job, teardown included, is over (or never ran)


def call_soon_threadsafe(backend: str) -> Callable[..., object]:
    """The running loop's way to run a plain callback soon, called from another thread
    without waiting for an answer (one wake-up of the loop thread): asyncio's
    ``call_soon_threadsafe``, trio's ``run_sync_soon``. Call it on the loop thread; what
    it returns raises ``RuntimeError`` once the loop has ended."""
    if backend == "trio":
        import trio  # a core dependency, imported only by processes whose loop is trio's

        return trio.lowlevel.current_trio_token().run_sync_soon
    return asyncio.get_running_loop().call_soon_threadsafe


class JobHost:
    """The job side of a per-process loop: runs submitted jobs in scopes of their own,
    tracks them, and cancels them on demand.

    Loop-thread state (``_accepting``, ``_inflight``, ``_drained``) is touched only by
    the loop thread; ``runtime`` and ``portal`` are set by the subclass once its loop is
    up. ``cancelled_reason`` ends the message of the ``ProcessClosed`` a job cancelled
    through its own scope raises.
    """

    cancelled_reason = "shutdown"

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.runtime: Runtime | None = None
        self.portal: BlockingPortal | None = None
        self._drained: anyio.Event | None = None
        self._inflight: set[Call] = set()
        self._accepting = False

    async def host_call(self, work: Callable[[Runtime], Awaitable[T]], call: Call) -> T:
        """Run ``work`` on the loop in the call's own cancel scope (on the loop thread).

        Raises:
            ProcessClosed: the job was abandoned before it started, the runtime is
                closing, or the job's scope was cancelled (by its thread or by closing).
        """
        try:
            with call.lock:
                if call.cancelled:  # the thread gave up before the job started
                    raise ProcessClosed(f"job abandoned before it started in worker process {self.pid}")
                scope = call.scope = anyio.CancelScope()
            if not self._accepting:
                raise ProcessClosed(f"the lifecycle runtime of worker process {self.pid} is closing")
            assert self.runtime is not None
            self._inflight.add(call)
            try:
                with scope:
                    return await work(self.runtime)
            finally:
                self._inflight.discard(call)
                if not self._accepting and not self._inflight and self._drained is not None:
                    self._drained.set()
            # Reached only when the scope swallowed our own cancellation: the thread
            # cancelled the job (and no longer waits for this) or closing did.
            raise ProcessClosed(f"the job was cancelled in worker process {self.pid} ({self.cancelled_reason})")
        finally:
            call.done.set()

    async def cancel_inflight(self) -> None:
        """Stop accepting jobs, cancel those in flight and wait for their teardown (on
        the loop thread, while worker scope, which they may still use, is alive)."""
        self._accepting = False
        for call in list(self._inflight):
            assert call.scope is not None
            call.scope.cancel()
        if self._inflight:
            assert self._drained is not None
            await self._drained.wait()

    def cancel(self, call: Call) -> None:
        """Cancel ``call`` from its thread: one not started never starts; one running is
        cancelled on the loop (its teardown runs). Returns without waiting."""
        with call.lock:
            call.cancelled = True
            scope = call.scope
        portal = self.portal
        if scope is None or portal is None:
            return  # not started: it sees `cancelled` when it starts; or closing cancels it
        # Scopes belong to the loop thread (trio checks). A RuntimeError means the portal
        # stopped, and closing cancelled the job already.
        with contextlib.suppress(RuntimeError):
            portal.call(scope.cancel)
