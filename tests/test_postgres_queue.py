"""PostgresQueue beyond the shared contract (tests/test_queue_contract.py): worker
processes SIGKILLed mid-job and draining 10,000 messages together; malformed rows
injected with asyncpg; connections terminated by the server mid-drain; errors at open;
``queue_from_url``; and ``PostgresQueue.transaction``, whose commit is the ack.

asyncpg is asyncio-only, so these run on asyncio (trio gets its construction error). No ``from
__future__ import annotations``: the jobs' ``Depends(queue.transaction)`` names a local."""

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Annotated, Any

import anyio
import asyncpg
import pytest
from harnesses.postgres import POSTGRES_DSN, check_postgres, drop_tables
from structlog.testing import capture_logs
from support import require_service

from lifecycle import Depends, LifecycleError, Runtime, StartupError, Worker, job
from lifecycle.queues import BrokerUnavailable, PostgresQueue, _postgres, queue_from_url

ROOT = Path(__file__).resolve().parent.parent
APP = ROOT / "tests" / "postgres_worker_app.py"

pytestmark = [pytest.mark.anyio, pytest.mark.postgres]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def table() -> AsyncIterator[str]:
    require_service("PostgreSQL", check_postgres)
    name = f"lc_test_{uuid.uuid4().hex[:12]}"
    try:
        yield name
    finally:
        await drop_tables(name)


def make(table: str, **options: Any) -> PostgresQueue:
    options.setdefault("lease", 2.0)
    options.setdefault("poll_interval", 0.05)
    options.setdefault("application_name", f"lc-test-{table}")
    return PostgresQueue(POSTGRES_DSN, table=table, **options)


async def sql(statement: str, *args: Any) -> list[Any]:
    conn = await asyncpg.connect(POSTGRES_DSN)
    try:
        return list(await conn.fetch(statement, *args))
    finally:
        await conn.close()


async def wait_until(condition: Callable[[], Any], limit: float, what: str) -> None:
    deadline = time.monotonic() + limit
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {limit} s waiting for {what}")
        await asyncio.sleep(0.05)


async def drained(queue: PostgresQueue) -> bool:
    try:
        counts = await queue.counts()
    except BrokerUnavailable:  # a pooled connection the connection killer ended: ask again
        return False
    return counts["ready"] == counts["leased"] == counts["delayed"] == 0


# -- construction and open ------------------------------------------------------------------


def test_trio_is_refused_at_construction() -> None:
    async def build() -> None:
        PostgresQueue(POSTGRES_DSN)

    with pytest.raises(LifecycleError, match="needs the asyncio backend"):
        anyio.run(build, backend="trio")


def test_bad_options_are_refused() -> None:
    with pytest.raises(ValueError, match="table must be"):
        PostgresQueue(POSTGRES_DSN, table="Jobs; DROP")
    with pytest.raises(ValueError, match="lease must be"):
        PostgresQueue(POSTGRES_DSN, lease=0)
    with pytest.raises(ValueError, match="pool_size"):
        PostgresQueue(POSTGRES_DSN, pool_size=0)


def test_a_missing_client_library_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    from lifecycle.queues._base import import_client

    for module, queue, extra in [("asyncpg", "PostgresQueue", "postgres"), ("aio_pika", "RabbitQueue", "rabbitmq")]:
        monkeypatch.setitem(sys.modules, module, None)
        with pytest.raises(LifecycleError, match=rf"{queue} needs .*pip install 'lifecycle\[{extra}\]'"):
            import_client(module, queue, extra)


async def test_open_fails_clearly_for_a_missing_database_or_role_without_the_password(table: str) -> None:
    missing = POSTGRES_DSN.replace("postgres@", "postgres:s3cret-pw@").rsplit("/", 1)[0] + "/no_such_db_lc"
    queue = PostgresQueue(missing, table=table)
    with pytest.raises(LifecycleError, match="does not exist") as caught:
        await queue.open()
    assert "s3cret-pw" not in str(caught.value) and "***" in str(caught.value)
    assert not isinstance(caught.value, BrokerUnavailable)
    assert "s3cret-pw" not in repr(queue)
    await queue.close()
    nobody = PostgresQueue(POSTGRES_DSN.replace("postgres@", "no_such_role_lc@"), table=table)
    with pytest.raises(LifecycleError, match="no_such_role_lc"):
        await nobody.open()
    await nobody.close()


async def test_an_unreachable_server_is_transient_and_a_worker_waits_for_it() -> None:
    queue = PostgresQueue("postgresql://postgres@127.0.0.1:1/test", connect_timeout=2)
    with pytest.raises(BrokerUnavailable, match="unavailable"):
        await queue.open()
    with pytest.raises(BrokerUnavailable):
        await queue.enqueue("count", {"i": 1})
    await queue.close()


async def test_a_table_that_is_not_a_queue_is_refused(table: str) -> None:
    await sql(f'CREATE TABLE "{table}" (id int, something text)')
    queue = make(table)
    with pytest.raises(LifecycleError, match="lacks the columns"):
        await queue.open()
    await queue.close()


async def test_open_and_init_schema_are_idempotent_and_concurrent(table: str) -> None:
    queues = [make(table) for _ in range(4)]
    await asyncio.gather(*(queue.open() for queue in queues))
    await _postgres.init_schema(POSTGRES_DSN, table=table)
    await queues[0].enqueue("count", {"i": 1})
    assert (await queues[1].counts())["ready"] == 1
    for queue in queues:
        await queue.close()


async def test_a_worker_with_a_misconfigured_queue_does_not_start(table: str) -> None:
    dsn = POSTGRES_DSN.rsplit("/", 1)[0] + "/no_such_db_lc"
    worker = Worker(PostgresQueue(dsn, table=table), [count])
    with pytest.raises(StartupError, match="does not exist"):
        await worker.run()


def test_queue_from_url_takes_options_and_passes_the_rest_to_asyncpg() -> None:
    async def build() -> PostgresQueue:
        made = queue_from_url("postgresql://u:pw-secret@h:5/db?table=emails&lease=7&sslmode=disable", pool_size=3)
        assert isinstance(made, PostgresQueue)
        return made

    queue = anyio.run(build)
    assert (queue.table, queue.lease, queue.pool_size) == ("emails", 7.0, 3)
    assert "pw-secret" not in queue.dsn and "sslmode=disable" in queue.dsn and "table" not in queue.dsn
    with pytest.raises(ValueError, match="option 'lease' must be a number"):
        anyio.run(lambda: _postgres.from_url("postgres://h/db?lease=soon"))


# -- a worker over the queue -------------------------------------------------------------------

DONE: list[int] = []


@job(name="count")
async def count(i: int) -> None:
    DONE.append(i)


async def run_worker(worker: Worker, until: Callable[[], Any], limit: float) -> None:
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker.run)
        try:
            await wait_until(until, limit, "the worker to finish")
        finally:
            worker.stop()


async def test_malformed_rows_are_dead_lettered_with_their_raw_values(table: str) -> None:
    queue = make(table)
    await queue.open()
    rows = [
        ("count", b"\xff\xfe not utf-8", 1, 1.0),
        ("count", b"not json", 1, 1.0),
        ("count", b"[" * 100 + b"]" * 100, 1, 1.0),
        ("", b"{}", 1, 1.0),
        ("count", b'{"i": 1}', 0, 1.0),
        ("count", b'{"i": 1}', 1, float("nan")),
    ]
    for job_name, payload, attempt, enqueued_at in rows:
        await sql(
            f'INSERT INTO "{table}" (job, payload, attempt, enqueued_at, run_at) VALUES ($1, $2, $3, $4, 0)',
            job_name,
            payload,
            attempt,
            enqueued_at,
        )
    await queue.enqueue(count, {"i": 42})
    DONE.clear()
    worker = Worker(queue, [count], concurrency=4, poll_interval=0.1)
    await run_worker(worker, lambda: drained(queue), 20)
    assert DONE == [42]
    dead = await queue.dead_letters()
    assert len(dead) == len(rows) and {record["reason"] for record in dead} == {"malformed"}
    by_payload = {record["raw:payload"]: record for record in dead}
    assert set(by_payload) >= {b"\xff\xfe not utf-8", b"not json"}
    assert "not valid UTF-8" in by_payload[b"\xff\xfe not utf-8"]["error"]
    assert {record.get("raw:job") for record in dead} >= {"", "count"}
    assert await queue.replay([record["dead_letter_id"] for record in dead]) == 0  # nothing to run
    await queue.close()


async def test_terminated_connections_mid_drain_lose_no_job_and_end_no_worker(table: str) -> None:
    queue = make(table, lease=3.0, pool_size=8)
    await queue.open()
    total = 400
    await queue.enqueue_many("slowish", [{"i": i} for i in range(total)])
    seen: list[int] = []

    @job(name="slowish")
    async def slowish(i: int) -> None:
        await asyncio.sleep(0.04)  # a drain of at least a second: several kills land in it
        seen.append(i)

    worker = Worker(queue, [slowish], concurrency=16, poll_interval=0.2, broker_backoff=0.05, broker_backoff_max=0.5)
    kills = 0

    async def kill_connections() -> None:
        nonlocal kills
        while True:
            await asyncio.sleep(0.15)
            rows = await sql(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
                f"lc-test-{table}",
            )
            kills += sum(1 for row in rows if row[0])

    with capture_logs() as logs:
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker.run)
            killer = asyncio.ensure_future(kill_connections())
            try:
                await wait_until(lambda: asyncio.sleep(0, len(set(seen)) >= total), 60, "every job to run")
            finally:
                killer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await killer  # no kill lands after this
            await wait_until(lambda: drained(queue), 30, "every message to be settled")
            worker.stop()
    assert kills >= 3, kills
    assert set(seen) == set(range(total))  # at least once: a claim whose answer was lost runs again
    assert any(log["event"] == "worker.broker_unavailable" for log in logs)

    async def no_dead_letters() -> bool:
        try:
            return (await queue.counts())["dead"] == 0
        except BrokerUnavailable:  # another pooled connection the killer ended
            return False

    await wait_until(no_dead_letters, 10, "the dead letter count, which must be 0")
    await queue.close()


# -- worker processes ---------------------------------------------------------------------------


def lines(directory: Path, what: str) -> list[str]:
    found: list[str] = []
    for path in directory.glob(f"{what}-*"):
        found += path.read_text().splitlines()
    return found


def start(table: str, evidence: Path, **env: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, str(APP), POSTGRES_DSN, table, str(evidence)],
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


async def test_a_sigkilled_workers_messages_are_completed_by_another(table: str, tmp_path: Path) -> None:
    queue = make(table)
    await queue.open()
    await queue.enqueue_many("slow", [{"i": i, "seconds": 1.0} for i in range(20)])
    first = start(table, tmp_path, CONCURRENCY="20", LEASE="1.0")
    try:
        await wait_until(lambda: asyncio.sleep(0, len(lines(tmp_path, "started")) >= 20), 30, "jobs to start")
        first.kill()
        first.wait(10)
    finally:
        if first.poll() is None:
            first.kill()
    assert len(lines(tmp_path, "done")) < 20  # it died holding messages
    second = start(table, tmp_path, CONCURRENCY="20", LEASE="1.0")
    try:
        await wait_until(lambda: drained(queue), 40, "the second worker to finish them")
        assert stop(second) == 0
    finally:
        if second.poll() is None:
            second.kill()
    assert set(lines(tmp_path, "done")) == {str(i) for i in range(20)}
    assert (await queue.counts())["dead"] == 0
    await queue.close()


# -- the job's transaction ------------------------------------------------------------------------


async def run_jobs(queue: PostgresQueue, jobs: list[Any], until: Callable[[], Any], **options: Any) -> Worker:
    options.setdefault("retry_backoff", 0.05)
    worker = Worker(queue, jobs, concurrency=4, poll_interval=0.1, **options)
    await run_worker(worker, until, 30)
    return worker


async def test_the_jobs_writes_commit_with_its_ack_and_roll_back_with_a_failure(table: str) -> None:
    queue = make(table)
    await queue.open()
    await sql(f'CREATE TABLE "{table}_out" (i int PRIMARY KEY, attempt int)')
    attempts: dict[int, int] = {}

    @job(name="write", retries=2)
    async def write(i: int, tx: Annotated[asyncpg.Connection, Depends(queue.transaction)]) -> None:
        attempts[i] = attempts.get(i, 0) + 1
        await tx.execute(f'INSERT INTO "{table}_out" VALUES ($1, $2)', i, attempts[i])
        if i % 2 and attempts[i] == 1:
            raise ValueError("odd jobs fail once, after writing")

    try:
        await queue.enqueue_many(write, [{"i": i} for i in range(6)])
        worker = await run_jobs(queue, [write], lambda: drained(queue))
        rows = await sql(f'SELECT i, attempt FROM "{table}_out" ORDER BY i')
        # The failed first attempts' rows were rolled back: one row per job, and the odd
        # ones from their second attempt.
        assert [tuple(row) for row in rows] == [(i, 2 if i % 2 else 1) for i in range(6)]
        assert worker.stats["succeeded"] == 6 and worker.stats["retried"] == 3
    finally:
        await sql(f'DROP TABLE IF EXISTS "{table}_out"')
        await queue.close()


async def test_a_failing_outer_teardown_rolls_the_jobs_writes_back(table: str) -> None:
    """README, "Semantics", rule 5: a teardown that raises fails the job, so the message is
    not acknowledged, and the writes, which commit only with the ack, are undone."""
    queue = make(table)
    await queue.open()
    await sql(f'CREATE TABLE "{table}_out" (i int)')
    failed = []

    async def audit() -> AsyncIterator[None]:  # set up first, torn down last
        yield
        if not failed:
            failed.append(True)
            raise RuntimeError("audit flush failed")

    @job(name="write", retries=1)
    async def write(
        i: int, _: Annotated[None, Depends(audit)], tx: Annotated[asyncpg.Connection, Depends(queue.transaction)]
    ) -> None:
        await tx.execute(f'INSERT INTO "{table}_out" VALUES ($1)', i)

    try:
        await queue.enqueue(write, {"i": 1})
        worker = await run_jobs(queue, [write], lambda: drained(queue))
        assert [row[0] for row in await sql(f'SELECT i FROM "{table}_out"')] == [1]  # the second attempt's only
        assert worker.stats["retried"] == 1 and worker.stats["succeeded"] == 1
    finally:
        await sql(f'DROP TABLE IF EXISTS "{table}_out"')
        await queue.close()


async def test_a_commit_that_fails_is_a_failed_job_retried_with_backoff_then_dead_lettered(table: str) -> None:
    """A commit refused by the server (here a deferred constraint) is found by the ack,
    after the job's teardown: the queue rolls the writes back and raises CommitFailed
    with the message still owned, and the worker treats the job as failed: retried with
    backoff while attempts remain, then dead-lettered as ``failed`` with the cause."""
    queue = make(table)
    await queue.open()
    await sql(
        f'CREATE TABLE "{table}_out" (i int, CONSTRAINT "{table}_u" UNIQUE (i) DEFERRABLE INITIALLY DEFERRED)'
    )
    runs = []

    @job(name="dup", retries=1)
    async def dup(i: int, tx: Annotated[asyncpg.Connection, Depends(queue.transaction)]) -> None:
        runs.append(i)
        await tx.execute(f'INSERT INTO "{table}_out" VALUES ($1), ($1)', i)  # refused only at COMMIT

    try:
        await queue.enqueue(dup, {"i": 1})
        with capture_logs() as logs:
            await run_jobs(queue, [dup], lambda: drained(queue), retry_backoff=0.01)
        assert await sql(f'SELECT i FROM "{table}_out"') == []  # nothing committed, ever
        assert runs == [1, 1]  # attempt 1, retried once, attempt 2
        [dead] = await queue.dead_letters()
        assert dead["reason"] == "failed" and dead["attempts"] == 2
        assert dead["error_type"] == "lifecycle.CommitFailed" and "UniqueViolationError" in dead["error"]
        assert [log["event"] for log in logs].count("job.retrying") == 1
        assert not [log for log in logs if log["event"] == "worker.settle_failed"]
    finally:
        await sql(f'DROP TABLE IF EXISTS "{table}_out"')
        await queue.close()


async def test_a_lost_lease_rolls_the_jobs_writes_back(table: str) -> None:
    queue, other = make(table, lease=1.0), make(table, lease=1.0)
    await queue.enqueue("write", {"i": 1})
    [held] = await queue.receive(1, 5)
    rt_tx: list[Any] = []

    async def use() -> None:
        from lifecycle import JobContext

        ctx = JobContext(held.id, "write", 1, {})
        gen = queue.transaction(ctx)
        conn = await gen.__anext__()
        rt_tx.append(conn)
        await conn.execute("SELECT 1")
        with pytest.raises(StopAsyncIteration):
            await gen.__anext__()  # teardown: the transaction now waits for the ack

    await sql(f'CREATE TABLE "{table}_out" (i int)')
    try:
        await use()
        await rt_tx[0].execute(f'INSERT INTO "{table}_out" VALUES (1)')  # the job's write, before the ack
        await asyncio.sleep(1.5)
        [taken] = await other.receive(1, 5)  # the lease expired: another consumer has it
        assert taken.deliveries == 2
        assert await queue.ack(held) is False  # owner-checked in the job's transaction: rolled back
        assert await sql(f'SELECT i FROM "{table}_out"') == []
        assert await other.ack(taken) is True
    finally:
        await sql(f'DROP TABLE IF EXISTS "{table}_out"')
        await queue.close()
        await other.close()


async def test_the_transaction_outside_a_worker_is_a_clear_error(table: str) -> None:
    queue = make(table)

    @job(name="write")
    async def write(i: int, tx: Annotated[asyncpg.Connection, Depends(queue.transaction)]) -> None:
        pass

    async with Runtime() as rt:
        with pytest.raises(LifecycleError, match=r"job 'write'.*PostgresQueue.transaction.*Worker consuming"):
            await rt.run(write, i=1)
    await queue.close()
