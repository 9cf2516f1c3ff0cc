"""Message headers (``enqueue(headers=)``, ``Delivery.headers``): a worker keeps them in
the dead letter so a replay carries them again, and every backend's decoder turns
headers that do not decode into a malformed delivery (the round trip through each real
broker is in the contract suite)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from test_worker import run_until_empty

from lifecycle import Reject, Worker, job
from lifecycle.queues import Delivery, MemoryQueue, _nats, _postgres, _rabbit, _redis, _sqlite
from lifecycle.queues._base import MAX_HEADERS_BYTES, MalformedMessage, decode_headers

TRACE = {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}


@pytest.mark.anyio
async def test_a_dead_letter_keeps_the_headers_and_its_replay_carries_them() -> None:
    @job
    async def refuse(n: int) -> None:
        raise Reject("no")

    queue = MemoryQueue()
    await queue.enqueue("refuse", {"n": 1}, headers=TRACE)
    await run_until_empty(Worker(queue, [refuse]), queue)
    [dead] = await queue.dead_letters()
    assert dead["headers"] == TRACE
    assert await queue.replay([dead["dead_letter_id"]]) == 1
    seen = [delivery.headers for delivery in await queue.receive(1, 1)]
    assert seen == [TRACE]


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (b"not json", "headers are not JSON"),
        (b"\xff\xfe", "headers are not JSON"),
        (b'["a"]', "not a JSON object of strings"),
        (b'{"a": 1}', "not a JSON object of strings"),
        (b'{"a": "' + b"x" * MAX_HEADERS_BYTES + b'"}', "over the limit"),
    ],
)
def test_decode_headers_refuses_what_is_not_an_object_of_strings(raw: bytes, why: str) -> None:
    with pytest.raises(MalformedMessage, match=why):
        decode_headers(raw)


def _sqlite_row(headers: bytes) -> Delivery:
    return _sqlite.decode_row((1, b"job", b"{}", 1, 1, 1.0, headers), claim=1)


def _postgres_row(headers: bytes) -> Delivery:
    return _postgres.decode_row((1, "job", b"{}", 1, 1, 1.0, headers.decode("utf-8", "replace")), token=1)


def _redis_fields(headers: bytes) -> Delivery:
    return _redis.decode_fields("1-0", {b"job": b"job", b"payload": b"{}", b"headers": headers}, 1)


def _rabbit_message(headers: bytes) -> Delivery:
    return _rabbit.decode_message("m", {"job": "job", "headers": headers}, b"{}")


def _nats_message(headers: bytes) -> Delivery:
    return _nats.decode_message("1", {_nats.JOB: "job", _nats.HEADERS: headers.decode()}, b"{}", 1)


DECODERS: list[Callable[[bytes], Delivery]] = [_sqlite_row, _postgres_row, _redis_fields, _rabbit_message, _nats_message]


@pytest.mark.parametrize("decode", DECODERS, ids=lambda d: d.__name__.strip("_"))
def test_every_backend_decodes_headers_or_calls_the_message_malformed(decode: Callable[[bytes], Any]) -> None:
    good = decode(b'{"traceparent": "00-abc"}')
    assert (good.malformed, good.headers) == (None, {"traceparent": "00-abc"})
    bad = decode(b'{"traceparent": 7}')
    assert bad.malformed is not None and "headers" in bad.malformed.lower()
    assert "not a JSON object of strings" in bad.malformed
