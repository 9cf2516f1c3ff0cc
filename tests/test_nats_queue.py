"""NatsQueue and Worker against the real NATS server with JetStream: nothing is lost.

Skipped with a reason when NATS is unreachable; under CI=true that is a failure. Each
test has streams of its own (a random suffix), deleted afterwards."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import nats
import pytest
from harnesses.nats import delete_streams, nats_url
from nats_worker_app import build, runs

from lifecycle import LifecycleError, Worker, job
from lifecycle.queues import BrokerUnavailable, NatsQueue, queue_from_url

pytestmark = [pytest.mark.anyio, pytest.mark.nats]
APP = Path(__file__).with_name("nats_worker_app.py")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # nats-py's client is asyncio-only


@pytest.fixture
def url() -> str:
    return nats_url()


@pytest.fixture
async def stream(url: str) -> AsyncIterator[str]:
    name = f"lifecycle-test-{uuid.uuid4().hex[:12]}"
    yield name
    await delete_streams(url, name)


def make_queue(url: str, stream: str, **options: Any) -> NatsQueue:
    options.setdefault("lease", 1.0)
    return NatsQueue(url, stream=stream, subject=f"test.{stream}", **options)


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def spawn(url: str, stream: str, directory: Path, processes: list[subprocess.Popen[bytes]], **env: str) -> Any:
    proc = subprocess.Popen(
        [sys.executable, str(APP), url, stream, str(directory)],
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    processes.append(proc)
    return proc


async def stream_messages(url: str, name: str) -> int:
    client = await nats.connect(url)
    try:
        return int((await client.jetstream().stream_info(name)).state.messages)
    finally:
        await client.close()


async def publish_raw(url: str, subject: str, body: bytes, headers: dict[str, str] | None = None) -> None:
    client = await nats.connect(url)
    try:
        await client.jetstream().publish(subject, body, headers=headers)
    finally:
        await client.close()


async def run_worker_until(worker: Worker, condition: Any, limit: float = 30) -> None:
    with anyio.fail_after(limit):
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker.run)
            while not await condition():
                await anyio.sleep(0.05)
            worker.stop()


async def test_worker_drains_acks_and_the_stream_is_left_empty(url: str, stream: str) -> None:
    done: list[int] = []

    @job
    async def record(n: int) -> None:
        done.append(n)

    queue = make_queue(url, stream)
    for n in range(50):
        await queue.enqueue(record, {"n": n})

    async def finished() -> bool:
        return len(done) == 50 and await stream_messages(url, stream) == 0

    await run_worker_until(Worker(queue, [record], concurrency=8, poll_interval=0.1), finished)
    assert sorted(done) == list(range(50))
    await queue.close()


async def test_worker_killed_mid_job_is_redelivered_and_completed_by_another(
    url: str, stream: str, tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    queue = make_queue(url, stream, lease=1.0)
    await queue.open()
    await queue.enqueue("hang_first", {"i": 1})
    victim = spawn(url, stream, tmp_path, processes, LEASE="1.0")
    with anyio.fail_after(20):
        while "started 1" not in runs(tmp_path):
            await anyio.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait(10)
    assert await stream_messages(url, stream) == 1  # never acknowledged

    async def finished() -> bool:
        return "finished 1" in runs(tmp_path) and await stream_messages(url, stream) == 0

    await run_worker_until(Worker(queue, build(str(tmp_path)), poll_interval=0.1), finished)
    assert runs(tmp_path).count("started 1") == 2
    assert await queue.dead_letters() == []
    await queue.close()


async def test_malformed_messages_are_dead_lettered_with_their_bytes_and_the_rest_run(url: str, stream: str) -> None:
    done: list[int] = []

    @job
    async def record(n: int) -> None:
        done.append(n)

    queue = make_queue(url, stream)
    await queue.open()
    subject = f"test.{stream}"
    bad = [
        (b'{"n": 1}', None, "Lifecycle-Job: missing"),
        (b'{"n": 1}', {"Lifecycle-Job": "record", "Lifecycle-Attempt": "zero"}, "Lifecycle-Attempt"),
        (b'{"n": 1}', {"Lifecycle-Job": "record", "Lifecycle-Enqueued-At": "nan"}, "Lifecycle-Enqueued-At"),
        (b"\xff\xfe not utf-8", {"Lifecycle-Job": "record"}, "UTF-8"),
        (b"{not json", {"Lifecycle-Job": "record"}, "not JSON"),
        (b"[" * 100 + b"]" * 100, {"Lifecycle-Job": "record"}, "deeper"),
    ]
    for body, headers, _why in bad:
        await publish_raw(url, subject, body, headers)
    await queue.enqueue("record", {"n": 7})

    async def finished() -> bool:
        return done == [7] and len(await queue.dead_letters()) == len(bad)

    await run_worker_until(Worker(queue, [record], concurrency=4, poll_interval=0.1), finished)
    dead = list(reversed(await queue.dead_letters()))  # oldest first: the order published
    for (body, headers, why), record_ in zip(bad, dead, strict=True):
        assert record_["reason"] == "malformed"
        assert why in record_["error"]
        assert record_["raw:payload"] == body  # the bytes as they arrived
        assert record_["raw:headers"] == (headers or {})
    assert await queue.replay([r["dead_letter_id"] for r in dead]) == 0  # nothing to run
    assert await stream_messages(url, stream) == 0
    await queue.close()


class Proxy:
    """A TCP proxy on loopback between the client and the server; ``cut()`` closes
    every connection through it at once, as a server-side kill would."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.writers: list[asyncio.StreamWriter] = []
        self.cuts = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        self.writers += [writer, up_writer]

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.CancelledError):
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            sink.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def cut(self) -> None:
        self.cuts += 1
        for writer in self.writers:
            transport = writer.transport
            transport.abort()  # an RST, not a polite close
        self.writers.clear()

    async def close(self) -> None:
        self.cut()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


async def test_connection_cut_mid_drain_loses_no_job_and_the_worker_carries_on(url: str, stream: str) -> None:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    proxy = Proxy((parts.hostname or "127.0.0.1", parts.port or 4222))
    port = await proxy.start()
    done: list[int] = []

    @job
    async def slow(n: int) -> None:
        await anyio.sleep(0.01)
        done.append(n)

    total = 400
    producer = make_queue(url, stream)
    for n in range(total):
        await producer.enqueue(slow, {"n": n})
    queue = make_queue(f"nats://127.0.0.1:{port}", stream, lease=5.0, request_timeout=2.0)
    worker = Worker(queue, [slow], concurrency=16, poll_interval=0.1, retry_backoff=0.05)

    async def finished() -> bool:
        if proxy.cuts < 3 and len(done) >= (proxy.cuts + 1) * total // 5:
            proxy.cut()
        # Not done before the third cut, even on a machine fast enough to drain first.
        return proxy.cuts == 3 and set(done) == set(range(total)) and await stream_messages(url, stream) == 0

    await run_worker_until(worker, finished, limit=60)
    assert proxy.cuts == 3
    assert set(done) == set(range(total))  # no job lost (a cut may make one run twice)
    assert len(done) - total <= 16 * 3  # at most the in-flight ones of each cut again
    assert await producer.dead_letters() == []
    await queue.close()
    await producer.close()
    await proxy.close()


async def test_renew_reports_a_message_lost_once_its_lease_ran_out_and_settles_return_false(
    url: str, stream: str
) -> None:
    queue, other = make_queue(url, stream, lease=1.0), make_queue(url, stream, lease=1.0)
    await queue.enqueue("count", {"i": 1})
    with anyio.fail_after(10):
        [held] = await queue.receive(1, 1.0)
    assert await queue.renew([held]) == []
    with anyio.fail_after(10):
        taken: list[Any] = []
        while not taken:
            taken = await other.receive(1, 0.5)
    assert taken[0].deliveries == 2
    assert await queue.renew([held]) == [held.id]
    assert await queue.release(held) is False
    assert await queue.dead_letter(held, {"reason": "late"}) is False
    assert await other.ack(taken[0]) is True
    assert await stream_messages(url, stream) == 0
    await queue.close()
    await other.close()


async def test_max_deliver_dead_letters_the_delivery_past_it(url: str, stream: str) -> None:
    queue = make_queue(url, stream, lease=0.5, max_deliver=2)
    await queue.enqueue("count", {"i": 1})
    seen: list[int] = []
    with anyio.fail_after(20):
        while not await queue.dead_letters():
            for delivery in await queue.receive(1, 0.3):  # never settled: a dying consumer
                seen.append(delivery.deliveries)
                queue._held.clear()  # forget it, as a new process would
    [dead] = await queue.dead_letters()
    assert seen == [1, 2]
    assert (dead["reason"], dead["deliveries"], dead["payload"]) == ("max_deliver", 3, {"i": 1})
    assert await stream_messages(url, stream) == 0
    await queue.close()


async def test_enqueue_with_a_message_id_is_stored_once(url: str, stream: str) -> None:
    queue = make_queue(url, stream)
    first = await queue.enqueue("count", {"i": 1}, message_id="order-17")
    again = await queue.enqueue("count", {"i": 1}, message_id="order-17")
    other = await queue.enqueue("count", {"i": 1})
    assert first == again != other
    assert await stream_messages(url, stream) == 2
    delayed = await queue.enqueue("count", {"i": 2}, delay=30)
    assert delayed.startswith("delayed:")
    with pytest.raises(ValueError, match="attempt must be >= 1"):
        await queue.enqueue("count", {"i": 1}, attempt=0)
    await queue.close()


async def test_a_malformed_delivery_cannot_be_retried(url: str, stream: str) -> None:
    queue = make_queue(url, stream)
    await queue.open()
    await publish_raw(url, f"test.{stream}", b"{}")
    with anyio.fail_after(10):
        [delivery] = await queue.receive(1, 1.0)
    assert delivery.malformed == "Lifecycle-Job: missing"
    with pytest.raises(ValueError, match="cannot be retried"):
        await queue.retry(delivery, 0, "E: x")
    assert await queue.release(delivery) is True  # put back unchanged, still malformed
    with anyio.fail_after(10):
        [again] = await queue.receive(1, 1.0)
    assert (again.malformed, again.deliveries) == ("Lifecycle-Job: missing", 1)
    assert await queue.dead_letter(again, {"reason": "malformed"}) is True
    assert (await queue.dead_letters())[0]["raw:payload"] == b"{}"
    await queue.close()


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_constructing_under_trio_is_a_clear_error() -> None:
    with pytest.raises(LifecycleError, match="needs the asyncio backend.*running under trio"):
        NatsQueue()


async def test_an_unreachable_server_is_broker_unavailable_without_the_password() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    queue = NatsQueue(f"nats://user:s3cret-pw@127.0.0.1:{port}", connect_timeout=0.5)
    with anyio.fail_after(20), pytest.raises(BrokerUnavailable) as caught:
        await queue.open()
    assert "s3cret-pw" not in str(caught.value) and "***" in str(caught.value)
    assert "s3cret-pw" not in queue.url
    with pytest.raises(BrokerUnavailable):
        await queue.enqueue("count", {"i": 1})
    await queue.close()


@pytest.mark.parametrize("bad", ["http://127.0.0.1:4222", "nats://"])
async def test_a_bad_url_is_a_clear_error_from_open(bad: str) -> None:
    queue = NatsQueue(bad)
    with pytest.raises(LifecycleError, match="invalid NATS URL"):
        await queue.open()


@pytest.fixture
def private_server(tmp_path: Path) -> Iterator[str]:
    """A nats-server of our own, without JetStream and with a password."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    try:
        proc = subprocess.Popen(
            ["nats-server", "-a", "127.0.0.1", "-p", str(port), "--user", "u", "--pass", "right-pw"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    except FileNotFoundError:
        pytest.skip("the nats-server binary is not installed")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            break
        time.sleep(0.05)
    yield f"127.0.0.1:{port}"
    proc.terminate()
    proc.wait(10)


async def test_open_refuses_bad_credentials_and_a_server_without_jetstream(private_server: str) -> None:
    wrong = NatsQueue(f"nats://u:wrong-pw@{private_server}", connect_timeout=2)
    with anyio.fail_after(20), pytest.raises(LifecycleError, match="refused the credentials") as caught:
        await wrong.open()
    assert not isinstance(caught.value, BrokerUnavailable) and "wrong-pw" not in str(caught.value)
    await wrong.close()
    plain = NatsQueue(f"nats://u:right-pw@{private_server}", request_timeout=1)
    with anyio.fail_after(20), pytest.raises(LifecycleError, match="JetStream enabled") as caught:
        await plain.open()
    assert not isinstance(caught.value, BrokerUnavailable)
    await plain.close()


async def test_open_refuses_a_stream_of_the_wrong_kind(url: str, stream: str) -> None:
    client = await nats.connect(url)
    await client.jetstream().add_stream(name=stream, subjects=[f"other.{stream}"])
    await client.close()
    queue = make_queue(url, stream)
    with pytest.raises(LifecycleError, match="choose another stream name") as caught:
        await queue.open()
    assert not isinstance(caught.value, BrokerUnavailable)
    await queue.close()


async def test_open_is_idempotent_and_dead_letter_arguments_are_checked(url: str, stream: str) -> None:
    queue = make_queue(url, stream)
    await queue.open()
    await queue.open()
    with pytest.raises(ValueError, match="dead_letter_id"):
        await queue.dead_letters(before="1-0")
    with pytest.raises(ValueError, match="dead_letter_id"):
        await queue.replay(["x"])
    with pytest.raises(ValueError, match="dead_letter_id"):
        await queue.purge(["x"])
    assert await queue.dead_letters(0) == []
    assert await queue.purge([]) == 0
    assert await queue.renew([]) == []
    assert await queue.receive(0, 1) == []
    await queue.close()
    await queue.close()


def test_constructor_checks_its_arguments() -> None:
    for options, match in (
        ({"lease": 0}, "lease must be positive"),
        ({"max_deliver": 0}, "max_deliver must be >= 1"),
        ({"stream": "a.b"}, "stream 'a.b'"),
        ({"subject": "jobs.*"}, "without wildcards"),
        ({"request_timeout": -1}, "request_timeout must be positive"),
    ):
        with pytest.raises(ValueError, match=match):
            NatsQueue(**options)


def test_queue_from_url_builds_a_nats_queue_with_its_options() -> None:
    queue = queue_from_url("nats://u:pw-secret@127.0.0.1:4222?stream=EMAILS&lease=12&max_deliver=4", durable="w2")
    assert isinstance(queue, NatsQueue)
    assert (queue.stream, queue.lease, queue.max_deliver, queue.durable) == ("EMAILS", 12.0, 4, "w2")
    assert "pw-secret" not in queue.url
    with pytest.raises(ValueError, match="unknown option 'bogus'"):
        queue_from_url("nats://127.0.0.1:4222?bogus=1")
