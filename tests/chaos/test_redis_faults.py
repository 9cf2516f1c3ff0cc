"""Workers draining a stream while the Redis server under them fails: killed -9 and
restarted, its connections killed, stalled past the socket timeout.

Each test enqueues a batch of ``count`` jobs, starts worker processes
(``tests/queue_worker_app.py``), injects the fault mid-drain and asserts with counts: every job
ran at least once, duplicates only where the fault lost acknowledgements or outlasted
every lease (each bounded by what it can explain), no worker exited (checked on every poll; at the end each exits 0 on SIGTERM), nothing is
left pending, and no dead letters (there is no poison here)."""

from __future__ import annotations

import threading
import time
from collections import Counter

import pytest
import redis
from chaos_harness import (
    GROUP,
    RedisServer,
    WorkerPool,
    assert_settled,
    dead_letters,
    enqueue_counts,
    pending,
    report,
    wait_until,
)

pytestmark = pytest.mark.chaos

JOBS = 2000
WORKERS = 2
CONCURRENCY = 16
# What one worker holds at most: its running jobs, and the acknowledgements of finished
# ones still on their way while the next jobs run (Worker, `concurrency`).
HELD = 2 * CONCURRENCY
STALL = 10  # seconds: past any sane socket timeout; the DEBUG SLEEP 10 / CLIENT PAUSE 10000


def drained(client: redis.Redis, stream: str, pool: WorkerPool, jobs: int) -> bool:
    """Every job ran, and the stream has nothing left: neither pending nor unread."""
    return len(pool.executions()) >= jobs and pending(client, stream) == 0 and client.xlen(stream) == 0


def outcome(executions: Counter[int], jobs: int) -> tuple[int, int]:
    """(lost, duplicated): jobs that never ran, and runs beyond the first."""
    lost = sum(1 for i in range(jobs) if executions[i] == 0)
    return lost, sum(n - 1 for n in executions.values() if n > 1)


def start_drain(redis_server: RedisServer, workers: WorkerPool, stream: str, jobs: int = JOBS) -> redis.Redis:
    """Create the group, enqueue ``jobs`` count jobs and start the workers."""
    client = redis_server.client()
    client.xgroup_create(stream, GROUP, id="0", mkstream=True)
    enqueue_counts(client, stream, range(jobs))
    workers.env.update(CLAIM_IDLE="2", CONCURRENCY=str(CONCURRENCY))
    workers.spawn(WORKERS)
    # Faults start once every worker is up, so each scenario tests what it says; a
    # worker starting during an outage is a scenario of its own (below).
    wait_until(lambda: all(map(workers.ready, workers.live)), timeout=60, pool=workers, what="workers started")
    return client


def finish(
    scenario: str,
    client: redis.Redis,
    stream: str,
    workers: WorkerPool,
    started: float,
    jobs: int = JOBS,
    **extra: object,
) -> tuple[int, int]:
    """Wait for the drain, stop the workers (exit 0), check nothing is left, report."""
    wait_until(lambda: drained(client, stream, workers, jobs), timeout=120, pool=workers, what=f"{jobs} jobs drained")
    elapsed = time.monotonic() - started
    workers.stop()
    assert_settled(client, stream)
    lost, duplicated = outcome(workers.executions(), jobs)
    dead = dead_letters(client, stream)
    report(
        scenario,
        jobs=jobs,
        lost=lost,
        duplicated=duplicated,
        dead_lettered=len(dead),
        worker_exits=0,  # check_alive() failed the test otherwise
        seconds=round(elapsed, 1),
        broker_unavailable=workers.events("worker.broker_unavailable"),
        broker_recovered=workers.events("worker.broker_recovered"),
        **extra,
    )
    assert lost == 0
    assert dead == []  # no poison in these runs
    return lost, duplicated


def test_redis_killed_and_restarted_mid_drain(redis_server: RedisServer, workers: WorkerPool, stream: str) -> None:
    # Both variants start from a snapshot (SAVE) of the whole enqueued stream and its
    # group, so "every job ran at least once" means something in both:
    # - appendonly (appendfsync always): Redis comes back exactly as it was, pending
    #   entries included; the workers settle what they had in flight once it is back.
    #   A duplicate is possible only if an outage outlasts the 2 s lease and another
    #   consumer reclaims a job that was already running: bounded by what was in flight.
    # - volatile: Redis comes back as the snapshot, from before any job ran: every
    #   acknowledgement since is lost, so the jobs that ran before the kill run again.
    #   Those re-runs are the only duplicates allowed.
    client = start_drain(redis_server, workers, stream)
    client.save()
    started = time.monotonic()
    ran_before_restart = 0
    for threshold in (JOBS // 3, 2 * JOBS // 3):
        wait_until(
            lambda t=threshold: len(workers.executions()) >= t,  # type: ignore[misc]
            timeout=60,
            pool=workers,
            what=f"{threshold} jobs run",
            every=0.02,
        )
        redis_server.kill()
        time.sleep(1.0)  # the outage: every worker call fails meanwhile
        workers.check_alive()
        ran_before_restart += sum(workers.executions().values())
        redis_server.restart()
    variant = "appendonly" if redis_server.appendonly else "volatile"
    _, duplicated = finish(f"redis kill -9 and restart x2 ({variant})", client, stream, workers, started, kills=2)
    if redis_server.appendonly:
        assert duplicated <= 2 * WORKERS * HELD  # two kills
    else:
        assert duplicated <= ran_before_restart


@pytest.mark.parametrize("redis_server", ["volatile"], indirect=True)
def test_redis_restarted_empty_the_workers_recover(redis_server: RedisServer, workers: WorkerPool, stream: str) -> None:
    # Without persistence and without a snapshot, a kill -9 loses the stream, its group
    # and everything pending: the jobs of the first batch that had not run are gone and
    # no test can count them. What can be asserted: no worker exits, and a batch
    # enqueued after the restart is drained completely (the group recreated).
    client = start_drain(redis_server, workers, stream, jobs=JOBS)
    wait_until(lambda: len(workers.executions()) >= JOBS // 3, timeout=60, pool=workers, what="a third run", every=0.02)
    redis_server.kill()
    time.sleep(1.0)
    redis_server.restart()
    assert client.xlen(stream) == 0  # nothing survived (a worker may have recreated the group already)
    first = workers.executions()
    started = time.monotonic()
    enqueue_counts(client, stream, range(JOBS, 2 * JOBS))
    wait_until(
        lambda: (
            all(workers.executions()[i] for i in range(JOBS, 2 * JOBS))
            and pending(client, stream) == 0
            and client.xlen(stream) == 0
        ),
        timeout=120,
        pool=workers,
        what="the second batch drained",
    )
    elapsed = time.monotonic() - started
    workers.stop()
    assert_settled(client, stream)
    executions = workers.executions()
    second = Counter({i: n for i, n in executions.items() if i >= JOBS})
    report(
        "redis kill -9, restarted empty (volatile, no snapshot)",
        jobs=JOBS,
        lost=0,
        duplicated=sum(n - 1 for n in second.values()),
        dead_lettered=len(dead_letters(client, stream)),
        worker_exits=0,
        seconds=round(elapsed, 1),
        first_batch_run_before_the_kill=len(first),
        first_batch_lost_with_the_server=JOBS - len({i for i in executions if i < JOBS}),
    )
    assert len(second) == JOBS and set(second.values()) == {1}
    assert dead_letters(client, stream) == []


@pytest.mark.parametrize("redis_server", ["volatile"], indirect=True)
def test_client_kill_repeatedly_mid_drain(redis_server: RedisServer, workers: WorkerPool, stream: str) -> None:
    # CLIENT KILL drops the workers' connections, Redis keeps its data: a settle whose
    # answer was lost is repeated (idempotent) and no acknowledgement is lost, so no
    # job may run twice.
    client = start_drain(redis_server, workers, stream)
    started = time.monotonic()
    killed = rounds = 0
    while len(workers.executions()) < JOBS and rounds < 50:
        workers.check_alive()
        killed += int(client.client_kill_filter(_type="normal", skipme=True))
        rounds += 1
        time.sleep(0.1)
    _, duplicated = finish(
        "CLIENT KILL TYPE normal every 0.1 s",
        client,
        stream,
        workers,
        started,
        rounds=rounds,
        connections_killed=killed,
    )
    assert rounds >= 3, "the drain finished before the faults: make it longer"
    assert duplicated == 0


@pytest.mark.parametrize("redis_server", ["volatile"], indirect=True)
@pytest.mark.parametrize("stall", ["DEBUG SLEEP", "CLIENT PAUSE"])
def test_redis_stalls_past_the_socket_timeout(
    redis_server: RedisServer, workers: WorkerPool, stream: str, stall: str
) -> None:
    # The server answers nothing for STALL seconds: the workers' calls time out (they
    # must not hang), they back off and carry on afterwards. Redis loses nothing, but
    # its clock runs on: after the stall every lease (claim_idle=2 s) has expired, and
    # if one worker's reclaim (XAUTOCLAIM) is served before another's renew or ack, it
    # takes over messages the other already ran. Under CLIENT PAUSE that happens (the
    # paused commands of a connection that timed out are dropped, so the other's ack
    # comes later); after DEBUG SLEEP the buffered acks are served first. So duplicates
    # are possible, bounded by what was in flight, and reported.
    client = start_drain(redis_server, workers, stream)
    started = time.monotonic()
    wait_until(lambda: len(workers.executions()) >= JOBS // 3, timeout=60, pool=workers, what="a third run", every=0.02)
    if stall == "DEBUG SLEEP":
        # DEBUG SLEEP blocks the connection that sent it too: send it from a thread and
        # keep watching the workers meanwhile.
        sleeper = redis_server.client(socket_timeout=STALL + 30)
        thread = threading.Thread(target=sleeper.execute_command, args=("DEBUG", "SLEEP", str(STALL)))
        thread.start()
        wait_until(lambda: not thread.is_alive(), timeout=STALL + 30, pool=workers, what="DEBUG SLEEP to return")
        sleeper.close()
    else:
        client.client_pause(STALL * 1000)
        stall_ends = time.monotonic() + STALL
        wait_until(lambda: time.monotonic() > stall_ends, timeout=STALL + 30, pool=workers, what="the pause to end")
    ran_during_stall = len(workers.executions())
    _, duplicated = finish(f"{stall} {STALL} s", client, stream, workers, started, stall_seconds=STALL)
    assert ran_during_stall < JOBS, "the drain finished before the stall: make it longer"
    assert duplicated <= WORKERS * HELD


@pytest.mark.parametrize("redis_server", ["appendonly"], indirect=True)
def test_worker_started_during_an_outage_waits_for_redis(
    redis_server: RedisServer, workers: WorkerPool, stream: str
) -> None:
    # A worker (re)started while Redis is down, as an orchestrator does after a crash:
    # open() finds no broker. That is a transient failure (BrokerUnavailable), not a
    # misconfiguration (lifecycle/queues/_base.py), so the worker waits and starts once
    # Redis is back instead of exiting.
    jobs = 200
    client = redis_server.client()
    enqueue_counts(client, stream, range(jobs))
    redis_server.kill()
    workers.env.update(CLAIM_IDLE="2", CONCURRENCY=str(CONCURRENCY))
    workers.spawn(1)
    wait_until(
        lambda: workers.events("worker.broker_unavailable") > 0,
        timeout=60,
        pool=workers,
        what="the worker to notice the outage",
    )
    outage_ends = time.monotonic() + 2
    wait_until(lambda: time.monotonic() > outage_ends, timeout=10, pool=workers, what="2 s more of outage")
    started = time.monotonic()
    redis_server.restart()
    _, duplicated = finish("worker started while Redis is down", client, stream, workers, started, jobs=jobs)
    assert duplicated == 0
