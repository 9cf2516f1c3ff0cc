"""Hypothesis-built stream entries XADDed straight into the stream (bypassing
``enqueue``) while a worker process runs: whatever a foreign or broken producer writes,
the worker never exits; malformed entries land in the dead letters with reason
``malformed``, genuine poison with its own reason, and good ones complete once.

Each entry is built as good, malformed or poison from the start, so the expected
outcome is known without re-implementing the queue's decoder. Bad values are chosen to
be bad under any reasonable reading (e.g. an attempt that ``int()`` cannot parse or
that is below 1); borderline spellings that one decoder might accept and another refuse
are left out on purpose."""

from __future__ import annotations

import itertools
import json
import math
import time
from collections import Counter
from dataclasses import dataclass

import pytest
from chaos_harness import (
    RedisServer,
    WorkerPool,
    assert_settled,
    dead_letters,
    pending,
    report,
    wait_until,
)
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.chaos

HEADERS = ("job", "attempt", "enqueued_at", "payload")


@dataclass
class Entry:
    """One stream entry and what must become of it: ``outcome`` is "ran" or the
    dead-letter reason expected."""

    fields: dict[bytes, bytes]
    outcome: str
    index: int


def _int_or_none(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        return None


def _is_finite_float(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


# \xff never occurs in UTF-8, so these bytes are invalid UTF-8 wherever they sit.
invalid_utf8 = st.builds(lambda head, tail: head + b"\xff" + tail, st.binary(max_size=8), st.binary(max_size=8))
bad_job = st.one_of(st.just(b""), invalid_utf8, st.none())  # None: the field is missing
bad_attempt = st.one_of(
    st.sampled_from([b"one", b"0", b"-1", b"1.5", b"", b"1e3", b"nan"]),
    st.text(max_size=12).filter(lambda t: (_int_or_none(t) or 0) < 1).map(str.encode),
    invalid_utf8,
)
bad_enqueued_at = st.one_of(
    st.sampled_from([b"yesterday", b"nan", b"inf", b"-inf", b"1e999", b""]),
    st.text(max_size=12).filter(lambda t: not _is_finite_float(t)).map(str.encode),
    invalid_utf8,
)
bad_payload = st.one_of(
    invalid_utf8,
    st.text(max_size=40).filter(lambda t: not _is_json(t)).map(str.encode),
    # nested past the depth limit, up to the 100,000 levels
    st.integers(65, 100_000).map(lambda depth: b"[" * depth + b"]" * depth),
)
BAD = {"job": bad_job, "attempt": bad_attempt, "enqueued_at": bad_enqueued_at, "payload": bad_payload}
good_enqueued_at = st.floats(min_value=0, allow_infinity=False).map(lambda f: repr(f).encode())


@st.composite
def entries(draw: st.DrawFn, index: int) -> Entry:
    payload = json.dumps({"i": index}, indent=draw(st.sampled_from([None, 0, 2]))).encode()
    fields = {
        b"job": b"count",
        b"payload": payload,
        b"attempt": str(draw(st.integers(1, 3))).encode(),
        b"enqueued_at": draw(good_enqueued_at),
    }
    kind = draw(st.sampled_from(["good", "malformed", "unknown_job", "invalid_payload", "rejected"]))
    if kind == "malformed":
        for name in draw(st.lists(st.sampled_from(HEADERS), min_size=1, max_size=4, unique=True)):
            value = draw(BAD[name])
            if value is None:
                del fields[name.encode()]
            else:
                fields[name.encode()] = value
    elif kind == "unknown_job":
        fields[b"job"] = ("unknown-" + draw(st.text(max_size=10))).encode()
    elif kind == "invalid_payload":  # JSON, but not an object
        value = draw(st.one_of(st.integers(), st.text(max_size=10), st.lists(st.integers(), max_size=3), st.none()))
        fields[b"payload"] = json.dumps(value).encode()
    elif kind == "rejected":
        fields[b"job"] = b"poison"
    return Entry(fields, "ran" if kind == "good" else kind, index)


@pytest.mark.parametrize("redis_server", ["volatile"], indirect=True)
def test_fuzzed_entries_never_stop_the_worker(redis_server: RedisServer, workers: WorkerPool, stream: str) -> None:
    client = redis_server.client()
    workers.env.update(CLAIM_IDLE="2", CONCURRENCY="8")
    workers.spawn(1)
    indexes = itertools.count()
    expected: dict[str, str] = {}  # stream id -> dead-letter reason, for every entry that must not run
    good: list[int] = []
    started = time.monotonic()

    # No shrinking: examples share one live worker and stream, so a failure is reported
    # as drawn (with its entries) rather than replayed for minutes.
    @settings(
        max_examples=60,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.explicit, Phase.reuse, Phase.generate],
    )
    @given(st.data())
    def batch(data: st.DataObject) -> None:
        drawn = [data.draw(entries(next(indexes))) for _ in range(data.draw(st.integers(1, 20)))]
        with client.pipeline(transaction=False) as pipe:
            for entry in drawn:
                pipe.xadd(stream, entry.fields)  # type: ignore[arg-type]
            ids = pipe.execute()
        for entry, entry_id in zip(drawn, ids, strict=True):
            if entry.outcome == "ran":
                good.append(entry.index)
            else:
                expected[entry_id.decode()] = entry.outcome
        wait_until(
            lambda: all(workers.executions()[i] for i in good) and len(dead_letters(client, stream)) >= len(expected),
            timeout=30,
            pool=workers,
            what="the batch to be run or dead-lettered",
            every=0.05,
        )
        got = {letter["message_id"]: letter["reason"] for letter in dead_letters(client, stream)}
        assert got == expected

    batch()
    wait_until(lambda: pending(client, stream) == 0, timeout=30, pool=workers, what="nothing pending")
    elapsed = time.monotonic() - started
    workers.stop()
    assert_settled(client, stream)
    executions = workers.executions()
    assert executions == Counter({i: 1 for i in good})  # good ones exactly once; nothing else ran
    reasons = Counter(expected.values())
    report(
        "fuzzed entries XADDed while a worker runs",
        jobs=len(good) + len(expected),
        lost=0,
        duplicated=0,
        dead_lettered=len(expected),
        worker_exits=0,
        seconds=round(elapsed, 1),
        good=len(good),
        **{f"dead_{reason}": n for reason, n in sorted(reasons.items())},
    )
    assert reasons["malformed"] > 0 and len(good) > 0  # hypothesis exercised both sides
