"""The chaos tests' machinery: a private ``redis-server`` that can be killed -9 and
restarted in place (the other brokers' private servers are in ``servers.py``), worker
processes of any queue backend that can be killed and respawned, and the counts the
tests assert on.

Everything here is synchronous: the test process only injects faults and polls, while
the workers under test run in their own processes (``tests/queue_worker_app.py``)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import pytest
import redis

APP = Path(__file__).parent.parent / "queue_worker_app.py"
GROUP = "workers"
RESULTS_ENV = "LIFECYCLE_CHAOS_RESULTS"  # a file to append each scenario's figures to (JSON lines)


def require_redis_server() -> None:
    """Skip with the reason when there is no ``redis-server`` binary; under CI=true,
    fail instead (as ``require_service`` in tests/conftest.py does for services)."""
    if shutil.which("redis-server") is not None:
        return
    message = "redis-server is not installed (apt-get install redis-server); the chaos tests start their own"
    if os.environ.get("CI"):
        pytest.fail(f"{message} (CI=true: a missing service is a failure, not a skip)")
    pytest.skip(message)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no {path.name})"


class Server(Protocol):
    """What the worker pool needs of a broker server: the URL its workers connect to."""

    @property
    def url(self) -> str: ...


class RedisServer:
    """A ``redis-server`` of the test's own on a free loopback port, never the shared one.

    ``appendonly=True`` runs it with ``appendfsync always``: Redis fsyncs every write
    before it answers, so a kill -9 loses nothing a client saw acknowledged. Without it
    nothing is persisted unless the test asks for a snapshot (``BGSAVE``): a kill -9
    then brings back the last snapshot, or an empty server."""

    def __init__(self, directory: Path, *, appendonly: bool) -> None:
        self.dir = directory
        self.appendonly = appendonly
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.kills = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self, **options: Any) -> redis.Redis:
        """A new synchronous client (bytes in and out unless told otherwise)."""
        options.setdefault("socket_timeout", 30)
        return redis.Redis(host="127.0.0.1", port=self.port, **options)

    def start(self) -> None:
        """Start on a fresh free port (retrying if another process took it meanwhile)."""
        for _ in range(5):
            self.port = free_port()
            if self._launch():
                return
        raise RuntimeError(f"redis-server did not start; its log:\n{tail(self.dir / 'redis.log')}")

    def restart(self) -> None:
        """Start again on the same port and directory (after ``kill``)."""
        if not self._launch():
            raise RuntimeError(f"redis-server did not restart on {self.port}; its log:\n{tail(self.dir / 'redis.log')}")

    def kill(self) -> None:
        """kill -9: no shutdown, no final save; whatever was not yet on disk is gone."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.proc = None
        self.kills += 1

    def stop(self) -> None:
        """SIGTERM by pid (SIGKILL if it does not go within 10 s)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def _launch(self) -> bool:
        args = [
            "redis-server",
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--dir", str(self.dir),
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", "always",
            "--enable-debug-command", "local",  # DEBUG SLEEP; refused by default since Redis 7
            "--logfile", str(self.dir / "redis.log"),
            "--daemonize", "no",
        ]  # fmt: skip
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # Ready when its log says so (after loading its data), not when the port answers:
        # whoever holds the port when this one cannot bind it would answer too.
        ready = f"{self.proc.pid}:M "
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:  # the port was taken, say
                self.proc = None
                return False
            log = (self.dir / "redis.log").read_text(errors="replace") if (self.dir / "redis.log").exists() else ""
            if any(line.startswith(ready) and "Ready to accept connections" in line for line in log.splitlines()):
                client = self.client(socket_timeout=5, socket_connect_timeout=5)
                try:
                    return bool(client.ping())
                finally:
                    client.close()
            time.sleep(0.02)
        self.proc.kill()
        self.proc.wait(10)
        self.proc = None
        return False


@dataclass
class WorkerPool:
    """Worker processes (``tests/queue_worker_app.py``) on one stream (or table, or queue: the
    backend is the server URL's scheme), each logging to its own file."""

    server: Server
    stream: str
    directory: Path
    env: dict[str, str] = field(default_factory=dict)
    live: list[subprocess.Popen[bytes]] = field(default_factory=list)
    killed: int = 0
    spawned: int = 0

    @property
    def records(self) -> Path:
        path = self.directory / "records"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def spawn(self, count: int = 1) -> None:
        for _ in range(count):
            self.spawned += 1
            log = open(self.directory / f"worker-{self.spawned}.log", "wb")  # noqa: SIM115 - the child owns it
            proc = subprocess.Popen(
                [sys.executable, str(APP), self.server.url, self.stream],
                env={**os.environ, "RECORD_DIR": str(self.records), **self.env},
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
            log.close()
            proc.log_path = log.name  # type: ignore[attr-defined]
            self.live.append(proc)

    def kill(self, proc: subprocess.Popen[bytes]) -> None:
        """SIGKILL one worker: what it had in flight stays pending until its lease expires."""
        self.live.remove(proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        self.killed += 1

    def check_alive(self) -> None:
        """Fail if a worker exited on its own: a fault must never end one."""
        for proc in self.live:
            if proc.poll() is not None:
                raise AssertionError(
                    f"worker pid {proc.pid} exited with {proc.returncode} during the fault; its log:\n"
                    f"{tail(Path(proc.log_path))}"  # type: ignore[attr-defined]
                )

    def ready(self, proc: subprocess.Popen[bytes]) -> bool:
        """Has this worker logged ``worker.started`` (its signal handlers are in place)?"""
        return '"event": "worker.started"' in Path(proc.log_path).read_text(errors="replace")  # type: ignore[attr-defined]

    def stop(self) -> None:
        """Graceful SIGTERM to every live worker; each must exit 0. A worker still
        starting up (a fresh respawn) is waited for: before its signal handler is in
        place a SIGTERM would just kill it."""
        wait_until(lambda: all(self.ready(proc) for proc in self.live), timeout=60, pool=self, what="workers started")
        for proc in self.live:
            proc.send_signal(signal.SIGTERM)
        for proc in self.live:
            code = proc.wait(60)
            assert code == 0, f"worker pid {proc.pid} exited with {code} after SIGTERM:\n{tail(Path(proc.log_path))}"  # type: ignore[attr-defined]
        self.live.clear()

    def cleanup(self) -> None:
        for proc in self.live:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)
        self.live.clear()

    def executions(self, kind: str = "count") -> Counter[int]:
        """How many times each message index ran (lines ``<kind> <i>`` in every record file)."""
        counts: Counter[int] = Counter()
        for path in self.records.glob("*.log"):
            for line in path.read_text().splitlines():
                name, _, index = line.partition(" ")
                if name == kind:
                    counts[int(index)] += 1
        return counts

    def events(self, name: str) -> int:
        """How many times the workers logged event ``name``."""
        total = 0
        for path in self.directory.glob("worker-*.log"):
            total += path.read_text(errors="replace").count(f'"event": "{name}"')
        return total


def enqueue_counts(client: redis.Redis, stream: str, indexes: Iterable[int], *, job: str = "count") -> list[bytes]:
    """XADD messages in the queue's wire format, pipelined (much faster than one
    enqueue call each); returns their ids."""
    now = repr(time.time())
    ids: list[bytes] = []
    batch = list(indexes)
    for start in range(0, len(batch), 1000):
        with client.pipeline(transaction=False) as pipe:
            for i in batch[start : start + 1000]:
                pipe.xadd(stream, {"job": job, "payload": json.dumps({"i": i}), "attempt": "1", "enqueued_at": now})
            ids.extend(pipe.execute())
    return ids


def pending(client: redis.Redis, stream: str) -> int:
    try:
        info: Any = client.xpending(stream, GROUP)
    except redis.ResponseError:  # NOGROUP: no group, so nothing pending
        return 0
    return int(info["pending"])


def field_text(value: bytes) -> str:
    """A dead-letter field as text: JSON-encoded or plain, whichever the queue wrote."""
    text = value.decode("utf-8", "replace")
    try:
        decoded = json.loads(text)
    except ValueError:
        return text
    return decoded if isinstance(decoded, str) else text


def dead_letters(client: redis.Redis, stream: str) -> list[dict[str, str]]:
    """Every dead letter's ``reason`` and ``message_id``, oldest first."""
    entries: Any = client.xrange(f"{stream}:dead")
    return [
        {key: field_text(fields.get(key.encode(), b"")) for key in ("reason", "message_id")}
        | {"dead_letter_id": entry_id.decode()}
        for entry_id, fields in entries
    ]


def wait_until(
    condition: Callable[[], bool], *, timeout: float, pool: WorkerPool | None, what: str, every: float = 0.2
) -> float:
    """Poll ``condition`` until true (returns the seconds it took); meanwhile fail at once
    if a worker exits. ``what`` describes the condition for the timeout message."""
    started = time.monotonic()
    while True:
        if pool is not None:
            pool.check_alive()
        try:
            if condition():
                return time.monotonic() - started
        except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
            pass  # the test's own probe hit the fault being injected
        if time.monotonic() - started > timeout:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(every)


def assert_settled(client: redis.Redis, stream: str) -> None:
    """Nothing left anywhere: no pending entry, an empty stream, no delayed retry."""
    assert pending(client, stream) == 0, client.xpending(stream, GROUP)
    assert client.xlen(stream) == 0
    assert client.zcard(f"{stream}:delayed") == 0


def report(scenario: str, **figures: Any) -> None:
    """Print a scenario's figures (seen with ``-s``) and append them to the results file
    named by LIFECYCLE_CHAOS_RESULTS, from which benchmarks/RESULTS.md is written."""
    line = json.dumps({"scenario": scenario, **figures})
    print(f"\nchaos {line}")
    path = os.environ.get(RESULTS_ENV)
    if path:
        with open(path, "a") as out:
            out.write(line + "\n")
