"""The real command line, run as a subprocess, on both backends."""

import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

JOBS = Path(__file__).with_name("cli_jobs.py")
BACKENDS = ["asyncio", "trio"]


@pytest.fixture
def evidence(tmp_path: Path) -> Path:
    return tmp_path / "evidence.log"


def env_for(evidence: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "EVIDENCE": str(evidence), "PYTHONUNBUFFERED": "1", **extra}


def cli(evidence: Path, *args: str, stdin: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lifecycle", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env_for(evidence),
        timeout=timeout,
    )


def lines(evidence: Path) -> list[str]:
    return evidence.read_text().splitlines() if evidence.exists() else []


def start(evidence: Path, *args: str, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "lifecycle", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env_for(evidence, **env),
    )


def finish(proc: subprocess.Popen[str], timeout: float = 30) -> tuple[int, str]:
    """The exit code and stderr of a started process (killed if it outlives ``timeout``)."""
    try:
        _, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    return proc.returncode, stderr


def note(evidence: Path, text: str) -> None:
    with evidence.open("a") as fh:
        fh.write(text + "\n")


def wait_for(evidence: Path, text: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(text in line for line in lines(evidence)):
            return
        time.sleep(0.02)
    raise AssertionError(f"{text!r} never appeared; evidence: {lines(evidence)}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_run_one_job_prints_the_result_and_tears_down_in_order(evidence: Path, backend: str) -> None:
    result = cli(evidence, "--backend", backend, "run", f"{JOBS}:work", "--n", "3")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "session 3\n"
    assert lines(evidence) == ["pool up", "session up {'n': 3, 'pause': 0.0}", "session down", "pool down"]


def test_options_are_converted_by_annotation(evidence: Path) -> None:
    result = cli(
        evidence, "run", f"{JOBS}:convert", "--count", "2", "--ratio", "1.5", "--loud", "--path", "/tmp/x",
        "--color", "blue", "--mode", "slow", "--tags", "a", "--tags", "b", "--limit", "7",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {
        "count": 2, "ratio": 1.5, "loud": True, "path": "/tmp/x", "color": "blue", "mode": "slow",
        "tags": ["a", "b"], "limit": 7,
    }  # fmt: skip
    defaults = cli(evidence, "run", f"{JOBS}:convert", "--count", "1", "--no-loud", "--color", "b")
    assert json.loads(defaults.stdout)["color"] == "blue"  # by value too
    assert json.loads(defaults.stdout)["limit"] is None


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--count", "many"], "Invalid value for '--count': 'many' is not a valid integer"),
        (["--count", "1", "--ratio", "x"], "Invalid value for '--ratio'"),
        (["--count", "1", "--color", "green"], "Invalid value for '--color'"),
        (["--count", "1", "--mode", "medium"], "Invalid value for '--mode'"),
        ([], "Missing option '--count'"),
        (["--count", "1", "--bogus"], "--bogus"),
    ],
)
def test_bad_option_values_are_usage_errors_naming_the_option(evidence: Path, args: list[str], message: str) -> None:
    result = cli(evidence, "run", f"{JOBS}:convert", *args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Error: " in result.stderr


def test_job_help_shows_options_defaults_and_docstring_help(evidence: Path) -> None:
    result = cli(evidence, "run", f"{JOBS}:convert", "--help")
    assert result.returncode == 0
    assert "Echo converted options back as JSON." in result.stdout
    assert "--count INTEGER" in result.stdout and "How many." in result.stdout
    assert "--loud / --no-loud" in result.stdout and "Shout." in result.stdout
    assert "[default: 0.5]" in result.stdout
    assert "[red|blue]" in result.stdout and "[fast|slow]" in result.stdout


@pytest.mark.parametrize("backend", BACKENDS)
def test_failed_job_exits_1_and_json_logs_are_valid_json_with_job_identity(evidence: Path, backend: str) -> None:
    result = cli(evidence, "--log-format", "json", "run", f"{JOBS}:work", "--n", "-1", "--backend", backend)
    assert result.returncode == 1
    records = [json.loads(line) for line in result.stderr.splitlines()]  # every line is JSON
    failed = [r for r in records if r["event"] == "job.failed"]
    assert failed[0]["job"] == "work"
    assert failed[0]["attempt"] == 1
    assert len(failed[0]["job_id"]) == 32
    assert "ValueError: negative n: -1" in failed[0]["error"]
    assert "Traceback" in failed[0]["exception"]  # once, as text, in the library's line
    assert any(r["event"] == "cli.job_failed" and "exception" not in r for r in records)
    assert lines(evidence)[-3:] == ["session saw ValueError", "session down", "pool down"]


def test_default_log_format_is_json_when_stderr_is_not_a_terminal(evidence: Path) -> None:
    result = cli(evidence, "run", f"{JOBS}:work", "--n", "1")
    assert result.stderr.strip()
    for line in result.stderr.splitlines():
        json.loads(line)


def test_target_errors(evidence: Path, tmp_path: Path) -> None:
    several = cli(evidence, "run", str(JOBS))
    assert several.returncode == 2
    assert f"name one: {JOBS}:convert" in several.stderr
    missing = cli(evidence, "run", str(tmp_path / "nope.py"))
    assert missing.returncode == 2 and "no such file" in missing.stderr
    bad_syntax = tmp_path / "bad.py"
    bad_syntax.write_text("def broken(:\n")
    syntax = cli(evidence, "run", str(bad_syntax))
    assert syntax.returncode == 2 and "syntax error in" in syntax.stderr and "line 1" in syntax.stderr
    no_attr = cli(evidence, "run", f"{JOBS}:nothing")
    assert no_attr.returncode == 2 and "has no attribute 'nothing'" in no_attr.stderr
    not_job = cli(evidence, "run", f"{JOBS}:note")
    assert not_job.returncode == 2 and "is a function, not a @job or a Worker" in not_job.stderr
    module = cli(evidence, "run", "no_such_module_xyz:job")
    assert module.returncode == 2 and "no module named 'no_such_module_xyz'" in module.stderr


def test_dotted_module_target(evidence: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "lifecycle", "run", "cli_jobs:work", "--n", "4"],
        capture_output=True,
        text=True,
        env={**env_for(evidence), "PYTHONPATH": str(JOBS.parent)},
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "session 4\n"


def test_graph_error_in_the_file_exits_2(evidence: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken.py"
    broken.write_text(
        "from lifecycle import Depends, job\n"
        "def user(user_id: int): return user_id\n"
        "@job\nasync def a(u=Depends(user)): ...\n"
    )
    result = cli(evidence, "run", str(broken))
    assert result.returncode == 2
    assert "parameter 'user_id'" in result.stderr and "broken:user" in result.stderr


def test_check_reports_every_problem(evidence: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken.py"
    broken.write_text(
        "from lifecycle import Depends, dependency, job\n"
        "def user(user_id: int): return user_id\n"
        "def per_job(): return 1\n"
        "@dependency(scope='worker')\ndef pool(x=Depends(per_job)): return x\n"
        "@job\nasync def a(u=Depends(user)): ...\n"
        "@job\nasync def b(p=Depends(pool)): ...\n"
        "@job\nasync def fine(n: int): ...\n"
    )
    result = cli(evidence, "check", str(broken))
    assert result.returncode == 1
    assert "error: a: " in result.stderr and "parameter 'user_id'" in result.stderr
    assert "error: b: " in result.stderr and "cannot depend on job-scoped" in result.stderr
    assert "2 problems in" in result.stderr
    ok = cli(evidence, "check", str(JOBS))
    assert ok.returncode == 0 and "are valid" in ok.stdout


def test_list_and_graph(evidence: Path) -> None:
    listed = cli(evidence, "list", str(JOBS))
    assert listed.returncode == 0
    assert "work  (" in listed.stdout and "cli_jobs:pool [worker], cli_jobs:session [job]" in listed.stdout
    assert "worker  (Worker over MemoryQueue; concurrency=2)" in listed.stdout
    tree = cli(evidence, "graph", f"{JOBS}:work")
    assert tree.returncode == 0
    assert "├── s: cli_jobs:session  [job scope, async generator]" in tree.stdout
    assert "│   ├── p: cli_jobs:pool  [worker scope, async generator]" in tree.stdout
    mermaid = cli(evidence, "graph", f"{JOBS}:work", "--format", "mermaid")
    assert mermaid.stdout.startswith("graph TD") and "-->|p|" in mermaid.stdout
    dot = cli(evidence, "graph", f"{JOBS}:work", "--format", "dot")
    assert dot.stdout.startswith("digraph lifecycle {") and '[label="p"]' in dot.stdout
    assert cli(evidence, "graph", f"{JOBS}:work", "--format", "svg").returncode == 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_jsonl_batch_from_file_reports_failed_lines(evidence: Path, tmp_path: Path, backend: str) -> None:
    payloads = tmp_path / "payloads.jsonl"
    payloads.write_text('{"n": 1}\n{"n": -2}\nnot json\n\n{"m": 1}\n{"n": 5}\n')
    result = cli(
        evidence, "--log-format", "console", "--backend", backend,
        "run", f"{JOBS}:work", "--jsonl", str(payloads), "--concurrency", "3",
    )  # fmt: skip
    assert result.returncode == 1
    assert "done: 2, failed: 3" in result.stderr
    assert "line 2: ValueError: negative n: -2" in result.stderr
    assert "line 3: JSONDecodeError" in result.stderr
    assert "line 5: PayloadError" in result.stderr and "unexpected argument(s) 'm'" in result.stderr
    assert lines(evidence).count("pool up") == 1  # worker scope once for the whole batch
    assert lines(evidence)[-1] == "pool down"


def test_jsonl_batch_from_stdin_with_json_summary(evidence: Path) -> None:
    result = cli(evidence, "run", f"{JOBS}:work", "--jsonl", "-", stdin='{"n": 1}\n{"n": 2}\n')
    assert result.returncode == 0
    summary = [json.loads(line) for line in result.stderr.splitlines() if "cli.batch_summary" in line]
    assert summary == [{"event": "cli.batch_summary", "job": "work", "done": 2, "failed": 0, "failures": []}]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_during_a_run_cancels_runs_every_teardown_and_exits_130(
    evidence: Path, backend: str, signum: int
) -> None:
    proc = start(evidence, "--backend", backend, "run", f"{JOBS}:work", "--n", "1", "--pause", "60")
    wait_for(evidence, "working 1")
    proc.send_signal(signum)
    assert proc.wait(30) == 130
    assert lines(evidence)[-3:] == ["session saw Cancelled" if backend == "trio" else "session saw CancelledError",
                                    "session down", "pool down"]  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
def test_signal_during_a_batch_tears_down_in_flight_jobs(evidence: Path, tmp_path: Path, backend: str) -> None:
    payloads = tmp_path / "payloads.jsonl"
    payloads.write_text("".join(json.dumps({"n": n, "pause": 60}) + "\n" for n in range(10)))
    proc = start(evidence, "--backend", backend, "run", f"{JOBS}:work", "--jsonl", str(payloads), "--concurrency", "2")
    wait_for(evidence, "working 1")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 130
    seen = lines(evidence)
    started = [line for line in seen if line.startswith("session up")]
    assert len(started) == 2 and all(line.startswith(("session up {'n': 0,", "session up {'n': 1,")) for line in started)
    assert seen.count("session down") == 2  # only the two in flight were started, both torn down
    assert seen[-1] == "pool down"


def test_second_signal_forces_exit(evidence: Path) -> None:
    proc = start(evidence, "run", f"{JOBS}:hang")
    wait_for(evidence, "hang running")
    proc.send_signal(signal.SIGINT)
    wait_for(evidence, "stuck teardown started")
    proc.send_signal(signal.SIGINT)
    assert proc.wait(10) == 130
    assert "stuck teardown finished" not in lines(evidence)


@pytest.mark.parametrize("backend", BACKENDS)
def test_signal_before_the_first_await_still_counts_as_the_first(evidence: Path, backend: str) -> None:
    """The handlers are installed before the job starts, so a signal sent at once is the
    graceful one and the next forces the exit (it used to reach asyncio's handler first)."""
    proc = start(evidence, "--backend", backend, "run", f"{JOBS}:interrupt_self")
    wait_for(evidence, "stuck teardown started")
    proc.send_signal(signal.SIGINT)
    assert proc.wait(10) == 130
    stderr = proc.stderr.read() if proc.stderr else ""
    assert "cli.interrupted" in stderr and "cli.forced_exit" in stderr
    assert "stuck teardown finished" not in lines(evidence)


@pytest.mark.parametrize("backend", BACKENDS)
def test_worker_target_consumes_until_sigterm(evidence: Path, backend: str) -> None:
    proc = start(evidence, "--backend", backend, "run", f"{JOBS}:worker")
    deadline = time.monotonic() + 20
    while lines(evidence).count("session down") < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    code, stderr = finish(proc)
    assert code == 0, stderr  # a graceful stop is the normal end of a worker's life
    seen = lines(evidence)
    assert seen.count("session down") == 3
    assert seen[0] == "pool up" and seen[-1] == "pool down"


def test_help_version_and_python_dash_m(evidence: Path) -> None:
    result = cli(evidence, "--help")
    assert result.returncode == 0
    for command in ("run", "list", "graph", "check"):
        assert command in result.stdout
    assert cli(evidence, "--version").stdout.startswith("lifecycle, version")
    assert cli(evidence, "run", "--help").returncode == 0
    assert cli(evidence, "nope").returncode == 2


def test_options_given_with_jsonl_are_defaults_for_every_line(evidence: Path) -> None:
    result = cli(evidence, "run", f"{JOBS}:work", "--n", "5", "--jsonl", "-", stdin='{}\n{"n": 6}\n')
    assert result.returncode == 0, result.stderr
    ups = sorted(line for line in lines(evidence) if line.startswith("session up"))
    assert ups == ["session up {'n': 5, 'pause': 0.0}", "session up {'n': 6, 'pause': 0.0}"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_worker_whose_worker_scope_fails_at_startup_exits_1(evidence: Path, tmp_path: Path, backend: str) -> None:
    app = tmp_path / "broken_worker.py"
    app.write_text(
        "from lifecycle import Depends, Worker, dependency, job\n"
        "from lifecycle.queues import MemoryQueue\n"
        "@dependency(scope='worker')\n"
        "async def database():\n"
        "    raise ConnectionRefusedError('db is down')\n"
        "    yield\n"
        "@job\nasync def work(db=Depends(database)): ...\n"
        "worker = Worker(MemoryQueue(), [work])\n"
    )
    result = cli(evidence, "--backend", backend, "run", f"{app}:worker")
    assert result.returncode == 1
    failure = [json.loads(line) for line in result.stderr.splitlines() if "cli.worker_failed" in line]
    assert "worker could not start" in failure[0]["error"]
    assert "broken_worker:database" in failure[0]["error"] and "db is down" in failure[0]["error"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_worker_stopped_gracefully_by_a_signal_exits_0_after_its_in_flight_job(
    evidence: Path, backend: str, signum: int
) -> None:
    proc = start(evidence, "--backend", backend, "run", f"{JOBS}:busy_worker")
    wait_for(evidence, "working 7")  # the job is in flight (it sleeps 2 s)
    proc.send_signal(signum)
    code, stderr = finish(proc)
    assert code == 0, stderr
    seen = lines(evidence)
    assert seen[-2:] == ["session down", "pool down"]  # the job ended, then the worker scope
    assert not any(line.startswith("session saw") for line in seen)  # finished, not cancelled
    events = [json.loads(line)["event"] for line in stderr.splitlines()]
    assert "cli.interrupted" in events and "worker.stopped" in events
    assert "Traceback" not in stderr


@pytest.mark.parametrize("backend", BACKENDS)
def test_second_signal_forces_a_draining_worker_out_with_130(evidence: Path, backend: str) -> None:
    proc = start(evidence, "--backend", backend, "run", f"{JOBS}:stuck_worker")
    wait_for(evidence, "hang running")
    proc.send_signal(signal.SIGTERM)
    wait_for(evidence, "stuck teardown started")  # shutdown_grace=0: cancelled, tearing down
    proc.send_signal(signal.SIGTERM)
    code, stderr = finish(proc, timeout=10)
    assert code == 130
    assert "stuck teardown finished" not in lines(evidence)
    events = [json.loads(line)["event"] for line in stderr.splitlines()]
    assert events.count("cli.interrupted") == 1 and events[-1] == "cli.forced_exit"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_while_importing_a_worker_exits_0_without_starting_it(
    evidence: Path, backend: str, signum: int
) -> None:
    proc = start(evidence, "--backend", backend, "run", f"{JOBS}:worker", SLOW_IMPORT="1")
    wait_for(evidence, "import waiting")
    proc.send_signal(signum)
    note(evidence, "signal sent")
    code, stderr = finish(proc)
    assert code == 0, stderr
    assert lines(evidence) == ["import waiting", "signal sent", "import done"]  # nothing started
    events = [json.loads(line)["event"] for line in stderr.splitlines()]
    assert events == ["cli.interrupted"]
    assert "Traceback" not in stderr


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["job", "batch"])
def test_signal_while_importing_a_job_exits_130_without_running_it(evidence: Path, backend: str, mode: str) -> None:
    args = ["--n", "1"] if mode == "job" else ["--jsonl", "-"]
    proc = start(evidence, "--backend", backend, "run", f"{JOBS}:work", *args, SLOW_IMPORT="1")
    wait_for(evidence, "import waiting")
    proc.send_signal(signal.SIGTERM)
    note(evidence, "signal sent")
    stdout, stderr = proc.communicate('{"n": 2}\n' if mode == "batch" else None, timeout=30)
    assert proc.returncode == 130, stderr
    assert stdout == ""
    assert lines(evidence) == ["import waiting", "signal sent", "import done"]  # no job, no pool
    assert "cli.interrupted" in stderr and "Traceback" not in stderr


def test_second_signal_while_importing_forces_the_exit(evidence: Path) -> None:
    proc = start(evidence, "run", f"{JOBS}:worker", SLOW_IMPORT="1")
    wait_for(evidence, "import waiting")
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGINT)  # another kind: two pending SIGTERMs would be merged into one
    code, stderr = finish(proc, timeout=10)  # never notes "signal sent": only the exit ends it
    assert code == 130
    assert "import done" not in lines(evidence)
    assert [json.loads(line)["event"] for line in stderr.splitlines()] == ["cli.forced_exit"]


@pytest.mark.parametrize("command", [["check"], ["list"], ["graph"]])
def test_signal_while_a_reading_command_imports_interrupts_it_at_once(evidence: Path, command: list[str]) -> None:
    target = str(JOBS) if command != ["graph"] else f"{JOBS}:work"
    proc = start(evidence, *command, target, SLOW_IMPORT="1")
    wait_for(evidence, "import waiting")
    proc.send_signal(signal.SIGINT)
    code, stderr = finish(proc, timeout=10)  # never notes "signal sent": the import is interrupted
    assert code == 130, stderr
    assert "import done" not in lines(evidence)
    assert "Traceback" not in stderr


@pytest.mark.parametrize("backend", BACKENDS)
def test_worker_crash_exits_1_and_logs_the_cause_not_the_group(evidence: Path, backend: str) -> None:
    result = cli(evidence, "--backend", backend, "run", f"{JOBS}:crashing_worker")
    assert result.returncode == 1
    assert lines(evidence) == ["crashing"]
    [failure] = [json.loads(line) for line in result.stderr.splitlines() if "cli.worker_failed" in line]
    assert failure["error"] == "RuntimeError: broker exploded: connection to redis://:***@127.0.0.1:1/0 reset"
    assert failure["exception"]  # the traceback is there too ...
    assert "s3cret-pw" not in result.stderr  # ... and the password is nowhere
    assert '"locals"' not in result.stderr  # frame locals never reach a log line


@pytest.mark.parametrize("log_format", ["json", "console"])
def test_job_failing_with_a_group_logs_every_leaf_cause(evidence: Path, log_format: str) -> None:
    result = cli(evidence, "--log-format", log_format, "run", f"{JOBS}:fail_in_parts")
    assert result.returncode == 1
    [failed] = [line for line in result.stderr.splitlines() if "cli.job_failed" in line]
    assert "ValueError: left part; KeyError: 'right part'" in failed


@pytest.mark.parametrize("log_format", ["json", "console"])
def test_passwords_in_urls_never_reach_a_log_line(evidence: Path, log_format: str) -> None:
    result = cli(evidence, "--log-format", log_format, "run", f"{JOBS}:leak_secret")
    assert result.returncode == 1
    assert "s3cret-pw" not in result.stderr
    assert "postgresql://app:***@db.internal:5432/app" in result.stderr
    assert "job.failed" in result.stderr and "cli.job_failed" in result.stderr


def test_list_shows_a_redis_workers_url_without_its_password(evidence: Path, tmp_path: Path) -> None:
    pytest.importorskip("redis")
    app = tmp_path / "redis_app.py"
    app.write_text(
        "from lifecycle import Worker, job\n"
        "from lifecycle.queues import RedisStreamQueue\n"
        "@job\nasync def ping() -> None: ...\n"
        "worker = Worker(RedisStreamQueue('redis://app:s3cret-pw@127.0.0.1:6379/0', stream='s'), [ping])\n"
    )
    listed = cli(evidence, "list", str(app))
    assert listed.returncode == 0, listed.stderr
    assert "worker  (Worker over RedisStreamQueue at redis://app:***@127.0.0.1:6379/0; concurrency=16)" in listed.stdout
    assert "s3cret-pw" not in listed.stdout + listed.stderr


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["run", f"{JOBS}:worker"], 0),  # the worker is not started
        (["run", f"{JOBS}:work", "--n", "1"], 130),  # nor is the job
        (["list", str(JOBS)], 130),  # a reading command is interrupted
        (["--version"], 130),  # nothing acted on the signal: it still interrupts
    ],
)
def test_signal_during_argument_parsing(evidence: Path, args: list[str], expected: int) -> None:
    """The signal arrives after main() took over the signals but before click parsed the
    arguments (the earliest a signal can be handled at all)."""
    script = (
        "import os, signal, sys\n"
        "from lifecycle import _cli\n"
        "parse = _cli.cli.main\n"
        "def signalled_first(**kw):\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    return parse(**kw)\n"
        "_cli.cli.main = signalled_first\n"
        f"sys.exit(_cli.main({args!r}))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env_for(evidence), timeout=60
    )
    assert result.returncode == expected, result.stderr
    assert lines(evidence) == []  # no pool, no session, no job
    assert "Traceback" not in result.stderr


def test_usage_errors_do_not_show_a_password_either(evidence: Path, tmp_path: Path) -> None:
    app = tmp_path / "connects_at_import.py"
    app.write_text("raise RuntimeError('cannot connect to redis://app:s3cret-pw@cache:6379/0')\n")
    for command in (["run", str(app)], ["check", str(app)], ["list", str(app)]):
        result = cli(evidence, *command)
        assert result.returncode == 2
        assert "importing" in result.stderr and "redis://app:***@cache:6379/0" in result.stderr
        assert "s3cret-pw" not in result.stderr


def test_describe_flattens_nested_groups_and_redact_masks_only_passwords() -> None:
    from lifecycle._cli._logs import describe, redact

    group = ExceptionGroup("outer", [ValueError("a"), ExceptionGroup("inner", [KeyError("k"), TimeoutError()])])
    assert describe(group) == "ValueError: a; KeyError: 'k'; TimeoutError"
    assert describe(RuntimeError("plain")) == "RuntimeError: plain"
    text = "redis://127.0.0.1:6379/0, amqp://guest:guest@h:5672//, redis://:pw@h/1, https://u@h/x?a=b:c@d"
    assert redact(text) == "redis://127.0.0.1:6379/0, amqp://guest:***@h:5672//, redis://:***@h/1, https://u@h/x?a=b:c@d"


# -- --jsonl output, input errors ------------------------------------------------------


def records(stdout: str) -> dict[int, dict[str, object]]:
    """The batch's stdout, one JSON object per line, by input line number."""
    found = [json.loads(line) for line in stdout.splitlines()]
    by_line = {record["line"]: record for record in found}
    assert len(by_line) == len(found)  # one answer per line
    return by_line


@pytest.mark.parametrize("backend", BACKENDS)
def test_jsonl_writes_one_json_object_per_line_to_stdout(evidence: Path, tmp_path: Path, backend: str) -> None:
    payloads = tmp_path / "payloads.jsonl"
    payloads.write_bytes(b'{"n": 1}\n{"n": -2}\nnot json\n\n{"m": 1}\n\xff\xfe{"n": 3}\n[1]\n{"n": 5}')
    result = cli(
        evidence, "--backend", backend, "run", f"{JOBS}:work", "--jsonl", str(payloads), "--concurrency", "3"
    )
    assert result.returncode == 1
    out = records(result.stdout)
    assert sorted(out) == [1, 2, 3, 5, 6, 7, 8]  # the blank line 4 has no answer
    assert out[1] == {"line": 1, "ok": True, "result": "session 1"}
    assert out[8] == {"line": 8, "ok": True, "result": "session 5"}  # the last line needs no newline
    assert out[2] == {"line": 2, "ok": False, "error": "ValueError: negative n: -2"}
    assert out[3]["ok"] is False and str(out[3]["error"]).startswith("JSONDecodeError: ")
    assert out[5]["ok"] is False and str(out[5]["error"]).startswith("PayloadError: ")
    assert out[6]["ok"] is False and str(out[6]["error"]).startswith("UnicodeDecodeError: 'utf-8' codec")
    assert out[7] == {"line": 7, "ok": False, "error": "ValueError: expected a JSON object, got list"}
    summary = [json.loads(line) for line in result.stderr.splitlines() if "cli.batch_summary" in line]
    assert summary[0]["done"] == 2 and [f["line"] for f in summary[0]["failures"]] == [2, 3, 5, 6, 7]
    assert lines(evidence).count("pool up") == 1 and lines(evidence)[-1] == "pool down"


def test_jsonl_results_json_cannot_carry_fall_back_to_repr(evidence: Path) -> None:
    kinds = ["plain", "none", "text", "objects", "nan", "tuple_keys"]
    stdin = "".join(json.dumps({"kind": kind}) + "\n" for kind in kinds)
    result = cli(evidence, "run", f"{JOBS}:shapes", "--jsonl", "-", stdin=stdin)
    assert result.returncode == 0, result.stderr
    got = {kinds[number - 1]: record["result"] for number, record in records(result.stdout).items()}
    assert got["plain"] == {"a": [1, 2.5, None, True]}
    assert got["none"] is None and got["text"] == "just text"
    assert got["objects"] == {"when": "datetime.date(2024, 1, 2)", "ids": [7]}  # repr per value, sets as arrays
    assert got["nan"] == "nan"  # NaN is not JSON: the repr of the whole result
    assert got["tuple_keys"] == "{(1, 2): 'x'}"


def test_jsonl_error_lines_are_redacted(evidence: Path) -> None:
    result = cli(evidence, "run", f"{JOBS}:leak_secret", "--jsonl", "-", stdin="{}\n")
    assert result.returncode == 1
    [record] = records(result.stdout).values()
    assert record["error"] == "ConnectionError: cannot reach postgresql://app:***@db.internal:5432/app"
    assert "s3cret-pw" not in result.stdout + result.stderr


@pytest.mark.parametrize("kind", ["missing", "directory"])
def test_jsonl_input_that_cannot_be_opened_is_a_usage_error(evidence: Path, tmp_path: Path, kind: str) -> None:
    source = tmp_path / "missing.jsonl" if kind == "missing" else tmp_path
    result = cli(evidence, "run", f"{JOBS}:work", "--jsonl", str(source))
    assert result.returncode == 2
    assert f"Invalid value for '--jsonl': cannot read {source}: " in result.stderr
    assert "Traceback" not in result.stderr and "ExceptionGroup" not in result.stderr
    assert lines(evidence) == []  # nothing was set up


# -- the progress line on a terminal ---------------------------------------------------


def render_screen(raw: str) -> list[str]:
    """What a terminal shows after ``raw``: carriage returns, newlines and erase-line;
    other escape sequences (colours) are dropped."""
    rows: list[list[str]] = [[]]
    col = 0
    i = 0
    while i < len(raw):
        escape = re.match(r"\x1b\[[0-9;?]*([A-Za-z])", raw[i:])
        if escape:
            if escape.group(1) == "K":
                del rows[-1][col:]
            i += escape.end()
            continue
        char = raw[i]
        if char == "\r":
            col = 0
        elif char == "\n":
            rows.append([])
            col = 0
        else:
            row = rows[-1]
            row.extend(" " * (col - len(row)))
            if col < len(row):
                row[col] = char
            else:
                row.append(char)
            col += 1
        i += 1
    return ["".join(row) for row in rows]


def run_in_pty(args: list[str], env: dict[str, str], timeout: float = 60) -> tuple[int, str]:
    """Run with stdout and stderr on one pseudo-terminal; the exit code and all it showed."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, env=env)
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.1)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: every writer closed the terminal
                    break
                if not data:
                    break
                chunks.append(data)
        else:
            raise AssertionError(f"still running after {timeout} s: {b''.join(chunks)!r}")
        return proc.wait(timeout), b"".join(chunks).decode("utf-8", "replace")
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("backend", BACKENDS)
def test_progress_line_never_shares_a_row_with_log_or_result_lines(
    evidence: Path, tmp_path: Path, backend: str
) -> None:
    payloads = tmp_path / "payloads.jsonl"
    payloads.write_text("".join(json.dumps({"n": n, "pause": 0.05}) + "\n" for n in range(30)))
    args = [sys.executable, "-m", "lifecycle", "--backend", backend, "run", f"{JOBS}:work"]
    code, raw = run_in_pty([*args, "--jsonl", str(payloads), "--concurrency", "2"], env_for(evidence))
    assert code == 0, raw
    assert re.search(r"\d+ done, 0 failed", raw)  # the progress line was drawn ...
    screen = render_screen(raw)
    assert not [row for row in screen if re.search(r"\d+ done, \d+ failed", row)], screen  # ... and always erased
    logged = [row for row in screen if "job.succeeded" in row]
    assert len(logged) == 30 and all(re.match(r"\d{4}-\d\d-\d\dT", row) for row in logged), screen
    results = [json.loads(row) for row in screen if row.startswith('{"line"')]
    assert sorted(r["line"] for r in results) == list(range(1, 31))
    assert "done: 30, failed: 0" in screen


# -- targets ---------------------------------------------------------------------------


def console_script() -> list[str]:
    """The installed ``lifecycle`` script: unlike ``python -m``, it does not put the
    current directory on sys.path by itself."""
    script = Path(sys.executable).with_name("lifecycle")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-P", "-c", "import sys; from lifecycle._cli import main; sys.exit(main())"]


def test_dotted_targets_are_found_in_the_current_directory(evidence: Path, tmp_path: Path) -> None:
    (tmp_path / "mymod.py").write_text("from lifecycle import job\n@job\nasync def hi(name: str) -> str:\n    return 'hi ' + name\n")
    env = {k: v for k, v in env_for(evidence).items() if k != "PYTHONPATH"}
    ran = subprocess.run([*console_script(), "run", "mymod:hi", "--name", "Ada"], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=60)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout == "hi Ada\n"
    root = JOBS.parent.parent
    listed = subprocess.run([*console_script(), "list", "examples.jobs"], cwd=root, capture_output=True, text=True, env=env, timeout=60)
    assert listed.returncode == 0, listed.stderr
    assert "greet  (examples.jobs:greet" in listed.stdout


def test_a_directory_target_says_what_to_name_instead(evidence: Path) -> None:
    root = JOBS.parent.parent
    package = subprocess.run([sys.executable, "-m", "lifecycle", "run", "lifecycle"], cwd=root, capture_output=True, text=True, env=env_for(evidence), timeout=60)
    assert package.returncode == 2
    assert "no such file" not in package.stderr
    assert "lifecycle defines no jobs/workers; it is a package: name one of its modules, as lifecycle.jobs" in package.stderr
    folder = subprocess.run([sys.executable, "-m", "lifecycle", "list", "examples/"], cwd=root, capture_output=True, text=True, env=env_for(evidence), timeout=60)
    assert folder.returncode == 2
    assert "examples/ is a directory, not a Python file; name a module in it, as a file (examples/celery_app.py)" in folder.stderr
    assert "dotted (examples.celery_app)" in folder.stderr and "examples/jobs.py" in folder.stderr


def test_an_import_error_shows_its_traceback_at_debug_only(evidence: Path, tmp_path: Path) -> None:
    app = tmp_path / "explodes.py"
    app.write_text("def connect():\n    raise RuntimeError('cannot connect to redis://app:s3cret-pw@cache:6379/0')\nconnect()\n")
    for where in ("before", "after"):
        args = ["--log-level", "debug", "run", str(app)] if where == "before" else ["run", str(app), "--log-level", "debug"]
        debug = cli(evidence, "--log-format", "console", *args)
        assert debug.returncode == 2
        assert "cli.import_failed" in debug.stderr and "Traceback" in debug.stderr
        assert 'explodes.py", line 2, in connect' in debug.stderr
        assert "importing" in debug.stderr and "s3cret-pw" not in debug.stderr
    quiet = cli(evidence, "run", str(app))
    assert quiet.returncode == 2 and "Traceback" not in quiet.stderr and "importing" in quiet.stderr


def test_run_without_a_target_is_a_usage_error(evidence: Path) -> None:
    result = cli(evidence, "run")
    assert result.returncode == 2
    assert "Usage: lifecycle run [OPTIONS] [TARGET] [ARGS]..." in result.stderr
    assert "Error: missing TARGET" in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_job_commands_accept_dash_h(evidence: Path, flag: str) -> None:
    result = cli(evidence, "run", f"{JOBS}:convert", flag)
    assert result.returncode == 0, result.stderr
    assert "--count INTEGER" in result.stdout and "-h, --help" in result.stdout


def test_check_counts_and_words_what_it_checked(evidence: Path, tmp_path: Path) -> None:
    one_each = tmp_path / "one_each.py"
    one_each.write_text(
        "from lifecycle import Worker, job\nfrom lifecycle.queues import MemoryQueue\n"
        "@job\nasync def ping() -> None: ...\nworker = Worker(MemoryQueue(), [ping])\n"
    )
    result = cli(evidence, "check", str(one_each))
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"ok: 1 job and 1 worker in {one_each} are valid (2 dependency graphs checked)\n"
    single = tmp_path / "single.py"
    single.write_text("from lifecycle import job\n@job\nasync def ping() -> None: ...\n")
    assert cli(evidence, "check", str(single)).stdout == f"ok: 1 job in {single} is valid (1 dependency graph checked)\n"
    empty = tmp_path / "empty.py"
    empty.write_text("x = 1\n")
    nothing = cli(evidence, "check", str(empty))
    assert nothing.returncode == 0 and "defines no jobs or workers; nothing to check" in nothing.stdout
    broken = tmp_path / "broken.py"
    broken.write_text("from lifecycle import Depends, job\ndef user(user_id: int): ...\n@job\nasync def a(u=Depends(user)): ...\n")
    assert "1 problem in" in cli(evidence, "check", str(broken)).stderr


def test_list_check_and_graph_see_celery_tasks(evidence: Path, tmp_path: Path) -> None:
    pytest.importorskip("celery")
    app = JOBS.parent.parent / "examples" / "celery_app.py"
    listed = cli(evidence, "list", str(app))
    assert listed.returncode == 0, listed.stderr
    assert f"send_welcome  ({app}:send_welcome; Celery task 'send_welcome'; retries=3" in listed.stdout
    assert "dependencies: celery_app:pool [worker], celery_app:connection [job]" in listed.stdout
    checked = cli(evidence, "check", str(app))
    assert checked.returncode == 0, checked.stderr
    assert checked.stdout == f"ok: 1 Celery task in {app} is valid (1 dependency graph checked)\n"
    tree = cli(evidence, "graph", f"{app}:send_welcome")
    assert tree.returncode == 0 and "conn: celery_app:connection  [job scope, async generator]" in tree.stdout
    run = cli(evidence, "run", f"{app}:send_welcome", "--user-id", "1")
    assert run.returncode == 2 and "is a Celery task: start a Celery worker" in run.stderr
    broken = tmp_path / "broken_tasks.py"
    broken.write_text(
        "from celery import Celery\nfrom lifecycle import Depends\nfrom lifecycle.celery import CeleryLifecycle\n"
        "lc = CeleryLifecycle(Celery('t'))\ndef user(user_id: int): ...\n"
        "@lc.task(name='bad')\nasync def bad(u=Depends(user)): ...\n"
    )
    problems = cli(evidence, "check", str(broken))
    assert problems.returncode == 1 and "error: bad: " in problems.stderr and "parameter 'user_id'" in problems.stderr


# -- container options, payload errors -------------------------------------------------


def test_container_options_parse_json_and_fixed_tuples_take_their_values(evidence: Path) -> None:
    result = cli(
        evidence, "run", f"{JOBS}:containers", "--counts", '{"a": 1}', "--pair", "3", "4",
        "--many", "1", "--many", "2", "--matrix", "[1, 2]", "--matrix", "[]", "--by-id", '{"7": 0.5}',
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {
        "counts": {"a": 1}, "pair": [3, 4], "pair_type": "tuple", "many": [1, 2], "many_type": "tuple",
        "matrix": [[1, 2], []], "by_id": {"7": 0.5},
    }  # fmt: skip
    helped = cli(evidence, "run", f"{JOBS}:containers", "-h")
    assert "--counts JSON-OBJECT" in helped.stdout and "--pair <INTEGER INTEGER>" in helped.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--counts", "notjson"], "Invalid value for '--counts': 'notjson' is not JSON"),
        (["--counts", "[1]"], "Invalid value for '--counts': '[1]': expected a JSON object, got an array"),
        (["--counts", '{"a": "x"}'], "'x' at ['a'] is not an int; expected dict[str, int]"),
        (["--counts", '{"a": true}'], "True at ['a'] is not an int"),
        (["--pair", "3"], "Option '--pair' requires 2 arguments"),
        (["--pair", "3", "x"], "Invalid value for '--pair'"),
        (["--matrix", "[1, 'a']"], "Invalid value for '--matrix'"),
        (["--matrix", '["a"]'], "'a' at [0] is not an int"),
        (["--by-id", '{"x": 1}'], "key 'x' is not an integer"),
    ],
)
def test_bad_container_options_are_usage_errors_naming_the_option(
    evidence: Path, args: list[str], message: str
) -> None:
    result = cli(evidence, "run", f"{JOBS}:containers", *args)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr


def test_payload_error_from_options_is_a_usage_error(evidence: Path) -> None:
    bad = cli(evidence, "run", f"{JOBS}:positive", "--n", "0")
    assert bad.returncode == 2, bad.stderr
    assert "Usage: lifecycle run" in bad.stderr and "Error: job 'positive' (cli_jobs:positive)" in bad.stderr
    assert "job.failed" not in bad.stderr and "cli.job_failed" not in bad.stderr
    good = cli(evidence, "run", f"{JOBS}:positive", "--n", "2")
    assert good.returncode == 0 and good.stdout == "2\n"
