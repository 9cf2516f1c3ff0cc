"""Running what the CLI was pointed at: one job, a JSONL batch, or a Worker, each with
SIGINT/SIGTERM handling: the first signal cancels gracefully (every teardown runs),
a second one forces the exit."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import structlog
from anyio.abc import TaskStatus

from .._job import Job
from .._runtime import Runtime
from .._worker import StartupError, Worker

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def log() -> Any:
    return structlog.get_logger("lifecycle.cli")


@dataclass
class Signals:
    received: list[str] = field(default_factory=list)

    async def watch(
        self, on_first: Callable[[], None], *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Started with ``tg.start`` so the handlers are in place before any job runs: a
        signal that beat them would go to asyncio's own SIGINT handler, and the second
        one would then count as the first."""
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as stream:
            task_status.started()
            async for signum in stream:
                name = signal.Signals(signum).name
                self.received.append(name)
                if len(self.received) == 1:
                    log().warning("cli.interrupted", signal=name, hint="shutting down; send it again to force")
                    on_first()
                else:
                    log().error("cli.forced_exit", signal=name)
                    sys.stderr.flush()
                    os._exit(EXIT_INTERRUPTED)


def print_result(result: Any) -> None:
    if result is None:
        return
    if isinstance(result, str):
        print(result)
        return
    try:
        print(json.dumps(result))
    except (TypeError, ValueError):
        print(repr(result))


async def run_job(job: Job[..., Any], payload: dict[str, Any]) -> int:
    signals = Signals()
    code = EXIT_INTERRUPTED
    async with Runtime() as rt, anyio.create_task_group() as tg:
        with anyio.CancelScope() as scope:
            await tg.start(signals.watch, scope.cancel)
            try:
                result = await rt.run(job, **payload)
            except Exception as exc:
                log().error("cli.job_failed", job=job.name, exc_info=exc)
                code = EXIT_FAILED
            else:
                print_result(result)
                code = EXIT_OK
        tg.cancel_scope.cancel()
    return EXIT_INTERRUPTED if signals.received else code


async def run_batch(
    job: Job[..., Any], source: str, concurrency: int, log_format: str, base: dict[str, Any] | None = None
) -> int:
    signals = Signals()
    done = 0
    failures: list[tuple[int, str]] = []
    progress = Progress(enabled=sys.stderr.isatty() and log_format == "console")
    slots = anyio.Semaphore(concurrency)

    async with Runtime() as rt, anyio.create_task_group() as watcher:
        with anyio.CancelScope() as batch:
            await watcher.start(signals.watch, batch.cancel)

            async def one(number: int, line: str) -> None:
                nonlocal done
                try:
                    payload = json.loads(line)
                    if not isinstance(payload, dict):
                        raise ValueError(f"expected a JSON object, got {type(payload).__name__}")
                    await rt.run(job, **{**(base or {}), **payload})
                except Exception as exc:
                    failures.append((number, f"{type(exc).__name__}: {exc}"))
                else:
                    done += 1
                finally:
                    slots.release()
                    progress.show(done, len(failures))

            async with anyio.create_task_group() as jobs:
                async for number, line in _lines(source):
                    if not line.strip():
                        continue
                    await slots.acquire()  # read no further ahead than there are free slots
                    jobs.start_soon(one, number, line)
        watcher.cancel_scope.cancel()
    progress.clear()
    failures.sort()
    if log_format == "json":  # the command's output, not a log event: never filtered by level
        summary: dict[str, Any] = {"event": "cli.batch_summary", "job": job.name, "done": done}
        summary["failed"] = len(failures)
        summary["failures"] = [{"line": n, "error": e} for n, e in failures]
        print(json.dumps(summary), file=sys.stderr)
    else:
        print(f"done: {done}, failed: {len(failures)}", file=sys.stderr)
        for number, error in failures:
            print(f"  line {number}: {error}", file=sys.stderr)
    if signals.received:
        return EXIT_INTERRUPTED
    return EXIT_FAILED if failures else EXIT_OK


async def _lines(source: str) -> Any:
    """Numbered lines, read in a worker thread so a slow pipe never blocks the loop."""
    if source == "-":
        stream: Any = anyio.wrap_file(sys.stdin)
    else:
        stream = await anyio.open_file(source, encoding="utf-8")
    try:
        number = 0
        async for line in stream:
            number += 1
            yield number, line
    finally:
        if source != "-":
            await stream.aclose()


class Progress:
    """A single status line on a terminal, refreshed at most ten times a second."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._last = 0.0

    def show(self, done: int, failed: int) -> None:
        now = time.monotonic()
        if self.enabled and now - self._last > 0.1:
            self._last = now
            sys.stderr.write(f"\r{done} done, {failed} failed")
            sys.stderr.flush()

    def clear(self) -> None:
        if self.enabled:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()


async def run_worker(worker: Worker) -> int:
    signals = Signals()
    async with anyio.create_task_group() as tg:
        await tg.start(signals.watch, worker.stop)
        try:
            await worker.run()
        except StartupError as exc:
            log().error("cli.worker_failed", error=str(exc))
            tg.cancel_scope.cancel()
            return EXIT_FAILED
        except Exception as exc:
            log().error("cli.worker_failed", error=f"{type(exc).__name__}: {exc}", exc_info=exc)
            tg.cancel_scope.cancel()
            return EXIT_FAILED
        tg.cancel_scope.cancel()
    return EXIT_INTERRUPTED if signals.received else EXIT_OK
