"""The queue contract (``lifecycle/queues/_base.py``), one suite for every backend: each
module of ``tests/harnesses`` is a backend (MemoryQueue and SqliteQueue on asyncio and
trio, RedisStreamQueue on asyncio against the real Redis, skipped with a reason when
it is unreachable and failing under CI=true). A new backend is done when this suite
passes for it."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

import anyio
import pytest
from harnesses import Harness, backends, cases

from lifecycle import PayloadError, job
from lifecycle.queues import Delivery, Queue

pytestmark = pytest.mark.anyio
LEASE = 1.0  # seconds; the lease tests wait a few of these


@job
async def send_email(user_id: int) -> None:
    pass


BACKENDS = backends()


@pytest.fixture(params=cases())
def case(request: pytest.FixtureRequest) -> tuple[str, str]:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
def anyio_backend(case: tuple[str, str]) -> str:
    return case[1]


@pytest.fixture
async def harness(case: tuple[str, str], request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    async with BACKENDS[case[0]].harness(request, LEASE) as made:
        yield made


async def collect(queue: Queue, count: int, limit: float = 10) -> list[Delivery]:
    """Receive until ``count`` deliveries arrived (or fail after ``limit`` seconds)."""
    got: list[Delivery] = []
    with anyio.fail_after(limit):
        while len(got) < count:
            got += await queue.receive(count - len(got), 0.2)
    return got


async def nothing_ready(queue: Queue) -> bool:
    return await queue.receive(10, 0) == []


async def test_enqueue_receive_ack(harness: Harness) -> None:
    queue = harness.queue
    await queue.open()
    before = time.time()
    ids = [await queue.enqueue("send_email", {"user_id": n}) for n in range(3)]
    await queue.enqueue(send_email, {"user_id": 3})  # a Job: validated, sent by its name
    assert len(set(ids)) == 3
    deliveries = await collect(queue, 4)
    assert sorted(d.payload["user_id"] for d in deliveries) == [0, 1, 2, 3]
    for delivery in deliveries:
        assert (delivery.job, delivery.attempt, delivery.deliveries, delivery.malformed) == ("send_email", 1, 1, None)
        assert before - 1 <= delivery.enqueued_at <= time.time() + 1
        await queue.ack(delivery)
    assert await nothing_ready(queue)
    assert await queue.renew(deliveries) == [d.id for d in deliveries]  # settled: no longer ours


async def test_enqueue_refuses_a_bad_payload_and_delay_with_at(harness: Harness) -> None:
    with pytest.raises(PayloadError, match="user_id"):
        await harness.queue.enqueue(send_email, {"user": 3})
    with pytest.raises(ValueError, match="not both"):
        await harness.queue.enqueue("send_email", {"user_id": 3}, delay=1, at=time.time() + 1)
    with pytest.raises(TypeError):
        await harness.queue.enqueue("send_email", {"user_id": object()})
    assert await nothing_ready(harness.queue)


async def test_retry_comes_back_as_the_next_attempt_after_its_delay(harness: Harness) -> None:
    queue = harness.queue
    await queue.enqueue("send_email", {"user_id": 7})
    [first] = await collect(queue, 1)
    await queue.retry(first, 0, "ValueError: once")
    [second] = await collect(queue, 1)
    assert (second.job, second.payload, second.attempt, second.deliveries) == ("send_email", {"user_id": 7}, 2, 1)
    assert second.enqueued_at == pytest.approx(first.enqueued_at)
    scheduled = time.monotonic()
    await queue.retry(second, 1.0, "ValueError: twice")
    assert await nothing_ready(queue)  # waits for its delay
    [third] = await collect(queue, 1)
    assert time.monotonic() - scheduled >= 0.9
    assert (third.payload, third.attempt) == ({"user_id": 7}, 3)
    await queue.ack(third)


async def test_enqueue_with_delay_or_at(harness: Harness) -> None:
    queue = harness.queue
    start = time.monotonic()
    await queue.enqueue("send_email", {"user_id": 1}, delay=1.0)
    await queue.enqueue("send_email", {"user_id": 2}, at=time.time() + 1.0)
    await queue.enqueue("send_email", {"user_id": 3}, at=time.time() - 60)  # past: now
    [now] = await collect(queue, 1)
    assert now.payload == {"user_id": 3}
    await queue.ack(now)  # at once: held past its lease (a loaded machine), it would come back
    later = await collect(queue, 2)
    assert time.monotonic() - start >= 0.9
    assert sorted(d.payload["user_id"] for d in later) == [1, 2]
    for delivery in later:
        await queue.ack(delivery)


async def test_a_dedup_key_enqueues_once_and_returns_the_first_messages_id(harness: Harness) -> None:
    queue, other = harness.queue, harness.other()
    key = f"tick-{uuid.uuid4().hex}"
    first = await queue.enqueue("send_email", {"user_id": 1}, dedup_key=key, dedup_ttl=60)
    assert await queue.enqueue("send_email", {"user_id": 2}, dedup_key=key, dedup_ttl=60) == first
    assert await other.enqueue(send_email, {"user_id": 3}, dedup_key=key, dedup_ttl=60) == first  # another producer
    plain = await queue.enqueue("send_email", {"user_id": 4})  # no key: never de-duplicated
    assert plain != first
    [one, four] = sorted(await collect(queue, 2), key=lambda d: d.payload["user_id"])
    assert (one.payload, four.payload) == ({"user_id": 1}, {"user_id": 4})
    assert await nothing_ready(queue)
    await queue.ack(one)
    # Settled, the key is still remembered: a late producer adds nothing.
    assert await other.enqueue("send_email", {"user_id": 5}, dedup_key=key, dedup_ttl=60) == first
    assert await nothing_ready(queue)
    await queue.ack(four)


async def test_racing_producers_with_one_dedup_key_make_one_message(harness: Harness) -> None:
    key = f"tick-{uuid.uuid4().hex}"
    producers = [harness.queue, harness.other(), harness.other()]
    ids: list[str] = []

    async def produce(queue: Queue, n: int) -> None:
        ids.append(await queue.enqueue("send_email", {"user_id": n}, at=time.time() + 0.5, dedup_key=key, dedup_ttl=60))

    async with anyio.create_task_group() as group:
        for n in range(12):
            group.start_soon(produce, producers[n % 3], n)
    assert len(set(ids)) == 1
    [only] = await collect(harness.queue, 1)
    await harness.queue.ack(only)
    assert await harness.queue.receive(10, 1.0) == []


async def test_a_dedup_key_is_forgotten_after_its_ttl(harness: Harness) -> None:
    key = f"tick-{uuid.uuid4().hex}"
    await harness.queue.enqueue("send_email", {"user_id": 1}, dedup_key=key, dedup_ttl=1.0)
    await anyio.sleep(1.6)  # past the ttl: the key is free (a slow machine only adds time)
    await harness.queue.enqueue("send_email", {"user_id": 2}, dedup_key=key, dedup_ttl=1.0)
    both = await collect(harness.queue, 2)
    assert sorted(d.payload["user_id"] for d in both) == [1, 2]
    for delivery in both:
        await harness.queue.ack(delivery)


async def test_enqueue_refuses_a_bad_dedup_key_or_ttl(harness: Harness) -> None:
    queue = harness.queue
    for key, ttl, message in [
        ("", None, "dedup_key must be a non-empty string"),
        (None, 5.0, "without a dedup_key"),
        ("k", 0, "dedup_ttl must be a positive"),
        ("k", -1.0, "dedup_ttl must be a positive"),
        ("k", float("nan"), "dedup_ttl must be a positive"),
    ]:
        with pytest.raises(ValueError, match=message):
            await queue.enqueue("send_email", {"user_id": 1}, dedup_key=key, dedup_ttl=ttl)
    assert await nothing_ready(queue)


async def test_cancel_removes_a_waiting_message_only(harness: Harness) -> None:
    queue, other = harness.queue, harness.other()
    delayed = await queue.enqueue("send_email", {"user_id": 1}, delay=1.0)
    due = await queue.enqueue("send_email", {"user_id": 2})
    kept = await queue.enqueue("send_email", {"user_id": 3}, delay=1.0)
    assert await other.cancel(delayed) is True  # any producer may cancel
    assert await queue.cancel(delayed) is False  # once
    assert await queue.cancel(due) is harness.cancels_due
    if not harness.cancels_due:  # it stays, and runs
        [ran] = await collect(queue, 1)
        assert ran.payload == {"user_id": 2}
        await queue.ack(ran)
    started = await queue.enqueue("send_email", {"user_id": 4})
    [held] = await collect(queue, 1)
    assert held.payload == {"user_id": 4}
    assert await queue.cancel(started) is False  # received: it runs
    assert await queue.cancel(held.id) is False
    assert await queue.cancel("no-such-message") is False
    await queue.ack(held)
    assert await queue.cancel(started) is False  # done
    [later] = await collect(queue, 1)  # only the one not cancelled comes, after its delay
    assert later.payload == {"user_id": 3}
    assert await queue.cancel(kept) is False
    await queue.ack(later)
    assert await queue.receive(10, 1.5) == []


async def test_dead_letters_newest_first_with_paging_replay_and_purge(harness: Harness) -> None:
    queue = harness.queue
    for n in range(5):
        await queue.enqueue("send_email", {"user_id": n})
    for delivery in sorted(await collect(queue, 5), key=lambda d: d.payload["user_id"]):
        record = {"job": delivery.job, "payload": delivery.payload, "reason": "failed", "error": "E: x"}
        await queue.dead_letter(delivery, record)
    newest = await queue.dead_letters(2)
    assert [r["payload"]["user_id"] for r in newest] == [4, 3]
    assert newest[0]["reason"] == "failed" and newest[0]["error"] == "E: x"
    older = await queue.dead_letters(2, before=newest[-1]["dead_letter_id"])
    assert [r["payload"]["user_id"] for r in older] == [2, 1]
    oldest = await queue.dead_letters(10, before=older[-1]["dead_letter_id"])
    assert [r["payload"]["user_id"] for r in oldest] == [0]
    assert await queue.dead_letters(10, before=oldest[0]["dead_letter_id"]) == []

    assert await queue.replay([newest[0]["dead_letter_id"]]) == 1
    assert await queue.replay([newest[0]["dead_letter_id"]]) == 0  # gone from the dead letters
    [replayed] = await collect(queue, 1)
    assert (replayed.job, replayed.payload, replayed.attempt) == ("send_email", {"user_id": 4}, 1)
    await queue.ack(replayed)

    assert await queue.purge([newest[1]["dead_letter_id"], newest[1]["dead_letter_id"]]) == 1
    assert [r["payload"]["user_id"] for r in await queue.dead_letters()] == [2, 1, 0]
    assert await queue.purge() == 3
    assert await queue.dead_letters() == []
    assert await queue.purge() == 0


HEADERS = {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", "tenant": 'ünïcode, "quoted"\n'}


async def test_headers_travel_with_the_message_through_every_settle(harness: Harness) -> None:
    """What ``enqueue(headers=)`` gave comes back as ``Delivery.headers``: now and
    delayed, after a retry (now and delayed), a release, and a dead letter's replay.
    No message is held while a delayed one is awaited: held past its lease on a loaded
    machine, it would come back as a second delivery."""
    queue = harness.queue
    await queue.enqueue("send_email", {"user_id": 1}, headers=HEADERS)
    await queue.enqueue("send_email", {"user_id": 3})
    first, plain = sorted(await collect(queue, 2), key=lambda d: d.payload["user_id"])
    assert (first.headers, plain.headers) == (HEADERS, {})
    await queue.ack(plain)
    await queue.retry(first, 0, "ValueError: now")
    [retried] = await collect(queue, 1)
    assert (retried.attempt, retried.headers) == (2, HEADERS)
    await queue.release(retried)
    [released] = await collect(queue, 1)
    assert (released.attempt, released.headers) == (2, HEADERS)
    record = {"job": released.job, "payload": released.payload, "reason": "failed", "headers": released.headers}
    await queue.dead_letter(released, record)
    [dead] = await queue.dead_letters(1)
    assert dead["headers"] == HEADERS
    assert await queue.replay([dead["dead_letter_id"]]) == 1
    [replayed] = await collect(queue, 1)
    assert (replayed.attempt, replayed.headers) == (1, HEADERS)
    await queue.ack(replayed)

    await queue.enqueue("send_email", {"user_id": 2}, headers=HEADERS, delay=0.5)
    [delayed] = await collect(queue, 1)
    assert delayed.headers == HEADERS
    await queue.retry(delayed, 0.5, "ValueError: later")
    [later] = await collect(queue, 1)
    assert (later.attempt, later.headers) == (2, HEADERS)
    await queue.ack(later)
    assert await nothing_ready(queue)


@pytest.mark.parametrize(
    ("headers", "match"),
    [
        ({"traceparent": 3}, "header 'traceparent' must be a string"),
        ({"": "x"}, "header names must be non-empty strings"),
        ({"big": "x" * 20_000}, "headers are over the limit"),
    ],
)
async def test_enqueue_refuses_bad_headers(harness: Harness, headers: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match) as caught:
        await harness.queue.enqueue("send_email", {"user_id": 1}, headers=headers)  # type: ignore[arg-type]
    assert "send_email" in str(caught.value)
    assert await nothing_ready(harness.queue)  # nothing entered the broker


async def test_release_keeps_the_attempt_and_counts_no_delivery(harness: Harness) -> None:
    queue = harness.queue
    await queue.enqueue("send_email", {"user_id": 5}, attempt=3)
    [held] = await collect(queue, 1)
    assert (held.attempt, held.deliveries) == (3, 1)
    await queue.release(held)
    await queue.release(held)  # repeated: still one copy
    [again] = await collect(queue, 1)
    assert (again.payload, again.attempt, again.deliveries) == ({"user_id": 5}, 3, 1)
    assert again.enqueued_at == pytest.approx(held.enqueued_at)
    assert await nothing_ready(queue)
    await queue.ack(again)


async def test_settling_twice_is_harmless(harness: Harness) -> None:
    queue = harness.queue
    for n in range(3):
        await queue.enqueue("send_email", {"user_id": n})
    by_user = {d.payload["user_id"]: d for d in await collect(queue, 3)}
    assert await queue.ack(by_user[0]) is True
    assert await queue.ack(by_user[0]) is False
    assert await queue.retry(by_user[0], 0, "late") is False  # settled already: no retry
    assert await queue.retry(by_user[1], 0, "E: once") is True
    assert await queue.retry(by_user[1], 0, "E: once") is False  # the answer was lost: asked again
    record = {"job": "send_email", "payload": {"user_id": 2}, "reason": "failed"}
    assert await queue.dead_letter(by_user[2], record) is True
    assert await queue.dead_letter(by_user[2], record) is False
    assert await queue.release(by_user[2]) is False
    [retried] = await collect(queue, 1)
    assert (retried.payload, retried.attempt) == ({"user_id": 1}, 2)
    assert await nothing_ready(queue)
    assert len(await queue.dead_letters()) == 1
    await queue.ack(retried)


async def test_renew_keeps_a_message_from_being_taken_over(harness: Harness) -> None:
    queue, other = harness.queue, harness.other()
    await queue.enqueue("send_email", {"user_id": 1})
    [held] = await collect(queue, 1)
    deadline = time.monotonic() + 3 * LEASE
    while time.monotonic() < deadline:
        assert await queue.renew([held]) == []
        assert await other.receive(10, 0.1) == []
    await queue.ack(held)
    assert await nothing_ready(other)


async def test_a_dead_consumers_message_is_redelivered_and_its_delivery_counted(harness: Harness) -> None:
    queue, other = harness.queue, harness.other()
    await queue.enqueue("send_email", {"user_id": 1})
    [held] = await collect(queue, 1)  # ... and its consumer dies: no renew
    [taken] = await collect(other, 1)
    assert (taken.payload, taken.attempt, taken.deliveries) == ({"user_id": 1}, 1, 2)
    assert await queue.renew([held]) == [held.id]  # the dead one, back, learns it lost it
    assert await queue.ack(held) is False  # a stale settle changes nothing
    assert await queue.retry(held, 0, "stale") is False
    assert await other.renew([taken]) == []
    await other.ack(taken)
    assert await nothing_ready(other)
    assert await queue.dead_letters() == []


async def test_lease_is_declared(harness: Harness) -> None:
    assert harness.queue.lease == LEASE
