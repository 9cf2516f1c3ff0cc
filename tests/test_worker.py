"""Worker semantics (docs/workers.md) against MemoryQueue, on asyncio and trio."""

from collections.abc import Sequence
from typing import Any

import anyio
import pytest
from structlog.testing import capture_logs

from lifecycle import Depends, JobContext, Reject, Retry, StartupError, Worker, dependency, job
from lifecycle.queues import BrokerUnavailable, Delivery, MemoryQueue

pytestmark = pytest.mark.anyio


async def run_until_empty(worker: Worker, queue: MemoryQueue, limit: float = 10) -> None:
    """Run the worker until every message is done, then stop it gracefully."""
    with anyio.fail_after(limit):
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker.run)
            while len(queue):
                await anyio.sleep(0.005)
            worker.stop()


async def test_processes_everything_with_worker_scope_for_the_whole_run() -> None:
    events: list[str] = []
    seen: list[int] = []

    @dependency(scope="worker")
    async def pool() -> Any:
        events.append("pool up")
        yield object()
        events.append("pool down")

    async def session(ctx: JobContext) -> Any:
        yield ctx.id

    @job
    async def record(n: int, p: Any = Depends(pool), s: str = Depends(session)) -> None:
        seen.append(n)

    queue = MemoryQueue()
    for n in range(100):
        await queue.enqueue("record", {"n": n})
    worker = Worker(queue, [record], concurrency=8)
    await run_until_empty(worker, queue)
    assert sorted(seen) == list(range(100))
    assert events == ["pool up", "pool down"]
    assert queue.acked == 100
    assert worker.stats["succeeded"] == 100


async def test_never_more_than_concurrency_in_flight_and_no_overfetch() -> None:
    running = 0
    peak = 0
    overfetch: list[int] = []

    @job
    async def slow() -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        overfetch.append(queue.in_flight)
        await anyio.sleep(0.01)
        running -= 1

    queue = MemoryQueue()
    for _ in range(60):
        await queue.enqueue("slow", {})
    await run_until_empty(Worker(queue, [slow], concurrency=5), queue)
    assert peak == 5
    assert max(overfetch) <= 5  # the worker stops reading while full


async def test_an_acknowledgement_on_its_way_frees_the_slot_but_at_most_twice_concurrency_are_held() -> None:
    """A succeeded job's ack overlaps the next read (one round trip less per message at
    concurrency 1); acks that do not come back stop the reading at 2 x concurrency."""
    started: list[int] = []
    acks_may_finish = anyio.Event()

    class SlowAcks(MemoryQueue):
        async def ack(self, delivery: Delivery) -> bool:
            await acks_may_finish.wait()
            return await super().ack(delivery)

    @job
    async def record(n: int) -> None:
        started.append(n)

    queue = SlowAcks()
    for n in range(5):
        await queue.enqueue("record", {"n": n})
    worker = Worker(queue, [record], concurrency=1, poll_interval=0.01)
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker.run)
            while len(started) < 2:
                await anyio.sleep(0.005)
            await anyio.sleep(0.1)  # time enough to read a third message, if it would
            assert started == [0, 1]  # job 1 ran while job 0's ack was on its way
            assert worker.in_flight == 2 and queue.in_flight == 2  # held: never more than 2 x 1
            assert queue.acked == 0
            acks_may_finish.set()
            while len(queue):
                await anyio.sleep(0.005)
            worker.stop()
    assert started == [0, 1, 2, 3, 4]
    assert queue.acked == 5
    assert worker.stats["succeeded"] == 5


async def test_failures_are_retried_with_backoff_then_dead_lettered_with_details() -> None:
    attempts: list[int] = []

    @job(retries=2)
    async def flaky(user_id: int, ctx: JobContext) -> None:
        attempts.append(ctx.attempt)
        raise ConnectionError(f"down for {user_id}")

    queue = MemoryQueue()
    await queue.enqueue("flaky", {"user_id": 7})
    worker = Worker(queue, [flaky], retry_backoff=0.01)
    await run_until_empty(worker, queue)
    assert attempts == [1, 2, 3]
    [dead] = await queue.dead_letters()
    assert dead["reason"] == "failed"
    assert dead["attempts"] == 3
    assert dead["payload"] == {"user_id": 7}
    assert dead["error"] == "ConnectionError: down for 7"
    assert "Traceback" in dead["traceback"] and "down for 7" in dead["traceback"]
    assert worker.stats["retried"] == 2


def test_backoff_is_exponential_with_jitter_and_capped() -> None:
    async def noop() -> None:
        pass

    worker = Worker(MemoryQueue(), [noop], retry_backoff=1.0, retry_backoff_max=5.0)
    for attempt, ceiling in [(1, 1.0), (2, 2.0), (3, 4.0), (4, 5.0), (10, 5.0)]:
        delays = {worker.backoff(attempt) for _ in range(50)}
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert len(delays) > 1  # jittered


async def test_retry_delay_is_honoured() -> None:
    times: list[float] = []

    @job(retries=1)
    async def later(ctx: JobContext) -> None:
        times.append(anyio.current_time())
        if ctx.attempt == 1:
            raise Retry(delay=0.1)

    queue = MemoryQueue()
    await queue.enqueue("later", {})
    await run_until_empty(Worker(queue, [later], retry_backoff=0), queue)
    assert times[1] - times[0] >= 0.1


async def test_reject_unknown_job_and_invalid_payload_go_to_dead_letter_at_once() -> None:
    calls: list[int] = []

    @job(retries=5)
    async def strict(n: int) -> None:
        calls.append(n)
        raise Reject(f"n={n} is not allowed")

    queue = MemoryQueue()
    await queue.enqueue("strict", {"n": 1})
    await queue.enqueue("missing", {"n": 1})
    await queue.enqueue("strict", {"wrong": 1})
    await run_until_empty(Worker(queue, [strict]), queue)
    assert calls == [1]
    by_reason = {d["reason"]: d for d in await queue.dead_letters()}
    assert set(by_reason) == {"rejected", "unknown_job", "invalid_payload"}
    assert by_reason["rejected"]["error"] == "Reject: n=1 is not allowed"
    assert "unknown job 'missing'; this worker runs: strict" in by_reason["unknown_job"]["error"]
    assert "missing argument(s) 'n'" in by_reason["invalid_payload"]["error"]
    assert "unexpected argument(s) 'wrong'" in by_reason["invalid_payload"]["error"]


async def test_teardown_that_raises_causes_a_retry_not_an_ack() -> None:
    attempts: list[int] = []

    async def tx(ctx: JobContext) -> Any:
        yield None
        if ctx.attempt == 1:
            raise RuntimeError("commit failed")

    @job(retries=1)
    async def write(t: Any = Depends(tx), ctx: JobContext = None) -> None:  # type: ignore[assignment]
        attempts.append(ctx.attempt)

    queue = MemoryQueue()
    await queue.enqueue("write", {})
    worker = Worker(queue, [write], retry_backoff=0.001)
    await run_until_empty(worker, queue)
    assert attempts == [1, 2]
    assert worker.stats == {"succeeded": 1, "retried": 1, "dead_lettered": 0, "released": 0, "settle_failed": 0, "lease_lost": 0}


async def test_hanging_teardown_is_bounded_by_teardown_timeout() -> None:
    async def hangs(ctx: JobContext) -> Any:
        yield None
        if ctx.attempt == 1:
            await anyio.sleep(60)

    @job(retries=1)
    async def work(h: Any = Depends(hangs)) -> None:
        pass

    queue = MemoryQueue()
    await queue.enqueue("work", {})
    worker = Worker(queue, [work], teardown_timeout=0.1, retry_backoff=0.001)
    await run_until_empty(worker, queue, limit=5)
    assert worker.stats["retried"] == 1 and worker.stats["succeeded"] == 1


async def test_stop_lets_in_flight_jobs_finish_within_grace() -> None:
    finished: list[int] = []
    started = anyio.Event()

    @job
    async def slow(n: int) -> None:
        started.set()
        await anyio.sleep(0.1)
        finished.append(n)

    queue = MemoryQueue()
    for n in range(3):
        await queue.enqueue("slow", {"n": n})
    worker = Worker(queue, [slow], concurrency=3, shutdown_grace=5)
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker.run)
        await started.wait()
        await anyio.sleep(0.01)
        worker.stop()
    assert sorted(finished) == [0, 1, 2]
    assert queue.acked == 3


async def test_cancelling_run_is_graceful_and_overrunning_jobs_are_cancelled_with_teardown() -> None:
    events: list[str] = []
    started = anyio.Event()

    @dependency(scope="worker")
    async def pool() -> Any:
        yield None
        events.append("pool down")

    async def resource() -> Any:
        try:
            yield None
        finally:
            await anyio.sleep(0.01)  # teardown can still await: it is shielded
            events.append("resource down")

    @job
    async def stuck(p: Any = Depends(pool), r: Any = Depends(resource)) -> None:
        started.set()
        await anyio.sleep(60)

    queue = MemoryQueue()
    await queue.enqueue("stuck", {})
    worker = Worker(queue, [stuck], shutdown_grace=0.1)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker.run)
            await started.wait()
            tg.cancel_scope.cancel()
    assert events == ["resource down", "pool down"]
    assert worker.stats["released"] == 1
    assert len(queue) == 1 and queue.in_flight == 0  # back in the queue for another consumer


async def test_worker_scope_failure_at_startup_fails_fast() -> None:
    @dependency(scope="worker")
    async def broken_pool() -> Any:
        raise ConnectionRefusedError("db down")
        yield  # pragma: no cover

    @job
    async def uses(p: Any = Depends(broken_pool)) -> None:
        pass

    queue = MemoryQueue()
    await queue.enqueue("uses", {})
    with pytest.raises(StartupError, match=r"broken_pool of job 'uses' failed: ConnectionRefusedError: db down"):
        await Worker(queue, [uses]).run()
    assert len(queue) == 1  # nothing consumed


async def test_poison_message_is_dead_lettered_after_max_deliveries() -> None:
    @job
    async def fine() -> None:
        pass

    queue = MemoryQueue(lease=0.05)
    await queue.enqueue("fine", {})
    for _ in range(3):  # three consumers took it and died before acknowledging (no renewal)
        assert len(await queue.receive(1, 5)) == 1
    worker = Worker(queue, [fine], max_deliveries=3)
    await run_until_empty(worker, queue)
    [dead] = await queue.dead_letters()
    assert dead["reason"] == "poison" and dead["deliveries"] == 4


def test_worker_configuration_errors() -> None:
    async def a() -> None:
        pass

    async def b() -> None:
        pass

    with pytest.raises(ValueError, match="concurrency"):
        Worker(MemoryQueue(), [a], concurrency=0)
    with pytest.raises(Exception, match="two jobs are named 'a'"):
        Worker(MemoryQueue(), [job(a), job(name="a")(b)])
    with pytest.raises(Exception, match="at least one job"):
        Worker(MemoryQueue(), [])


async def test_memory_queue_rejects_payloads_that_are_not_json() -> None:
    with pytest.raises(TypeError):
        await MemoryQueue().enqueue("x", {"when": object()})


async def test_a_failing_ack_is_logged_and_leaves_the_message_for_redelivery() -> None:
    done: list[int] = []

    class FlakyAck(MemoryQueue):
        fail = True

        async def ack(self, delivery: Any) -> bool:
            if self.fail:
                self.fail = False
                raise ConnectionError("broker went away")
            return await super().ack(delivery)

    @job
    async def work(n: int) -> None:
        done.append(n)

    queue = FlakyAck()
    for n in range(3):
        await queue.enqueue("work", {"n": n})
    worker = Worker(queue, [work])
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker.run)
            while worker.stats["succeeded"] < 2:
                await anyio.sleep(0.005)
            worker.stop()
    assert worker.stats["settle_failed"] == 1
    assert sorted(done) == [0, 1, 2]  # the other jobs were not disturbed
    assert queue.in_flight == 1  # not acked: a real broker would deliver it again


class FlakyBroker(MemoryQueue):
    """A MemoryQueue whose broker can be taken down: every call then raises
    BrokerUnavailable, as a backend does for a lost connection or a stall."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.down = False
        self.refused: dict[str, int] = {}

    def _check(self, operation: str) -> None:
        if self.down:
            self.refused[operation] = self.refused.get(operation, 0) + 1
            raise BrokerUnavailable(f"{operation}: connection refused")

    async def open(self) -> None:
        self._check("open")

    async def receive(self, limit: int, timeout: float) -> list[Delivery]:
        self._check("receive")
        return await super().receive(limit, timeout)

    async def ack(self, delivery: Delivery) -> bool:
        self._check("ack")
        return await super().ack(delivery)

    async def renew(self, deliveries: Sequence[Delivery]) -> list[str]:
        self._check("renew")
        return await super().renew(deliveries)


def fast_broker_backoff() -> dict[str, float]:
    return {"broker_backoff": 0.01, "broker_backoff_max": 0.05}


async def test_a_broker_down_at_start_up_is_waited_for_and_each_outage_logged_once() -> None:
    ran: list[int] = []

    @job
    async def work(n: int) -> None:
        ran.append(n)

    queue = FlakyBroker()
    await queue.enqueue("work", {"n": 1})
    queue.down = True
    worker = Worker(queue, [work], poll_interval=0.01, **fast_broker_backoff())
    with capture_logs() as logs, anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker.run)
            while queue.refused.get("open", 0) < 3:
                await anyio.sleep(0.005)
            queue.down = False
            while len(queue):
                await anyio.sleep(0.005)
            worker.stop()
    assert ran == [1]
    events = [entry["event"] for entry in logs]
    assert events.count("worker.broker_unavailable") == 1 and events.count("worker.broker_recovered") == 1
    assert events.index("worker.broker_recovered") < events.index("worker.started")


async def test_a_job_that_ends_during_an_outage_settles_when_the_broker_is_back() -> None:
    ran: list[int] = []
    release = anyio.Event()

    @job
    async def work(n: int) -> None:
        await release.wait()
        ran.append(n)

    queue = FlakyBroker()
    await queue.enqueue("work", {"n": 1})
    worker = Worker(queue, [work], poll_interval=0.01, **fast_broker_backoff())
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker.run)
            while not worker.in_flight:
                await anyio.sleep(0.005)
            queue.down = True
            release.set()
            while queue.refused.get("ack", 0) < 3:  # the ack is tried again and again
                await anyio.sleep(0.005)
            assert worker.in_flight == 1 and queue.acked == 0  # kept, not lost or failed
            queue.down = False
            while len(queue):
                await anyio.sleep(0.005)
            worker.stop()
    assert ran == [1] and queue.acked == 1
    assert worker.stats["succeeded"] == 1 and worker.stats["settle_failed"] == 0


async def test_a_lost_lease_is_not_settled_and_not_counted_as_a_success() -> None:
    release = anyio.Event()

    @job
    async def slow(n: int) -> None:
        await release.wait()

    queue = MemoryQueue(lease=0.05)
    await queue.enqueue("slow", {"n": 1})
    # Heartbeats far slower than the lease: the message goes to another consumer.
    worker = Worker(queue, [slow], poll_interval=0.01, heartbeat_interval=0.2)
    with capture_logs() as logs, anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker.run)
            while not worker.in_flight:
                await anyio.sleep(0.005)
            worker.stop()  # read no more: the other consumer below takes it
            with anyio.fail_after(5):
                [taken] = await queue.receive(1, 5)
            while worker.stats["lease_lost"] == 0:
                await anyio.sleep(0.01)
            release.set()
    assert worker.stats == {**worker.stats, "succeeded": 0, "lease_lost": 1}
    assert await queue.ack(taken) is True  # the new owner settles it
    assert [e["event"] for e in logs].count("worker.lease_lost") == 1


async def test_a_job_cancelled_by_shutdown_is_released_with_its_attempt_unused() -> None:
    @job(retries=0)
    async def stuck(n: int) -> None:
        await anyio.sleep_forever()

    queue = MemoryQueue()
    await queue.enqueue("stuck", {"n": 1})
    worker = Worker(queue, [stuck], shutdown_grace=0.05, poll_interval=0.01)
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker.run)
            while not worker.in_flight:
                await anyio.sleep(0.005)
            worker.stop()
    assert worker.stats["released"] == 1 and await queue.dead_letters() == []
    [again] = await queue.receive(1, 1)
    assert (again.attempt, again.deliveries) == (1, 1)


async def test_a_malformed_message_is_dead_lettered_and_the_rest_of_the_batch_goes_on() -> None:
    ran: list[int] = []

    @job
    async def work(n: int) -> None:
        ran.append(n)

    class WithGarbage(MemoryQueue):
        injected = False

        async def receive(self, limit: int, timeout: float) -> list[Delivery]:
            batch = await super().receive(limit, timeout)
            if batch and not self.injected:
                self.injected = True
                garbage = Delivery("garbage", "", None, raw={b"attempt": b"one"}, malformed="attempt: not a number")
                self._in_flight["garbage"] = (garbage, float("inf"))
                batch.insert(0, garbage)
            return batch

    queue = WithGarbage()
    for n in range(3):
        await queue.enqueue("work", {"n": n})
    worker = Worker(queue, [work], concurrency=8)
    await run_until_empty(worker, queue)
    assert sorted(ran) == [0, 1, 2]
    [dead] = await queue.dead_letters()
    assert dead["reason"] == "malformed" and "attempt: not a number" in dead["error"]
