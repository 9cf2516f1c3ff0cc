"""A real `celery worker` subprocess per pool against the real RabbitMQ broker, with Redis
as the result backend (skipped with a reason when either is missing; fails under CI=true),
and in-process tests of the per-process runtime and of the delivery defaults."""

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Annotated, Any

import anyio
import pytest
import sniffio
from celery import Celery
from celery.exceptions import SoftTimeLimitExceeded
from structlog.testing import capture_logs
from support import REDIS_URL, require_service

from lifecycle import Depends, JobContext, LifecycleError, Retry, Runtime, dependency, job
from lifecycle._process_loop import Call, ProcessClosed
from lifecycle.celery import CeleryLifecycle, _ProcessRuntime

BROKER = os.environ.get("LIFECYCLE_TEST_BROKER", "amqp://guest:guest@127.0.0.1:5672//")
TESTS = Path(__file__).parent


@pytest.fixture
def services() -> None:
    def broker() -> None:
        from kombu import Connection

        with Connection(BROKER, connect_timeout=3) as conn:
            conn.ensure_connection(max_retries=1)

    def results() -> None:
        import redis

        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()

    require_service("RabbitMQ", broker)
    require_service("Redis", results)


def read(evidence: Path) -> list[tuple[int, str]]:
    if not evidence.exists():
        return []
    return [(int(pid), text) for pid, _, text in (line.partition(" ") for line in evidence.read_text().splitlines())]


@contextlib.contextmanager
def celery_worker(
    pool: str, concurrency: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[ModuleType, Path]]:
    """Start ``celery -A celery_app worker`` on a queue of its own; yield the client-side
    app module and the worker's evidence file; stop it with SIGTERM, expecting exit 0."""
    evidence = tmp_path / "evidence.log"
    queue = f"lifecycle-test-{uuid.uuid4().hex[:8]}"
    env = {
        **os.environ,
        "EVIDENCE": str(evidence),
        "LIFECYCLE_CELERY_QUEUE": queue,
        "LIFECYCLE_TEST_BROKER": BROKER,
        "PYTHONPATH": str(TESTS),
    }
    monkeypatch.setenv("LIFECYCLE_CELERY_QUEUE", queue)
    monkeypatch.setenv("EVIDENCE", str(tmp_path / "client.log"))
    sys.modules.pop("celery_app", None)
    import celery_app as app

    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "celery_app", "worker", "--pool", pool, "-c", str(concurrency),
         "--loglevel", "WARNING", "--without-gossip", "--without-mingle", "--without-heartbeat"],
        cwd=TESTS, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        yield app, evidence
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            code = worker.wait(60)
        except subprocess.TimeoutExpired:
            worker.kill()
            raise
        app.app.close()
    assert code == 0, worker.stderr.read() if worker.stderr else ""


@pytest.mark.rabbitmq
@pytest.mark.redis
@pytest.mark.usefixtures("services")
@pytest.mark.parametrize("pool", ["prefork", "threads", "solo"])
def test_celery_worker(pool: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with celery_worker(pool, 1 if pool == "solo" else 2, tmp_path, monkeypatch) as (app, evidence):
        assert app.add.delay(a=2, b=3).get(timeout=60) == 5  # also waits for the worker to be up
        assert [t for _, t in read(evidence)][-2:] == ["session up add attempt=1", "session down"]

        pids = {r.get(timeout=30) for r in [app.whoami.delay() for _ in range(12)]}
        assert app.flaky.delay().get(timeout=30) == 3  # Retry -> Celery retry with countdown, fresh deps
        flaky = [t for _, t in read(evidence) if "flaky" in t]
        assert flaky == [f"session up flaky attempt={n}" for n in (1, 2, 3)]

        rejected = app.rejected.delay()
        with pytest.raises(Exception, match="not for us"):
            rejected.get(timeout=30)
        assert [t for _, t in read(evidence)].count("session up rejected attempt=1") == 1  # never retried

        with pytest.raises(RuntimeError, match="commit failed"):
            app.fails_in_teardown.delay().get(timeout=30)

        if pool == "prefork":  # Celery's soft time limits need the prefork pool's signals
            with pytest.raises(SoftTimeLimitExceeded):
                app.slow.delay().get(timeout=30)
            texts = [t for _, t in read(evidence)]
            assert texts[texts.index("session up slow attempt=1") + 1 :][:2] == [
                "session saw CancelledError",
                "session down",
            ]

    by_pid: dict[int, list[str]] = defaultdict(list)
    for pid, text in read(evidence):
        by_pid[pid].append(text)
    assert pids <= set(by_pid)
    for pid, texts in by_pid.items():
        if "pool up" not in texts:
            continue
        assert texts.count("pool up") == 1, f"worker scope created more than once in process {pid}"
        assert texts[-1] == "pool down", f"process {pid} did not tear down its worker scope last: {texts}"
    if pool != "prefork":
        assert len(by_pid) == 1  # threads and solo: one process, one worker scope


def wait_for(condition: Any, timeout: float, what: str) -> Any:
    """Poll ``condition()`` until it returns something truthy (generous timeouts: the
    machine may be loaded); fail naming ``what`` otherwise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


@pytest.mark.rabbitmq
@pytest.mark.redis
@pytest.mark.usefixtures("services")
def test_a_task_whose_prefork_child_is_killed_is_redelivered_and_succeeds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with celery_worker("prefork", 1, tmp_path, monkeypatch) as (app, evidence):
        marker = tmp_path / "victim.started"
        result = app.victim.delay(marker=str(marker))
        killed = wait_for(
            lambda: next((pid for pid, t in read(evidence) if t == "victim started attempt=1"), None),
            60,
            "the task to start in a prefork child",
        )
        wait_for(marker.exists, 30, "the first delivery to write its marker")
        os.kill(killed, signal.SIGKILL)

        survivor = result.get(timeout=60)  # redelivered: not lost as FAILURE/WorkerLostError
        assert result.status == "SUCCESS"
        assert survivor != killed
        runs = [(pid, t) for pid, t in read(evidence) if t.startswith("victim started")]
        # At least once: the killed run and the redelivered one (Celery does not count a
        # redelivery as a retry, so both are attempt 1).
        assert runs == [(killed, "victim started attempt=1"), (survivor, "victim started attempt=1")]
        survivor_texts = [t for pid, t in read(evidence) if pid == survivor]
        assert survivor_texts[0] == "pool up"  # the new child created its own worker scope

    texts = [t for pid, t in read(evidence) if pid == survivor]
    assert texts[-1] == "pool down"
    assert "pool down" not in [t for pid, t in read(evidence) if pid == killed]  # SIGKILL: no teardown


# -- in-process: the per-process runtime ------------------------------------------------------
# Celery raises its soft time limit in the task thread from a SIGUSR1 handler (prefork
# pool); these tests do the same in pytest's main thread, so the exception can land at any
# bytecode, exactly as in a worker. Each runtime hosts its loop on the test's backend.

CANCELLED = {"asyncio": "CancelledError", "trio": "Cancelled"}


class Events(list[str]):
    """What ran, in order, appended from the loop and from test threads."""


class Tree:
    """A worker-scoped pool, a job-scoped session on it, and jobs that use them."""

    def __init__(self, events: Events, pool_teardown_delay: float = 0.0) -> None:
        self.started = threading.Event()

        @dependency(scope="worker")
        async def pool() -> AsyncIterator[str]:
            events.append("pool up")
            yield "pool"
            await anyio.sleep(pool_teardown_delay)
            events.append("pool down")

        async def session(p: Annotated[str, Depends(pool)]) -> AsyncIterator[str]:
            events.append("session up")
            try:
                yield "session"
            except BaseException as exc:
                events.append(f"session saw {type(exc).__name__}")
                raise
            finally:
                events.append("session down")

        @job
        async def hang(s: Annotated[str, Depends(session)]) -> None:
            self.started.set()  # a threading.Event: test threads wait for it
            await anyio.sleep(60)

        @job
        async def quick(s: Annotated[str, Depends(session)]) -> str:
            return s

        self.session, self.hang, self.quick = session, hang, quick


class NotingRuntime(Runtime):
    """A Runtime that notes when it closes (worker-scope teardown done)."""

    def __init__(self, events: Events, **options: Any) -> None:
        super().__init__(**options)
        self.events = events

    async def __aexit__(self, *exc_info: Any) -> bool | None:
        try:
            return await super().__aexit__(*exc_info)
        finally:
            self.events.append("runtime closed")


def process_runtime(backend: str, events: Events, **options: Any) -> _ProcessRuntime:
    return _ProcessRuntime(lambda: NotingRuntime(events, teardown_timeout=5, **options), backend)


def loop_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == f"lifecycle-loop-{os.getpid()}"]


@pytest.fixture
def sigusr1() -> Iterator[list[Callable[[], None]]]:
    """SIGUSR1 runs the hooks appended to the yielded list, in pytest's main thread."""
    hooks: list[Callable[[], None]] = []

    def handler(signum: int, frame: Any) -> None:
        for hook in hooks:
            hook()

    previous = signal.signal(signal.SIGUSR1, handler)
    try:
        yield hooks
    finally:
        signal.signal(signal.SIGUSR1, previous)


def signal_when(event: threading.Event, delay: float = 0.0) -> threading.Thread:
    """Send SIGUSR1 to this process once ``event`` is set (then ``delay`` seconds)."""

    def send() -> None:
        if event.wait(30):
            time.sleep(delay)
            os.kill(os.getpid(), signal.SIGUSR1)

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread


def soft_time_limit() -> None:
    raise SoftTimeLimitExceeded()


def test_a_soft_time_limit_cancels_the_job_and_its_teardown_finishes_first(
    anyio_backend: str, sigusr1: list[Callable[[], None]]
) -> None:
    events = Events()
    tree = Tree(events)
    rt = process_runtime(anyio_backend, events)
    rt.start()
    try:
        sigusr1.append(soft_time_limit)
        sender = signal_when(tree.started)
        with pytest.raises(SoftTimeLimitExceeded):
            rt.run(lambda runtime: runtime.run(tree.hang))
        sender.join()
        assert events == ["pool up", "session up", f"session saw {CANCELLED[anyio_backend]}", "session down"]
        assert rt.run(lambda runtime: runtime.run(tree.quick)) == "session"  # the loop still serves
    finally:
        rt.close()
    assert events[-2:] == ["pool down", "runtime closed"]


def test_a_soft_time_limit_before_the_job_reached_the_loop_never_starts_it(
    anyio_backend: str, sigusr1: list[Callable[[], None]]
) -> None:
    events = Events()
    tree = Tree(events)
    rt = process_runtime(anyio_backend, events)
    rt.start()
    try:
        assert rt.portal is not None
        # Block the loop thread, then submit: the job waits for the loop, and the soft
        # time limit lands while it does. The loop is let go only once the task
        # thread has cancelled the job.
        blocking, gate = threading.Event(), threading.Event()
        rt.portal.start_task_soon(lambda: (blocking.set(), gate.wait(30)))
        assert blocking.wait(30)
        submitting = threading.Event()
        schedule, cancel = rt._schedule, rt.cancel
        assert schedule is not None

        def schedule_and_tell(*args: Any) -> Any:
            submitting.set()
            return schedule(*args)

        def cancel_then_release(call: Any) -> None:
            cancel(call)
            gate.set()

        rt._schedule = schedule_and_tell
        rt.cancel = cancel_then_release  # type: ignore[method-assign]
        sigusr1.append(soft_time_limit)
        sender = signal_when(submitting, delay=0.2)
        with pytest.raises(SoftTimeLimitExceeded):
            rt.run(lambda runtime: runtime.run(tree.quick))
        sender.join()
        assert gate.is_set()
        rt._schedule = schedule
        rt.cancel = cancel  # type: ignore[method-assign]
        assert rt.run(lambda runtime: runtime.run(tree.quick)) == "session"
        assert events == ["pool up", "session up", "session down"]  # the cancelled job never ran
    finally:
        rt.close()


def test_a_job_cancelled_before_the_loop_picks_it_up_never_starts(anyio_backend: str) -> None:
    events = Events()
    tree = Tree(events)
    rt = process_runtime(anyio_backend, events)
    rt.start()
    try:
        assert rt.portal is not None
        call = Call()
        rt.cancel(call)  # the task thread gave up first
        with pytest.raises(ProcessClosed, match="abandoned before it started"):
            rt.portal.call(rt.host_call, lambda runtime: runtime.run(tree.quick), call)
        assert call.done.is_set()
        assert events == []
    finally:
        rt.close()


def test_closing_with_a_job_in_flight_cancels_it_and_tears_it_down_before_worker_scope(anyio_backend: str) -> None:
    events = Events()
    tree = Tree(events)
    rt = process_runtime(anyio_backend, events)
    rt.start()
    outcome: list[BaseException] = []

    def task_thread() -> None:
        try:
            rt.run(lambda runtime: runtime.run(tree.hang))
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=task_thread)
    thread.start()
    assert tree.started.wait(30)
    started = time.monotonic()
    rt.close()
    took = time.monotonic() - started
    thread.join(30)
    assert len(outcome) == 1 and isinstance(outcome[0], ProcessClosed), outcome  # never reported success
    assert events == [
        "pool up",
        "session up",
        f"session saw {CANCELLED[anyio_backend]}",
        "session down",
        "pool down",
        "runtime closed",
    ]
    assert took < 20  # prompt: the job's 60 s sleep was cancelled
    with pytest.raises(ProcessClosed, match="not running"):
        rt.run(lambda runtime: runtime.run(tree.quick))
    with pytest.raises(ProcessClosed, match="is closed"):
        rt.start()
    assert loop_threads() == []


def test_close_twice_and_from_several_threads_tears_down_once_and_returns_after_it(anyio_backend: str) -> None:
    events = Events()
    tree = Tree(events, pool_teardown_delay=0.3)
    rt = process_runtime(anyio_backend, events)
    rt.start()
    assert rt.run(lambda runtime: runtime.run(tree.quick)) == "session"
    seen_after_close: list[list[str]] = []

    def close() -> None:
        rt.close()
        seen_after_close.append(list(events))

    threads = [threading.Thread(target=close) for _ in range(3)]
    for thread in threads:
        thread.start()
    close()
    for thread in threads:
        thread.join(30)
    close()  # once more, after it is closed
    assert len(seen_after_close) == 5
    assert all(seen[-2:] == ["pool down", "runtime closed"] for seen in seen_after_close)
    assert events.count("pool down") == 1


def test_a_close_from_another_thread_while_the_loop_starts_waits_for_it_then_closes(anyio_backend: str) -> None:
    events = Events()
    entered, gate = threading.Event(), threading.Event()

    def slow_runtime() -> Runtime:
        entered.set()
        gate.wait(30)  # blocks the loop thread: the start is under way
        return NotingRuntime(events)

    rt = _ProcessRuntime(slow_runtime, anyio_backend)
    starter = threading.Thread(target=rt.start)
    starter.start()
    assert entered.wait(30)
    closer = threading.Thread(target=rt.close)
    closer.start()
    gate.set()
    starter.join(30)
    closer.join(30)
    assert events == ["runtime closed"]
    assert not rt.running
    with pytest.raises(ProcessClosed):
        rt.start()
    assert loop_threads() == []


def test_a_close_from_a_signal_handler_during_start_closes_once_the_loop_is_up(
    anyio_backend: str, sigusr1: list[Callable[[], None]]
) -> None:
    events = Events()
    entered, gate = threading.Event(), threading.Event()

    def slow_runtime() -> Runtime:
        entered.set()
        gate.wait(30)
        return NotingRuntime(events)

    rt = _ProcessRuntime(slow_runtime, anyio_backend)
    sigusr1.extend([rt.close, gate.set])  # as a shutdown signal handler would, mid-start
    sender = signal_when(entered)
    with pytest.raises(ProcessClosed, match="closed while starting"):
        rt.start()
    sender.join()
    assert events == ["runtime closed"]
    assert loop_threads() == []


def test_a_soft_time_limit_during_start_stops_what_started_and_the_next_task_starts_afresh(
    anyio_backend: str, sigusr1: list[Callable[[], None]]
) -> None:
    events = Events()
    tree = Tree(events)
    entered, gate = threading.Event(), threading.Event()

    def slow_runtime() -> Runtime:
        entered.set()
        gate.wait(30)
        return NotingRuntime(events, teardown_timeout=5)

    rt = _ProcessRuntime(slow_runtime, anyio_backend)
    sigusr1.extend([gate.set, soft_time_limit])
    sender = signal_when(entered)
    with pytest.raises(SoftTimeLimitExceeded):
        rt.start()
    sender.join()
    sigusr1.clear()
    assert events == ["runtime closed"]  # the half-started runtime was closed again
    assert loop_threads() == []
    rt.start()  # the next task of the process
    try:
        assert rt.run(lambda runtime: runtime.run(tree.quick)) == "session"
        assert len(loop_threads()) == 1
    finally:
        rt.close()
    assert events[-2:] == ["pool down", "runtime closed"]


def test_a_runtime_that_cannot_open_fails_the_start_and_leaves_no_loop(anyio_backend: str) -> None:
    def broken() -> Runtime:
        raise RuntimeError("cannot open")

    rt = _ProcessRuntime(broken, anyio_backend)
    with pytest.raises(RuntimeError, match="cannot open"):
        rt.start()
    assert not rt.running
    assert loop_threads() == []
    rt.close()


def test_closing_a_runtime_that_never_started_makes_it_refuse_to_start(anyio_backend: str) -> None:
    rt = process_runtime(anyio_backend, Events())
    rt.close()
    rt.close()
    with pytest.raises(ProcessClosed, match="is closed"):
        rt.start()
    assert loop_threads() == []


def test_worker_scope_teardown_failure_at_close_is_logged_without_raising(anyio_backend: str) -> None:
    @dependency(scope="worker")
    async def fragile() -> AsyncIterator[str]:
        yield "fragile"
        raise RuntimeError("pool close failed")

    @job
    async def uses(f: Annotated[str, Depends(fragile)]) -> str:
        return f

    rt = process_runtime(anyio_backend, Events())
    rt.start()
    assert rt.run(lambda runtime: runtime.run(uses)) == "fragile"
    with capture_logs() as logs:
        rt.close()
    failures = [e for e in logs if e["event"] == "celery.worker_scope_teardown_failed"]
    assert [e["error"] for e in failures] == ["RuntimeError: pool close failed"]
    assert loop_threads() == []


# -- in-process: CeleryLifecycle's delivery defaults and its eager path --------------------------


def lifecycle_app(**conf: Any) -> Celery:
    """An app that needs no broker: tasks are inspected or run eagerly with apply().
    Its tasks are registered with shared=False, so they stay out of the other apps."""
    app = Celery(f"delivery-{uuid.uuid4().hex[:6]}", broker="memory://", backend="cache+memory://")
    app.conf.update(conf)
    return app


def redelivery_warnings(logs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {e["task"]: e for e in logs if e["event"] == "celery.redelivery_disabled"}


def test_tasks_are_acknowledged_late_and_requeued_on_a_lost_worker_by_default() -> None:
    app = lifecycle_app()
    lc = CeleryLifecycle(app)

    @lc.task(name="plain", shared=False)
    async def plain(x: int) -> int:
        return x

    with capture_logs() as logs:
        app.finalize()
        task = app.tasks["plain"]
    assert (task.acks_late, task.reject_on_worker_lost) == (True, True)
    assert redelivery_warnings(logs) == {}


def test_explicit_delivery_options_are_respected_and_warned_about_once() -> None:
    app = lifecycle_app(task_reject_on_worker_lost=False, task_acks_late=True)
    lc = CeleryLifecycle(app)

    class EarlyAcks(app.Task):  # type: ignore[misc, name-defined]
        acks_late = False

    @lc.task(name="early", acks_late=False, shared=False)
    async def early(x: int) -> int:
        return x

    @lc.task(name="by_config", shared=False)
    async def by_config(x: int) -> int:
        return x

    @lc.task(name="by_base", base=EarlyAcks, reject_on_worker_lost=True, shared=False)
    async def by_base(x: int) -> int:
        return x

    with capture_logs() as logs:
        app.finalize()
        app.on_after_finalize.send(sender=app)  # bound again: still one warning per task
    tasks = {name: (app.tasks[name].acks_late, app.tasks[name].reject_on_worker_lost) for name in lc.jobs}
    assert tasks == {"early": (False, False), "by_config": (True, False), "by_base": (False, True)}
    warnings = redelivery_warnings(logs)
    assert sorted(warnings) == ["by_base", "by_config", "early"]
    assert len([e for e in logs if e["event"] == "celery.redelivery_disabled"]) == 3
    assert warnings["early"]["log_level"] == "warning"
    assert "task 'early' can be lost when its worker process is killed" in warnings["early"]["reason"]
    assert warnings["early"]["acks_late"] is False


def test_a_task_registered_after_the_app_was_finalized_gets_the_defaults_too() -> None:
    app = lifecycle_app()
    app.finalize()
    lc = CeleryLifecycle(app)

    @lc.task(name="late", shared=False)
    async def late(x: int) -> int:
        return x

    with capture_logs() as logs:

        @lc.task(name="late_and_lossy", reject_on_worker_lost=False, shared=False)
        async def late_and_lossy(x: int) -> int:
            return x

    assert (app.tasks["late"].acks_late, app.tasks["late"].reject_on_worker_lost) == (True, True)
    assert app.tasks["late_and_lossy"].reject_on_worker_lost is False
    assert sorted(redelivery_warnings(logs)) == ["late_and_lossy"]


def test_tasks_run_eagerly_on_the_chosen_backend_and_are_requeued_after_shutdown(anyio_backend: str) -> None:
    app = lifecycle_app()
    events = Events()
    tree = Tree(events)
    lc = CeleryLifecycle(app, backend=anyio_backend, teardown_timeout=5)

    @lc.task(name="which_loop", shared=False)
    async def which_loop(x: int, s: Annotated[str, Depends(tree.session)]) -> str:
        return f"{x} {sniffio.current_async_library()}"

    try:
        assert app.tasks["which_loop"].apply(kwargs={"x": 1}).get() == f"1 {anyio_backend}"
    finally:
        lc.shutdown()
    assert events[-1] == "pool down"
    result = app.tasks["which_loop"].apply(kwargs={"x": 2})
    assert result.status == "REJECTED"  # Celery's Reject(requeue=True): back to the broker
    rejection = result.result
    assert rejection.requeue is True
    assert "task 'which_loop'" in rejection.reason and "closed" in rejection.reason


def test_close_from_the_loop_thread_is_refused_instead_of_waiting_for_itself(anyio_backend: str) -> None:
    rt = process_runtime(anyio_backend, Events())
    rt.start()
    try:

        async def close_from_a_job(runtime: Runtime) -> None:
            rt.close()

        with pytest.raises(RuntimeError, match="called on the lifecycle loop thread"):
            rt.run(close_from_a_job)
        assert rt.running
    finally:
        rt.close()
    assert loop_threads() == []


# -- logging and used-up retries ----------------------------------------------------------------


def test_a_task_that_asks_to_retry_with_no_attempts_left_says_so_and_names_the_cause(anyio_backend: str) -> None:
    app = lifecycle_app()
    lc = CeleryLifecycle(app, backend=anyio_backend, teardown_timeout=5)
    attempts: list[int] = []

    @lc.task(name="exhaust", shared=False, retries=1)
    async def exhaust(ctx: JobContext) -> None:
        attempts.append(ctx.attempt)
        try:
            raise ConnectionError("db down")
        except ConnectionError as exc:
            raise Retry(delay=0) from exc

    try:
        result = app.tasks["exhaust"].apply()
        with pytest.raises(LifecycleError) as info:
            result.get()
    finally:
        lc.shutdown()
    assert attempts == [1, 2]
    message = str(info.value)
    assert "task 'exhaust'" in message and "test_celery" in message  # the job and its module:qualname
    assert "attempts are used up (2 of 2; @lc.task(retries=1))" in message
    assert "Retry: retry requested (delay=0), caused by ConnectionError: db down" in message
    assert isinstance(info.value.__cause__, Retry)  # the chain is kept on the worker side


UNCONFIGURED_CELERY_APP = '''
"""Started as `celery -A quiet_app worker`; structlog is never configured here."""
import os
from typing import Annotated

from celery import Celery
from kombu import Queue

from lifecycle import Depends, Retry
from lifecycle.celery import CeleryLifecycle

QUEUE = os.environ["LIFECYCLE_CELERY_QUEUE"]
app = Celery("quiet", broker=os.environ["LIFECYCLE_TEST_BROKER"], backend=os.environ["LIFECYCLE_TEST_RESULTS"])
app.conf.update(
    task_default_queue=QUEUE, task_queues=[Queue(QUEUE, auto_delete=True)], task_serializer="json",
    result_serializer="json", accept_content=["json"], broker_connection_retry_on_startup=True,
    worker_prefetch_multiplier=1, result_expires=600,
)
lc = CeleryLifecycle(app, teardown_timeout=5)


async def session():
    yield "session"


@lc.task(name="quiet_add")
async def add(a: int, b: int, s: Annotated[str, Depends(session)]) -> int:
    return a + b


@lc.task(name="quiet_exhaust", retries=1)
async def exhaust(s: Annotated[str, Depends(session)]) -> None:
    try:
        raise ConnectionError("db down")
    except ConnectionError as exc:
        raise Retry(delay=0.1) from exc
'''


@pytest.mark.rabbitmq
@pytest.mark.redis
@pytest.mark.usefixtures("services")
def test_an_unconfigured_prefork_worker_prints_no_lifecycle_lines_and_used_up_retries_reach_the_client(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.util

    (tmp_path / "quiet_app.py").write_text(UNCONFIGURED_CELERY_APP)
    queue = f"lifecycle-test-{uuid.uuid4().hex[:8]}"
    env = {"LIFECYCLE_CELERY_QUEUE": queue, "LIFECYCLE_TEST_BROKER": BROKER, "LIFECYCLE_TEST_RESULTS": REDIS_URL}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    spec = importlib.util.spec_from_file_location(f"quiet_app_{queue[-8:]}", tmp_path / "quiet_app.py")
    assert spec is not None and spec.loader is not None
    client = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(client)
    output = tmp_path / "worker.out"
    with output.open("w") as sink:
        worker = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "quiet_app", "worker", "--pool", "prefork", "-c", "1",
             "--loglevel", "WARNING", "--without-gossip", "--without-mingle", "--without-heartbeat"],
            cwd=tmp_path, env={**os.environ, **env, "PYTHONPATH": str(tmp_path)}, stdout=sink,
            stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        try:
            results = [client.add.delay(a=n, b=1) for n in range(10)]
            assert [r.get(timeout=60) for r in results] == [n + 1 for n in range(10)]
            with pytest.raises(Exception) as info:
                client.exhaust.delay().get(timeout=60)
        finally:
            worker.send_signal(signal.SIGTERM)
            try:
                code = worker.wait(60)
            except subprocess.TimeoutExpired:
                worker.kill()
                raise
            client.app.close()
    text = output.read_text()
    assert code == 0, text
    assert type(info.value).__name__ == "LifecycleError"
    assert "attempts are used up (2 of 2" in str(info.value)
    assert "caused by ConnectionError: db down" in str(info.value)
    # Structlog unconfigured: the library's events go to the stdlib logger 'lifecycle',
    # which Celery's WARNING level governs: no debug/info events, no stdout prints
    # redirected as WARNING/ForkPoolWorker lines.
    for noise in ("job.started", "job.succeeded", "dependency.setup", "dependency.teardown", "WARNING/ForkPoolWorker"):
        assert noise not in text, text


def test_delay_validates_the_payload_in_the_producer_and_sends_its_json_form(anyio_backend: str) -> None:
    import datetime

    from lifecycle import PayloadError

    app = lifecycle_app(task_always_eager=True)
    lc = CeleryLifecycle(app, backend=anyio_backend, teardown_timeout=5)
    seen: list[Any] = []

    @lc.task(name="schedule", shared=False)
    async def schedule(day: datetime.date, times: int = 1) -> str:
        seen.append((day, times))
        return f"{day.isoformat()} x{times}"

    sent: list[dict[str, Any]] = []
    original = app.tasks["schedule"].apply

    def spy(args: Any = None, kwargs: Any = None, **options: Any) -> Any:
        sent.append({"args": args, "kwargs": kwargs})
        return original(args, kwargs, **options)

    app.tasks["schedule"].apply = spy  # eager apply_async ends in apply: see what crosses
    try:
        with pytest.raises(PayloadError, match="times") as bad:
            schedule.delay(day="2026-11-23", times="many")
        assert bad.value.job == "schedule" and not seen and not sent  # nothing was sent
        with pytest.raises(PayloadError, match="missing"):
            schedule.apply_async(kwargs={})
        assert schedule.delay(datetime.date(2026, 11, 23), times=2).get() == "2026-11-23 x2"
    finally:
        lc.shutdown()
    assert sent == [{"args": [], "kwargs": {"day": "2026-11-23", "times": 2}}]  # by name, JSON form
    assert seen == [(datetime.date(2026, 11, 23), 2)]  # converted back in the worker
