"""Redis Streams with a consumer group, on redis-py's asyncio client.

- Several workers share one group: each message goes to one consumer (XREADGROUP).
- A message is XACKed (and XDELed) only when its job and teardown succeeded.
- A retry or a dead-letter moves the message in one MULTI transaction with its XACK,
  so nothing is lost or duplicated between the two steps.
- Delayed retries wait in a sorted set; a Lua script moves due ones into the stream.
- Pending entries of a dead consumer are reclaimed with XAUTOCLAIM once idle for
  ``claim_idle`` seconds; live workers heartbeat theirs (XCLAIM JUSTID) so that long
  jobs are not stolen. The delivery count (XPENDING) lets the worker dead-letter a
  message that keeps killing its workers."""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import sniffio
from redis.asyncio import BlockingConnectionPool, Redis
from redis.exceptions import ResponseError

from .._errors import LifecycleError
from ._base import Delivery

_PROMOTE = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for _, member in ipairs(due) do
  local m = cjson.decode(member)
  redis.call('XADD', KEYS[2], '*', 'job', m.job, 'payload', m.payload,
             'attempt', tostring(m.attempt), 'enqueued_at', tostring(m.enqueued_at))
  redis.call('ZREM', KEYS[1], member)
end
return #due
"""


def _stream_fields(job: str, body: str, attempt: int, enqueued_at: float) -> dict[str, str]:
    """A message as stream fields (the same shape _PROMOTE writes)."""
    return {"job": job, "payload": body, "attempt": str(attempt), "enqueued_at": repr(enqueued_at)}


def _delayed_member(job: str, body: str, attempt: int, enqueued_at: float, **extra: str) -> tuple[str, str]:
    """A message waiting in the delayed sorted set, and its unique id (so that two equal
    payloads are two members)."""
    uid = uuid.uuid4().hex
    member = {"job": job, "payload": body, "attempt": attempt, "enqueued_at": enqueued_at, "uid": uid, **extra}
    return json.dumps(member), uid


def _require_asyncio() -> None:
    try:
        library = sniffio.current_async_library()
    except sniffio.AsyncLibraryNotFoundError:
        return  # constructed outside any event loop: checked again on first use
    if library != "asyncio":
        raise LifecycleError(
            f"RedisStreamQueue needs the asyncio backend (redis-py's client is asyncio-only), "
            f"but it is running under {library}; use backend='asyncio' (CLI: --backend asyncio)"
        )


class RedisStreamQueue:
    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        stream: str = "jobs",
        group: str = "workers",
        consumer: str | None = None,
        dead_letter_stream: str | None = None,
        claim_idle: float = 60.0,
        claim_interval: float | None = None,
        max_connections: int = 64,
    ) -> None:
        _require_asyncio()
        if claim_idle <= 0:
            raise ValueError(f"claim_idle must be positive, got {claim_idle!r}")
        self.url = url
        self.stream = stream
        self.group = group
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.dead_letter_stream = dead_letter_stream or f"{stream}:dead"
        self.delayed_key = f"{stream}:delayed"
        self.claim_idle = claim_idle
        self.claim_interval = claim_interval if claim_interval is not None else claim_idle / 2
        # A blocking pool: with many jobs settling at once, wait for a connection
        # instead of failing with "Too many connections".
        pool = BlockingConnectionPool.from_url(
            url, max_connections=max_connections, timeout=None, decode_responses=True
        )
        self.redis: Redis = Redis(connection_pool=pool)
        self._promote = self.redis.register_script(_PROMOTE)
        self._group_ready = False
        self._last_claim = 0.0
        self._claim_cursor = "0-0"

    async def _ready(self) -> None:
        _require_asyncio()
        if self._group_ready:
            return
        try:
            # From id 0, so that messages enqueued before the first worker are not missed.
            await self.redis.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_ready = True

    # -- producing ----------------------------------------------------------------------
    async def enqueue(
        self, job: str, payload: Mapping[str, Any] | None = None, *, delay: float | None = None, attempt: int = 1
    ) -> str:
        _require_asyncio()
        body = json.dumps(dict(payload or {}))
        if delay:
            member, uid = _delayed_member(job, body, attempt, time.time())
            await self.redis.zadd(self.delayed_key, {member: time.time() + delay})
            return f"delayed:{uid}"
        return str(await self.redis.xadd(self.stream, _stream_fields(job, body, attempt, time.time())))  # type: ignore[arg-type]

    # -- consuming ----------------------------------------------------------------------
    async def receive(self, limit: int, timeout: float) -> list[Delivery]:
        await self._ready()
        await self._promote(keys=[self.delayed_key, self.stream], args=[repr(time.time()), 100])
        now = time.monotonic()
        if now - self._last_claim >= self.claim_interval:
            self._last_claim = now
            claimed = await self._claim(limit)
            if claimed:
                return claimed
        response: Any = await self.redis.xreadgroup(
            self.group, self.consumer, {self.stream: ">"}, count=limit, block=max(1, int(timeout * 1000))
        )
        deliveries = []
        for _stream, entries in response or ():
            for message_id, fields in entries:
                deliveries.append(self._delivery(message_id, fields, 1))
        return deliveries

    async def _claim(self, limit: int) -> list[Delivery]:
        """Take over messages another consumer left pending for longer than claim_idle."""
        claimed: Any = await self.redis.xautoclaim(
            self.stream,
            self.group,
            self.consumer,
            min_idle_time=int(self.claim_idle * 1000),
            start_id=self._claim_cursor,
            count=limit,
        )
        cursor, entries = claimed[0], claimed[1]
        self._claim_cursor = cursor
        deliveries = []
        for message_id, fields in entries:
            if fields is None:  # deleted while pending
                await self.redis.xack(self.stream, self.group, message_id)
                continue
            info = await self.redis.xpending_range(self.stream, self.group, min=message_id, max=message_id, count=1)
            count = int(info[0]["times_delivered"]) if info else 1
            deliveries.append(self._delivery(message_id, fields, count))
        return deliveries

    def _delivery(self, message_id: str, fields: Mapping[str, str], deliveries: int) -> Delivery:
        raw_payload = fields.get("payload", "{}")
        try:
            payload: Any = json.loads(raw_payload)
        except ValueError:
            payload = raw_payload  # not JSON: the worker dead-letters it as an invalid payload
        return Delivery(
            id=message_id,
            job=fields.get("job", ""),
            payload=payload,
            attempt=int(fields.get("attempt", "1") or 1),
            deliveries=deliveries,
            enqueued_at=float(fields.get("enqueued_at", "0") or 0),
            raw=fields,
        )

    # -- settling -----------------------------------------------------------------------
    async def ack(self, delivery: Delivery) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            self._settle(pipe, delivery)
            await pipe.execute()

    async def retry(self, delivery: Delivery, delay: float, error: str) -> None:
        body = json.dumps(delivery.payload)
        attempt = delivery.attempt + 1
        async with self.redis.pipeline(transaction=True) as pipe:
            if delay > 0:
                member, _ = _delayed_member(delivery.job, body, attempt, delivery.enqueued_at, last_error=error[:500])
                pipe.zadd(self.delayed_key, {member: time.time() + delay})
            else:
                pipe.xadd(self.stream, _stream_fields(delivery.job, body, attempt, delivery.enqueued_at))  # type: ignore[arg-type]
            self._settle(pipe, delivery)
            await pipe.execute()

    async def dead_letter(self, delivery: Delivery, record: Mapping[str, Any]) -> None:
        fields = {key: value if isinstance(value, str) else json.dumps(value) for key, value in record.items()}
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xadd(self.dead_letter_stream, fields)  # type: ignore[arg-type]
            self._settle(pipe, delivery)
            await pipe.execute()

    def _settle(self, pipe: Any, delivery: Delivery) -> None:
        """Done with this delivery: acknowledge it and drop it from the stream."""
        pipe.xack(self.stream, self.group, delivery.id)
        pipe.xdel(self.stream, delivery.id)

    async def release(self, delivery: Delivery) -> None:
        """Leave it pending: another consumer reclaims it after ``claim_idle``."""
        return None

    async def heartbeat(self, deliveries: Sequence[Delivery]) -> None:
        if deliveries:
            await self.redis.xclaim(self.stream, self.group, self.consumer, 0, [d.id for d in deliveries], justid=True)

    # -- inspection ---------------------------------------------------------------------
    async def dead_letters(self, count: int = 100) -> list[dict[str, Any]]:
        """The most recent dead letters, oldest first, values decoded."""
        entries: Any = await self.redis.xrange(self.dead_letter_stream, count=count)
        decoded = []
        for message_id, fields in entries:
            record: dict[str, Any] = {"dead_letter_id": message_id}
            for key, value in fields.items():
                try:
                    record[key] = json.loads(value)
                except ValueError:
                    record[key] = value
            decoded.append(record)
        return decoded

    async def close(self) -> None:
        await self.redis.aclose()
