"""Running what the CLI was pointed at: one job, a JSONL batch, or a Worker, each with
SIGINT/SIGTERM handling (``_signals``): the first signal cancels a job or batch (every
teardown runs; exit 130) or stops a worker gracefully (exit 0, the normal end of a
worker's life); a second one forces the exit with 130. A signal that came while the
target was being imported acts as soon as the event loop runs: no job is started then.

A ``--jsonl`` batch writes one JSON object per input line to stdout, in completion order
(each flushed as its job ends, so a consumer sees results as they come; ``line`` says
which input line it answers): ``{"line": 3, "ok": true, "result": ...}`` or ``{"line":
4, "ok": false, "error": "Type: message"}``. Lines are read as bytes and decoded one by
one, so a line that is not UTF-8 fails alone. A result that JSON cannot carry is written
as its ``repr()`` (``result_json``)."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Any, BinaryIO

import anyio

from .._errors import StartupError
from .._job import Job
from .._log import traceback_text
from .._runtime import Runtime
from .._worker import Worker
from ._logs import STATUS, describe, redact
from ._signals import EXIT_INTERRUPTED, SIGNALS, log

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _fallback(value: Any) -> Any:
    """For ``json.dumps``: sets as arrays, pydantic models as their JSON form, any other
    object as its ``repr()``."""
    if isinstance(value, set | frozenset):
        return list(value)
    dump = getattr(value, "model_dump", None)
    if callable(dump) and not isinstance(value, type):
        return dump(mode="json")
    return repr(value)


def result_json(result: Any) -> str:
    """A job's result as JSON text. Values JSON has no type for become their ``repr()``
    (``_fallback``); a result that still cannot be written (a circular structure, NaN,
    keys that are not strings) is written whole as the string of its ``repr()``.

    Args:
        result: what the job returned.
    """
    try:
        return json.dumps(result, allow_nan=False, default=_fallback)
    except (TypeError, ValueError, RecursionError):
        return json.dumps(repr(result))


def print_result(result: Any) -> None:
    """Print one job's result on stdout: a string as is, ``None`` not at all, anything
    else as JSON (``result_json``)."""
    if result is None:
        return
    print(result if isinstance(result, str) else result_json(result), flush=True)


async def run_job(job: Job[..., Any], payload: dict[str, Any]) -> int:
    """Run one job and print its result: 0 done, 1 failed, 130 interrupted.

    Args:
        job: the job.
        payload: its arguments, already converted from the command line.
    """
    signals = SIGNALS
    code = EXIT_INTERRUPTED
    async with Runtime() as rt, anyio.create_task_group() as tg:
        with anyio.CancelScope() as scope:
            await tg.start(signals.watch, scope.cancel)
            # Checked, not left to the cancelled scope: a dependency's code before its
            # first await would run even in a cancelled scope.
            if not signals.received:
                try:
                    result = await rt.run(job, **payload)
                except Exception as exc:
                    log().error("cli.job_failed", job=job.name, error=describe(exc))  # the library logged the traceback
                    code = EXIT_FAILED
                else:
                    print_result(result)
                    code = EXIT_OK
        tg.cancel_scope.cancel()
    return EXIT_INTERRUPTED if signals.received else code


async def run_batch(
    job: Job[..., Any], source: BinaryIO, concurrency: int, log_format: str, base: dict[str, Any] | None = None
) -> int:
    """Run one job per JSON line of ``source``, write one JSON object per line to stdout
    (see the module docstring) and a summary to stderr: 0 all done, 1 some failed, 130
    interrupted.

    Args:
        job: the job.
        source: the open input, read as bytes (a file, or stdin's buffer); the caller
            opens it (so that a missing file is a usage error) and closes it.
        concurrency: how many lines run at once (>= 1).
        log_format: ``console`` or ``json``: the summary's format.
        base: arguments from the command line, defaults for every line.
    """
    signals = SIGNALS
    done = 0
    failures: list[tuple[int, str]] = []
    progress = Progress(enabled=sys.stderr.isatty() and log_format == "console")
    slots = anyio.Semaphore(concurrency)

    async with Runtime() as rt, anyio.create_task_group() as watcher:
        with anyio.CancelScope() as batch:
            await watcher.start(signals.watch, batch.cancel)

            async def one(number: int, line: bytes) -> None:
                nonlocal done
                try:
                    payload = _payload(number, line)
                    result = await rt.run(job, **{**(base or {}), **payload})
                except Exception as exc:
                    error = redact(describe(exc))
                    failures.append((number, error))
                    record = f'{{"line": {number}, "ok": false, "error": {json.dumps(error)}}}'
                else:
                    done += 1
                    record = f'{{"line": {number}, "ok": true, "result": {result_json(result)}}}'
                finally:
                    slots.release()
                STATUS.write_line(sys.stdout, record)  # not reached when cancelled: no answer then
                progress.show(done, len(failures))

            # The signal checks, not only the cancelled scope, keep a line from starting:
            # a dependency's code before its first await would run even in a cancelled scope.
            async with anyio.create_task_group() as jobs, aclosing(_lines(source)) as numbered:
                async for number, line in numbered:
                    if not line.strip():
                        continue
                    await slots.acquire()  # read no further ahead than there are free slots
                    if signals.received:
                        slots.release()
                        break
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


def _payload(number: int, line: bytes) -> dict[str, Any]:
    """One input line's arguments; raises (failing that line only) if it is not UTF-8 or
    not a JSON object."""
    text = line.decode("utf-8-sig" if number == 1 else "utf-8")  # a BOM may open the file
    payload = json.loads(text)
    if not isinstance(payload, dict):
        raise ValueError(f"expected a JSON object, got {type(payload).__name__}")
    return payload


async def _lines(source: BinaryIO) -> AsyncGenerator[tuple[int, bytes], None]:
    """Numbered lines, read in a worker thread so a slow pipe never blocks the loop."""
    number = 0
    async for line in anyio.wrap_file(source):
        number += 1
        yield number, line


class Progress:
    """The batch's status line on a terminal (``STATUS``, which keeps it clear of the
    log and result lines), refreshed at most ten times a second."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._last = 0.0

    def show(self, done: int, failed: int) -> None:
        now = time.monotonic()
        if self.enabled and now - self._last > 0.1:
            self._last = now
            STATUS.show(f"{done} done, {failed} failed")

    def clear(self) -> None:
        if self.enabled:
            STATUS.clear()


async def run_worker(worker: Worker) -> int:
    """Run a worker until SIGINT/SIGTERM: 0 after a graceful stop (also when the signal
    came before it started: it is then not started), 1 if it failed; a second signal
    exits with 130 from ``Signals.watch``.

    Args:
        worker: the worker.
    """
    signals = SIGNALS
    code = EXIT_OK
    async with anyio.create_task_group() as tg:
        await tg.start(signals.watch, worker.stop)
        try:
            if not signals.received:
                await worker.run()
        except StartupError as exc:
            log().error("cli.worker_failed", error=str(exc))
            code = EXIT_FAILED
        except Exception as exc:
            log().error("cli.worker_failed", error=describe(exc), exception=traceback_text(exc))
            code = EXIT_FAILED
        tg.cancel_scope.cancel()
    return code
