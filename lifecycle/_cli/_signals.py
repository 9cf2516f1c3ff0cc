"""SIGINT and SIGTERM for the command line, from the first line of ``main()`` to the exit.

One count, two stages, so that no signal is ever lost or handled by Python's default
(a SIGTERM that beats the event loop used to kill the process with 143):

- From the start of ``main()``, a plain ``signal.signal`` handler records each signal.
  It does not raise: an exception in the middle of click's parsing or of importing the
  target could not be told apart from a crash, whereas a recorded signal lets ``run``
  end cleanly once the target is loaded (a worker exits 0 without starting, a job 130
  without running). The handler is ours, not ``default_int_handler``, so neither
  asyncio nor trio installs its own SIGINT handler over it.
- While a job, batch or worker runs, ``Signals.watch`` receives them through anyio (a
  Python-level handler cannot cancel a task). It first replays a signal recorded before
  it started, and restores the recording handler when it ends: asyncio's
  ``remove_signal_handler`` resets to the defaults instead of the previous handler.

Whichever stage sees it, the second signal forces the exit with 130. Commands that only
read (``list``, ``graph``, ``check``) call ``interrupt_now()``: for them the first
signal raises ``KeyboardInterrupt`` at once, so a slow import can be interrupted."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any, NoReturn

import anyio
import structlog
from anyio.abc import TaskStatus

EXIT_INTERRUPTED = 130
HANDLED = (signal.SIGINT, signal.SIGTERM)


def log() -> Any:
    return structlog.get_logger("lifecycle.cli")


class Signals:
    """The process's SIGINT/SIGTERM state while the CLI runs (one per process: ``SIGNALS``)."""

    def __init__(self) -> None:
        self.received: list[str] = []  # signal names, in order of arrival
        self.acted = False  # something stopped or cancelled because of the first signal
        self._installed = False
        self._raising = False

    def install(self) -> None:
        """Record SIGINT/SIGTERM from now on; a no-op outside the main thread (where
        ``signal.signal`` is not allowed, and an embedding program owns the signals)."""
        self.received.clear()
        self.acted = False
        self._raising = False
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in HANDLED:
            signal.signal(signum, self._handle)
        self._installed = True

    def interrupt_now(self) -> None:
        """From now on the first signal raises ``KeyboardInterrupt`` (so does one that
        already arrived): for commands with nothing to shut down gracefully."""
        self._raising = True
        if self.received:
            self.acted = True
            raise KeyboardInterrupt

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self._record(signum)
        if self._raising:
            self.acted = True
            raise KeyboardInterrupt

    def _record(self, signum: int) -> None:
        """Count one signal; the second one ends the process here."""
        name = signal.Signals(signum).name
        self.received.append(name)
        if len(self.received) > 1:
            self.force_exit(name)

    def force_exit(self, name: str) -> NoReturn:
        """A second signal: exit with 130 now, without waiting for any teardown."""
        log().error("cli.forced_exit", signal=name)
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):  # a closed pipe must not stop a forced exit
                stream.flush()
        os._exit(EXIT_INTERRUPTED)

    def _act(self, on_first: Callable[[], None]) -> None:
        self.acted = True
        log().warning("cli.interrupted", signal=self.received[0], hint="shutting down; send it again to force")
        on_first()

    async def watch(
        self, on_first: Callable[[], None], *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Call ``on_first`` on the first signal (at once if one came before this
        started), force the exit on the second.

        Started with ``tg.start``, so the anyio handlers are in place (and an earlier
        signal already acted on) before the caller starts any job.

        Args:
            on_first: what the first signal does (cancel a scope, ``Worker.stop``);
                called from this task, on the event loop.
            task_status: set by ``tg.start``.
        """
        try:
            with anyio.open_signal_receiver(*HANDLED) as stream:
                if self.received and not self.acted:
                    self._act(on_first)  # it came during start-up: import, parsing, loop start
                task_status.started()
                async for signum in stream:
                    self._record(signum)
                    self._act(on_first)
        finally:
            if self._installed:
                for signum in HANDLED:
                    signal.signal(signum, self._handle)


SIGNALS = Signals()
