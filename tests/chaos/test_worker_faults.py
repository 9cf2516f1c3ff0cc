"""Worker processes that die (SIGKILL) mid-drain, and a job that outlasts its lease.

Redis stays up here; what fails is the consumer. A killed worker's in-flight messages
stay pending until their lease (``claim_idle``) expires, then another worker reclaims
and runs them: those are the only duplicates, at most ``concurrency`` per kill."""

from __future__ import annotations

import json
import random
import time

import pytest
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


@pytest.mark.parametrize("redis_server", ["volatile"], indirect=True)
def test_workers_killed_repeatedly_while_three_drain_10000_jobs(
    redis_server: RedisServer, workers: WorkerPool, stream: str
) -> None:
    jobs, concurrency = 10_000, 16
    client = redis_server.client()
    enqueue_counts(client, stream, range(jobs))
    workers.env.update(CLAIM_IDLE="2", CONCURRENCY=str(concurrency))
    workers.spawn(3)
    rng = random.Random(10)
    started = time.monotonic()
    # Each time another 500 jobs ran, SIGKILL one of the workers that is up (a fresh one
    # takes its place at once), until 90% ran: the rest drains without faults, including
    # what the last victims left pending (reclaimed after claim_idle). Paced by progress,
    # not by the clock, so a fast or a loaded machine sees the same ~18 kills.
    next_kill = step = jobs // 20
    while (ran := len(workers.executions())) < jobs * 9 // 10:
        workers.check_alive()
        ready = [proc for proc in workers.live if workers.ready(proc)]
        if ran >= next_kill and ready:
            workers.kill(rng.choice(ready))
            workers.spawn()
            next_kill = ran + step
        time.sleep(0.02)
    wait_until(
        lambda: len(workers.executions()) >= jobs and pending(client, stream) == 0 and client.xlen(stream) == 0,
        timeout=120,
        pool=workers,
        what=f"{jobs} jobs drained",
    )
    elapsed = time.monotonic() - started
    workers.stop()
    assert_settled(client, stream)
    executions = workers.executions()
    lost = sum(1 for i in range(jobs) if executions[i] == 0)
    duplicated = sum(n - 1 for n in executions.values() if n > 1)
    dead = dead_letters(client, stream)
    report(
        "SIGKILL a worker per 500 jobs run, 3 workers",
        jobs=jobs,
        lost=lost,
        duplicated=duplicated,
        dead_lettered=len(dead),
        worker_exits=0,
        seconds=round(elapsed, 1),
        workers_killed=workers.killed,
    )
    assert workers.killed >= 10, "the drain finished before the faults: make it longer"
    assert lost == 0
    # Only what the victims held: running jobs, and acknowledgements on their way while
    # the next job ran (a worker holds at most twice its concurrency).
    assert duplicated <= workers.killed * 2 * concurrency
    assert dead == []  # five deliveries to dying workers in a row would be "poison"; never here
    # No consumer of a dead worker is left holding anything (dead consumers without
    # pending entries are removed later, after a generous idle time).
    assert all(consumer["pending"] == 0 for consumer in client.xinfo_consumers(stream, GROUP))


@pytest.mark.parametrize("redis_server", ["volatile"], indirect=True)
def test_long_job_outlasting_its_lease_runs_exactly_once(
    redis_server: RedisServer, workers: WorkerPool, stream: str
) -> None:
    # claim_idle=1: without heartbeats another worker (or the same one) would reclaim
    # each of these 5 s jobs about five times while it still runs.
    jobs, seconds = 4, 5.0
    client = redis_server.client()
    for i in range(jobs):
        client.xadd(
            stream,
            {
                "job": "long",
                "payload": json.dumps({"i": i, "seconds": seconds}),
                "attempt": "1",
                "enqueued_at": repr(time.time()),
            },
        )
    workers.env.update(CLAIM_IDLE="1", CONCURRENCY="2")  # two workers, two jobs each
    started = time.monotonic()
    workers.spawn(2)
    wait_until(
        lambda: len(workers.executions("long-end")) >= jobs and pending(client, stream) == 0,
        timeout=60,
        pool=workers,
        what="the long jobs to finish",
    )
    elapsed = time.monotonic() - started
    # Give a late reclaim its chance to show: well past one more lease.
    wait_until(lambda: time.monotonic() - started > elapsed + 3, timeout=10, pool=workers, what="3 s more")
    workers.stop()
    assert_settled(client, stream)
    starts, ends = workers.executions("long-start"), workers.executions("long-end")
    dead = dead_letters(client, stream)
    report(
        "5 s jobs with claim_idle=1 (default heartbeats)",
        jobs=jobs,
        lost=sum(1 for i in range(jobs) if ends[i] == 0),
        duplicated=sum(starts.values()) - jobs,
        dead_lettered=len(dead),
        worker_exits=0,
        seconds=round(elapsed, 1),
    )
    assert starts == {i: 1 for i in range(jobs)}
    assert ends == {i: 1 for i in range(jobs)}
    assert dead == []
