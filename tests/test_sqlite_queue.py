"""SqliteQueue beyond the shared contract (tests/test_queue_contract.py): worker
processes sharing one database file, SIGKILLed mid-job and mid-write; malformed rows;
errors at open; ``queue_from_url``; the ``worker`` and ``dead`` commands."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import click
import pytest
import structlog
from click.testing import CliRunner

from lifecycle import LifecycleError, StartupError, Worker, job
from lifecycle._cli._queues import dead_command, worker_command
from lifecycle.queues import BrokerUnavailable, MemoryQueue, SqliteQueue, queue_from_url
from lifecycle.queues._sqlite import check_sqlite_version

ROOT = Path(__file__).resolve().parent.parent
APP = ROOT / "tests" / "sqlite_worker_app.py"


# -- helpers --------------------------------------------------------------------------------


def lines(directory: Path, what: str) -> list[str]:
    """Every line of ``<what>-<pid>`` evidence files in ``directory``."""
    found: list[str] = []
    for path in directory.glob(f"{what}-*"):
        found += path.read_text().splitlines()
    return found


def by_process(directory: Path, what: str) -> dict[int, list[str]]:
    return {int(path.name.rsplit("-", 1)[1]): path.read_text().splitlines() for path in directory.glob(f"{what}-*")}


def wait_for(condition: Callable[[], bool], limit: float, what: str) -> None:
    deadline = time.monotonic() + limit
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {limit} s waiting for {what}")
        time.sleep(0.05)


def start(mode: str, db: Path, evidence: Path, **env: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, str(APP), mode, str(db), str(evidence)],
        env={**os.environ, **env},
        cwd=ROOT,
        stderr=subprocess.PIPE,
    )


def stop(process: subprocess.Popen[bytes], limit: float = 30) -> int:
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(limit)
    finally:
        if process.poll() is None:
            process.kill()


def counts(db: Path) -> dict[str, int]:
    async def main() -> dict[str, int]:
        queue = SqliteQueue(db)
        try:
            return await queue.counts()
        finally:
            await queue.close()

    return anyio.run(main)


def fill(db: Path, name: str, payloads: list[dict[str, Any]]) -> None:
    async def main() -> None:
        queue = SqliteQueue(db)
        await queue.enqueue_many(name, payloads)
        await queue.close()

    anyio.run(main)


@pytest.fixture
def evidence(tmp_path: Path) -> Path:
    directory = tmp_path / "evidence"
    directory.mkdir()
    return directory


# -- several processes ----------------------------------------------------------------------


def test_a_sigkilled_workers_jobs_are_completed_by_another_process(tmp_path: Path, evidence: Path) -> None:
    db = tmp_path / "queue.db"
    fill(db, "slow", [{"i": i, "seconds": 0.5} for i in range(60)])
    first = start("worker", db, evidence, CONCURRENCY="20", LEASE="1.0")
    try:
        wait_for(lambda: len(lines(evidence, "started")) >= 20, 60, "the first worker to start 20 jobs")
    finally:
        first.kill()
        first.wait(30)
    cut_short = set(lines(evidence, "started")) - set(lines(evidence, "done"))
    assert cut_short, "the first worker was killed holding jobs"
    second = start("worker", db, evidence, CONCURRENCY="20", LEASE="1.0")
    try:
        wait_for(lambda: set(lines(evidence, "done")) >= {str(i) for i in range(60)}, 90, "every job to finish")
    finally:
        assert stop(second) == 0
    finished_by = by_process(evidence, "done")
    assert cut_short <= set(finished_by[second.pid])  # taken over once their leases expired
    assert counts(db) == {"ready": 0, "delayed": 0, "leased": 0, "dead": 0}


def test_three_processes_drain_thirty_thousand_jobs_each_exactly_once(tmp_path: Path, evidence: Path) -> None:
    db = tmp_path / "queue.db"
    total = 30_000
    fill(db, "count", [{"i": i} for i in range(total)])
    started = time.monotonic()
    workers = [start("worker", db, evidence, CONCURRENCY="32", LEASE="10") for _ in range(3)]
    try:
        wait_for(lambda: len(lines(evidence, "done")) >= total, 120, f"{total} jobs to be done")
        elapsed = time.monotonic() - started
    finally:
        codes = [stop(worker) for worker in workers]
    assert codes == [0, 0, 0]
    done = lines(evidence, "done")
    assert len(done) == total and set(done) == {str(i) for i in range(total)}  # each exactly once
    shares = [len(found) for found in by_process(evidence, "done").values()]
    assert len(shares) == 3 and min(shares) > 0, shares  # all three took part
    assert counts(db) == {"ready": 0, "delayed": 0, "leased": 0, "dead": 0}
    print(f"3 processes drained {total} jobs in {elapsed:.1f} s ({total / elapsed:.0f} jobs/s); shares {shares}")


def test_the_database_survives_kill_9_mid_write_with_nothing_lost(tmp_path: Path, evidence: Path) -> None:
    db = tmp_path / "queue.db"
    for run in range(5):
        process = start("churn", db, evidence, START=str(run * 1_000_000), BACKEND=("asyncio", "trio")[run % 2])
        goal = len(lines(evidence, "churn")) + 400  # about 100 enqueues and 100 settles
        wait_for(lambda goal=goal: len(lines(evidence, "churn")) > goal, 60, "the churn process to get going")
        time.sleep(0.05 + 0.1 * run)
        process.kill()
        process.wait(30)
    enqueued, attempted, settled = {}, set(), {}
    for path in evidence.glob("churn-*"):
        for line in path.read_text().splitlines():
            kind, *rest = line.split()
            if kind == "enq":
                enqueued[int(rest[0])] = rest[1]
            elif kind == "settle":
                attempted.add((rest[0], int(rest[1])))
            elif kind == "settled":
                settled[(rest[0], int(rest[1]))] = rest[2] == "True"
    assert len(enqueued) >= 5 * 100

    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    live: dict[int, list[int]] = {}
    for payload, attempt in conn.execute("SELECT payload, attempt FROM lifecycle_messages"):
        live.setdefault(json.loads(payload)["i"], []).append(attempt)
    dead = [json.loads(text)["payload"]["i"] for (text,) in conn.execute("SELECT record FROM lifecycle_dead_letters")]
    conn.close()
    assert len(dead) == len(set(dead))
    for i in enqueued:
        copies = len(live.get(i, [])) + dead.count(i)
        acked = ("ack", i) in attempted
        # Never two copies; none only if an ack was at least attempted (it may have
        # committed just before the kill); a retried or dead-lettered one is still there.
        assert copies == 1 or (acked and copies == 0), (i, live.get(i), i in dead, acked)
        if settled.get(("ack", i)):
            assert copies == 0
        if settled.get(("retry", i)):  # back as attempt 2, unless that one was acked since
            assert live.get(i) == [2] or acked
        if settled.get(("dead_letter", i)):
            assert i in dead and i not in live
    # At most one message per killed run can be in the database without its record.
    assert len(set(live) - set(enqueued)) <= 5


# -- malformed rows ------------------------------------------------------------------------

BAD_ROWS: list[tuple[str, tuple[str, ...], str]] = [
    ("not JSON", ("'count'", "'{not json'", "1", "1700000000"), "payload: payload is not JSON"),
    ("too deep", ("'count'", f"'{'[' * 100}{']' * 100}'", "1", "1700000000"), "payload: payload nests deeper"),
    ("not UTF-8", ("'count'", "CAST(x'ff' AS TEXT)", "1", "1700000000"), "payload: payload is not valid UTF-8"),
    ("attempt text", ("'count'", "'{\"i\": 1}'", "'x'", "1700000000"), "attempt: not a positive integer"),
    ("attempt zero", ("'count'", "'{\"i\": 1}'", "0", "1700000000"), "attempt: not a positive integer"),
    ("empty job", ("''", "'{\"i\": 1}'", "1", "1700000000"), "job: empty"),
    ("attempt fraction", ("'count'", "'{\"i\": 1}'", "1.5", "1700000000"), "attempt: not a positive integer: 1.5"),
    ("job not UTF-8", ("x'ff00'", "'{\"i\": 1}'", "1", "1700000000"), "job: not valid UTF-8"),
    ("time text", ("'count'", "'{\"i\": 1}'", "1", "'yesterday'"), "enqueued_at: not a finite time"),
]


@pytest.mark.anyio
async def test_malformed_rows_inserted_by_hand_become_dead_letters(tmp_path: Path) -> None:
    db = tmp_path / "queue.db"
    queue = SqliteQueue(db, lease=5, poll_interval=0.02)
    await queue.open()
    conn = sqlite3.connect(db, isolation_level=None)
    for _, (job_sql, payload_sql, attempt_sql, time_sql), _ in BAD_ROWS:
        conn.execute(
            "INSERT INTO lifecycle_messages (queue, job, payload, attempt, enqueued_at, run_at) "
            f"VALUES ('jobs', {job_sql}, {payload_sql}, {attempt_sql}, {time_sql}, 0)"
        )
    conn.close()
    await queue.enqueue("count", {"i": 7})
    ran: list[int] = []

    @job(name="count")
    def count(i: int) -> None:
        ran.append(i)

    worker = Worker(queue, [count], concurrency=1, poll_interval=0.05)  # one at a time: in order
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker.run)
        with anyio.fail_after(30):
            while (await queue.counts())["dead"] < len(BAD_ROWS) or not ran:
                await anyio.sleep(0.05)
        worker.stop()
    assert ran == [7]
    assert await queue.counts() == {"ready": 0, "delayed": 0, "leased": 0, "dead": len(BAD_ROWS)}
    records = list(reversed(await queue.dead_letters()))  # oldest first: in insertion order
    assert [r["reason"] for r in records] == ["malformed"] * len(BAD_ROWS)
    for (label, _, why), record in zip(BAD_ROWS, records, strict=True):
        assert why in record["error"], (label, record["error"])
        assert set(record) >= {"raw:job", "raw:payload", "raw:attempt", "raw:enqueued_at"}, label
    assert records[0]["raw:payload"] == b"{not json"  # the stored value, exactly
    assert records[3]["raw:attempt"] == b"x"
    assert records[6]["raw:attempt"] == 1.5 and records[7]["raw:job"] == b"\xff\x00"
    assert await queue.replay([r["dead_letter_id"] for r in records]) == 0  # nothing to run
    assert await queue.purge() == len(BAD_ROWS)
    await queue.close()


@pytest.mark.anyio
async def test_a_malformed_delivery_cannot_be_retried(tmp_path: Path) -> None:
    queue = SqliteQueue(tmp_path / "queue.db")
    await queue.open()
    conn = sqlite3.connect(tmp_path / "queue.db", isolation_level=None)
    conn.execute(
        "INSERT INTO lifecycle_messages (queue, job, payload, enqueued_at, run_at) VALUES ('jobs', 'x', '{', 1, 0)"
    )
    conn.close()
    [delivery] = await queue.receive(1, 1)
    assert delivery.malformed is not None
    with pytest.raises(ValueError, match="cannot be retried; dead-letter it"):
        await queue.retry(delivery, 0, "E")
    assert await queue.release(delivery) is True  # given back as it was
    [again] = await queue.receive(1, 1)
    assert again.malformed == delivery.malformed and again.deliveries == 1
    await queue.close()


# -- the rest of its behaviour --------------------------------------------------------------


@pytest.mark.anyio
async def test_an_enqueue_through_the_same_object_wakes_a_waiting_receive(tmp_path: Path) -> None:
    queue = SqliteQueue(tmp_path / "queue.db", poll_interval=30)
    await queue.open()
    got: list[Any] = []

    async def receive() -> None:
        got.extend(await queue.receive(1, 20))

    started = time.monotonic()
    async with anyio.create_task_group() as tg:
        tg.start_soon(receive)
        await anyio.sleep(0.1)
        await queue.enqueue("count", {"i": 1})
    assert [d.payload for d in got] == [{"i": 1}]
    assert time.monotonic() - started < 10  # not the 30 s poll
    await queue.close()


@pytest.mark.anyio
async def test_a_lease_that_expired_while_still_held_here_is_not_handed_out_here_again(tmp_path: Path) -> None:
    queue = SqliteQueue(tmp_path / "queue.db", lease=0.3, poll_interval=0.02)
    await queue.enqueue("count", {"i": 1})
    [held] = await queue.receive(1, 1)
    await anyio.sleep(0.6)  # the lease expired (a slow renewal); the job still runs here
    assert await queue.receive(1, 0.2) == []
    assert await queue.renew([held]) == []  # nobody took it: still this consumer's
    assert await queue.ack(held) is True
    await queue.enqueue("count", {"i": 2})
    [dropped] = await queue.receive(1, 1)
    assert await queue.renew([]) == []
    queue._held.discard(dropped.id)  # as if the worker gave up on it without settling
    await anyio.sleep(0.6)
    [again] = await queue.receive(1, 1)  # then this consumer takes it over like any other
    assert (again.id, again.deliveries) == (dropped.id, 2)
    assert await queue.ack(dropped) is False and await queue.ack(again) is True
    await queue.close()


@pytest.mark.anyio
async def test_queues_of_different_names_share_a_file_without_mixing(tmp_path: Path) -> None:
    emails = SqliteQueue(tmp_path / "queue.db", name="emails")
    reports = SqliteQueue(tmp_path / "queue.db", name="reports")
    await emails.enqueue("send", {"to": "ada"})
    await reports.enqueue("build", {"n": 1}, delay=60)
    assert await reports.receive(10, 0) == []
    [delivery] = await emails.receive(10, 0)
    assert delivery.job == "send"
    assert await reports.ack(delivery) is False  # not that queue's message
    assert await emails.ack(delivery) is True
    assert await reports.counts() == {"ready": 0, "delayed": 1, "leased": 0, "dead": 0}
    for queue in (emails, reports):
        await queue.close()


@pytest.mark.anyio
async def test_a_database_locked_beyond_busy_timeout_is_broker_unavailable(tmp_path: Path) -> None:
    db = tmp_path / "queue.db"
    queue = SqliteQueue(db, busy_timeout=0.2)
    blocker = sqlite3.connect(db, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    with pytest.raises(BrokerUnavailable, match="SQLITE_BUSY.*database is locked"):
        await queue.open()  # the schema needs the write lock too
    blocker.execute("ROLLBACK")
    await queue.open()
    blocker.execute("BEGIN IMMEDIATE")
    with pytest.raises(BrokerUnavailable, match=r"enqueue of job 'count'.*queue.db"):
        await queue.enqueue("count", {"i": 1})
    blocker.execute("ROLLBACK")
    await queue.enqueue("count", {"i": 1})
    [delivery] = await queue.receive(1, 1)
    blocker.execute("BEGIN IMMEDIATE")
    with pytest.raises(BrokerUnavailable):
        await queue.ack(delivery)
    blocker.execute("ROLLBACK")
    assert await queue.ack(delivery) is True  # still ours: settled once the lock is free
    blocker.close()
    await queue.close()


@pytest.mark.anyio
async def test_open_fails_clearly_for_a_bad_path_or_a_file_that_is_not_a_database(tmp_path: Path) -> None:
    with pytest.raises(LifecycleError, match="unable to open database file; check that the path") as missing:
        await SqliteQueue(tmp_path / "no such dir" / "q.db").open()
    assert not isinstance(missing.value, BrokerUnavailable)
    (tmp_path / "text.db").write_text("hello, I am not a database" * 100)
    with pytest.raises(LifecycleError, match="file is not a database; the file exists but is not a SQLite"):
        await SqliteQueue(tmp_path / "text.db").open()
    conn = sqlite3.connect(tmp_path / "other.db")
    conn.execute("CREATE TABLE lifecycle_messages (id INTEGER PRIMARY KEY, name TEXT)")
    conn.commit()
    conn.close()
    with pytest.raises(LifecycleError, match=r"lacks the columns \['attempt'"):
        await SqliteQueue(tmp_path / "other.db").open()


@pytest.mark.anyio
async def test_a_worker_on_an_unopenable_database_fails_at_start_up(tmp_path: Path) -> None:
    @job
    def noop() -> None:
        pass

    worker = Worker(SqliteQueue(tmp_path / "missing" / "q.db"), [noop])
    with pytest.raises(StartupError, match="queue could not be opened.*missing"):
        await worker.run()


def test_bad_arguments_are_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for option in ("lease", "poll_interval", "busy_timeout"):
        with pytest.raises(ValueError, match=f"SqliteQueue {option} must be a positive number"):
            SqliteQueue(tmp_path / "q.db", **{option: 0})
    with pytest.raises(ValueError, match="synchronous must be"):
        SqliteQueue(tmp_path / "q.db", synchronous="sometimes")
    with pytest.raises(ValueError, match="name must not be empty"):
        SqliteQueue(tmp_path / "q.db", name="")
    with pytest.raises(LifecycleError, match=r"needs SQLite >= 3.35.0 .* uses SQLite 3.31.1"):
        check_sqlite_version((3, 31, 1))
    monkeypatch.setattr(sqlite3, "sqlite_version_info", (3, 34, 0))
    with pytest.raises(LifecycleError, match="UPDATE ... RETURNING"):
        SqliteQueue(tmp_path / "q.db")


@pytest.mark.anyio
async def test_bad_enqueue_and_dead_letter_arguments_are_refused(tmp_path: Path) -> None:
    queue = SqliteQueue(tmp_path / "q.db")
    with pytest.raises(ValueError, match="attempt must be an integer >= 1"):
        await queue.enqueue("count", {}, attempt=0)
    with pytest.raises(ValueError, match="must be finite"):
        await queue.enqueue("count", {}, delay=float("inf"))
    for call in (queue.dead_letters(10, before="x"), queue.replay(["1-0"]), queue.purge(["abc"])):
        with pytest.raises(ValueError, match="is not a dead_letter_id"):
            await call
    assert await queue.receive(0, 1) == []
    assert await queue.renew([]) == []
    assert await queue.dead_letters(0) == []
    await queue.close()
    await queue.close()  # idempotent


# -- queue_from_url -------------------------------------------------------------------------


def test_queue_from_url_builds_each_backend(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    relative = queue_from_url("sqlite:///jobs.db")
    assert isinstance(relative, SqliteQueue) and relative.path == "jobs.db" and relative.lease == 30.0
    absolute = queue_from_url(f"sqlite:///{tmp_path}/q%20x.db?name=emails&lease=5&poll_interval=0.5")
    assert isinstance(absolute, SqliteQueue)
    assert (absolute.path, absolute.name, absolute.lease, absolute.poll_interval) == (
        f"{tmp_path}/q x.db",
        "emails",
        5.0,
        0.5,
    )
    assert queue_from_url("sqlite:///jobs.db?lease=5", lease=7).lease == 7  # keywords win
    assert queue_from_url("sqlite:///:memory:").path == ":memory:"  # type: ignore[attr-defined]
    memory = queue_from_url("memory://")
    assert isinstance(memory, MemoryQueue) and memory.lease is None
    assert queue_from_url("memory://?lease=2").lease == 2
    pytest.importorskip("redis")
    from lifecycle.queues import RedisStreamQueue

    redis = queue_from_url("redis://:s3cret-pw@127.0.0.1:6379/2?stream=emails&group=senders&claim_idle=5")
    assert isinstance(redis, RedisStreamQueue)
    assert (redis.stream, redis.group, redis.claim_idle) == ("emails", "senders", 5.0)
    assert "s3cret-pw" not in redis.url and redis.url.endswith("@127.0.0.1:6379/2")
    secure = queue_from_url("rediss://127.0.0.1:6380/0", stream="s")
    assert isinstance(secure, RedisStreamQueue) and secure.stream == "s"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://host/q", r"unknown scheme 'ftp'; known: sqlite:///PATH, redis://.*memory://"),
        ("jobs.db", "has no scheme; expected one of: sqlite:///PATH"),
        ("sqlite://jobs.db", "three slashes, then the path"),
        ("sqlite:///", "three slashes, then the path"),
        ("sqlite:///jobs.db?lease=soon", "option 'lease' must be a number, got 'soon'"),
        ("sqlite:///jobs.db?stream=x", "unknown option 'stream'; this backend takes: busy_timeout, consumer"),
        ("memory://somewhere", "a memory queue has no address"),
        ("memory://?lease=1&group=g", "unknown option 'group'; this backend takes: lease"),
    ],
)
def test_queue_from_url_errors(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        queue_from_url(url)


def test_queue_from_url_errors_mask_the_password() -> None:
    pytest.importorskip("redis")
    with pytest.raises(ValueError, match="claim_idle") as caught:
        queue_from_url("redis://user:hunter22@127.0.0.1/0?claim_idle=later")
    assert "hunter22" not in str(caught.value) and "user:***@" in str(caught.value)
    with pytest.raises(ValueError) as unknown:
        queue_from_url("pigeon://guest:hunter22@127.0.0.1//")  # an unknown scheme
    assert "hunter22" not in str(unknown.value)
    with pytest.raises(TypeError, match="must be a string"):
        queue_from_url(42)  # type: ignore[arg-type]


# -- the command line -----------------------------------------------------------------------


def command_group() -> click.Group:
    """The lifecycle CLI if the worker and dead commands are registered there, else a
    group made of just them."""
    from lifecycle._cli import cli

    if cli.commands.get("worker") is worker_command and cli.commands.get("dead") is dead_command:
        return cli
    return click.Group("lifecycle", commands=[worker_command, dead_command])


@pytest.fixture
def keep_structlog() -> Iterator[None]:
    """The commands configure structlog for the CLI; restore the suite's configuration."""
    previous = structlog.get_config()
    yield
    structlog.configure(**previous)


def dead_lettered(db: Path, count: int) -> None:
    async def main() -> None:
        queue = SqliteQueue(db, lease=5)
        for i in range(count):
            await queue.enqueue("count", {"i": i})
        for delivery in sorted(await queue.receive(count, 1), key=lambda d: d.payload["i"]):
            record = {"job": "count", "payload": delivery.payload, "reason": "failed", "error": "E: x"}
            await queue.dead_letter(delivery, record)
        await queue.close()

    anyio.run(main)


def test_dead_list_replay_and_purge(tmp_path: Path, keep_structlog: None) -> None:
    db = tmp_path / "q.db"
    dead_lettered(db, 4)
    url = f"sqlite:///{db}"
    runner = CliRunner()
    group = command_group()
    listed = runner.invoke(group, ["dead", "list", "--queue", url, "--count", "2"])
    assert listed.exit_code == 0, listed.output
    records = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [r["payload"]["i"] for r in records] == [3, 2] and records[0]["reason"] == "failed"
    older = runner.invoke(group, ["dead", "list", "--queue", url, "--before", records[1]["dead_letter_id"]])
    assert [json.loads(line)["payload"]["i"] for line in older.stdout.splitlines()] == [1, 0]
    replayed = runner.invoke(group, ["dead", "replay", "--queue", url, records[0]["dead_letter_id"], "999"])
    assert replayed.exit_code == 0 and "replayed 1 of 2" in replayed.stderr
    purged = runner.invoke(group, ["dead", "purge", "--queue", url, records[1]["dead_letter_id"]])
    assert purged.exit_code == 0 and "purged 1" in purged.stderr
    everything = runner.invoke(group, ["dead", "purge", "--queue", url, "--all", "--backend", "trio"])
    assert everything.exit_code == 0 and "purged 2" in everything.stderr
    assert counts(db) == {"ready": 1, "delayed": 0, "leased": 0, "dead": 0}  # the replayed one


def test_dead_commands_report_bad_input(tmp_path: Path, keep_structlog: None) -> None:
    runner = CliRunner()
    group = command_group()
    bad_url = runner.invoke(group, ["dead", "list", "--queue", "ftp://x"])
    assert bad_url.exit_code == 2 and "Invalid value for '--queue'" in bad_url.stderr
    both = runner.invoke(group, ["dead", "purge", "--queue", f"sqlite:///{tmp_path}/q.db", "--all", "1"])
    assert both.exit_code == 2 and "not both" in both.stderr
    neither = runner.invoke(group, ["dead", "purge", "--queue", f"sqlite:///{tmp_path}/q.db"])
    assert neither.exit_code == 2
    bad_id = runner.invoke(group, ["dead", "list", "--queue", f"sqlite:///{tmp_path}/q.db", "--before", "x"])
    assert bad_id.exit_code == 1 and "is not a dead_letter_id" in bad_id.stderr
    unopenable = runner.invoke(group, ["dead", "list", "--queue", f"sqlite:///{tmp_path}/none/q.db"])
    assert unopenable.exit_code == 1 and "unable to open database file" in unopenable.stderr


def test_worker_command_refuses_bad_input(tmp_path: Path, keep_structlog: None) -> None:
    runner = CliRunner()
    group = command_group()
    url = f"sqlite:///{tmp_path}/q.db"
    (tmp_path / "empty.py").write_text("X = 1\n")
    no_jobs = runner.invoke(group, ["worker", str(tmp_path / "empty.py"), "--queue", url])
    assert no_jobs.exit_code == 2 and "defines no @job functions" in no_jobs.stderr
    bad_url = runner.invoke(group, ["worker", str(APP), "--queue", "sqlite:///q.db?lease=-1"])
    assert bad_url.exit_code == 2 and "lease must be a positive number" in bad_url.stderr
    missing = runner.invoke(group, ["worker", str(APP)])
    assert missing.exit_code == 2 and "--queue" in missing.stderr
    (tmp_path / "with_worker.py").write_text(
        "from lifecycle import Worker, job\nfrom lifecycle.queues import MemoryQueue\n"
        "@job\ndef noop() -> None: ...\nworker = Worker(MemoryQueue(), [noop])\n"
    )
    a_worker = runner.invoke(group, ["worker", f"{tmp_path / 'with_worker.py'}:worker", "--queue", url])
    assert a_worker.exit_code == 2 and "run it with 'lifecycle run" in a_worker.stderr
    unopenable = runner.invoke(group, ["worker", str(APP), "--queue", f"sqlite:///{tmp_path}/none/q.db"])
    assert unopenable.exit_code == 1  # StartupError, logged as cli.worker_failed


_WORKER_MAIN = """
import sys, click
from lifecycle._cli import cli, main
from lifecycle._cli._queues import dead_command, worker_command
if cli.commands.get("worker") is worker_command:
    sys.exit(main(sys.argv[1:]))
from lifecycle._cli._signals import SIGNALS
SIGNALS.install()
click.Group("lifecycle", commands=[worker_command, dead_command]).main(sys.argv[1:], prog_name="lifecycle")
"""


FLAGS = ["--concurrency", "4", "--poll-interval", "0.2", "--log-format", "json", "--backend"]


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_worker_command_runs_every_job_and_stops_gracefully_on_sigterm(
    tmp_path: Path, evidence: Path, backend: str
) -> None:
    db = tmp_path / "q.db"
    fill(db, "count", [{"i": i} for i in range(20)])
    fill(db, "slow", [{"i": 100, "seconds": 0.1}])
    process = subprocess.Popen(
        [sys.executable, "-c", _WORKER_MAIN, "worker", str(APP), "--queue", f"sqlite:///{db}", *FLAGS, backend],
        env={**os.environ, "SQLITE_APP_EVIDENCE": str(evidence)},
        cwd=ROOT,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for(lambda: len(lines(evidence, "done")) >= 21, 60, "the CLI worker to run every job")
    finally:
        code = stop(process)
    stderr = process.stderr.read().decode() if process.stderr else ""
    assert code == 0, stderr
    assert sorted(map(int, lines(evidence, "done"))) == [*range(20), 100]
    assert "worker.stopped" in stderr
    assert counts(db) == {"ready": 0, "delayed": 0, "leased": 0, "dead": 0}


def test_queue_init_creates_the_storage_idempotently_and_reports_a_bad_path(tmp_path: Path) -> None:
    from lifecycle._cli import cli

    path = tmp_path / "jobs.db"
    runner = CliRunner()
    for _ in range(2):  # idempotent
        done = runner.invoke(cli, ["queue", "init", "--queue", f"sqlite:///{path}"])
        assert done.exit_code == 0, done.output
    tables = {row[0] for row in sqlite3.connect(path).execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"lifecycle_messages", "lifecycle_dead_letters"} <= tables
    bad = runner.invoke(cli, ["queue", "init", "--queue", f"sqlite:///{tmp_path}/missing/dir/jobs.db"])
    assert bad.exit_code == 1 and "unable to open database file" in bad.output
    unknown = runner.invoke(cli, ["queue", "init", "--queue", "carrier-pigeon://coop"])
    assert unknown.exit_code == 2 and "unknown scheme" in unknown.output


@pytest.mark.anyio
async def test_queues_opening_a_new_file_at_once_all_open(tmp_path: Path) -> None:
    """Switching a fresh file to WAL can fail at once with "database is locked" while
    another connection opens it (SQLite's busy handler is not called for it): racing
    producers of a new queue hit that. Each open retries within ``busy_timeout``."""
    for trial in range(40):
        path = tmp_path / f"race-{trial}.db"
        queues = [SqliteQueue(path) for _ in range(4)]
        try:
            async with anyio.create_task_group() as group:
                for queue in queues:
                    group.start_soon(queue.open)
        finally:
            for queue in queues:
                await queue.close()
