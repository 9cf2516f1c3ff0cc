"""RabbitQueue against the real RabbitMQ (asyncio only: aio-pika is asyncio-only): worker
processes killed and sharing a load, malformed messages injected with the client, the
broker closing the connection mid-drain (``rabbitmqctl close_connection``), and the
errors of a misconfigured or unreachable broker. Skipped with a reason without the
broker; failing under CI=true. Each test uses queues with a random suffix and deletes
them."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from harnesses.rabbit import RABBIT_URL, delete_queues, reachable
from support import require_service

from lifecycle import LifecycleError, Worker, job
from lifecycle.queues import BrokerUnavailable, queue_from_url
from lifecycle.queues._rabbit import DELAY_BUCKETS, RabbitQueue, _bucket, decode_message

pytestmark = [pytest.mark.anyio, pytest.mark.rabbitmq]
APP = Path(__file__).parent / "rabbit_worker_app.py"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def rabbit_url() -> str:
    require_service("RabbitMQ", reachable)
    return RABBIT_URL


@pytest.fixture
async def name(rabbit_url: str) -> AsyncIterator[str]:
    queue = f"lifecycle-test-{uuid.uuid4().hex[:12]}"
    yield queue
    await delete_queues(rabbit_url, queue)


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def spawn(url: str, queue: str, evidence: Path, processes: list[subprocess.Popen[bytes]], **env: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, str(APP), url, queue, str(evidence)],
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    processes.append(proc)
    return proc


def lines(evidence: Path, kind: str) -> list[list[str]]:
    if not evidence.exists():
        return []
    return [line.split() for line in evidence.read_text().splitlines() if line.startswith(kind + " ")]


async def wait_for(condition: Any, limit: float, what: str) -> None:
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {limit} s waiting for {what}"
        await anyio.sleep(0.05)


async def fill(queue: RabbitQueue, job_name: str, count: int) -> None:
    for start in range(0, count, 500):
        await asyncio.gather(*(queue.enqueue(job_name, {"i": i}) for i in range(start, min(start + 500, count))))


async def backlog(url: str, queue: str) -> int:
    import aio_pika

    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        return int(declared.declaration_result.message_count or 0)
    finally:
        await connection.close()


async def test_worker_killed_mid_job_is_redelivered_and_completed_by_another(
    rabbit_url: str, name: str, tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    evidence = tmp_path / "evidence"
    queue = RabbitQueue(rabbit_url, queue=name)
    await queue.open()
    victim = spawn(rabbit_url, name, evidence, processes)
    for i in range(3):
        await queue.enqueue("hang_first", {"i": i})
    await wait_for(lambda: len(lines(evidence, "started")) == 3, 30, "the victim to start all three")
    assert {row[2] for row in lines(evidence, "started")} == {str(victim.pid)}
    victim.send_signal(signal.SIGKILL)
    victim.wait(10)
    survivor = spawn(rabbit_url, name, evidence, processes)
    await wait_for(lambda: len(lines(evidence, "finished")) == 3, 30, "the survivor to finish all three")
    assert sorted(int(row[1]) for row in lines(evidence, "finished")) == [0, 1, 2]
    assert {row[2] for row in lines(evidence, "finished")} == {str(survivor.pid)}
    await wait_for(lambda: True, 0, "")
    assert await backlog(rabbit_url, name) == 0
    survivor.send_signal(signal.SIGTERM)
    assert survivor.wait(30) == 0
    await queue.close()


@job(name="count")
async def count(i: int) -> None:
    pass


async def run_worker_until(worker: Worker, condition: Any, limit: float = 30) -> None:
    with anyio.fail_after(limit):
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker.run)
            while not await condition():
                await anyio.sleep(0.05)
            worker.stop()


async def test_malformed_messages_are_dead_lettered_with_their_bytes_and_the_rest_run(rabbit_url: str, name: str) -> None:
    import aio_pika

    queue = RabbitQueue(rabbit_url, queue=name)
    await queue.open()
    raw = [
        ({"attempt": 1}, b'{"i": 1}', "job: missing"),
        ({"job": ""}, b'{"i": 1}', "job: empty"),
        ({"job": "count", "attempt": "x"}, b'{"i": 1}', "attempt: not a positive integer"),
        ({"job": "count", "attempt": 0}, b'{"i": 1}', "attempt: not a positive integer"),
        ({"job": "count", "enqueued_at": "later"}, b'{"i": 1}', "enqueued_at: not a number"),
        ({"job": "count", "enqueued_at": "-5"}, b'{"i": 1}', "enqueued_at: not a finite time"),
        ({"job": "count"}, b"\xff\xfe not utf-8", "payload: payload is not valid UTF-8"),
        ({"job": "count"}, b"{not json", "payload: payload is not JSON"),
        ({"job": "count"}, b"[" * 100 + b"]" * 100, "payload: payload nests deeper"),
        ({"job": 5}, b"{}", "job: not text"),
    ]
    connection = await aio_pika.connect(rabbit_url)
    channel = await connection.channel(publisher_confirms=True)
    for headers, body, _why in raw:
        await channel.default_exchange.publish(aio_pika.Message(body, headers=headers), routing_key=name)
    await connection.close()
    await queue.enqueue(count, {"i": 7})
    worker = Worker(queue, [count], concurrency=4, poll_interval=0.1)

    async def settled() -> bool:
        return worker.stats["succeeded"] == 1 and len(await queue.dead_letters()) == len(raw)

    await run_worker_until(worker, settled)
    dead = list(reversed(await queue.dead_letters()))  # oldest first: the order they were sent
    assert [record["reason"] for record in dead] == ["malformed"] * len(raw)
    for record, (_headers, body, why) in zip(dead, raw, strict=True):
        assert record["raw:body"] == body  # the exact bytes
        assert why in record["error"]
    assert await queue.replay([record["dead_letter_id"] for record in dead]) == 0  # nothing to run
    assert await queue.purge() == len(raw)
    assert await queue.dead_letters() == []
    await queue.close()


def connection_pids(marker: str) -> list[str]:
    out = subprocess.run(
        ["rabbitmqctl", "-q", "list_connections", "pid", "client_properties"],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout
    return [line.split("\t")[0] for line in out.splitlines() if marker in line]


async def test_connection_closed_by_the_broker_mid_drain_loses_no_job_and_the_worker_carries_on(
    rabbit_url: str, name: str
) -> None:
    if shutil.which("rabbitmqctl") is None:
        pytest.skip("rabbitmqctl is not installed: cannot close a connection from the server side")
    ran: Counter[int] = Counter()

    @job(name="slow")
    async def slow(i: int) -> None:
        await anyio.sleep(0.02)
        ran[i] += 1

    queue = RabbitQueue(rabbit_url, queue=name)
    producer = RabbitQueue(rabbit_url, queue=name)
    await fill(producer, "slow", 400)
    worker = Worker(queue, [slow], concurrency=8, poll_interval=0.1, broker_backoff=0.1, broker_backoff_max=0.5)
    kills = 0

    async def kill_twice() -> None:
        nonlocal kills
        for round_ in range(2):
            await wait_for(lambda: len(ran) >= 60 * (round_ + 1), 60, "progress before the kill")  # noqa: B023
            pids = await anyio.to_thread.run_sync(connection_pids, queue.consumer)
            assert pids, "the worker's connection was not found"
            for pid in pids:
                await anyio.to_thread.run_sync(
                    lambda pid=pid: subprocess.run(
                        ["rabbitmqctl", "-q", "close_connection", pid, "test: closed by the server"],
                        check=True, timeout=60, capture_output=True,
                    )
                )
            kills += 1

    async def all_ran() -> bool:
        return len(ran) == 400 and kills == 2 and await backlog(rabbit_url, name) == 0

    with anyio.fail_after(120):
        async with anyio.create_task_group() as tg:
            tg.start_soon(kill_twice)
            await run_worker_until(worker, all_ran, limit=120)
    assert sorted(ran) == list(range(400))  # every job ran; a few may have run twice
    assert worker.stats["succeeded"] >= 400 - worker.stats["lease_lost"]
    assert worker.stats["dead_lettered"] == 0
    assert await queue.dead_letters() == []
    await queue.close()
    await producer.close()


async def test_lease_lost_with_the_connection_is_reported_not_raised(rabbit_url: str, name: str) -> None:
    queue = RabbitQueue(rabbit_url, queue=name)
    await queue.enqueue("count", {"i": 1})
    await queue.enqueue("count", {"i": 2})
    held = []
    with anyio.fail_after(10):
        while len(held) < 2:
            held += await queue.receive(2 - len(held), 0.5)
    assert queue._connection is not None
    await queue._connection.close()  # as a dead connection: the broker takes them back
    assert await queue.renew(held) == [d.id for d in held]
    assert await queue.ack(held[0]) is False
    assert await queue.retry(held[1], 0, "E: x") is False
    assert await queue.dead_letter(held[1], {"reason": "failed"}) is False
    assert await queue.release(held[1]) is False
    again = []
    with anyio.fail_after(10):
        while len(again) < 2:
            again += await queue.receive(2 - len(again), 0.5)
    assert sorted(d.payload["i"] for d in again) == [1, 2]
    assert [d.deliveries for d in again] == [2, 2]  # counted by the quorum queue
    for delivery in again:
        assert await queue.ack(delivery) is True
    await queue.close()


async def test_a_long_delay_hops_through_the_largest_bucket(rabbit_url: str, name: str) -> None:
    queue = RabbitQueue(rabbit_url, queue=name)
    await queue.open()
    # A message whose 'due' is far off, as after a hop of the largest bucket: it is
    # published to a delay queue again, not handed out.
    await queue._publish(name, b'{"i": 1}', {"job": "count", "due": repr(time.time() + 10 * 86400)}, "m1", "test")
    assert await queue.receive(10, 0.5) == []
    assert await backlog(rabbit_url, name) == 0
    assert await backlog(rabbit_url, f"{name}.delay.86400") == 1
    await queue.close()


def test_delays_round_up_to_a_bucket() -> None:
    assert _bucket(0.01) == 1 and _bucket(1.0) == 1 and _bucket(1.01) == 2 and _bucket(61) == 120
    assert _bucket(10**7) == DELAY_BUCKETS[-1]


def test_decode_message_counts_deliveries_from_both_headers() -> None:
    delivery = decode_message("m", {"job": "count", "x-delivery-count": 2, "returns": 1, "enqueued_at": "5.5"}, b"{}")
    assert (delivery.deliveries, delivery.enqueued_at, delivery.malformed) == (4, 5.5, None)


def test_constructing_under_trio_is_a_clear_error() -> None:
    async def build() -> None:
        RabbitQueue(RABBIT_URL)

    with pytest.raises(LifecycleError, match="asyncio backend"):
        anyio.run(build, backend="trio")


async def test_bad_credentials_are_a_clear_error_from_open_without_the_password(rabbit_url: str, name: str) -> None:
    queue = RabbitQueue(f"amqp://guest:s3cr3t-{uuid.uuid4().hex[:6]}@127.0.0.1:5672/", queue=name)
    with pytest.raises(LifecycleError, match="authentication failed") as info:
        await queue.open()
    assert not isinstance(info.value, BrokerUnavailable)
    assert "s3cr3t" not in str(info.value)
    await queue.close()


async def test_a_missing_vhost_is_a_clear_error(rabbit_url: str, name: str) -> None:
    queue = RabbitQueue("amqp://guest:guest@127.0.0.1:5672/no-such-vhost-" + uuid.uuid4().hex[:6], queue=name)
    with pytest.raises(LifecycleError) as info:
        await queue.open()
    assert not isinstance(info.value, BrokerUnavailable)
    await queue.close()


async def test_a_queue_declared_otherwise_is_a_clear_error(rabbit_url: str, name: str) -> None:
    import aio_pika

    connection = await aio_pika.connect(rabbit_url)
    channel = await connection.channel()
    await channel.declare_queue(name, durable=False, auto_delete=False)  # a classic queue
    await connection.close()
    queue = RabbitQueue(rabbit_url, queue=name)
    with pytest.raises(LifecycleError, match="PRECONDITION_FAILED") as info:
        await queue.open()
    assert not isinstance(info.value, BrokerUnavailable)
    await queue.close()


async def test_an_unreachable_broker_is_broker_unavailable() -> None:
    queue = RabbitQueue("amqp://guest:hunter22@127.0.0.1:1/", queue="x", timeout=2)
    with pytest.raises(BrokerUnavailable) as info:
        await queue.open()
    assert "hunter22" not in str(info.value)
    with pytest.raises(BrokerUnavailable):
        await queue.enqueue("count", {"i": 1})
    await queue.close()


async def test_used_after_close_is_an_error(rabbit_url: str, name: str) -> None:
    queue = RabbitQueue(rabbit_url, queue=name)
    await queue.close()
    with pytest.raises(LifecycleError, match="after close"):
        await queue.receive(1, 0)


def test_from_url_takes_the_queue_options_and_refuses_unknown_ones() -> None:
    queue = queue_from_url("amqp://guest:pw@127.0.0.1:5672/?queue=emails&lease=30&timeout=3")
    assert isinstance(queue, RabbitQueue)
    assert (queue.queue, queue.lease, queue.timeout, queue.dead_letter_queue) == ("emails", 30.0, 3.0, "emails.dead")
    assert "pw" not in queue.url
    with pytest.raises(ValueError, match="lease"):
        queue_from_url("amqp://127.0.0.1/?lease=soon")
    with pytest.raises(ValueError, match="positive"):
        RabbitQueue(lease=0)
    with pytest.raises(ValueError, match="positive"):
        RabbitQueue(timeout=0)


async def test_bad_dead_letter_ids_are_refused(rabbit_url: str, name: str) -> None:
    queue = RabbitQueue(rabbit_url, queue=name)
    for call in (lambda: queue.dead_letters(before="abc"), lambda: queue.replay(["-1"]), lambda: queue.purge(["1-0"])):
        with pytest.raises(ValueError, match="dead_letter_id"):
            await call()
    assert await queue.purge([]) == 0 and await queue.replay([]) == 0 and await queue.dead_letters(0) == []
    await queue.close()


# -- a dead-letter stream that has not come back after a crash of the broker -------------------


class _Channel:
    """Stands for an aio-pika channel: records declares, refuses the one named in
    ``refuse`` with ``error`` (as the broker's channel exception would)."""

    def __init__(self, refuse: str | None = None, error: str = "") -> None:
        self.declared: list[str] = []
        self.refuse, self.error = refuse, error
        self.is_closed = False

    async def declare_queue(self, name: str, **_options: Any) -> None:
        if name == self.refuse:
            self.is_closed = True  # a refused declare closes its channel
            raise RuntimeError(self.error)
        self.declared.append(name)

    async def close(self) -> None:
        self.is_closed = True


class _Connection:
    def __init__(self, side: _Channel) -> None:
        self.side = side

    async def channel(self) -> _Channel:
        return self.side


DOWN = "NOT_FOUND - home node 'rabbit@host' of durable queue 'jobs.dead' in vhost '/' is down or inaccessible"


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_dead_letter_stream_still_down_after_a_crash_does_not_stop_consuming(anyio_backend: str) -> None:
    from structlog.testing import capture_logs

    queue = RabbitQueue(RABBIT_URL, queue="jobs")
    publisher, side = _Channel(), _Channel(refuse="jobs.dead", error=DOWN)
    with capture_logs() as logs:
        await queue._declare(_Connection(side), publisher)  # type: ignore[arg-type]
    assert publisher.declared == ["jobs"] and not publisher.is_closed  # the work queue, on its own channel
    [event] = [log for log in logs if log["event"] == "queue.dead_letters_unavailable"]
    assert event["log_level"] == "warning" and event["dead_letter_queue"] == "jobs.dead"


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_any_other_refusal_of_the_dead_letter_stream_still_fails_the_declare(anyio_backend: str) -> None:
    queue = RabbitQueue(RABBIT_URL, queue="jobs")
    side = _Channel(refuse="jobs.dead", error="PRECONDITION_FAILED - inequivalent arg 'x-queue-type'")
    with pytest.raises(RuntimeError, match="inequivalent"):
        await queue._declare(_Connection(side), _Channel())  # type: ignore[arg-type]
    assert side.is_closed
