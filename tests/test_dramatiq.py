"""The Dramatiq integration: a real ``dramatiq`` CLI worker (two processes, two threads
each) on RabbitMQ and on Redis, with Redis storing results (skipped with a reason when a
service is missing; fails under CI=true); then in-process tests with Dramatiq's
StubBroker and a Dramatiq Worker in this process, on both anyio backends, for the
producer-side validation, the outcome mapping, time limits and the per-process loop."""

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator
from datetime import date
from pathlib import Path
from types import ModuleType
from typing import Annotated, Any

import anyio
import dramatiq
import pytest
from dramatiq.brokers.stub import StubBroker
from dramatiq.middleware import Shutdown, TimeLimitExceeded
from dramatiq.middleware.threading import raise_thread_exception
from dramatiq.results import ResultFailure, Results
from dramatiq.results.backends import StubBackend
from hypothesis import given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs
from support import REDIS_URL, require_service

from lifecycle import Depends, JobContext, LifecycleError, PayloadError, Reject, Retry, Runtime, dependency, job
from lifecycle._process_loop import ProcessClosed
from lifecycle.dramatiq import DramatiqLifecycle, _ProcessLoop

_AMQP = os.environ.get("LIFECYCLE_TEST_BROKER", "amqp://guest:guest@127.0.0.1:5672//")
# pika reads the default vhost "/" only percent-encoded (kombu's trailing "//" is "" to it).
RABBIT_URL = _AMQP[:-1] + "%2F" if _AMQP.endswith("//") else _AMQP
TESTS = Path(__file__).parent
CANCELLED = {"asyncio": "CancelledError", "trio": "Cancelled"}


def need_redis() -> None:
    import redis

    require_service("Redis", lambda: redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping())


def need_rabbitmq() -> None:
    import pika

    def check() -> None:
        pika.BlockingConnection(pika.URLParameters(RABBIT_URL)).close()

    require_service("RabbitMQ", check)


def read(evidence: Path) -> list[tuple[int, str]]:
    if not evidence.exists():
        return []
    return [(int(pid), text) for pid, _, text in (line.partition(" ") for line in evidence.read_text().splitlines())]


def wait_for(condition: Any, timeout: float, what: str) -> Any:
    """Poll ``condition()`` until it is truthy (generous timeouts: the machine may be
    loaded); fail naming ``what`` otherwise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


def delete_queues(kind: str, queue: str) -> None:
    """Remove this test's queues (and only them) from the shared broker."""
    if kind == "rabbitmq":
        import pika

        connection = pika.BlockingConnection(pika.URLParameters(RABBIT_URL))
        try:
            channel = connection.channel()
            for name in (queue, f"{queue}.DQ", f"{queue}.XQ"):
                channel.queue_delete(name)
        finally:
            connection.close()
    else:
        import redis

        client = redis.Redis.from_url(REDIS_URL)
        keys = list(client.scan_iter(match=f"dramatiq:{queue}*"))
        if keys:
            client.delete(*keys)


def dead_letter_count(kind: str, queue: str) -> int:
    if kind == "rabbitmq":
        import pika

        connection = pika.BlockingConnection(pika.URLParameters(RABBIT_URL))
        try:
            return int(connection.channel().queue_declare(f"{queue}.XQ", passive=True).method.message_count)
        finally:
            connection.close()
    import redis

    return int(redis.Redis.from_url(REDIS_URL).zcard(f"dramatiq:{queue}.XQ"))


@contextlib.contextmanager
def dramatiq_worker(
    kind: str, backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **env: str
) -> Iterator[tuple[ModuleType, Path, subprocess.Popen[bytes], str]]:
    """Start ``dramatiq dramatiq_app`` (2 processes x 2 threads) on a queue of its own;
    yield the client-side app module, the evidence file, the process and the queue;
    stop it with SIGTERM (to the main process only, as a supervisor does)."""
    evidence = tmp_path / "evidence.log"
    queue = f"lifecycle-test-{uuid.uuid4().hex[:10]}"
    settings_env = {
        "LIFECYCLE_DRAMATIQ_QUEUE": queue,
        "LIFECYCLE_DRAMATIQ_BROKER": kind,
        "LIFECYCLE_DRAMATIQ_BACKEND": backend,
        "LIFECYCLE_TEST_BROKER": RABBIT_URL,
        "LIFECYCLE_TEST_REDIS_URL": REDIS_URL,
    }
    for name, value in settings_env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("EVIDENCE", str(tmp_path / "client.log"))
    sys.modules.pop("dramatiq_app", None)
    import dramatiq_app as app

    log = (tmp_path / "worker.log").open("wb")
    worker = subprocess.Popen(
        [sys.executable, "-m", "dramatiq", "dramatiq_app", "--processes", "2", "--threads", "2", "--queues", queue],
        cwd=TESTS,
        env={**os.environ, **settings_env, **env, "EVIDENCE": str(evidence), "PYTHONPATH": str(TESTS)},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        yield app, evidence, worker, queue
    finally:
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(90)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
            raise
        finally:
            log.close()
            app.broker.close()
            delete_queues(kind, queue)


def get(message: Any, timeout: float = 60) -> Any:
    return message.get_result(block=True, timeout=int(timeout * 1000))


@pytest.mark.redis
@pytest.mark.rabbitmq
@pytest.mark.parametrize(("kind", "backend"), [("rabbitmq", "asyncio"), ("redis", "trio")])
def test_a_dramatiq_worker_runs_actors_as_jobs(
    kind: str, backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    need_redis()
    if kind == "rabbitmq":
        need_rabbitmq()
    with dramatiq_worker(kind, backend, tmp_path, monkeypatch) as (app, evidence, worker, queue):
        assert get(app.add.send(2, b=3), timeout=90) == 5  # also waits for the worker to be up
        assert [t for _, t in read(evidence) if "add" in t or t == "session down"][-2:] == [
            "session up add attempt=1",
            "session down",
        ]
        pids = {get(m) for m in [app.whoami.send() for _ in range(12)]}

        assert get(app.flaky.send()) == 3  # Retry(delay) -> dramatiq.Retry, fresh job scope each time
        assert [t for _, t in read(evidence) if "flaky" in t] == [f"session up flaky attempt={n}" for n in (1, 2, 3)]

        with pytest.raises(
            ResultFailure, match=r"asked to retry but its attempts are used up \(2 of 2; max_retries=1\)"
        ):
            get(app.stubborn.send())

        with pytest.raises(ResultFailure, match="Reject: not for us"):
            get(app.rejected.send())
        assert [t for _, t in read(evidence)].count("session up rejected attempt=1") == 1
        assert not [t for _, t in read(evidence) if "rejected attempt=2" in t]  # never retried...
        wait_for(
            lambda: dead_letter_count(kind, queue) >= 2, 30, "the dead letters"
        )  # stubborn's too  # ...but dead-lettered

        with pytest.raises(ResultFailure, match="RuntimeError: commit failed"):
            get(app.fails_in_teardown.send())

        with pytest.raises(ResultFailure, match="TimeLimitExceeded"):
            get(app.slow.send())  # time_limit=1000 ms
        texts = [t for _, t in read(evidence)]
        after = texts[texts.index("session up slow attempt=1") + 1 :]
        assert after[:2] == [f"session saw {CANCELLED[backend]}", "session down"]

        with pytest.raises(PayloadError, match=r"job 'add' \(dramatiq_app:add\): a: Input should be a valid integer"):
            app.add.send(a="x", b=3)  # refused in the producer

        worker.send_signal(signal.SIGTERM)
        assert worker.wait(90) == 0

    by_pid: dict[int, list[str]] = defaultdict(list)
    for pid, text in read(evidence):
        by_pid[pid].append(text)
    assert pids <= set(by_pid)
    assert len(by_pid) == 2  # two worker processes, each with its own worker scope
    for pid, texts in by_pid.items():
        # Created at boot, before any message, once; torn down last, in reverse order.
        assert texts[:2] == ["pool up", "settings up"], (pid, texts)
        assert texts.count("pool up") == 1
        assert texts[-2:] == ["settings down", "pool down"], (pid, texts)


@pytest.mark.redis
def test_a_failing_worker_scoped_dependency_stops_the_worker_at_boot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    need_redis()
    with dramatiq_worker("redis", "asyncio", tmp_path, monkeypatch, LIFECYCLE_DRAMATIQ_BROKEN_SETTINGS="1") as (
        _app,
        evidence,
        worker,
        _queue,
    ):
        code = worker.wait(90)
    assert code != 0
    output = (tmp_path / "worker.log").read_text()
    assert "StartupError" in output or "_StartupFailed" in output
    assert (
        "could not start: worker-scoped dependency dramatiq_app:settings of actor 'add' failed: "
        "RuntimeError: settings file missing"
    ) in output
    by_pid: dict[int, list[str]] = defaultdict(list)
    for pid, text in read(evidence):
        by_pid[pid].append(text)
    assert by_pid
    for texts in by_pid.values():
        assert texts == ["pool up", "pool down"]  # what was created is torn down


# -- in-process: Dramatiq's StubBroker and Worker in this process -----------------------------


class Events(list[str]):
    """What ran, in order, appended from the loop and from worker threads."""


@contextlib.contextmanager
def stub_app(backend: str, **options: Any) -> Iterator[tuple[StubBroker, DramatiqLifecycle, Events]]:
    broker = StubBroker()
    broker.add_middleware(Results(backend=StubBackend()))
    broker.emit_after("process_boot")  # starts the TimeLimit middleware's timer thread
    dramatiq.set_broker(broker)  # Message.get_result asks the global broker for its backend
    events = Events()
    lc = DramatiqLifecycle(broker, backend=backend, teardown_timeout=5, **options)
    try:
        yield broker, lc, events
    finally:
        lc.shutdown()
        broker.close()


@contextlib.contextmanager
def worker(broker: StubBroker, threads: int = 2) -> Iterator[dramatiq.Worker]:
    w = dramatiq.Worker(broker, worker_timeout=50, worker_threads=threads)
    w.start()
    try:
        yield w
    finally:
        w.stop(timeout=30_000)


def tree(lc: DramatiqLifecycle, events: Events) -> tuple[Any, Any]:
    @dependency(scope="worker")
    async def pool() -> AsyncIterator[str]:
        events.append("pool up")
        yield "pool"
        await anyio.sleep(0)
        events.append("pool down")

    async def session(p: Annotated[str, Depends(pool)], ctx: JobContext) -> AsyncIterator[str]:
        events.append(f"session up {ctx.name} attempt={ctx.attempt}")
        try:
            yield "session"
        except BaseException as exc:
            events.append(f"session saw {type(exc).__name__}")
            raise
        finally:
            await anyio.sleep(0.01)
            events.append("session down")

    return pool, session


def test_send_validates_the_payload_in_the_producer_and_sends_it_by_name(anyio_backend: str) -> None:
    with stub_app(anyio_backend) as (broker, lc, events):
        _pool, session = tree(lc, events)

        @lc.actor(queue_name="q", store_results=True)
        async def remind(user_id: int, on: date, s: Annotated[str, Depends(session)], note: str = "") -> str:
            return f"{user_id} {on.isoformat()} {type(on).__name__} {note}"

        with pytest.raises(PayloadError) as info:
            remind.send(user_id="abc", on="not a date", extra=1)
        message = str(info.value)
        assert message.startswith("job 'remind' (test_dramatiq:")
        for part in ("user_id: Input should be a valid integer", "on: Input should be a valid date", "extra"):
            assert part in message
        assert broker.queues["q"].qsize() == 0  # nothing was sent

        sent = remind.send(7, "2026-11-23")  # positional at the door, by name on the wire
        assert sent.args == ()
        assert sent.kwargs == {"user_id": 7, "on": "2026-11-23"}
        assert remind.message_with_options(args=(7, date(2026, 1, 2))).kwargs["on"] == "2026-01-02"
        with worker(broker):
            assert sent.get_result(block=True, timeout=30_000) == "7 2026-11-23 date "
        assert events == ["pool up", "session up remind attempt=1", "session down", "pool down"]


def test_actor_options_pass_through_and_throws_is_extended(anyio_backend: str) -> None:
    with stub_app(anyio_backend) as (broker, lc, _events):

        @lc.actor(actor_name="named", queue_name="other", priority=5, max_retries=7, throws=KeyError)
        async def fn() -> None: ...

        assert fn.actor_name == "named"
        assert fn.queue_name == "other"
        assert fn.priority == 5
        assert fn.options["max_retries"] == 7
        assert KeyError in fn.options["throws"]
        assert Reject in fn.options["throws"]

        async def other() -> None: ...

        with pytest.raises(ValueError, match="not_an_option"):
            lc.actor(not_an_option=True)(other)
        with pytest.raises(TypeError, match="keyword options only"):
            lc.actor(fn.fn, "x")
        with pytest.raises(ValueError, match="backend must be 'asyncio' or 'trio'"):
            DramatiqLifecycle(broker, backend="curio")


def test_outcomes_map_onto_dramatiq_retries_and_dead_letters(anyio_backend: str) -> None:
    with stub_app(anyio_backend) as (broker, lc, events):
        _pool, session = tree(lc, events)

        @lc.actor(queue_name="q", store_results=True, max_retries=3)
        async def flaky(ctx: JobContext, s: Annotated[str, Depends(session)]) -> int:
            if ctx.attempt < 3:
                raise Retry(delay=0.05)
            return ctx.attempt

        @lc.actor(queue_name="q", store_results=True, max_retries=3)
        async def rejected(s: Annotated[str, Depends(session)]) -> None:
            raise Reject("not for us")

        @lc.actor(queue_name="q", store_results=True, max_retries=1, min_backoff=10, max_backoff=20)
        async def broken(s: Annotated[str, Depends(session)]) -> None:
            raise ValueError("boom")  # any other error: Dramatiq's own retries

        with worker(broker):
            m_flaky, m_rejected, m_broken = flaky.send(), rejected.send(), broken.send()
            assert m_flaky.get_result(block=True, timeout=30_000) == 3
            with pytest.raises(ResultFailure, match="Reject: not for us"):
                m_rejected.get_result(block=True, timeout=30_000)
            with pytest.raises(ResultFailure, match="ValueError: boom"):
                m_broken.get_result(block=True, timeout=30_000)
        # Two worker threads: the three actors' runs interleave.
        assert sorted(e for e in events if e.startswith("session up")) == [
            "session up broken attempt=1",
            "session up broken attempt=2",  # max_retries=1: one retry, then the dead letter
            *(f"session up flaky attempt={n}" for n in (1, 2, 3)),
            "session up rejected attempt=1",  # Reject: never retried
        ]
        dead = {m.actor_name for m in broker.dead_letters}
        assert dead == {"rejected", "broken"}
        assert events[-1] == "pool down"


def test_a_message_the_producer_did_not_check_is_dead_lettered_without_retry(anyio_backend: str) -> None:
    with stub_app(anyio_backend) as (broker, lc, events):
        _pool, session = tree(lc, events)

        @lc.actor(queue_name="q", store_results=True, max_retries=5)
        async def double(n: int, s: Annotated[str, Depends(session)]) -> int:
            return 2 * n

        # Sent by another program, bypassing LifecycleActor's check.
        raw = broker.enqueue(
            dramatiq.Message(queue_name="q", actor_name="double", args=(), kwargs={"n": "x"}, options={})
        )
        with worker(broker):
            with pytest.raises(
                ResultFailure, match=r"PayloadError: job 'double' \(test_dramatiq:.*double\): n: Input should be"
            ):
                raw.get_result(block=True, timeout=30_000)
            assert double.send(n="21").get_result(block=True, timeout=30_000) == 42  # converted at the door
        assert [m.message_id for m in broker.dead_letters] == [raw.message_id]  # at once, not after 5 retries
        assert events.count("session up double attempt=1") == 1  # only the valid one set anything up


def test_a_sync_actor_body_and_a_direct_call_run_as_jobs(anyio_backend: str) -> None:
    with stub_app(anyio_backend) as (broker, lc, events):
        _pool, session = tree(lc, events)

        @lc.actor(queue_name="q", store_results=True)
        def shout(word: str, s: Annotated[str, Depends(session)], ctx: JobContext) -> str:
            return f"{word.upper()} via {s}, attempt {ctx.attempt}"

        assert shout("hi") == "HI via session, attempt 1"  # here and now, in this process's runtime
        assert events == ["pool up", "session up shout attempt=1", "session down"]
        with worker(broker):  # the worker adopts the running runtime, and tears it down at its shutdown
            assert shout.send("yo").get_result(block=True, timeout=30_000) == "YO via session, attempt 1"
        assert events.count("pool up") == 1
        assert events[-1] == "pool down"


def test_a_retry_with_no_attempts_left_fails_naming_the_cause(anyio_backend: str) -> None:
    with stub_app(anyio_backend) as (broker, lc, _events):

        async def lookup() -> None:
            raise Retry(delay=0)

        @lc.actor(queue_name="q", store_results=True, max_retries=0)
        async def once(v: Annotated[None, Depends(lookup)]) -> None: ...

        with (
            worker(broker),
            pytest.raises(ResultFailure, match=r"LifecycleError: actor 'once' \(test_dramatiq:.*once\) asked to retry"),
        ):
            once.send().get_result(block=True, timeout=30_000)
        assert [m.actor_name for m in broker.dead_letters] == ["once"]


def test_a_time_limit_cancels_the_job_and_its_teardown_finishes_first(anyio_backend: str) -> None:
    with stub_app(anyio_backend) as (broker, lc, events):
        _pool, session = tree(lc, events)

        @lc.actor(queue_name="q", store_results=True, max_retries=0, time_limit=200)
        async def slow(s: Annotated[str, Depends(session)]) -> None:
            await anyio.sleep(60)

        @lc.actor(queue_name="q", store_results=True)
        async def quick(s: Annotated[str, Depends(session)]) -> str:
            return s

        with worker(broker, threads=1):
            with pytest.raises(ResultFailure, match="TimeLimitExceeded"):
                slow.send().get_result(block=True, timeout=30_000)
            assert events[1:4] == [
                "session up slow attempt=1",
                f"session saw {CANCELLED[anyio_backend]}",
                "session down",
            ]
            assert quick.send().get_result(block=True, timeout=30_000) == "session"  # the loop still serves
            loop = lc.process_runtime()
            assert not loop._inflight
        assert events[-1] == "pool down"


def test_a_message_still_running_when_the_worker_gives_up_is_torn_down_and_left_unacknowledged(
    anyio_backend: str,
) -> None:
    with stub_app(anyio_backend) as (broker, lc, events):
        _pool, session = tree(lc, events)
        started = threading.Event()

        @lc.actor(queue_name="q", max_retries=3)
        async def hang(s: Annotated[str, Depends(session)]) -> None:
            started.set()
            await anyio.sleep(60)

        w = dramatiq.Worker(broker, worker_timeout=50, worker_threads=1)
        w.start()
        hang.send()
        assert started.wait(30)
        w.stop(timeout=200)  # Dramatiq waits 0.2 s for the thread, then closes the runtime
        assert events == [
            "pool up",
            "session up hang attempt=1",
            f"session saw {CANCELLED[anyio_backend]}",
            "session down",
            "pool down",
        ]
        # Neither retried (no attempt used) nor dead-lettered: never acknowledged, so a
        # real broker redelivers it.
        assert broker.dead_letters == []
        assert broker.queues["q"].unfinished_tasks == 1
        assert not [m for m in broker.queues["q.DQ"].queue]


def test_a_job_still_running_at_shutdown_is_cancelled_before_worker_scope_goes(anyio_backend: str) -> None:
    events = Events()

    @dependency(scope="worker")
    async def pool() -> AsyncIterator[str]:
        events.append("pool up")
        yield "pool"
        events.append("pool down")

    async def session(p: Annotated[str, Depends(pool)]) -> AsyncIterator[str]:
        events.append("session up")
        try:
            yield p
        except BaseException as exc:
            events.append(f"session saw {type(exc).__name__}")
            raise
        finally:
            await anyio.sleep(0.01)
            events.append(f"session down, pool still {p}")

    started = threading.Event()

    @job
    async def hang(s: Annotated[str, Depends(session)]) -> None:
        started.set()
        await anyio.sleep(60)

    loop = _ProcessLoop(lambda: Runtime(teardown_timeout=5), anyio_backend)
    loop.start()
    outcome: list[BaseException] = []

    def run() -> None:
        try:
            loop.run(lambda rt: rt.run(hang))
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    assert started.wait(30)
    loop.close()
    thread.join(30)
    assert [type(e) for e in outcome] == [ProcessClosed]
    assert events == [
        "pool up",
        "session up",
        f"session saw {CANCELLED[anyio_backend]}",
        "session down, pool still pool",
        "pool down",
    ]
    with pytest.raises(ProcessClosed):
        loop.start()  # a process never gets a second worker scope
    with pytest.raises(ProcessClosed):
        loop.run(lambda rt: rt.run(hang))
    loop.close()  # idempotent
    assert not [t for t in threading.enumerate() if t.name == f"lifecycle-dramatiq-{os.getpid()}"]


def test_a_job_raising_timeout_error_fails_with_it_and_the_wait_does_not_mistake_it(anyio_backend: str) -> None:
    # The waiting thread's own slices also end in TimeoutError: the job's must come through.
    @job
    async def times_out() -> None:
        raise TimeoutError("upstream took too long")

    loop = _ProcessLoop(lambda: Runtime(teardown_timeout=5), anyio_backend)
    loop.start()
    try:
        started = time.monotonic()
        with pytest.raises(TimeoutError, match="upstream took too long"):
            loop.run(lambda rt: rt.run(times_out))
        assert time.monotonic() - started < 30  # not waiting forever
    finally:
        loop.close()


def test_a_failing_worker_scope_teardown_is_logged_at_close(anyio_backend: str) -> None:
    @dependency(scope="worker")
    async def pool() -> AsyncIterator[str]:
        yield "pool"
        raise RuntimeError("close failed for redis://user:hunter2@db:6379/0")

    @job
    async def uses(p: Annotated[str, Depends(pool)]) -> str:
        return p

    loop = _ProcessLoop(lambda: Runtime(teardown_timeout=5), anyio_backend)
    loop.start()
    assert loop.run(lambda rt: rt.run(uses)) == "pool"
    with capture_logs() as logs:
        loop.close()
    [event] = [e for e in logs if e["event"] == "dramatiq.worker_scope_teardown_failed"]
    assert event["log_level"] == "error"
    assert event["error"] == "RuntimeError: close failed for redis://user:***@db:6379/0"
    assert "hunter2" not in event["exception"]
    assert event["pid"] == os.getpid()


def test_a_failing_worker_scoped_dependency_fails_the_dramatiq_worker_start(anyio_backend: str) -> None:
    with stub_app(anyio_backend) as (broker, lc, events):
        pool, _session = tree(lc, events)

        @dependency(scope="worker")
        async def settings_(p: Annotated[str, Depends(pool)]) -> AsyncIterator[str]:
            raise RuntimeError("settings file missing")
            yield "never"

        @lc.actor(queue_name="q")
        async def uses(s: Annotated[str, Depends(settings_)]) -> None: ...

        w = dramatiq.Worker(broker, worker_timeout=50, worker_threads=1)
        with pytest.raises(
            LifecycleError,
            match="worker-scoped dependency .*settings_ of actor 'uses' failed: RuntimeError: settings file missing",
        ):
            w.start()
        assert events == ["pool up", "pool down"]


def interrupt(backend: str, delay: float, during_teardown: bool, second: float | None) -> None:
    """Raise TimeLimitExceeded in a thread waiting for a job after ``delay`` seconds
    and, when ``second`` is not None, Dramatiq's Shutdown that much later."""
    events = Events()

    @dependency(scope="worker")
    async def pool() -> AsyncIterator[str]:
        yield "pool"

    async def session(p: Annotated[str, Depends(pool)]) -> AsyncIterator[str]:
        events.append("up")
        try:
            yield p
        finally:
            if during_teardown:
                await anyio.sleep(0.01)
            events.append("down")

    @job
    async def work(s: Annotated[str, Depends(session)]) -> str:
        await anyio.sleep(0.01)
        return s

    loop = _ProcessLoop(lambda: Runtime(teardown_timeout=5), backend)
    loop.start()
    try:
        ready, sent = threading.Event(), threading.Event()
        balanced: list[bool] = []

        def target() -> None:
            # The exception may land anywhere in here, even after the job: the outer
            # handler catches it wherever it lands, and the wait at the end makes sure
            # it lands before the thread ends.
            try:
                ready.set()
                try:
                    loop.run(lambda rt: rt.run(work))
                except (TimeLimitExceeded, Shutdown):
                    # What the worker thread sees: the teardown is over already.
                    balanced.append(events.count("up") == events.count("down"))
                while not sent.wait(0.005):
                    pass
                time.sleep(0.05)
            except (TimeLimitExceeded, Shutdown):
                pass

        thread = threading.Thread(target=target)
        thread.start()
        ready.wait(30)
        time.sleep(delay)
        assert thread.ident is not None
        raise_thread_exception(thread.ident, TimeLimitExceeded)
        if second is not None:
            time.sleep(second)
            raise_thread_exception(thread.ident, Shutdown)
        sent.set()
        thread.join(30)
        assert not thread.is_alive()
        assert all(balanced)
        assert events.count("up") == events.count("down")  # every session set up was torn down
        assert not loop._inflight
        assert loop.run(lambda rt: rt.run(work)) == "pool"  # the loop still serves
    finally:
        loop.close()


@settings(max_examples=25, deadline=None)
@given(
    delay=st.floats(min_value=0, max_value=0.03),
    during_teardown=st.booleans(),
    second=st.none() | st.floats(min_value=0, max_value=0.02),
)
def test_a_time_limit_at_any_moment_never_leaks_a_teardown(
    delay: float, during_teardown: bool, second: float | None
) -> None:
    """Dramatiq raises its time limit asynchronously in the worker thread, so it may land
    anywhere: before submission, while the job is set up, runs or is torn down, or after.
    Whatever the moment, and even when a shutdown notification follows it, every session
    set up is torn down before the thread sees the exception, nothing stays in flight,
    and the loop keeps serving."""
    for backend in ("asyncio", "trio"):
        interrupt(backend, delay, during_teardown, second)
