"""Exactly one run per tick across a fleet, in real time, through the real command line.

For each queue backend present, three ``lifecycle run tests/schedule_app.py:worker``
processes drive one schedule ticking every second (``catch_up="latest"``). In the
middle, one worker is SIGKILLed (between two ticks, so it holds no message) and later
restarted. Every run appends its tick to an evidence file; the test then counts runs
per tick: each tick from the first to the last exactly once, none missing, over at
least ``TICKS`` ticks. The fleets of all backends run at the same time, so the test
takes about ``TICKS`` seconds whatever the number of backends.

What it proves per backend: the de-duplication key makes one message per tick
although three schedulers enqueue every tick (and a restarted one enqueues the latest
past tick again, as catch-up); a fleet that lost a worker keeps ticking; no tick is lost
across the kill and the restart."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from support import REDIS_URL, require_service

APP = Path(__file__).with_name("schedule_app.py")
TICKS = 22  # ticks counted per backend, one a second
KILL_AT, RESTART_AT = 7, 12  # the victim is killed after this many ticks, restarted after that many
DEADLINE = 240.0  # seconds for everything: generous, the machine may be loaded


@dataclass
class Fleet:
    name: str
    url: str
    evidence: Path
    workers: list[subprocess.Popen[str]] = field(default_factory=list)
    killed: subprocess.Popen[str] | None = None
    restarted: bool = False
    done: bool = False

    def start_worker(self) -> subprocess.Popen[str]:
        env = {**os.environ, "EVIDENCE": str(self.evidence), "QUEUE_URL": self.url, "EVERY": "1"}
        env.pop("CI", None)  # the worker app has nothing to skip; keep the env otherwise
        return subprocess.Popen(
            [sys.executable, "-m", "lifecycle", "--log-level", "warning", "run", f"{APP}:worker"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )

    def ticks(self) -> list[float]:
        if not self.evidence.exists():
            return []
        return [float(line.split()[0]) for line in self.evidence.read_text().splitlines() if line.strip()]

    def distinct(self) -> int:
        return len(set(self.ticks()))


def redis_fleet(tmp_path: Path) -> Iterator[Fleet]:
    def ping() -> None:
        import redis

        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()

    require_service("Redis", ping)
    stream = f"lifecycle-fleet-{uuid.uuid4().hex[:12]}"
    yield Fleet("redis", f"{REDIS_URL}?stream={stream}&claim_idle=5", tmp_path / "redis.evidence")
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    client.delete(stream, f"{stream}:dead", f"{stream}:delayed", f"{stream}:delayed:ids")
    for key in client.scan_iter(match=f"{stream}:dedup:*"):
        client.delete(key)
    client.close()


def sqlite_fleet(tmp_path: Path) -> Iterator[Fleet]:
    yield Fleet("sqlite", f"sqlite:///{tmp_path / 'fleet.db'}?lease=5", tmp_path / "sqlite.evidence")


def postgres_fleet(tmp_path: Path) -> Iterator[Fleet]:
    import anyio
    from harnesses.postgres import POSTGRES_DSN, check_postgres, drop_tables

    require_service("PostgreSQL", check_postgres)
    table = f"fleet_{uuid.uuid4().hex[:12]}"
    yield Fleet("postgres", f"{POSTGRES_DSN}?table={table}&lease=5", tmp_path / "postgres.evidence")
    anyio.run(drop_tables, table)


def nats_fleet(tmp_path: Path) -> Iterator[Fleet]:
    import anyio
    from harnesses.nats import delete_streams, nats_url

    url = nats_url()
    stream = f"lifecycle-fleet-{uuid.uuid4().hex[:12]}"
    yield Fleet("nats", f"{url}?stream={stream}&subject=fleet.{stream}&lease=5", tmp_path / "nats.evidence")
    anyio.run(delete_streams, url, stream)


def rabbit_fleet(tmp_path: Path) -> Iterator[Fleet]:
    import anyio
    from harnesses.rabbit import RABBIT_URL, delete_queues, reachable

    require_service("RabbitMQ", reachable)
    name = f"lifecycle-fleet-{uuid.uuid4().hex[:12]}"
    yield Fleet("rabbitmq", f"{RABBIT_URL}?queue={name}", tmp_path / "rabbit.evidence")
    anyio.run(delete_queues, RABBIT_URL, name)


FLEETS: list[Callable[[Path], Iterator[Fleet]]] = [redis_fleet, sqlite_fleet, postgres_fleet, nats_fleet, rabbit_fleet]


def test_three_workers_run_each_tick_once_through_a_kill_and_a_restart(tmp_path: Path) -> None:
    makers = [maker(tmp_path) for maker in FLEETS]
    fleets = [next(made) for made in makers]
    try:
        for fleet in fleets:
            fleet.workers = [fleet.start_worker() for _ in range(3)]
        drive(fleets)
        for fleet in fleets:
            for worker in fleet.workers:
                worker.send_signal(signal.SIGINT)
            codes = [worker.wait(timeout=60) for worker in fleet.workers]
            assert codes == [0, 0, 0], (fleet.name, [w.stderr.read() if w.stderr else "" for w in fleet.workers])
    finally:
        for fleet in fleets:
            for worker in [*fleet.workers, *([fleet.killed] if fleet.killed else [])]:
                worker.kill()
                worker.communicate()
        for made in makers:
            next(made, None)
    for fleet in fleets:
        runs = Counter(fleet.ticks())
        ticks = sorted(runs)
        twice = {tick: count for tick, count in runs.items() if count != 1}
        assert not twice, f"{fleet.name}: ticks run more than once: {twice}"
        missing = [t for t in range(int(ticks[0]), int(ticks[-1]) + 1) if float(t) not in runs]
        assert not missing, f"{fleet.name}: ticks never run: {missing}"
        assert len(ticks) >= TICKS, fleet.name
        assert fleet.killed is not None and fleet.killed.returncode == -signal.SIGKILL
        assert fleet.restarted


def drive(fleets: list[Fleet]) -> None:
    """Poll every fleet: kill a worker between two ticks, restart it, stop at TICKS."""
    deadline = time.monotonic() + DEADLINE
    while not all(fleet.done for fleet in fleets):
        assert time.monotonic() < deadline, {f.name: f.distinct() for f in fleets}
        for fleet in fleets:
            for worker in fleet.workers:
                if worker.poll() is not None:
                    pytest.fail(f"{fleet.name}: a worker exited with {worker.returncode}: {worker.stderr.read()}")  # type: ignore[union-attr]
            ticks = fleet.ticks()
            seen = len(set(ticks))
            if fleet.killed is None and seen >= KILL_AT and time.time() - ticks[-1] >= 0.4:
                # Between two ticks: the last one's run was recorded (and acked just
                # after), the next is not due for another half second.
                victim = fleet.workers.pop(0)
                victim.send_signal(signal.SIGKILL)
                victim.wait(timeout=30)
                fleet.killed = victim
            elif fleet.killed is not None and not fleet.restarted and seen >= RESTART_AT:
                fleet.workers.append(fleet.start_worker())
                fleet.restarted = True
            elif fleet.restarted and seen >= TICKS + 1:
                fleet.done = True
        time.sleep(0.05)
