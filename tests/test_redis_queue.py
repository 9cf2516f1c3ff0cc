"""RedisStreamQueue and Worker against the real Redis server: nothing is lost.

Skipped with a reason when Redis is unreachable; under CI=true that is a failure."""

import json
import os
import shutil
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
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis import exceptions as redis_errors
from redis.asyncio import Redis

from lifecycle import Depends, JobContext, LifecycleError, PayloadError, Worker, job
from lifecycle._log import redact
from lifecycle.queues import BrokerUnavailable, Delivery, RedisStreamQueue

pytestmark = [pytest.mark.anyio, pytest.mark.redis]
APP = Path(__file__).with_name("redis_worker_app.py")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # redis-py's client is asyncio-only


@pytest.fixture
def stream() -> str:
    return f"lifecycle-test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def redis(redis_url: str, stream: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url, decode_responses=True)
    yield client
    keys = [key async for key in client.scan_iter(f"{stream}*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()


def make_queue(redis_url: str, stream: str, **options: Any) -> RedisStreamQueue:
    options.setdefault("claim_idle", 0.5)
    return RedisStreamQueue(redis_url, stream=stream, group="workers", **options)


async def pending_count(redis: Redis, stream: str) -> int:
    info: Any = await redis.xpending(stream, "workers")
    return int(info["pending"])


async def run_worker_until(worker: Worker, condition: Any, limit: float = 20) -> None:
    with anyio.fail_after(limit):
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker.run)
            while not await condition():
                await anyio.sleep(0.02)
            worker.stop()


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def spawn(redis_url: str, stream: str, processes: list[subprocess.Popen[bytes]], **env: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, str(APP), redis_url, stream],
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    processes.append(proc)
    return proc


async def test_acknowledged_after_success_and_removed_from_the_stream(
    redis_url: str, stream: str, redis: Redis
) -> None:
    done: list[int] = []

    @job
    async def record(n: int) -> None:
        done.append(n)

    queue = make_queue(redis_url, stream)
    for n in range(20):
        await queue.enqueue("record", {"n": n})

    async def finished() -> bool:
        return len(done) == 20 and await pending_count(redis, stream) == 0

    await run_worker_until(Worker(queue, [record], concurrency=4, poll_interval=0.1), finished)
    assert sorted(done) == list(range(20))
    assert await redis.xlen(stream) == 0
    await queue.close()


async def test_poison_message_reaches_the_dead_letter_after_its_attempts(
    redis_url: str, stream: str, redis: Redis
) -> None:
    @job(retries=2)
    async def always_fails(user_id: int, ctx: JobContext) -> None:
        raise ValueError(f"bad user {user_id} on attempt {ctx.attempt}")

    queue = make_queue(redis_url, stream)
    await queue.enqueue("always_fails", {"user_id": 9})

    async def dead() -> bool:
        return bool(await redis.xlen(f"{stream}:dead"))

    worker = Worker(queue, [always_fails], retry_backoff=0.05, poll_interval=0.05)
    await run_worker_until(worker, dead)
    [record] = await queue.dead_letters()
    assert record["reason"] == "failed"
    assert record["attempts"] == 3
    assert record["payload"] == {"user_id": 9}
    assert record["error"] == "ValueError: bad user 9 on attempt 3"
    assert "Traceback" in record["traceback"]
    assert await pending_count(redis, stream) == 0
    assert await redis.zcard(f"{stream}:delayed") == 0
    await queue.close()


async def test_message_that_keeps_killing_its_consumers_is_dead_lettered(
    redis_url: str, stream: str, redis: Redis
) -> None:
    @job
    async def fine() -> None:
        pass

    await make_queue(redis_url, stream).enqueue("fine", {})
    seen = []
    # claim_idle well above a loaded machine's gaps between reads: a gap longer than half
    # of it counts as a stall of this consumer and defers reclaiming (RedisStreamQueue).
    for n in range(3):  # three consumers took it and died without acknowledging
        ghost = make_queue(redis_url, stream, consumer=f"ghost-{n}", claim_idle=0.5, claim_interval=0)
        with anyio.fail_after(10):
            while not (deliveries := await ghost.receive(1, 0.1)):
                pass
        seen.append(deliveries[0].deliveries)
        await ghost.close()
    assert seen == [1, 2, 3]
    queue = make_queue(redis_url, stream, claim_idle=0.5, claim_interval=0)

    async def dead() -> bool:
        return bool(await redis.xlen(f"{stream}:dead"))

    await run_worker_until(Worker(queue, [fine], max_deliveries=3, poll_interval=0.05), dead)
    [record] = await queue.dead_letters()
    assert record["reason"] == "poison"
    assert record["deliveries"] == 4
    assert await pending_count(redis, stream) == 0
    await queue.close()


async def test_teardown_that_raises_causes_a_retry_not_an_ack(redis_url: str, stream: str, redis: Redis) -> None:
    attempts: list[int] = []

    async def tx(ctx: JobContext) -> Any:
        yield None
        if ctx.attempt == 1:
            raise RuntimeError("commit failed")

    @job(retries=1)
    async def write(t: Any = Depends(tx), ctx: JobContext = None) -> None:  # type: ignore[assignment]
        attempts.append(ctx.attempt)

    queue = make_queue(redis_url, stream)
    await queue.enqueue("write", {})
    worker = Worker(queue, [write], retry_backoff=0.05, poll_interval=0.05)

    async def settled() -> bool:
        return worker.stats["succeeded"] == 1

    await run_worker_until(worker, settled)
    assert attempts == [1, 2]
    assert worker.stats["retried"] == 1
    assert await pending_count(redis, stream) == 0
    await queue.close()


async def test_hanging_teardown_is_bounded_by_the_teardown_timeout(redis_url: str, stream: str, redis: Redis) -> None:
    async def hangs(ctx: JobContext) -> Any:
        yield None
        if ctx.attempt == 1:
            await anyio.sleep(3600)

    @job(retries=1)
    async def work(h: Any = Depends(hangs)) -> None:
        pass

    queue = make_queue(redis_url, stream)
    await queue.enqueue("work", {})
    worker = Worker(queue, [work], teardown_timeout=0.2, retry_backoff=0.05, poll_interval=0.05)

    async def settled() -> bool:
        return worker.stats["succeeded"] == 1

    await run_worker_until(worker, settled, limit=10)
    assert worker.stats["retried"] == 1
    await queue.close()


async def test_graceful_shutdown_finishes_in_flight_and_releases_overrunning_jobs(
    redis_url: str, stream: str, redis: Redis
) -> None:
    finished: list[int] = []
    started: list[int] = []

    @job
    async def sleepy(n: int, seconds: float) -> None:
        started.append(n)
        await anyio.sleep(seconds)
        finished.append(n)

    queue = make_queue(redis_url, stream, claim_idle=60)
    for n in range(3):
        await queue.enqueue("sleepy", {"n": n, "seconds": 0.2})
    await queue.enqueue("sleepy", {"n": 99, "seconds": 3600}, attempt=2)
    worker = Worker(queue, [sleepy], concurrency=8, shutdown_grace=0.5, poll_interval=0.05)
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker.run)
            while len(started) < 4:
                await anyio.sleep(0.01)
            tg.cancel_scope.cancel()  # as SIGTERM does under the CLI
    assert sorted(finished) == [0, 1, 2]
    assert worker.stats["released"] == 1
    # Released: back in the stream at once, for any consumer, same attempt, no delivery counted.
    assert await pending_count(redis, stream) == 0
    successor = make_queue(redis_url, stream, consumer="next")
    [released] = await successor.receive(1, 1)
    assert (released.payload, released.attempt, released.deliveries) == ({"n": 99, "seconds": 3600}, 2, 1)
    await successor.close()
    await queue.close()


async def test_worker_killed_mid_job_is_reclaimed_and_completed_by_another(
    redis_url: str, stream: str, redis: Redis, processes: list[subprocess.Popen[bytes]]
) -> None:
    queue = make_queue(redis_url, stream, claim_idle=0.5, claim_interval=0.1)
    await queue.enqueue("hang_first", {"i": 1})
    victim = spawn(redis_url, stream, processes, CLAIM_IDLE="0.5")
    with anyio.fail_after(20):
        while not await redis.llen(f"{stream}:started"):
            await anyio.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait(10)
    assert await pending_count(redis, stream) == 1  # the killed worker never acknowledged it

    from redis_worker_app import build

    async def finished() -> bool:
        return bool(await redis.llen(f"{stream}:finished")) and await pending_count(redis, stream) == 0

    await run_worker_until(Worker(queue, build(redis_url, stream), poll_interval=0.1), finished)
    assert await redis.get(f"{stream}:runs:1") == "2"
    assert await redis.xlen(f"{stream}:dead") == 0
    await queue.close()


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_constructing_under_trio_is_a_clear_error(redis_url: str) -> None:
    with pytest.raises(LifecycleError, match="needs the asyncio backend.*running under trio"):
        RedisStreamQueue(redis_url)


# -- helpers for the fault tests ----------------------------------------------------------


async def collect(queue: RedisStreamQueue, count: int, limit: float = 10) -> list[Delivery]:
    got: list[Delivery] = []
    with anyio.fail_after(limit):
        while len(got) < count:
            got += await queue.receive(count - len(got), 0.2)
    return got


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PrivateRedis:
    """A redis-server of this test's own on a free loopback port (never the shared one),
    for the faults that kill, pause or reconfigure a server."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def admin(self) -> Redis:
        return Redis(host="127.0.0.1", port=self.port, decode_responses=True, socket_timeout=30)

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--enable-debug-command", "yes", "--dir", str(self.dir)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def cli(self, *args: str) -> subprocess.Popen[bytes]:
        """A redis-cli command running in the background (DEBUG SLEEP blocks its caller)."""
        return subprocess.Popen(["redis-cli", "-p", str(self.port), *args], stdout=subprocess.DEVNULL)


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        message = "redis-server and redis-cli are needed for a private server"
        if os.environ.get("CI"):
            pytest.fail(f"{message} (CI=true: a missing service is a failure, not a skip)")
        pytest.skip(message)
    server = PrivateRedis(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.kill()


async def until_unavailable(call: Any, limit: float = 15) -> BrokerUnavailable:
    """Call until it raises BrokerUnavailable (anything else fails the test)."""
    with anyio.fail_after(limit):
        while True:
            try:
                await call()
            except BrokerUnavailable as exc:
                return exc


async def until_available(call: Any, limit: float = 20) -> Any:
    """Call until it stops raising BrokerUnavailable; return its result."""
    with anyio.fail_after(limit):
        while True:
            try:
                return await call()
            except BrokerUnavailable:
                await anyio.sleep(0.1)


# -- malformed entries --------------------------------------------------------------------

REPRODUCTIONS = {
    "attempt one": {"job": "rec", "payload": '{"i":1}', "attempt": "one", "enqueued_at": "0"},
    "enqueued_at yesterday": {"job": "rec", "payload": '{"i":1}', "attempt": "1", "enqueued_at": "yesterday"},
    "JSON nested 100,000 deep": {"job": "rec", "payload": "[" * 100_000 + "]" * 100_000, "attempt": "1"},
    "invalid UTF-8": {"job": b"rec\xff", "payload": b'{"i":"\xc3\x28"}', "attempt": "1", "enqueued_at": "0"},
}


@pytest.mark.parametrize("case", list(REPRODUCTIONS))
async def test_a_malformed_entry_is_returned_as_malformed_and_the_batch_goes_on(
    redis_url: str, stream: str, redis: Redis, case: str
) -> None:
    queue = make_queue(redis_url, stream)
    await queue.open()
    await redis.xadd(stream, REPRODUCTIONS[case])  # type: ignore[arg-type]
    await queue.enqueue("rec", {"i": 2})
    bad, good = sorted(await collect(queue, 2), key=lambda d: d.malformed is None)
    field = {"attempt one": "attempt", "enqueued_at yesterday": "enqueued_at"}.get(case, "payload" if "JSON" in case else "job")
    assert bad.malformed is not None and bad.malformed.startswith(f"{field}: ")
    assert (bad.job, bad.payload) == ("", None)
    assert bad.raw == {k.encode(): v if isinstance(v, bytes) else v.encode() for k, v in REPRODUCTIONS[case].items()}
    assert (good.job, good.payload, good.malformed) == ("rec", {"i": 2}, None)
    await queue.dead_letter(bad, {"reason": "malformed", "error": bad.malformed})
    [record] = await queue.dead_letters()
    assert record["reason"] == "malformed"
    assert {k: v for k, v in record.items() if k.startswith("raw:")} == {
        f"raw:{k.decode()}": v for k, v in bad.raw.items()
    }  # losslessly
    assert await queue.replay([record["dead_letter_id"]]) == 0  # nothing to run
    assert len(await queue.dead_letters()) == 1
    await queue.ack(good)
    assert await redis.xlen(stream) == 0 and await pending_count(redis, stream) == 0
    await queue.close()


async def test_worker_dead_letters_malformed_entries_and_runs_the_rest(
    redis_url: str, stream: str, redis: Redis
) -> None:
    done: list[int] = []

    @job(name="rec")
    async def rec(i: int) -> None:
        done.append(i)

    queue = make_queue(redis_url, stream)
    for fields in REPRODUCTIONS.values():
        await redis.xadd(stream, fields)  # type: ignore[arg-type]
    await queue.enqueue("rec", {"i": 1})

    async def settled() -> bool:
        return done == [1] and await redis.xlen(f"{stream}:dead") == 4

    await run_worker_until(Worker(queue, [rec], poll_interval=0.05), settled)
    records = await queue.dead_letters()
    assert {r["reason"] for r in records} == {"malformed"}
    assert all(any(k.startswith("raw:") for k in r) for r in records)
    assert await redis.xlen(stream) == 0 and await pending_count(redis, stream) == 0
    await queue.close()


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)
GOOD_FIELDS = {
    b"job": st.text(min_size=1, max_size=20).map(str.encode),
    b"payload": st.dictionaries(st.text(max_size=5), JSON_VALUES, max_size=4).map(lambda d: json.dumps(d).encode()),
    b"attempt": st.integers(1, 10**9).map(lambda n: str(n).encode()),
    b"enqueued_at": st.floats(0, 1e10).map(lambda f: repr(f).encode()),
}


@st.composite
def stream_entries(draw: st.DrawFn) -> tuple[dict[bytes, bytes], bool]:
    """An entry's fields, each good, arbitrary bytes, or missing; and whether every
    field is known to be good (arbitrary bytes may be good by chance)."""
    fields: dict[bytes, bytes] = {}
    known_good = True
    for name, good in GOOD_FIELDS.items():
        choice = draw(st.sampled_from(["good", "good", "bytes", "missing"]))
        if choice == "good":
            fields[name] = draw(good)
        elif choice == "bytes":
            fields[name] = draw(st.binary(max_size=40))
            known_good = False
        elif name in (b"job", b"payload"):
            known_good = False
    if draw(st.booleans()) or not fields:
        fields[b"extra"] = draw(st.binary(max_size=10))
    return fields, known_good


async def fuzz_round(url: str, entries: list[tuple[dict[bytes, bytes], bool]]) -> None:
    stream = f"lifecycle-test-fuzz-{uuid.uuid4().hex[:12]}"
    client = Redis.from_url(url)
    queue = RedisStreamQueue(url, stream=stream, group="workers", claim_idle=60)
    try:
        await queue.open()
        sent = {(await client.xadd(stream, fields)).decode(): (fields, ok) for fields, ok in entries}  # type: ignore[arg-type]
        deliveries = await collect(queue, len(entries))
        assert sorted(d.id for d in deliveries) == sorted(sent)
        malformed = []
        for delivery in deliveries:
            fields, known_good = sent[delivery.id]
            if delivery.malformed is None:
                assert delivery.job == fields[b"job"].decode()
                assert delivery.payload == json.loads(fields[b"payload"])
                assert delivery.attempt == int(fields.get(b"attempt", b"1"))
                assert delivery.enqueued_at == float(fields.get(b"enqueued_at", b"0"))
                await queue.ack(delivery)
            else:
                assert not known_good, delivery.malformed
                assert delivery.malformed.split(":")[0] in ("job", "payload", "attempt", "enqueued_at")
                assert delivery.raw == fields
                malformed.append(delivery)
                await queue.dead_letter(delivery, {"reason": "malformed", "error": delivery.malformed})
        records = await queue.dead_letters(len(entries) + 1)
        assert len(records) == len(malformed)
        for record, delivery in zip(records, reversed(malformed), strict=True):
            raw = {k[4:].encode("utf-8", "surrogateescape"): v for k, v in record.items() if k.startswith("raw:")}
            assert raw == delivery.raw
        assert await client.xlen(stream) == 0
    finally:
        await client.delete(stream, f"{stream}:dead", f"{stream}:delayed")
        await client.aclose()
        await queue.close()


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow], deadline=None)
@given(entries=st.lists(stream_entries(), min_size=1, max_size=8))
def test_fuzzed_entries_come_back_good_or_malformed_never_raise(
    redis_url: str, entries: list[tuple[dict[bytes, bytes], bool]]
) -> None:
    anyio.run(fuzz_round, redis_url, entries, backend="asyncio")


async def test_a_garbage_delayed_member_reaches_the_worker_as_malformed(
    redis_url: str, stream: str, redis: Redis
) -> None:
    queue = make_queue(redis_url, stream)
    await redis.zadd(f"{stream}:delayed", {"not json": 0, '{"job": 3, "payload": "{}"}': 0})
    deliveries = await collect(queue, 2)
    assert {d.malformed for d in deliveries} == {"job: missing"}
    assert {d.raw[b"delayed_member"] for d in deliveries} == {b"not json", b'{"job": 3, "payload": "{}"}'}
    assert await redis.zcard(f"{stream}:delayed") == 0
    await queue.close()


# -- open() and misconfiguration ----------------------------------------------------------


def test_redact_url_hides_every_form_of_password() -> None:
    assert redact("redis://user:s3cret@host:6379/0") == "redis://user:***@host:6379/0"
    assert redact("redis://:s3cret@host/0") == "redis://:***@host/0"
    assert redact("rediss://u:p@ss:w@rd@host/0") == "rediss://u:***@host/0"
    assert redact("redis://host/0?password=s3cret&db=1") == "redis://host/0?password=***&db=1"
    assert redact("redis://host:6379/0") == "redis://host:6379/0"


@pytest.mark.parametrize(
    "url", ["redis://user:s3cret-pw@127.0.0.1:notaport/0", "http://user:s3cret-pw@127.0.0.1/0", "redis://:s3cret-pw@127.0.0.1:99999999/0"]
)
async def test_a_bad_url_is_a_clear_error_from_open_without_the_password(url: str) -> None:
    queue = RedisStreamQueue(url, stream="never-used")  # construction does no I/O
    for call in (queue.open, lambda: queue.enqueue("x", {}), lambda: queue.receive(1, 0)):
        with pytest.raises(LifecycleError, match="invalid Redis URL") as caught:
            await call()
        assert "s3cret-pw" not in str(caught.value) and "***" in str(caught.value)
    assert "s3cret-pw" not in queue.url
    await queue.close()


async def test_an_unreachable_server_is_broker_unavailable() -> None:
    queue = RedisStreamQueue(f"redis://:pw-123456@127.0.0.1:{free_port()}/0", stream="never-used", connect_timeout=2)
    with pytest.raises(BrokerUnavailable, match="unavailable") as caught:
        await queue.open()
    assert "pw-123456" not in str(caught.value)
    with pytest.raises(BrokerUnavailable):
        await queue.receive(1, 0.1)
    await queue.close()
    await queue.close()  # idempotent


@pytest.mark.parametrize("key", ["", ":delayed", ":dead"])
async def test_open_refuses_a_key_of_the_wrong_type(redis_url: str, stream: str, redis: Redis, key: str) -> None:
    await redis.set(f"{stream}{key}", "not a stream")
    queue = make_queue(redis_url, stream)
    with pytest.raises(LifecycleError, match=f"key '{stream}{key}' is a string"):
        await queue.open()
    if key == "":  # and a command that meets it later says so too
        with pytest.raises(LifecycleError, match="WRONGTYPE"):
            await queue.receive(1, 0)
    await queue.close()


async def test_open_refuses_bad_credentials_and_missing_permissions(private_redis: PrivateRedis) -> None:
    admin = private_redis.admin()
    await admin.acl_setuser("alice", enabled=True, passwords=["+right-pw"], keys=["*"], channels=["*"], commands=["+@all"])
    await admin.acl_setuser("bob", enabled=True, passwords=["+bob-pw"], keys=["other:*"], commands=["+@all"])
    port = private_redis.port
    wrong = RedisStreamQueue(f"redis://alice:wrong-pw@127.0.0.1:{port}/0", stream="jobs")
    with pytest.raises(LifecycleError, match="refused the credentials") as caught:
        await wrong.open()
    assert "wrong-pw" not in str(caught.value) and "alice:***" in str(caught.value)
    denied = RedisStreamQueue(f"redis://bob:bob-pw@127.0.0.1:{port}/0", stream="jobs")
    with pytest.raises(LifecycleError, match="lacks a permission") as caught:
        await denied.open()
    assert "bob-pw" not in str(caught.value)
    right = RedisStreamQueue(f"redis://alice:right-pw@127.0.0.1:{port}/0", stream="jobs")
    await right.open()
    await admin.config_set("requirepass", "needed-pw")  # the default user now needs one: NOAUTH
    anonymous = RedisStreamQueue(f"redis://127.0.0.1:{port}/0", stream="jobs")
    with pytest.raises(LifecycleError, match="refused the credentials"):
        await anonymous.open()
    for queue in (wrong, denied, right, anonymous):
        await queue.close()
    await admin.aclose()


async def test_open_is_idempotent_and_checks_nothing_else(redis_url: str, stream: str, redis: Redis) -> None:
    queue = make_queue(redis_url, stream)
    await queue.open()
    await queue.open()
    assert [g["name"] for g in await redis.xinfo_groups(stream)] == ["workers"]
    await queue.close()


# -- transient failures ---------------------------------------------------------------------


async def test_client_kill_mid_receive_is_broker_unavailable_then_recovers(private_redis: PrivateRedis) -> None:
    queue = RedisStreamQueue(private_redis.url, stream="jobs", claim_idle=60)
    await queue.open()
    admin = private_redis.admin()
    failures: list[BrokerUnavailable] = []

    async def read_until_it_fails() -> None:
        failures.append(await until_unavailable(lambda: queue.receive(1, 5)))

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(read_until_it_fails)
            while not failures:  # kill while the read is blocked in XREADGROUP
                clients = await admin.client_list()
                if any(c.get("cmd") == "xreadgroup" for c in clients):
                    await admin.client_kill_filter(_type="normal", skipme=True)
                await anyio.sleep(0.02)
    assert "RedisStreamQueue receive" in str(failures[0])
    await queue.enqueue("job", {"n": 1})  # redis-py reconnects on the next command
    [delivery] = await collect(queue, 1)
    assert delivery.payload == {"n": 1}
    await queue.ack(delivery)
    await queue.close()
    await admin.aclose()


async def test_a_restart_is_broker_unavailable_then_leases_and_settles_carry_on(private_redis: PrivateRedis) -> None:
    queue = RedisStreamQueue(private_redis.url, stream="jobs", claim_idle=60, connect_timeout=1)
    await queue.open()
    await queue.enqueue("job", {"n": 1})
    [held] = await collect(queue, 1)
    admin = private_redis.admin()
    await admin.save()  # the held message and its pending entry survive the restart
    await admin.aclose()
    private_redis.kill()
    await until_unavailable(lambda: queue.renew([held]))
    with pytest.raises(BrokerUnavailable):
        await queue.ack(held)
    private_redis.start()
    assert await until_available(lambda: queue.renew([held])) == []  # still ours; scripts reloaded
    await queue.ack(held)
    await queue.enqueue("job", {"n": 2})
    [delivery] = await collect(queue, 1)
    assert delivery.payload == {"n": 2}
    await queue.ack(delivery)
    admin = private_redis.admin()
    assert await admin.xlen("jobs") == 0
    await admin.aclose()
    await queue.close()


async def test_a_restart_that_lost_the_group_recreates_it(private_redis: PrivateRedis) -> None:
    queue = RedisStreamQueue(private_redis.url, stream="jobs", claim_idle=60, connect_timeout=1)
    await queue.open()
    await queue.enqueue("job", {"n": 1})
    [held] = await collect(queue, 1)
    private_redis.kill()  # no snapshot: everything is gone
    private_redis.start()
    assert await until_available(lambda: queue.receive(1, 0.1)) == []
    await queue.ack(held)  # no group any more: not ours, nothing happens
    await queue.enqueue("job", {"n": 2})
    [delivery] = await collect(queue, 1)
    assert delivery.payload == {"n": 2}
    await queue.close()


@pytest.mark.parametrize("stall", [("DEBUG", "SLEEP", "5"), ("CLIENT", "PAUSE", "5000", "ALL")])
async def test_a_stalled_server_is_broker_unavailable_not_a_hang(
    private_redis: PrivateRedis, stall: tuple[str, ...]
) -> None:
    queue = RedisStreamQueue(private_redis.url, stream="jobs", claim_idle=60, socket_timeout=1, connect_timeout=1)
    await queue.open()
    stalled_at = time.monotonic()
    staller = private_redis.cli(*stall)
    exc = await until_unavailable(lambda: queue.receive(1, 0.5))
    assert "Timeout" in str(exc)
    assert time.monotonic() - stalled_at < 4.5  # well before the stall ends: a timeout, not a hang
    staller.wait(30)
    await until_available(lambda: queue.enqueue("job", {"n": 1}))
    [delivery] = await until_available(lambda: collect(queue, 1))
    assert delivery.payload == {"n": 1}
    await until_available(lambda: queue.ack(delivery))
    await queue.close()


async def test_long_receive_timeouts_never_outlast_the_socket_timeout(redis_url: str, stream: str, redis: Redis) -> None:
    queue = make_queue(redis_url, stream, socket_timeout=2)
    await queue.open()
    for _ in range(3):  # an idle queue: each wait ends early (the BLOCK is capped), no error
        with anyio.fail_after(8):
            assert await queue.receive(1, 10) == []
    await queue.enqueue("job", {"n": 1})
    with anyio.fail_after(8):
        [delivery] = await queue.receive(1, 10)
    await queue.ack(delivery)
    await queue.close()


async def test_an_idle_worker_with_poll_interval_10_keeps_running(redis_url: str, stream: str, redis: Redis) -> None:
    done: list[int] = []

    @job
    async def record(n: int) -> None:
        done.append(n)

    queue = make_queue(redis_url, stream, socket_timeout=1)
    worker = Worker(queue, [record], poll_interval=10)
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker.run)
            idle_until = time.monotonic() + 3  # three socket timeouts of idling
            while time.monotonic() < idle_until:
                await anyio.sleep(0.1)
            await queue.enqueue("record", {"n": 1})
            while not done:
                await anyio.sleep(0.05)
            worker.stop()
    assert done == [1]
    assert await pending_count(redis, stream) == 0
    await queue.close()


async def test_a_deleted_stream_recreates_the_group(redis_url: str, stream: str, redis: Redis) -> None:
    queue = make_queue(redis_url, stream)
    await queue.open()
    await redis.delete(stream)
    assert await queue.receive(1, 0.1) == []  # NOGROUP: recreated on the next call
    await queue.enqueue("job", {"n": 1})
    [delivery] = await collect(queue, 1)
    await queue.ack(delivery)
    await queue.close()


# -- leases and consumers -------------------------------------------------------------------


async def test_renew_of_a_message_another_consumer_owns_reports_it_lost(
    redis_url: str, stream: str, redis: Redis
) -> None:
    owner = make_queue(redis_url, stream, consumer="owner", claim_idle=60)
    intruder = make_queue(redis_url, stream, consumer="intruder", claim_idle=60)
    await owner.enqueue("job", {"n": 1})
    [held] = await collect(owner, 1)
    assert await intruder.renew([held]) == [held.id]
    await intruder.ack(held)  # not its message: nothing happens
    [pending] = await redis.xpending_range(stream, "workers", min="-", max="+", count=10)
    assert (pending["consumer"], pending["times_delivered"]) == ("owner", 1)
    assert await owner.renew([held]) == []
    await owner.ack(held)
    assert await pending_count(redis, stream) == 0
    for queue in (owner, intruder):
        await queue.close()


async def test_a_consumer_reclaims_nothing_from_itself(redis_url: str, stream: str, redis: Redis) -> None:
    queue = make_queue(redis_url, stream, claim_idle=0.05, claim_interval=0)
    await queue.enqueue("job", {"n": 1})
    [held] = await collect(queue, 1)
    await anyio.sleep(0.2)  # its lease ran out (an outage, say), but it is still running here
    assert await queue.receive(1, 0.1) == []
    await queue.ack(held)  # and still ours to settle
    await queue.close()


async def test_dead_consumers_are_removed_but_never_one_with_pending_entries(
    redis_url: str, stream: str, redis: Redis
) -> None:
    for n in range(3):
        await make_queue(redis_url, stream).enqueue("job", {"n": n})
    idle = make_queue(redis_url, stream, consumer="idle", claim_idle=60)
    holder = make_queue(redis_url, stream, consumer="holder", claim_idle=60)
    [done] = await collect(idle, 1)
    await idle.ack(done)
    await collect(holder, 1)  # and dies holding it
    with anyio.fail_after(10):
        while min(c["idle"] for c in await redis.xinfo_consumers(stream, "workers")) < 500:
            await anyio.sleep(0.05)
    sweeper = make_queue(redis_url, stream, consumer="sweeper", claim_idle=60, claim_interval=0, consumer_timeout=0.3)
    await collect(sweeper, 1)
    names = {c["name"] for c in await redis.xinfo_consumers(stream, "workers")}
    assert names == {"holder", "sweeper"}
    assert await pending_count(redis, stream) == 2
    for queue in (idle, holder, sweeper):
        await queue.close()


# -- the producer side and the dead letters -------------------------------------------------


async def test_enqueue_checks_its_arguments(redis_url: str, stream: str, redis: Redis) -> None:
    @job
    async def send(user_id: int) -> None:
        pass

    queue = make_queue(redis_url, stream)
    with pytest.raises(PayloadError, match="user_id"):
        await queue.enqueue(send, {})
    with pytest.raises(ValueError, match="not both"):
        await queue.enqueue("send", {}, delay=1, at=time.time())
    with pytest.raises(ValueError, match="attempt must be >= 1"):
        await queue.enqueue("send", {}, attempt=0)
    with pytest.raises(ValueError, match="Out of range float values"):
        await queue.enqueue("send", {"x": float("nan")})
    assert await redis.exists(stream, f"{stream}:delayed") == 0
    assert (await queue.enqueue("send", {"user_id": 1}, delay=60)).startswith("delayed:")
    assert await redis.zcard(f"{stream}:delayed") == 1
    await queue.close()


def test_constructor_checks_its_arguments() -> None:
    for option in ("claim_idle", "socket_timeout", "connect_timeout"):
        with pytest.raises(ValueError, match=f"{option} must be positive"):
            RedisStreamQueue(**{option: 0})


async def test_a_malformed_delivery_cannot_be_retried(redis_url: str, stream: str, redis: Redis) -> None:
    queue = make_queue(redis_url, stream)
    await queue.open()
    await redis.xadd(stream, {"job": "x"})
    [bad] = await collect(queue, 1)
    assert bad.malformed == "payload: missing"
    with pytest.raises(ValueError, match="cannot be retried; dead-letter it"):
        await queue.retry(bad, 0, "E")
    await queue.release(bad)  # shutdown: put back as it was
    [again] = await collect(queue, 1)
    assert again.raw == {b"job": b"x"}
    await queue.ack(again)
    await queue.close()


async def test_dead_letter_arguments_are_checked(redis_url: str, stream: str, redis: Redis) -> None:
    queue = make_queue(redis_url, stream)
    with pytest.raises(ValueError, match="before must be a dead_letter_id"):
        await queue.dead_letters(before="yesterday")
    with pytest.raises(ValueError, match="is not a dead_letter_id"):
        await queue.replay(["1-0", "latest"])
    assert await queue.dead_letters(0) == []
    assert await queue.purge([]) == 0
    assert await queue.replay(["1-0"]) == 0  # no such dead letter
    await queue.close()


async def test_dead_letters_pages_across_more_than_a_hundred(redis_url: str, stream: str, redis: Redis) -> None:
    queue = make_queue(redis_url, stream)
    for n in range(150):
        await queue.enqueue("job", {"n": n})
    for delivery in await collect(queue, 150):
        await queue.dead_letter(delivery, {"job": delivery.job, "payload": delivery.payload, "reason": "failed"})
    first = await queue.dead_letters()
    rest = await queue.dead_letters(before=first[-1]["dead_letter_id"])
    ids = [r["dead_letter_id"] for r in first + rest]
    assert len(first) == 100 and len(rest) == 50 and len(set(ids)) == 150
    newest = await redis.xrevrange(f"{stream}:dead", count=1)
    assert ids[0] == newest[0][0]  # the most recent first
    assert await queue.purge() == 150
    await queue.close()


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (redis_errors.BusyLoadingError("Redis is loading the dataset in memory"), BrokerUnavailable),
        (redis_errors.MasterDownError("Link with MASTER is down"), BrokerUnavailable),
        (redis_errors.TryAgainError("Multiple keys request during rehashing of slot"), BrokerUnavailable),
        (redis_errors.ClusterDownError("The cluster is down"), BrokerUnavailable),
        (redis_errors.ResponseError("LOADING Redis is loading"), BrokerUnavailable),
        (redis_errors.ReadOnlyError("You can't write against a read only replica."), BrokerUnavailable),
        (redis_errors.ConnectionError("Connection closed by server."), BrokerUnavailable),
        (redis_errors.TimeoutError("Timeout reading from host"), BrokerUnavailable),
        (ConnectionResetError(104, "Connection reset by peer"), BrokerUnavailable),
        (redis_errors.AuthenticationError("invalid username-password pair"), LifecycleError),
        (redis_errors.NoPermissionError("this user has no permissions to run the 'xadd' command"), LifecycleError),
        (redis_errors.ResponseError("ERR unknown command 'XAUTOCLAIM'"), LifecycleError),
        (redis_errors.DataError("Invalid input of type: 'NoneType'"), redis_errors.DataError),
    ],
)
def test_each_redis_error_is_mapped_to_transient_or_misconfiguration(error: Exception, expected: type) -> None:
    queue = RedisStreamQueue("redis://user:pw-secret-1@127.0.0.1:6379/0", stream="never-used")
    with pytest.raises(expected) as caught, queue._errors("receive"):
        raise error
    assert "pw-secret-1" not in str(caught.value)
    if expected is BrokerUnavailable:
        assert caught.value.__cause__ is error  # kept for the logs' traceback
