"""The real command line, run as a subprocess, on both backends."""

import json
import os
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
    assert any(r["event"] == "cli.job_failed" and r.get("exception") for r in records)
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
    assert "2 problem(s)" in result.stderr
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
    assert seen.count("session up {'n': 0, 'pause': 60}") + seen.count("session up {'n': 1, 'pause': 60}") == 2
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
