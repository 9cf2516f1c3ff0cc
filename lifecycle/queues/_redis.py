"""Redis Streams with a consumer group, on redis-py's asyncio client.

It is shaped by the faults a worker must outlive: a malformed entry, a dropped or
stalled connection, a restart, a consumer that died holding messages. Invariants:

- Several workers share one group: each message goes to one consumer (XREADGROUP).
- A message is XACKed (and XDELed) only when its job and teardown succeeded.
- Every settle (ack, retry, dead letter, release) is one Lua script that first checks
  that the entry is still pending for this consumer (XPENDING), then moves it and acks
  it. So a retry or a dead letter is never lost or duplicated between two steps, a
  settle repeated after a lost answer changes nothing, and a consumer that lost its
  lease cannot settle a message another consumer now runs.
- Every field is decoded here, from bytes: an entry that does not decode comes back as
  a ``Delivery`` whose ``malformed`` says why, never as an exception; its dead letter
  keeps the original bytes (``raw:<field>``).
- Leases: a delivery stays with its consumer while ``renew`` (XCLAIM JUSTID, owner
  checked, which resets the idle time without counting a delivery) runs more often
  than every ``claim_idle`` seconds. Entries idle for longer belong to a dead consumer
  and are reclaimed with XAUTOCLAIM, which counts a delivery: the worker dead-letters
  a message that keeps killing its workers.
- Delayed retries wait in a sorted set; a Lua script moves due ones into the stream.
- Transient failures (connection lost, timeout, restart, stall) raise
  ``BrokerUnavailable`` from every method, and the worker calls again: redis-py
  reconnects on the next command. A blocking read never outlasts the socket timeout
  (its BLOCK is capped), so an idle worker is not mistaken for a stalled one.
- Consumers that have held nothing for ``consumer_timeout`` seconds are removed from
  the group (XGROUP DELCONSUMER, in a script that re-checks that nothing is pending)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import socket
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

import anyio
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry as RedisRetry
from redis.backoff import NoBackoff
from redis.exceptions import (
    AuthenticationError,
    AuthorizationError,
    ClusterDownError,
    InvalidResponse,
    NoPermissionError,
    NoScriptError,
    ReadOnlyError,
    RedisError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .._errors import LifecycleError
from .._log import LOG, redact
from ._base import (
    BrokerUnavailable,
    Delivery,
    MalformedMessage,
    check_enqueue,
    decode_headers,
    decode_payload,
    encode_headers,
    encode_payload,
    job_name,
    record_headers,
    require_asyncio,
)

if TYPE_CHECKING:
    from .._job import Job

# Answers that mean "ask again in a moment" (a replica loading its data set, a failover
# in progress); redis-py maps some to classes and strips the code from the message.
_TRANSIENT_CODES = ("LOADING", "MASTERDOWN", "TRYAGAIN", "CLUSTERDOWN", "READONLY")
_MAX_BLOCK = 1.0  # seconds; an XREADGROUP BLOCK longer than this returns early instead
_MAX_ATTEMPT = re.compile(rb"[1-9][0-9]{0,17}")  # a positive int, at most 18 digits
_STREAM_ID = re.compile(r"[0-9]{1,20}(-[0-9]{1,20})?")

# True when KEYS[1]'s entry ARGV[3] is pending for consumer ARGV[2] of group ARGV[1].
# pcall: a missing group (the key was deleted, a restart without persistence) is "not
# owned", not an error that would fail every settle.
_OWNED = """
local function owned(id)
  local p = redis.pcall('XPENDING', KEYS[1], ARGV[1], id, id, 1)
  return type(p) == 'table' and p.err == nil and p[1] ~= nil and p[1][2] == ARGV[2]
end
"""

# KEYS: stream, target (stream, delayed set or dead stream). ARGV: group, consumer, id,
# mode, score, then the fields to add (or, for 'zadd', the member).
_SETTLE = (
    _OWNED
    + """
if not owned(ARGV[3]) then return false end
local result = 1
if ARGV[4] == 'xadd' then
  result = redis.call('XADD', KEYS[2], '*', unpack(ARGV, 6))
elseif ARGV[4] == 'zadd' then
  redis.call('ZADD', KEYS[2], ARGV[5], ARGV[6])
end
redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
redis.call('XDEL', KEYS[1], ARGV[3])
return result
"""
)

# KEYS: stream. ARGV: group, consumer, ids... Returns the ids this consumer lost.
_RENEW = """
local lost = {}
for i = 3, #ARGV do
  local p = redis.pcall('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if type(p) == 'table' and p.err == nil and p[1] ~= nil and p[1][2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
  else
    table.insert(lost, ARGV[i])
  end
end
return lost
"""

# KEYS: delayed set, stream, the index of cancellable delayed members (uid -> member).
# ARGV: now, limit. A member that does not decode is moved
# as it is, so that it reaches the worker as a malformed message instead of failing
# this script, and so every receive, forever. Returns {moved, score of the next due}.
_PROMOTE = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for _, member in ipairs(due) do
  local ok, m = pcall(cjson.decode, member)
  if ok and type(m) == 'table' and type(m.job) == 'string' and type(m.payload) == 'string' then
    local f = {'job', m.job, 'payload', m.payload, 'attempt', tostring(m.attempt),
               'enqueued_at', tostring(m.enqueued_at)}
    if type(m.headers) == 'string' then
      table.insert(f, 'headers')
      table.insert(f, m.headers)
    end
    redis.call('XADD', KEYS[2], '*', unpack(f))
    if type(m.uid) == 'string' then
      redis.call('HDEL', KEYS[3], m.uid)
    end
  else
    redis.call('XADD', KEYS[2], '*', 'delayed_member', member)
  end
  redis.call('ZREM', KEYS[1], member)
end
local nxt = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return {#due, nxt[2] or false}
"""

# KEYS: dedup key, stream, delayed set, delayed index. ARGV: key ttl ms, due score or
# '' for now, the delayed member, its uid, then the stream fields. One script, so the
# key check, the enqueue and the key are one step for every producer: {created, id}.
_ENQUEUE_ONCE = """
local held = redis.call('GET', KEYS[1])
if held then
  return {0, held}
end
local id
if ARGV[2] ~= '' then
  redis.call('ZADD', KEYS[3], ARGV[2], ARGV[3])
  redis.call('HSET', KEYS[4], ARGV[4], ARGV[3])
  id = 'delayed:' .. ARGV[4]
else
  id = redis.call('XADD', KEYS[2], '*', unpack(ARGV, 5))
end
redis.call('SET', KEYS[1], id, 'PX', ARGV[1])
return {1, id}
"""

# KEYS: stream, delayed set, delayed index. ARGV: group, message id. A delayed message
# is removed from the set if it is still there; a stream entry is deleted if the group
# has not read it yet (its id is after the group's last delivered id). Returns 1 or 0.
_CANCEL = """
local delayed = string.match(ARGV[2], '^delayed:(.+)$')
if delayed then
  local member = redis.call('HGET', KEYS[3], delayed)
  if not member then
    return 0
  end
  redis.call('HDEL', KEYS[3], delayed)
  return redis.call('ZREM', KEYS[2], member)
end
local ms, seq = string.match(ARGV[2], '^(%d+)-(%d+)$')
if not ms then
  return 0
end
local last = nil
for _, group in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  local name, delivered = nil, nil
  for i = 1, #group, 2 do
    if group[i] == 'name' then name = group[i + 1] end
    if group[i] == 'last-delivered-id' then delivered = group[i + 1] end
  end
  if name == ARGV[1] then last = delivered end
end
if last then
  local lms, lseq = string.match(last, '^(%d+)-(%d+)$')
  local after = tonumber(ms) > tonumber(lms) or (tonumber(ms) == tonumber(lms) and tonumber(seq) > tonumber(lseq))
  if not after then
    return 0
  end
end
return redis.call('XDEL', KEYS[1], ARGV[2])
"""

# KEYS: stream. ARGV: group, consumer, min idle ms, cursor, count. Returns
# {cursor, id, fields, times delivered, id, fields, times delivered, ...}.
_RECLAIM = """
local r = redis.call('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4], 'COUNT', ARGV[5])
local out = {r[1]}
for _, e in ipairs(r[2]) do
  if e[2] then
    local p = redis.call('XPENDING', KEYS[1], ARGV[1], e[1], e[1], 1)
    table.insert(out, e[1])
    table.insert(out, e[2])
    table.insert(out, p[1] and p[1][4] or 1)
  else
    redis.call('XACK', KEYS[1], ARGV[1], e[1])  -- Redis 6.2: deleted while pending
  end
end
return out
"""

# KEYS: stream. ARGV: group, idle ms, this consumer. Deletes consumers with nothing
# pending, idle for longer than ARGV[2]; atomic, so one cannot read in between.
_FORGET = """
local removed = {}
for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local info = {}
  for i = 1, #c, 2 do info[c[i]] = c[i + 1] end
  if info['pending'] == 0 and info['idle'] > tonumber(ARGV[2]) and info['name'] ~= ARGV[3] then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], info['name'])
    table.insert(removed, info['name'])
  end
end
return removed
"""

# KEYS: dead stream, stream. ARGV: dead letter id, job, payload, enqueued_at, then the
# headers field and its value when there are headers.
_REPLAY = """
if #redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1]) == 0 then return false end
local id = redis.call('XADD', KEYS[2], '*', 'job', ARGV[2], 'payload', ARGV[3], 'attempt', '1', 'enqueued_at', ARGV[4],
                      unpack(ARGV, 5))
redis.call('XDEL', KEYS[1], ARGV[1])
return id
"""

# KEYS: dead stream. Returns how many entries it held.
_PURGE_ALL = """
local n = redis.call('XLEN', KEYS[1])
redis.call('DEL', KEYS[1])
return n
"""


def _url_secrets(url: str) -> list[str]:
    """The password as it may appear in an error text (raw and percent-decoded)."""
    try:
        password = urlsplit(url).password
    except ValueError:
        return []
    return [secret for secret in {password, unquote(password or "")} if secret and len(secret) > 2]


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else value


def _pairs(flat: Sequence[bytes]) -> dict[bytes, bytes]:
    return dict(zip(flat[::2], flat[1::2], strict=False))


def _message_fields(
    job: str, body: str | bytes, attempt: int, enqueued_at: float | str, headers: str | bytes | None = None
) -> list[Any]:
    """A message as stream fields, flattened (the same shape _PROMOTE writes);
    ``headers`` is their JSON text (``encode_headers``), left out when None."""
    fields = ["job", job, "payload", body, "attempt", str(attempt), "enqueued_at", str(enqueued_at)]
    return fields if headers is None else [*fields, "headers", headers]


def _delayed_member(
    job: str, body: str, attempt: int, enqueued_at: str, headers: str | None = None, **extra: str
) -> tuple[str, str]:
    """A message waiting in the delayed sorted set, and its unique id (so that two equal
    payloads are two members). Numbers travel as strings: cjson would round them."""
    uid = uuid.uuid4().hex
    member = {"job": job, "payload": body, "attempt": str(attempt), "enqueued_at": enqueued_at, "uid": uid, **extra}
    if headers is not None:
        member["headers"] = headers
    return json.dumps(member, ensure_ascii=False), uid


def decode_fields(message_id: str, fields: Mapping[bytes, bytes], deliveries: int) -> Delivery:
    """A stream entry as a ``Delivery``; one that does not decode is returned with
    ``malformed`` set (``"<field>: <why>"``) and ``raw`` holding the fields' bytes.

    Args:
        message_id: the entry's id.
        fields: the entry's fields, as bytes.
        deliveries: the times it was delivered (XPENDING's count; 1 for a fresh read).
    Required: ``job`` (non-empty UTF-8) and ``payload`` (see ``decode_payload``);
    optional: ``attempt`` (a positive integer, default 1), ``enqueued_at`` (finite,
    non-negative epoch seconds, default 0) and ``headers`` (see ``decode_headers``)."""
    raw = dict(fields)

    def bad(why: str) -> Delivery:
        return Delivery(message_id, "", None, 1, deliveries, 0.0, raw=raw, malformed=why)

    job = fields.get(b"job")
    if job is None:
        return bad("job: missing")
    try:
        name = job.decode("utf-8")
    except UnicodeDecodeError as exc:
        return bad(f"job: not valid UTF-8 ({exc.reason} at byte {exc.start})")
    if not name:
        return bad("job: empty")
    attempt_raw = fields.get(b"attempt", b"1")
    if not _MAX_ATTEMPT.fullmatch(attempt_raw):
        return bad(f"attempt: not a positive integer: {attempt_raw[:40]!r}")
    enqueued_raw = fields.get(b"enqueued_at", b"0")
    try:
        enqueued_at = float(enqueued_raw)
    except ValueError:
        return bad(f"enqueued_at: not a number: {enqueued_raw[:40]!r}")
    if not math.isfinite(enqueued_at) or enqueued_at < 0:
        return bad(f"enqueued_at: not a finite time in seconds since the epoch: {enqueued_raw[:40]!r}")
    body = fields.get(b"payload")
    if body is None:
        return bad("payload: missing")
    try:
        payload = decode_payload(body)
    except MalformedMessage as exc:
        return bad(f"payload: {exc}")
    try:
        headers = decode_headers(fields.get(b"headers"))
    except MalformedMessage as exc:
        return bad(f"headers: {exc}")
    return Delivery(message_id, name, payload, int(attempt_raw), deliveries, enqueued_at, raw=raw, headers=headers)


class _PendingSettle:
    """A settle waiting for (or in) a pipelined batch, and what the server said."""

    __slots__ = ("args", "done", "error", "keys", "leads", "result")

    def __init__(self, keys: list[str], args: list[Any]) -> None:
        self.keys = keys
        self.args = args
        self.done = anyio.Event()
        self.leads = False  # set when this caller must send the next batch itself
        self.result: Any = None
        self.error: BaseException | None = None

    def outcome(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.result


class RedisStreamQueue:
    """A queue on a Redis stream shared by a consumer group (see the module docstring).

    Construction does no I/O; ``open()`` (the worker calls it at start-up) connects and
    checks the configuration. Producers may call ``enqueue`` without ``open``.

    Args:
        url: a redis-py URL (``redis://[user:password@]host:port/db``, ``rediss://``,
            ``unix://``). Its password never appears in logs or errors.
        stream: the stream key; ``{stream}:delayed`` and ``{stream}:dead`` go with it.
        group: the consumer group shared by the workers of this queue.
        consumer: this consumer's name in the group; default host-pid-random, unique.
        dead_letter_stream: where dead letters go; default ``{stream}:dead``.
        claim_idle: seconds (> 0) a delivery stays with its consumer without ``renew``
            (this is ``lease``); after that another consumer reclaims it.
        claim_interval: seconds between reclaim passes; default ``claim_idle / 2``.
        consumer_timeout: seconds after which a consumer with nothing pending and no
            activity is removed from the group; default ``max(10 * claim_idle, 60)``.
        max_connections: connections in the pool; callers wait for a free one.
        socket_timeout: seconds (> 0) a command may take before it fails with
            ``BrokerUnavailable``; blocking reads are capped below it.
        connect_timeout: seconds (> 0) to connect before ``BrokerUnavailable``.
        health_check_interval: a connection idle for this many seconds is PINGed before
            use, so a dead one is replaced instead of failing a command; 0 turns it off.
        prefetch: messages (>= 0) read ahead, beyond what the worker asks for, and kept
            here until it asks again: at low concurrency most reads then cost no round
            trip. They are leased to this consumer meanwhile (renewed with the worker's
            own renewals, and before being handed out if they waited a third of
            ``claim_idle``); ``close()`` puts back those never handed out. Default 0
            (off): each consumer holds only what its worker runs, so several consumers
            share a short queue evenly. 8 or so suits a worker at low concurrency
            draining a busy stream.
    """

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
        consumer_timeout: float | None = None,
        max_connections: int = 64,
        socket_timeout: float = 5.0,
        connect_timeout: float = 5.0,
        health_check_interval: float = 10.0,
        prefetch: int = 0,
    ) -> None:
        require_asyncio("RedisStreamQueue", "redis-py's client")
        if not isinstance(prefetch, int) or prefetch < 0:
            raise ValueError(f"RedisStreamQueue prefetch must be an int >= 0, got {prefetch!r}")
        for name, value in (
            ("claim_idle", claim_idle),
            ("socket_timeout", socket_timeout),
            ("connect_timeout", connect_timeout),
        ):
            if not value > 0:
                raise ValueError(f"RedisStreamQueue {name} must be positive, got {value!r}")
        self.url = redact(url)  # the only form kept in the open: it is printed
        self.stream = stream
        self.group = group
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.dead_letter_stream = dead_letter_stream or f"{stream}:dead"
        self.delayed_key = f"{stream}:delayed"
        self.delayed_index_key = f"{stream}:delayed:ids"  # uid -> member, for cancel
        self.claim_idle = claim_idle
        self.lease: float | None = claim_idle
        self.claim_interval = claim_interval if claim_interval is not None else claim_idle / 2
        self.consumer_timeout = consumer_timeout if consumer_timeout is not None else max(10 * claim_idle, 60.0)
        # BLOCK well inside the socket timeout: a read that waits for messages must
        # never look like a stalled server.
        self._block_cap = min(_MAX_BLOCK, socket_timeout / 4)
        self._secrets = _url_secrets(url)
        self._url_error: str | None = None
        self._redis: Redis | None = None
        try:
            # A blocking pool: with many jobs settling at once, wait for a connection
            # instead of failing with "Too many connections". No retries inside
            # redis-py: a failure surfaces at once as BrokerUnavailable, and the worker
            # decides (with backoff) when to call again.
            pool = BlockingConnectionPool.from_url(
                url,
                max_connections=max_connections,
                timeout=None,
                decode_responses=False,
                socket_timeout=socket_timeout,
                socket_connect_timeout=connect_timeout,
                health_check_interval=health_check_interval,
                retry=RedisRetry(NoBackoff(), 0),
            )
            self._redis = Redis(connection_pool=pool)
        except (ValueError, TypeError) as exc:
            self._url_error = self._scrub(f"{type(exc).__name__}: {exc}")
        self._group_ready = False
        self._last_claim = -math.inf
        # When this consumer last saw the broker stall or fail, or went long without
        # reading: for one lease after that, it reclaims nothing (see _receive).
        self._trouble_at = -math.inf
        self._last_read: float | None = None
        self._claim_cursor = "0-0"
        self._held: set[str] = set()  # ids handed out and not settled: not "reclaimed" from ourselves
        self.prefetch = prefetch
        self._buffer: list[Delivery] = []  # read ahead, ours, not handed out yet (also in _held)
        self._buffered_at = 0.0  # when the buffer was last read or renewed (monotonic)
        self._scripts: dict[str, Any] = {}
        self._settles: list[_PendingSettle] = []  # asked for while a batch is on its way
        self._settling = False

    # -- plumbing -----------------------------------------------------------------------
    def _where(self, op: str) -> str:
        return f"RedisStreamQueue {op} (stream {self.stream!r}, group {self.group!r}, url {self.url})"

    def _scrub(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def _client(self) -> Redis:
        require_asyncio("RedisStreamQueue", "redis-py's client")
        if self._redis is None:
            raise LifecycleError(
                f"{self._where('open')}: invalid Redis URL ({self._url_error}); expected "
                f"redis://[user:password@]host:port/db, rediss://... or unix://path"
            )
        return self._redis

    def _script(self, source: str) -> Any:
        script = self._scripts.get(source)
        if script is None:
            # redis-py's Script reloads itself after a NOSCRIPT (a restarted server).
            script = self._scripts[source] = self._client().register_script(source)
        return script

    @contextlib.contextmanager
    def _errors(self, op: str) -> Iterator[None]:
        """Transient failures become BrokerUnavailable; misconfiguration a clear
        LifecycleError. Texts pass through _scrub: no password reaches a message."""
        try:
            yield
        except (AuthenticationError, AuthorizationError) as exc:
            raise LifecycleError(
                f"{self._where(op)}: Redis refused the credentials: {self._scrub(str(exc))}; "
                f"check the user name and password in the URL"
            ) from None
        except NoPermissionError as exc:
            raise LifecycleError(
                f"{self._where(op)}: the Redis user lacks a permission the queue needs: {self._scrub(str(exc))}; "
                f"it needs the stream, set and script commands on keys {self.stream!r}, "
                f"{self.delayed_key!r} and {self.dead_letter_stream!r}"
            ) from None
        except (ClusterDownError, TryAgainError, ReadOnlyError) as exc:
            raise self._unavailable(op, exc) from exc
        except ResponseError as exc:
            text = self._scrub(str(exc))
            if text.startswith(_TRANSIENT_CODES):
                raise self._unavailable(op, exc) from exc
            if text.startswith("WRONGTYPE"):
                raise LifecycleError(
                    f"{self._where(op)}: a key of this queue holds the wrong type ({text}); keys "
                    f"{self.stream!r} and {self.dead_letter_stream!r} must be streams, "
                    f"{self.delayed_key!r} a sorted set"
                ) from None
            raise LifecycleError(f"{self._where(op)}: Redis answered an error: {text}") from None
        except (RedisConnectionError, RedisTimeoutError, InvalidResponse, OSError) as exc:
            # BusyLoadingError is a ConnectionError; InvalidResponse is a garbled answer
            # (a connection cut mid-reply). Anything else (DataError, say) is a bug here.
            raise self._unavailable(op, exc) from exc

    def _unavailable(self, op: str, exc: BaseException) -> BrokerUnavailable:
        self._trouble_at = time.monotonic()
        return BrokerUnavailable(f"{self._where(op)}: Redis unavailable: {type(exc).__name__}: {self._scrub(str(exc))}")

    async def _ensure_group(self, redis: Redis) -> None:
        if self._group_ready:
            return
        try:
            # From id 0, so that messages enqueued before the first worker are not missed.
            await redis.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_ready = True

    # -- set-up -------------------------------------------------------------------------
    async def open(self) -> None:
        """Connect, check the keys' types, create the group (if needed) and load the
        scripts. A bad URL, rejected credentials, a missing permission or a key of the
        wrong type raise ``LifecycleError``; an unreachable server ``BrokerUnavailable``."""
        redis = self._client()
        with self._errors("open"):
            await redis.ping()
            async with redis.pipeline(transaction=False) as pipe:
                for key in (self.stream, self.delayed_key, self.dead_letter_stream):
                    pipe.type(key)
                types = [_text(kind) for kind in await pipe.execute()]
            expected = {self.stream: "stream", self.delayed_key: "zset", self.dead_letter_stream: "stream"}
            for (key, want), kind in zip(expected.items(), types, strict=True):
                if kind not in ("none", want):
                    raise LifecycleError(
                        f"{self._where('open')}: key {key!r} is a {kind}, but the queue needs a {want} there; "
                        f"choose another stream name or delete the key"
                    )
            self._group_ready = False
            await self._ensure_group(redis)
            for source in (_SETTLE, _RENEW, _PROMOTE, _RECLAIM, _FORGET, _REPLAY, _PURGE_ALL, _ENQUEUE_ONCE, _CANCEL):
                await redis.script_load(source)

    # -- producing ----------------------------------------------------------------------
    async def enqueue(
        self,
        job: str | Job[..., Any],
        payload: Mapping[str, Any] | None = None,
        *,
        delay: float | None = None,
        at: float | None = None,
        attempt: int = 1,
        headers: Mapping[str, str] | None = None,
        dedup_key: str | None = None,
        dedup_ttl: float | None = None,
    ) -> str:
        """Add a message; returns its stream id, or ``delayed:<uid>`` for a later one.

        Args:
            job: the job's name, or a ``Job`` (then the payload is validated first:
                ``PayloadError``).
            payload: the job's arguments, a JSON-serialisable mapping (``TypeError``
                or ``ValueError`` otherwise, here rather than at the worker).
            delay: seconds from now; None or <= 0 means now. Not with ``at``.
            at: when to run it, in seconds since the epoch (a past time means now).
            attempt: the attempt number the message carries (>= 1).
            headers: string metadata handed back as ``Delivery.headers``.
            dedup_key: while a message enqueued with this key is remembered, add
                nothing and return its id: one Lua script checks the key, adds the
                entry (or the delayed member) and sets the key, so racing producers
                make one message.
            dedup_ttl: seconds the key is remembered (default ``DEDUP_TTL``, a day).
        """
        ttl = check_enqueue(job, delay, at, attempt, dedup_key, dedup_ttl)
        name, args = job_name(job, payload)
        body = encode_payload(args)
        header_text = encode_headers(name, headers)
        now = time.time()
        due = now + delay if delay is not None else at
        redis = self._client()
        later = due is not None and due > now
        with self._errors(f"enqueue of job {name!r}"):
            if ttl is not None and dedup_key is not None:
                member, uid = _delayed_member(name, body, attempt, repr(now), header_text)
                fields = _message_fields(name, body, attempt, repr(now), header_text)
                _created, message_id = await self._script(_ENQUEUE_ONCE)(
                    keys=[f"{self.stream}:dedup:{dedup_key}", self.stream, self.delayed_key, self.delayed_index_key],
                    args=[max(1, math.ceil(ttl * 1000)), repr(due) if later else "", member, uid, *fields],
                )
                return _text(message_id)
            if later and due is not None:
                member, uid = _delayed_member(name, body, attempt, repr(now), header_text)
                async with redis.pipeline(transaction=True) as pipe:  # cancellable: indexed by uid
                    pipe.zadd(self.delayed_key, {member: due})
                    pipe.hset(self.delayed_index_key, uid, member)
                    await pipe.execute()
                return f"delayed:{uid}"
            fields = _message_fields(name, body, attempt, repr(now), header_text)
            return _text(await redis.xadd(self.stream, _pairs(fields)))  # type: ignore[arg-type]

    async def cancel(self, message_id: str) -> bool:
        """See ``Queue.cancel``: a delayed message (``delayed:<uid>``) still waiting, or
        a stream entry the group has not read yet; one Lua script either way."""
        with self._errors(f"cancel of message {message_id!r}"):
            removed = await self._script(_CANCEL)(
                keys=[self.stream, self.delayed_key, self.delayed_index_key], args=[self.group, message_id]
            )
        return bool(removed)

    # -- consuming ----------------------------------------------------------------------
    async def receive(self, limit: int, timeout: float) -> list[Delivery]:
        """Up to ``limit`` messages: due delayed ones are moved in first, then entries
        of dead consumers are reclaimed (every ``claim_interval``), then new ones are
        read, waiting at most ``timeout`` seconds, and at most about a second: an empty
        answer before ``timeout`` is normal, call again."""
        redis = self._client()
        if limit < 1:
            return []
        with self._errors("receive"):
            try:
                return await self._receive(redis, limit, timeout)
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                # The stream was deleted, or a restart without persistence lost it:
                # create the group again on the next call.
                self._group_ready = False
                self._drop_buffer()
                return []

    async def _receive(self, redis: Redis, limit: int, timeout: float) -> list[Delivery]:
        if self._buffer:
            return await self._take(limit)
        await self._ensure_group(redis)
        now = time.monotonic()
        if self._last_read is not None and now - self._last_read > self.claim_idle / 2:
            self._trouble_at = now  # a long pause since the last read: a stall, or a busy worker
        # After a stall of the server (CLIENT PAUSE, DEBUG SLEEP, a failover) every
        # consumer's renewals were held up too, so leases look expired that are not:
        # reclaim only once the others have had a whole lease to renew theirs.
        if now - self._last_claim >= self.claim_interval and now - self._trouble_at >= self.claim_idle:
            claimed = await self._reclaim(limit)
            await self._forget_consumers()
            self._last_claim = now  # only once the pass succeeded
            if claimed:
                self._last_read = time.monotonic()
                return claimed
        # One round trip while messages are waiting: due delayed messages are moved in
        # and new ones read in the same pipeline (the read sees what the move added).
        # Only an empty answer pays for a second, blocking, read.
        promoted, response = await self._promote_and_read(redis, limit + self.prefetch)
        if not response:
            wait = min(max(timeout, 0.0), self._block_cap)
            if promoted[1] is not None:  # a delayed message falls due sooner
                wait = min(wait, max(float(promoted[1]) - time.time(), 0.0))
            block = int(wait * 1000)
            if block > 0:
                started = time.monotonic()
                response = await redis.xreadgroup(
                    self.group, self.consumer, {self.stream: ">"}, count=limit + self.prefetch, block=block
                )
                if time.monotonic() - started > wait + self.claim_idle / 2:
                    self._trouble_at = time.monotonic()  # the server stalled during this read
        self._last_read = time.monotonic()
        deliveries = []
        for _stream, entries in response or ():
            for message_id, fields in entries:
                deliveries.append(decode_fields(_text(message_id), fields or {}, 1))
        self._held.update(delivery.id for delivery in deliveries)
        self._buffer.extend(deliveries[limit:])
        self._buffered_at = self._last_read
        return deliveries[:limit]

    async def _take(self, limit: int) -> list[Delivery]:
        """Hand out up to ``limit`` read-ahead messages. Ones that waited long enough
        to risk their lease are renewed first; any this consumer lost are dropped (the
        consumer that took them over runs them)."""
        if time.monotonic() - self._buffered_at > self.claim_idle / 3:
            await self._renew_buffer()
        taken, self._buffer = self._buffer[:limit], self._buffer[limit:]
        return taken

    async def _renew_buffer(self) -> None:
        ids = [delivery.id for delivery in self._buffer]
        lost: Any = await self._script(_RENEW)(keys=[self.stream], args=[self.group, self.consumer, *ids])
        self._forget_lost({_text(message_id) for message_id in lost})
        self._buffered_at = time.monotonic()

    def _forget_lost(self, lost: set[str]) -> None:
        if lost:
            self._buffer = [delivery for delivery in self._buffer if delivery.id not in lost]
            self._held.difference_update(lost)

    def _drop_buffer(self) -> None:
        self._held.difference_update(delivery.id for delivery in self._buffer)
        self._buffer = []

    async def _promote_and_read(self, redis: Redis, limit: int) -> tuple[Any, Any]:
        """_PROMOTE and a non-blocking XREADGROUP, pipelined: one round trip. EVALSHA
        directly (redis-py's pipelined Script would ask SCRIPT EXISTS first, a round
        trip more); a server that lost its scripts (a restart) gets them again here."""
        promote = self._script(_PROMOTE)
        async with redis.pipeline(transaction=False) as pipe:
            keys = (self.delayed_key, self.stream, self.delayed_index_key)
            pipe.evalsha(promote.sha, len(keys), *keys, repr(time.time()), 100)
            pipe.xreadgroup(self.group, self.consumer, {self.stream: ">"}, count=limit)
            promoted, response = await pipe.execute(raise_on_error=False)
        if isinstance(response, Exception):
            raise response
        if isinstance(promoted, NoScriptError):
            # The read still ran, and what it read is ours now: keep it, and move the
            # delayed messages on the next call.
            await redis.script_load(_PROMOTE)
            promoted = [0, None]
        elif isinstance(promoted, Exception):
            raise promoted
        return promoted, response

    async def _reclaim(self, limit: int) -> list[Delivery]:
        """Take over messages left pending for longer than claim_idle (their consumer
        died). Our own held ones come back too (an outage outlasted their lease); they
        are still running here, so they are not handed out a second time."""
        args = [self.group, self.consumer, int(self.claim_idle * 1000), self._claim_cursor, limit]
        out: Any = await self._script(_RECLAIM)(keys=[self.stream], args=args)
        self._claim_cursor = _text(out[0])
        deliveries = []
        for index in range(1, len(out), 3):
            message_id = _text(out[index])
            if message_id in self._held:
                continue
            deliveries.append(decode_fields(message_id, _pairs(out[index + 1]), int(out[index + 2])))
        if deliveries:
            self._held.update(delivery.id for delivery in deliveries)
            LOG.info("queue.reclaimed", stream=self.stream, consumer=self.consumer, ids=[d.id for d in deliveries])
        return deliveries

    async def _forget_consumers(self) -> None:
        args = [self.group, int(self.consumer_timeout * 1000), self.consumer]
        removed: Any = await self._script(_FORGET)(keys=[self.stream], args=args)
        if removed:
            LOG.info("queue.consumers_removed", stream=self.stream, consumers=[_text(name) for name in removed])

    # -- settling -----------------------------------------------------------------------
    async def _settle(self, op: str, delivery: Delivery, target: str, mode: str, *extra: Any) -> bool:
        """Run _SETTLE; False when the delivery was no longer ours (settled already, or
        taken over by another consumer): then nothing changed."""
        args = [self.group, self.consumer, delivery.id, mode, *extra]
        with self._errors(f"{op} of message {delivery.id} (job {delivery.job!r})"):
            result = await self._coalesced_settle([self.stream, target], args)
        self._held.discard(delivery.id)
        if result is None:
            LOG.debug("queue.settle_skipped", op=op, job=delivery.job, job_id=delivery.id, consumer=self.consumer)
        return result is not None

    async def _coalesced_settle(self, keys: list[str], args: list[Any]) -> Any:
        """One _SETTLE, sent with every other settle asked for while a batch is on its
        way: many jobs finishing at once cost one pipelined round trip instead of one
        each (and one connection instead of many). Each settle is still its own atomic,
        owner-checked script, sent only when its job asked for it (after teardown), so
        batching changes no outcome; it only waits for the batch before it, if any.

        Shielded: a settle whose job was cancelled while it waits is sent all the same
        (it is idempotent), and the wait is bounded by the socket timeout."""
        pending = _PendingSettle(keys, args)
        self._settles.append(pending)
        with anyio.CancelScope(shield=True):
            if self._settling:
                await pending.done.wait()
                if not pending.leads:
                    return pending.outcome()
            # This caller sends every settle queued so far, then hands the batch queued
            # meanwhile to the first of its callers, and returns its own answer.
            self._settling = True
            try:
                batch, self._settles = self._settles, []
                await self._send_settles(batch)
            finally:
                if self._settles:
                    self._settles[0].leads = True
                    self._settles[0].done.set()
                else:
                    self._settling = False
        return pending.outcome()

    async def _send_settles(self, batch: list[_PendingSettle]) -> None:
        redis = self._client()
        script = self._script(_SETTLE)
        try:
            if len(batch) == 1:
                batch[0].result = await script(keys=batch[0].keys, args=batch[0].args)
            else:
                async with redis.pipeline(transaction=False) as pipe:
                    for item in batch:
                        pipe.evalsha(script.sha, len(item.keys), *item.keys, *item.args)
                    results = await pipe.execute(raise_on_error=False)
                for item, result in zip(batch, results, strict=True):
                    if isinstance(result, NoScriptError):  # a restarted server: reload, resend
                        result = await script(keys=item.keys, args=item.args)
                    if isinstance(result, Exception):
                        item.error = result
                    else:
                        item.result = result
        except Exception as exc:  # the connection failed: every settle in it fails
            for item in batch:
                item.error = exc
        finally:
            for item in batch:
                item.done.set()

    def _body(self, delivery: Delivery) -> str:
        """The payload as it arrived (no float or int drift), else re-encoded."""
        raw = delivery.raw.get(b"payload") if isinstance(delivery.raw, Mapping) else None
        return raw.decode("utf-8") if isinstance(raw, bytes) else encode_payload(delivery.payload)

    async def ack(self, delivery: Delivery) -> bool:
        """Done: XACK and XDEL, if the delivery is still this consumer's (else False)."""
        return await self._settle("ack", delivery, self.stream, "ack", "")

    async def retry(self, delivery: Delivery, delay: float, error: str) -> bool:
        """Re-enqueue as attempt + 1 after ``delay`` seconds (through the delayed set
        when > 0) and ack this delivery, atomically; ``error`` is kept as
        ``last_error`` (first 500 characters)."""
        if delivery.malformed is not None:
            raise ValueError(
                f"retry of message {delivery.id}: a malformed message ({delivery.malformed}) cannot be "
                f"retried; dead-letter it"
            )
        body, attempt, enqueued_at = self._body(delivery), delivery.attempt + 1, repr(delivery.enqueued_at)
        headers = encode_headers(delivery.job, delivery.headers)
        if delay > 0:
            member, _ = _delayed_member(delivery.job, body, attempt, enqueued_at, headers, last_error=error[:500])
            return await self._settle("retry", delivery, self.delayed_key, "zadd", repr(time.time() + delay), member)
        fields = [*_message_fields(delivery.job, body, attempt, enqueued_at, headers), "last_error", error[:500]]
        return await self._settle("retry", delivery, self.stream, "xadd", "", *fields)

    async def dead_letter(self, delivery: Delivery, record: Mapping[str, Any]) -> bool:
        """Add ``record`` to the dead stream (every value as JSON) and ack this
        delivery, atomically. A malformed delivery's original fields are kept too, as
        ``raw:<field>`` holding their exact bytes."""
        fields: list[Any] = []
        for key, value in record.items():
            fields += [key, json.dumps(value, default=repr)]
        if delivery.malformed is not None and isinstance(delivery.raw, Mapping):
            for name, value in delivery.raw.items():
                fields += [b"raw:" + name, value]
        return await self._settle("dead_letter", delivery, self.dead_letter_stream, "xadd", "", *fields)

    async def release(self, delivery: Delivery) -> bool:
        """Put it back now, unchanged (same attempt and enqueued_at), as a new entry,
        and ack this one, atomically: redelivered at once, no delivery counted."""
        if isinstance(delivery.raw, Mapping) and delivery.raw:
            fields: list[Any] = [item for pair in delivery.raw.items() for item in pair]
        else:
            body = encode_payload(delivery.payload)
            headers = encode_headers(delivery.job, delivery.headers)
            fields = _message_fields(delivery.job, body, delivery.attempt, repr(delivery.enqueued_at), headers)
        return await self._settle("release", delivery, self.stream, "xadd", "", *fields)

    async def renew(self, deliveries: Sequence[Delivery]) -> list[str]:
        """Reset the idle time of those deliveries this consumer still owns (XCLAIM
        JUSTID: no delivery counted); returns the ids of the others (lost). Read-ahead
        messages not handed out yet are renewed in the same call."""
        if not deliveries:
            return []
        ids = [delivery.id for delivery in deliveries]
        ahead = [delivery.id for delivery in self._buffer]
        with self._errors(f"renew of {len(ids)} message(s)"):
            lost: Any = await self._script(_RENEW)(keys=[self.stream], args=[self.group, self.consumer, *ids, *ahead])
        lost_ids = {_text(message_id) for message_id in lost}
        if ahead:
            self._buffered_at = time.monotonic()
            self._forget_lost(lost_ids.intersection(ahead))
        self._held.difference_update(lost_ids)
        return [message_id for message_id in ids if message_id in lost_ids]

    # -- dead letters -------------------------------------------------------------------
    async def dead_letters(self, count: int = 100, before: str | None = None) -> list[dict[str, Any]]:
        """Dead letters, newest first: at most ``count``, older than the dead letter
        ``before`` (exclusive) when given. Values are JSON-decoded; ``raw:<field>``
        values (a malformed message's original fields) are bytes. Each record has its
        ``dead_letter_id`` (for ``before``, ``replay`` and ``purge``)."""
        if before is not None and not _STREAM_ID.fullmatch(before):
            raise ValueError(f"dead_letters: before must be a dead_letter_id like '1700000000000-0', got {before!r}")
        if count < 1:
            return []
        redis = self._client()
        with self._errors("dead_letters"):
            entries: Any = await redis.xrevrange(
                self.dead_letter_stream, max="+" if before is None else f"({before}", min="-", count=count
            )
        return [self._dead_record(_text(message_id), fields) for message_id, fields in entries]

    @staticmethod
    def _dead_record(message_id: str, fields: Mapping[bytes, bytes]) -> dict[str, Any]:
        record: dict[str, Any] = {"dead_letter_id": message_id}
        for name, value in fields.items():
            key = _text(name)
            if name.startswith(b"raw:"):
                record[key] = value
                continue
            try:
                record[key] = json.loads(value)
            except ValueError:  # not written by dead_letter (or not UTF-8): as it is
                try:
                    record[key] = value.decode("utf-8")
                except UnicodeDecodeError:
                    record[key] = value
        return record

    async def replay(self, ids: Sequence[str]) -> int:
        """Put these dead letters back on the stream as new messages (attempt 1, same
        job and payload) and delete them from the dead stream, atomically per id.
        Missing ids and malformed dead letters (no job or payload) are skipped; returns
        how many were replayed."""
        redis = self._client()
        replayed = 0
        for dead_id in ids:
            if not _STREAM_ID.fullmatch(dead_id):
                raise ValueError(f"replay: {dead_id!r} is not a dead_letter_id like '1700000000000-0'")
            with self._errors(f"replay of dead letter {dead_id}"):
                entries: Any = await redis.xrange(self.dead_letter_stream, min=dead_id, max=dead_id, count=1)
                if not entries:
                    continue
                record = self._dead_record(dead_id, entries[0][1])
                job, payload = record.get("job"), record.get("payload")
                if not isinstance(job, str) or not job or not isinstance(payload, dict):
                    continue  # malformed: nothing to run; its raw fields stay for a human
                args = [dead_id, job, encode_payload(payload), repr(time.time())]
                headers = encode_headers(job, record_headers(record))
                if headers is not None:
                    args += ["headers", headers]
                new_id = await self._script(_REPLAY)(keys=[self.dead_letter_stream, self.stream], args=args)
            replayed += new_id is not None
        return replayed

    async def purge(self, ids: Sequence[str] | None = None) -> int:
        """Delete these dead letters, or all of them (``ids=None``); returns how many."""
        redis = self._client()
        with self._errors("purge"):
            if ids is None:
                return int(await self._script(_PURGE_ALL)(keys=[self.dead_letter_stream], args=[]))
            if not ids:
                return 0
            return int(await redis.xdel(self.dead_letter_stream, *ids))

    async def close(self) -> None:
        """Put back the read-ahead messages never handed out (as ``release`` does: no
        delivery counted), then close the connections (idempotent; a dead server is
        not an error here: those messages then return after ``claim_idle``)."""
        buffered, self._buffer = self._buffer, []
        for delivery in buffered:
            with contextlib.suppress(BrokerUnavailable, LifecycleError):
                await self.release(delivery)
        if self._redis is not None:
            with contextlib.suppress(RedisError, OSError):
                await self._redis.aclose()
                await self._redis.connection_pool.disconnect()
