"""Safe, quiet logs (docs/operations.md, "Logs"): the library never prints by itself (unconfigured
structlog: its events go to the stdlib logger ``lifecycle``), expected outcomes log one
line without a traceback, unexpected errors keep theirs (plain text, never frame
locals), and a password reaches no log line."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import anyio
import pytest
import structlog
from structlog.testing import capture_logs

from lifecycle import JobTimeout, Reject, Retry, Runtime, Worker, _log, job
from lifecycle.queues import MemoryQueue

SECRET = "hunter2-s3cret"
TESTS = Path(__file__).parent

# Run in a subprocess, so that the test suite's own structlog configuration does not
# apply: structlog is left unconfigured, as in an application that never touched it.
UNCONFIGURED_APP = textwrap.dedent(
    """
    import json, logging, sys, traceback
    from typing import Annotated, Any

    import anyio
    import structlog

    from lifecycle import Depends, Reject, Runtime, Worker, job
    from lifecycle.queues import MemoryQueue

    backend, mode, out = sys.argv[1:4]
    SECRET = "hunter2-s3cret"
    records = []


    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)


    if mode != "silent":  # "silent": no logging configuration at all
        logging.getLogger("lifecycle").addHandler(Keep())
    if mode == "debug":
        logging.getLogger("lifecycle").setLevel(logging.DEBUG)

    runners = []


    async def resource():
        # The traced runner's generated function is registered as '<... (traced)>'.
        runners.append(any(f.filename.endswith("(traced)>") for f in traceback.extract_stack()))
        yield "r"


    @job
    async def ok(r: Annotated[str, Depends(resource)]) -> str:
        return r


    @job
    async def login(user: str, password: str, r: Annotated[str, Depends(resource)]) -> None:
        url = f"postgresql://{user}:{password}@db.example/app"
        raise ConnectionError(f"cannot connect to {url}")


    @job
    async def refused() -> None:
        raise Reject("not for us")


    @job(timeout=0.05)
    async def slow() -> None:
        await anyio.sleep(30)


    @job
    async def forever() -> None:
        await anyio.sleep(30)


    async def main() -> None:
        async with Runtime() as rt:
            assert await rt.run(ok) == "r"
            for fn, kwargs in [(login, {"user": "app", "password": SECRET}), (refused, {}), (slow, {})]:
                try:
                    await rt.run(fn, **kwargs)
                except Exception:
                    pass
            with anyio.move_on_after(0.05):
                await rt.run(forever)
        queue = MemoryQueue()
        await queue.enqueue("login", {"user": "app", "password": SECRET})
        worker = Worker(queue, [login])
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                tg.start_soon(worker.run)
                while len(queue):
                    await anyio.sleep(0.005)
                worker.stop()
        assert len(await queue.dead_letters()) == 1


    anyio.run(main, backend=backend)
    with open(out, "w") as fh:
        json.dump(
            {
                "configured": structlog.is_configured(),
                "traced": runners,
                "records": [
                    {"level": r.levelname, "message": r.getMessage(), "event": getattr(r, "event", None),
                     "fields": {k: repr(v) for k, v in vars(r).items()}}
                    for r in records
                ],
            },
            fh,
        )
    """
)


def run_unconfigured(tmp_path: Path, backend: str, mode: str) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    script = tmp_path / "unconfigured_app.py"
    script.write_text(UNCONFIGURED_APP)
    out = tmp_path / f"{mode}.json"
    proc = subprocess.run(
        [sys.executable, str(script), backend, mode, str(out)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return proc, json.loads(out.read_text())


def by_event(records: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    found: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        found.setdefault(record["event"], []).append(record)
    return found


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_unconfigured_the_library_prints_nothing_at_all(tmp_path: Path, backend: str) -> None:
    # No structlog configuration, no logging configuration, and failures of every kind:
    # not a byte on stdout or stderr (no structlog default printer, no stdlib last resort).
    proc, result = run_unconfigured(tmp_path, backend, "silent")
    assert result["configured"] is False
    assert (proc.stdout, proc.stderr) == ("", "")


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_unconfigured_events_go_to_the_stdlib_logger_with_debug_off_and_the_untraced_runner(
    tmp_path: Path, backend: str
) -> None:
    proc, result = run_unconfigured(tmp_path, backend, "default")
    assert (proc.stdout, proc.stderr) == ("", "")
    assert result["traced"] and not any(result["traced"])  # debug is off: the untraced runner
    records = result["records"]
    events = by_event(records)
    # The stdlib default level (WARNING) governs: no debug or info event was even built.
    assert {r["level"] for r in records} <= {"WARNING", "ERROR"}
    assert "job.started" not in events and "job.succeeded" not in events and "dependency.setup" not in events

    [failed] = [r for r in events["job.failed"] if "login" in r["message"]]
    assert failed["level"] == "ERROR"
    message = failed["message"]
    assert message.startswith("job.failed job=login ")
    assert "error='ConnectionError: cannot connect to postgresql://app:***@db.example/app'" in message
    assert "Traceback (most recent call last)" in message  # unexpected: the traceback, as text
    assert "raise ConnectionError" in message
    assert repr("login") == failed["fields"]["job"]  # the fields travel as record attributes too

    # Expected outcomes: one line each, no traceback, no cancel-scope internals.
    [rejected] = events["job.rejected"]
    [timed_out] = events["job.timed_out"]
    [cancelled] = events["job.cancelled"]
    assert (rejected["level"], timed_out["level"], cancelled["level"]) == ("WARNING", "ERROR", "WARNING")
    assert "reason='not for us'" in rejected["message"]
    for record in (rejected, timed_out, cancelled):
        assert "\n" not in record["message"] and "Traceback" not in record["message"]
    assert cancelled["message"].startswith("job.cancelled job=forever ")
    assert "cancel scope" not in cancelled["message"].lower() and "error" not in cancelled["message"]

    [dead] = events["job.dead_lettered"]  # the Worker's dead letter, through the fallback
    assert "reason=failed" in dead["message"]

    # The password is an argument and sits in the failing frame's locals: nowhere logged.
    assert SECRET not in json.dumps(records)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_unconfigured_debug_enabled_on_the_stdlib_logger_turns_on_debug_events_and_the_traced_runner(
    tmp_path: Path, backend: str
) -> None:
    proc, result = run_unconfigured(tmp_path, backend, "debug")
    assert (proc.stdout, proc.stderr) == ("", "")
    assert result["traced"] and all(result["traced"])
    events = by_event(result["records"])
    for name in ("job.started", "dependency.setup", "dependency.teardown"):
        assert events[name][0]["level"] == "DEBUG"
    [succeeded] = events["job.succeeded"]
    assert succeeded["level"] == "INFO" and "duration_ms=" in succeeded["message"]
    assert SECRET not in json.dumps(result["records"])


# -- the CLI ------------------------------------------------------------------------------

CLI_JOB = textwrap.dedent(
    """
    from lifecycle import job


    @job
    async def login(user: str, password: str) -> None:
        url = f"postgresql://{user}:{password}@db.example/app"
        raise ConnectionError(f"cannot connect to {url}")
    """
)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@pytest.mark.parametrize("log_format", ["json", "console"])
def test_a_failing_job_shows_its_password_nowhere_in_any_cli_log_format(
    tmp_path: Path, backend: str, log_format: str
) -> None:
    (tmp_path / "secret_jobs.py").write_text(CLI_JOB)
    proc = subprocess.run(
        [sys.executable, "-m", "lifecycle", "--log-format", log_format, "--log-level", "debug", "--backend", backend,
         "run", "secret_jobs.py:login", "--user", "app", "--password", SECRET],
        capture_output=True, text=True, timeout=120, cwd=tmp_path, env={**os.environ, "NO_COLOR": "1"},
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert "job.failed" in proc.stderr and "ConnectionError" in proc.stderr  # it was logged
    assert "postgresql://app:***@db.example/app" in proc.stderr
    assert SECRET not in proc.stdout + proc.stderr


# -- through structlog, as the application configured it ------------------------------------

@pytest.mark.anyio
async def test_a_workers_dead_letter_log_line_shows_no_password() -> None:
    @job
    async def login(user: str, password: str) -> None:
        raise ConnectionError(f"cannot connect to redis://{user}:{password}@cache.example/0")

    queue = MemoryQueue()
    await queue.enqueue("login", {"user": "app", "password": SECRET})
    worker = Worker(queue, [login])
    with capture_logs() as logs, anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker.run)
            while len(queue):
                await anyio.sleep(0.005)
            worker.stop()
    [dead] = [e for e in logs if e["event"] == "job.dead_lettered"]
    assert dead["error"] == "ConnectionError: cannot connect to redis://app:***@cache.example/0"
    assert SECRET not in repr(logs)
    [letter] = await queue.dead_letters()
    assert letter["error"] == dead["error"]  # the dead letter's error is redacted too


def events_of(logs: list[dict[str, Any]], prefix: str = "job.") -> list[dict[str, Any]]:
    return [e for e in logs if e["event"].startswith(prefix)]


@pytest.mark.anyio
async def test_reject_timeout_and_cancellation_log_one_event_without_a_traceback() -> None:
    @job
    async def refused() -> None:
        raise Reject("not for us")

    @job(timeout=0.05)
    async def slow() -> None:
        await anyio.sleep(30)

    @job
    async def forever() -> None:
        await anyio.sleep(30)

    async with Runtime() as rt:
        with capture_logs() as logs, pytest.raises(Reject):
            await rt.run(refused)
        assert events_of(logs) == [
            {"event": "job.rejected", "log_level": "warning", "reason": "not for us", "job": "refused",
             "job_id": logs[0]["job_id"], "attempt": 1}
        ]  # fmt: skip

        with capture_logs() as logs, pytest.raises(JobTimeout):
            await rt.run(slow)
        [timed_out] = events_of(logs)
        assert (timed_out["event"], timed_out["log_level"]) == ("job.timed_out", "error")
        assert timed_out["error"].startswith("JobTimeout: job 'slow'")
        assert "exception" not in timed_out and "exc_info" not in timed_out

        with capture_logs() as logs:
            with anyio.move_on_after(0.05):
                await rt.run(forever)
        assert events_of(logs) == [
            {"event": "job.cancelled", "log_level": "warning", "job": "forever", "job_id": logs[0]["job_id"],
             "attempt": 1}
        ]  # fmt: skip


@pytest.mark.anyio
async def test_an_unexpected_error_keeps_its_traceback_as_text_with_the_real_cause_and_no_locals() -> None:
    async def crash(password: str) -> None:
        raise ValueError(f"bad row; dsn=postgresql://u:{password}@db/x")

    @job
    async def grouped(password: str) -> None:
        async with anyio.create_task_group() as tg:  # the error arrives wrapped in a group
            tg.start_soon(crash, password)

    async with Runtime() as rt:
        with capture_logs() as logs, pytest.raises(BaseExceptionGroup):
            await rt.run(grouped, password=SECRET)
    [failed] = events_of(logs)
    assert (failed["event"], failed["log_level"]) == ("job.failed", "error")
    assert failed["error"] == "ValueError: bad row; dsn=postgresql://u:***@db/x"  # the leaf, not the group
    assert "exc_info" not in failed  # no exception object a renderer could show locals of
    assert failed["exception"].startswith("Traceback (most recent call last)") or "ExceptionGroup" in failed["exception"]
    assert "raise ValueError" in failed["exception"]
    assert SECRET not in repr(logs)


@pytest.mark.anyio
async def test_retries_used_up_by_retry_log_one_failure_saying_so() -> None:
    @job(retries=1)
    async def again() -> None:
        raise Retry(delay=0)

    async with Runtime() as rt:
        with capture_logs() as logs, pytest.raises(Retry):
            await rt.run(again)
    assert [e["event"] for e in events_of(logs)] == ["job.retrying", "job.failed"]
    failed = events_of(logs)[-1]
    assert failed["error"] == "Retry: retry requested (delay=0); no attempts left (2 of 2)"
    assert "exception" not in failed


def test_exception_groups_and_interrupts_are_judged_by_their_leaves() -> None:
    import asyncio

    with capture_logs() as logs:
        _log.log_failure(_log.LOG, BaseExceptionGroup("x", [asyncio.CancelledError(), asyncio.CancelledError()]), job="a")
        _log.log_failure(_log.LOG, KeyboardInterrupt(), job="b")
        _log.log_failure(_log.LOG, ExceptionGroup("x", [Reject("no")]), job="c")
        _log.log_failure(_log.LOG, ExceptionGroup("x", [ValueError("v"), KeyError("k")]), job="d")
    assert [(e["event"], e["job"]) for e in logs] == [
        ("job.cancelled", "a"), ("job.cancelled", "b"), ("job.rejected", "c"), ("job.failed", "d")
    ]  # fmt: skip
    assert logs[1]["by"] == "KeyboardInterrupt" and "error" not in logs[0]
    assert logs[3]["error"] == "ValueError: v; KeyError: 'k'" and "ExceptionGroup: x" in logs[3]["exception"]


# -- levels, read through structlog's public API -------------------------------------------


def test_levels_come_from_structlogs_public_configuration_only(monkeypatch: pytest.MonkeyPatch) -> None:
    import logging

    assert "structlog._" not in inspect.getsource(_log)  # no private structlog state
    previous = structlog.get_config()
    try:
        structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
        assert _log.enabled_levels() == (False, False)
        structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG))
        assert _log.enabled_levels() == (True, True)
        # structlog routed to the stdlib: the stdlib logger 'lifecycle' decides.
        structlog.configure(wrapper_class=structlog.stdlib.BoundLogger, logger_factory=structlog.stdlib.LoggerFactory())
        monkeypatch.setattr(_log.STDLIB_LOGGER, "level", logging.INFO)
        _log.STDLIB_LOGGER.manager._clear_cache()  # type: ignore[attr-defined]
        assert _log.enabled_levels() == (False, True)

        class Opaque:  # a wrapper that cannot say: everything enabled, its filtering decides
            def __init__(self, *args: Any, **kwargs: Any) -> None: ...

        structlog.configure(wrapper_class=Opaque, logger_factory=structlog.PrintLoggerFactory())
        assert _log.enabled_levels() == (True, True)
    finally:
        structlog.configure(**previous)
        _log.STDLIB_LOGGER.manager._clear_cache()  # type: ignore[attr-defined]


def test_a_failure_nobody_reads_is_not_formatted(monkeypatch: pytest.MonkeyPatch) -> None:
    """Formatting a traceback costs far more than a job: with errors filtered out, the
    library does not build the ``exception`` text at all (the event still goes out)."""
    import logging

    formatted: list[BaseException] = []
    real = _log.traceback_text
    monkeypatch.setattr(_log, "traceback_text", lambda exc: formatted.append(exc) or real(exc))
    previous = structlog.get_config()
    try:
        structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))
        _log.log_failure(_log.LOG, ValueError("quiet"), job="a")
        assert formatted == []
        structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
        with capture_logs() as logs:
            _log.log_failure(_log.LOG, ValueError("loud"), job="b")
        assert [str(exc) for exc in formatted] == ["loud"]
        assert "ValueError: loud" in logs[0]["exception"]
    finally:
        structlog.configure(**previous)


# -- result types ------------------------------------------------------------------------


def test_run_and_celery_tasks_carry_the_jobs_result_type(tmp_path: Path) -> None:
    mypy_api = pytest.importorskip("mypy.api")
    program = tmp_path / "typed_user.py"
    program.write_text(
        textwrap.dedent(
            """
            from typing import Annotated

            from celery import Celery

            import lifecycle
            from lifecycle import Depends, job
            from lifecycle.celery import CeleryLifecycle


            async def dep() -> str:
                return "x"


            @job
            async def add(n: int, d: Annotated[str, Depends(dep)]) -> int:
                return n


            def plain() -> str:
                return "s"


            lc = CeleryLifecycle(Celery("typed"))


            @lc.task(name="half", retries=2)
            async def half(n: int) -> float:
                return n / 2


            @lc.task
            def raw() -> bytes:
                return b""


            reveal_type(lifecycle.run(add, n=1))
            reveal_type(lifecycle.run(plain, backend="trio"))
            reveal_type(half.delay(n=1).get(timeout=1))
            reveal_type(half(n=1))
            reveal_type(raw.apply_async().get())
            """
        )
    )
    stdout, stderr, code = mypy_api.run(["--strict", "--no-error-summary", "--cache-dir", str(tmp_path / "cache"),
                                         str(program)])  # fmt: skip
    revealed = [
        line.split("Revealed type is ")[1].strip('"').removeprefix("builtins.")
        for line in stdout.splitlines()
        if "Revealed type" in line
    ]
    assert revealed == ["int", "str", "float", "float", "bytes"], stdout + stderr
    assert code == 0, stdout + stderr
