"""A queue in PostgreSQL tables, on asyncpg (asyncio only): durable, shared by any number
of worker processes on any number of machines, and the one backend whose ack can commit
together with the job's own writes (``PostgresQueue.transaction``).

Invariants:

- One row per message in ``{table}``. It is ready when ``owner`` is NULL and ``run_at``
  has come, and leased while ``owner`` (a consumer) and ``token`` (which of that
  consumer's claims) are set, until ``lease_until``. Times are epoch seconds from the
  server's clock (``clock_timestamp()``), so the workers' clocks do not matter.
- A claim is one statement: ``UPDATE … WHERE id IN (SELECT … FOR UPDATE SKIP LOCKED
  LIMIT n) RETURNING``, over expired leases first (another consumer died: a delivery
  counted) and then ready rows, oldest first. Concurrent consumers skip each other's
  rows instead of waiting for them; ``renew`` moves ``lease_until`` only.
- Every settle is one transaction that first checks ``owner`` and ``token``: a repeated
  or stale settle (the lease went to another consumer) changes nothing and returns
  False. A retry or a release gives the row a new id (from the table's sequence), so one
  id never names two deliveries a worker could mix up.
- ``enqueue``, a retry due now, a release and a replay NOTIFY the channel named after
  the table; an idle ``receive`` LISTENs on a connection of its own and wakes at once.
  Polling every ``poll_interval`` is the fallback (a lost listener, a delayed message
  falling due, a lease expiring), so no wake-up is needed for correctness.
- Every column is decoded here: a row that does not decode (an empty job name, a
  payload that is not UTF-8 JSON, a non-positive attempt) comes back as a ``Delivery``
  whose ``malformed`` says why, never as an exception; its dead letter keeps the stored
  values (``raw:<column>``, the payload as bytes).
- A lost connection, a server restart or shutdown, a terminated backend, too many
  connections or a timeout is ``BrokerUnavailable`` (the pool replaces the connection
  on the next call); bad credentials, a missing database, a missing permission or a
  table of that name made by something else is a ``LifecycleError`` from ``open()``.
- Settles and the transaction hand-over run shielded from cancellation (bounded by
  ``command_timeout``), so a committed claim or settle is never lost to a cancellation.

``transaction`` (a job-scoped dependency) hands the job a connection inside an open
transaction. If the job body and every teardown succeed, the transaction stays open
until the worker's ``ack``, which deletes the message (owner-checked) in that same
transaction and commits: the job's writes and its ack commit together or not at all.
Any other settle (retry, dead letter, release), a lost lease or a job that failed rolls
them back."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import math
import os
import re
import socket
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import anyio

from .._context import JobContext
from .._errors import CommitFailed, LifecycleError
from .._log import LOG, redact
from ._base import (
    RAW_COLUMNS,
    BrokerUnavailable,
    Delivery,
    MalformedMessage,
    check_enqueue,
    dead_record_from_row,
    decode_headers,
    decode_payload,
    encode_headers,
    encode_payload,
    import_client,
    job_name,
    record_headers,
    require_asyncio,
)
from ._url import _options

if TYPE_CHECKING:
    import asyncpg  # type: ignore[import-untyped]  # asyncpg ships no type information

    from .._job import Job

_MAX_ATTEMPT = 10**18
_TABLE = re.compile(r"[a-z_][a-z0-9_]{0,47}")  # room for the "_dead_id_seq" style suffixes (63 max)
# SQLSTATE classes that mean "try again later": connection exception, insufficient
# resources, operator intervention (pg_terminate_backend, shutdown), system error, and
# transaction rollback (a deadlock or serialization failure of a queue statement).
_TRANSIENT_CLASSES = ("08", "53", "57", "58", "40")
_NOW = "extract(epoch from clock_timestamp())::float8"
_COLUMNS = {
    "id", "job", "payload", "attempt", "deliveries", "enqueued_at", "run_at", "owner", "token", "lease_until",
    "last_error",
}  # fmt: skip


def _schema(table: str) -> list[str]:
    q = f'"{table}"'
    return [
        f'CREATE SEQUENCE IF NOT EXISTS "{table}_seq"',
        f"CREATE TABLE IF NOT EXISTS {q} ("
        f"id bigint PRIMARY KEY DEFAULT nextval('\"{table}_seq\"'), "
        "job text NOT NULL, payload bytea NOT NULL, attempt bigint NOT NULL DEFAULT 1, "
        "deliveries integer NOT NULL DEFAULT 0, enqueued_at float8 NOT NULL, run_at float8 NOT NULL, "
        "owner text, token bigint, lease_until float8, last_error text, headers text)",
        f"ALTER TABLE {q} ADD COLUMN IF NOT EXISTS headers text",  # a table made before headers existed
        f'CREATE INDEX IF NOT EXISTS "{table}_ready" ON {q} (run_at, id) WHERE owner IS NULL',
        f'CREATE INDEX IF NOT EXISTS "{table}_leased" ON {q} (lease_until) WHERE owner IS NOT NULL',
        f'CREATE TABLE IF NOT EXISTS "{table}_dead" (id bigserial PRIMARY KEY, record text NOT NULL, '
        "raw_job text, raw_payload bytea, raw_attempt bigint, raw_enqueued_at float8, failed_at float8 NOT NULL)",
    ]


@dataclass(slots=True)
class _Tx:
    """A job's transaction from ``PostgresQueue.transaction``: ``running`` while the job
    has it, ``pending`` once the job and the dependency's teardown succeeded (the ack
    commits it), ``doomed`` when the lease was lost meanwhile (rolled back at teardown)."""

    conn: Any
    transaction: Any
    state: str = "running"


@dataclass(slots=True)
class _Claim:
    """What this queue object knows of a delivery it handed out and has not settled."""

    token: int
    tx: _Tx | None = None
    commit_failed: str | None = None  # why a transactional ack did not commit (CommitFailed raised)


@dataclass(frozen=True, slots=True)
class _Handle:
    """``Delivery.raw`` of a PostgresQueue delivery: the claim token (every settle's owner
    check) and the row's columns as stored (kept in the dead letter of a malformed row)."""

    token: int
    columns: dict[str, Any] = field(default_factory=dict)


def decode_row(row: Sequence[Any], token: int) -> Delivery:
    """A claimed row (``id, job, payload, attempt, deliveries, enqueued_at, headers``) as a
    ``Delivery``; one that does not decode is returned with ``malformed`` set
    (``"<column>: <why>"``) and its columns kept in ``raw``.

    Args:
        row: the values as asyncpg returned them (the payload as bytes).
        token: the claim token that handed the row out.
    """
    message_id, job, payload, attempt, deliveries, enqueued_at, headers = row
    handle = _Handle(token, dict(zip(RAW_COLUMNS, (job, payload, attempt, enqueued_at), strict=True)))
    count = deliveries if isinstance(deliveries, int) and deliveries >= 1 else 1

    def bad(why: str) -> Delivery:
        return Delivery(str(message_id), "", None, 1, count, 0.0, raw=handle, malformed=why)

    if not isinstance(job, str) or not job:
        return bad(f"job: empty or not text: {job!r:.40}")
    if not isinstance(attempt, int) or not 1 <= attempt <= _MAX_ATTEMPT:
        return bad(f"attempt: not a positive integer: {attempt!r:.40}")
    if not isinstance(enqueued_at, float) or not math.isfinite(enqueued_at) or enqueued_at < 0:
        return bad(f"enqueued_at: not a finite time in seconds since the epoch: {enqueued_at!r:.40}")
    try:
        body = decode_payload(bytes(payload))
    except MalformedMessage as exc:
        return bad(f"payload: {exc}")
    try:
        decoded_headers = decode_headers(headers)
    except MalformedMessage as exc:
        return bad(f"headers: {exc}")
    return Delivery(str(message_id), job, body, attempt, count, enqueued_at, raw=handle, headers=decoded_headers)


def _dsn_secrets(dsn: str) -> list[str]:
    try:
        parts = urlsplit(dsn)
        password = parts.password
        query = dict(parse_qsl(parts.query))
    except ValueError:
        return []
    found = {password, unquote(password or ""), query.get("password")}
    return [secret for secret in found if secret and len(secret) > 2]


class PostgresQueue:
    """A queue in PostgreSQL (see the module docstring), on asyncpg; asyncio only.

    Construction does no I/O; ``open()`` (the worker calls it at start-up) connects,
    creates the tables if needed (``CREATE … IF NOT EXISTS`` under an advisory lock) and
    checks them. Producers may call ``enqueue`` without ``open`` (the first call creates
    the tables too).

    Args:
        dsn: a libpq URL, ``postgresql://user:password@host:port/database?sslmode=…``.
            Its password never appears in logs or errors.
        table: the messages' table; the dead letters go to ``{table}_dead``, and the
            wake-ups to the NOTIFY channel ``{table}``. Lower-case letters, digits and
            ``_``, at most 48 characters. Several queues are several tables.
        lease: seconds (> 0) a received message stays with its consumer without
            ``renew``; after that any consumer takes it over, counting a delivery.
        poll_interval: seconds (> 0) between looks at the table while ``receive`` waits
            and no NOTIFY came: the most a delayed message or an expired lease waits to
            be noticed, and the fallback when the listening connection is lost.
        pool_size: the most connections this object opens (plus one that LISTENs). A
            job using ``transaction`` holds one from its setup until its ack, so give at
            least the worker's concurrency plus two when jobs use it.
        command_timeout: seconds (> 0) a statement may take before it fails with
            ``BrokerUnavailable``.
        connect_timeout: seconds (> 0) to connect before ``BrokerUnavailable``.
        application_name: the connections' ``application_name`` (seen in
            ``pg_stat_activity``).
        consumer: this consumer's name, stored as a leased row's owner; default
            host-pid-random, unique.
    """

    def __init__(
        self,
        dsn: str,
        *,
        table: str = "lifecycle_jobs",
        lease: float = 30.0,
        poll_interval: float = 1.0,
        pool_size: int = 10,
        command_timeout: float = 10.0,
        connect_timeout: float = 10.0,
        application_name: str = "lifecycle",
        consumer: str | None = None,
    ) -> None:
        require_asyncio("PostgresQueue", "asyncpg")
        for option, value in (
            ("lease", lease),
            ("poll_interval", poll_interval),
            ("command_timeout", command_timeout),
            ("connect_timeout", connect_timeout),
        ):
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"PostgresQueue {option} must be a positive number of seconds, got {value!r}")
        if not isinstance(pool_size, int) or pool_size < 1:
            raise ValueError(f"PostgresQueue pool_size must be a positive integer, got {pool_size!r}")
        if not isinstance(table, str) or not _TABLE.fullmatch(table):
            raise ValueError(
                f"PostgresQueue table must be lower-case letters, digits and '_' (at most 48, not starting "
                f"with a digit), got {table!r}"
            )
        self.dsn = redact(dsn)  # the only form kept in the open: it is printed
        self._dsn = dsn
        self._secrets = _dsn_secrets(dsn)
        self.table = table
        self.dead_table = f"{table}_dead"
        self.channel = table
        self.lease: float | None = float(lease)
        self.poll_interval = float(poll_interval)
        self.pool_size = pool_size
        self.command_timeout = float(command_timeout)
        self.connect_timeout = float(connect_timeout)
        self.application_name = application_name
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._pool: Any = None
        self._pool_lock: asyncio.Lock | None = None
        self._schema_ready = False
        self._listener: Any = None
        self._listen_failed_at = -math.inf
        self._wakeup: asyncio.Event | None = None
        self._tokens = itertools.count(1)
        self._held: dict[str, _Claim] = {}  # ids handed out by this object and not settled

    def __repr__(self) -> str:
        return f"PostgresQueue({self.dsn!r}, table={self.table!r}, lease={self.lease!r})"

    # -- plumbing -----------------------------------------------------------------------
    def _where(self, op: str) -> str:
        return f"PostgresQueue {op} (table {self.table!r}, dsn {self.dsn})"

    def _scrub(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return redact(text)

    def _unavailable(self, op: str, exc: BaseException) -> BrokerUnavailable:
        return BrokerUnavailable(
            f"{self._where(op)}: PostgreSQL unavailable: {type(exc).__name__}: {self._scrub(str(exc))}"
        )

    @contextlib.contextmanager
    def _errors(self, op: str) -> Iterator[None]:
        """Transient failures become ``BrokerUnavailable``; misconfiguration a clear
        ``LifecycleError``. Texts are scrubbed: no password reaches a message."""
        asyncpg = import_client("asyncpg", "PostgresQueue", "postgres")
        try:
            yield
        except LifecycleError:
            raise
        except asyncpg.PostgresError as exc:
            state = getattr(exc, "sqlstate", None) or ""
            text = self._scrub(str(exc))
            if state[:2] in _TRANSIENT_CLASSES or state == "55P03":  # 55P03: lock not available
                raise self._unavailable(op, exc) from exc
            hint = {
                "28P01": "check the user name and password in the DSN",
                "28000": "the server refused this user or host (pg_hba.conf); check the DSN",
                "3D000": "the database does not exist; create it or fix the DSN",
                "42501": f"the user lacks a permission on {self.table!r} or {self.dead_table!r} (or on the "
                "schema, to create them)",
                "42P01": "the queue's table is missing; open() or init_schema() creates it",
            }.get(state, "")
            raise LifecycleError(
                f"{self._where(op)}: PostgreSQL answered {type(exc).__name__} ({state}): {text}"
                + (f"; {hint}" if hint else "")
            ) from None
        except (asyncpg.InterfaceError, asyncpg.exceptions.InternalClientError, OSError, TimeoutError) as exc:
            # InterfaceError: the connection was closed (terminated) under a call, or
            # the pool is closing; InternalClientError: the pool resetting a connection
            # the server just terminated ("another operation is in progress").
            # ConnectionError is an OSError.
            raise self._unavailable(op, exc) from exc

    async def _ensure_pool(self) -> Any:
        require_asyncio("PostgresQueue", "asyncpg")
        if self._pool is not None:
            return self._pool
        if self._pool_lock is None:
            self._pool_lock = asyncio.Lock()
        async with self._pool_lock:
            if self._pool is None:
                asyncpg = import_client("asyncpg", "PostgresQueue", "postgres")
                try:
                    pool = await asyncpg.create_pool(
                        self._dsn,
                        min_size=0,
                        max_size=self.pool_size,
                        command_timeout=self.command_timeout,
                        timeout=self.connect_timeout,
                        server_settings={"application_name": self.application_name},
                        # Statements are few and fixed; caching them is the point.
                        statement_cache_size=64,
                    )
                except (ValueError, TypeError) as exc:
                    raise LifecycleError(
                        f"{self._where('open')}: invalid DSN ({self._scrub(f'{type(exc).__name__}: {exc}')}); "
                        f"expected postgresql://user:password@host:port/database"
                    ) from None
                self._pool = pool
        return self._pool

    async def _ready(self) -> Any:
        """The pool, with the schema created once per object."""
        pool = await self._ensure_pool()
        if not self._schema_ready:
            async with pool.acquire() as conn:
                await self._create_schema(conn)
            self._schema_ready = True
        return pool

    async def _create_schema(self, conn: Any) -> None:
        async with conn.transaction():
            # Concurrent CREATE … IF NOT EXISTS can still collide on the catalog: one at a time.
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"lifecycle:{self.table}")
            rows = await conn.fetch(
                "SELECT column_name FROM information_schema.columns WHERE table_schema = current_schema() "
                "AND table_name = $1",
                self.table,
            )
            columns = {row[0] for row in rows}
            if columns and not columns >= _COLUMNS:
                raise LifecycleError(
                    f"{self._where('open')}: table {self.table!r} exists but lacks the columns "
                    f"{sorted(_COLUMNS - columns)}; it belongs to something else: give another table name"
                )
            for statement in _schema(self.table):
                await conn.execute(statement)

    @contextlib.asynccontextmanager
    async def _conn(self, op: str) -> AsyncIterator[Any]:
        """A pooled connection for one operation, errors mapped (see ``_errors``)."""
        with self._errors(op):
            pool = await self._ready()
            async with pool.acquire(timeout=self.connect_timeout + self.command_timeout) as conn:
                yield conn

    # -- set-up -------------------------------------------------------------------------
    async def open(self) -> None:
        """Connect, create the tables if needed and check them. A bad DSN, rejected
        credentials, a missing database or permission, or a table of that name that is
        not a queue raise ``LifecycleError``; an unreachable server ``BrokerUnavailable``."""
        self._schema_ready = False
        async with self._conn("open") as conn:
            await conn.fetchval(f'SELECT count(*) FROM "{self.dead_table}" WHERE false')

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
    ) -> str:
        """Add a message (and NOTIFY the listening consumers if it is due now); returns
        its id.

        Args:
            job: the job's name, or a ``Job`` (then the payload is validated first:
                ``PayloadError``).
            payload: the job's arguments, a JSON-serialisable mapping (``TypeError``
                or ``ValueError`` otherwise, here rather than at the worker).
            delay: seconds from now (the server's clock); None or <= 0 means now. Not
                with ``at``.
            at: when to run it, in seconds since the epoch (a past time means now).
            attempt: the attempt number the message carries (>= 1).
            headers: string metadata handed back as ``Delivery.headers``.
        """
        check_enqueue(job, delay, at, attempt)
        name, args = job_name(job, payload)
        body = encode_payload(args).encode("utf-8")
        header_text = encode_headers(name, headers)
        ids = await self._insert(f"enqueue of job {name!r}", [(name, body)], delay, at, attempt, header_text)
        return ids[0]

    async def enqueue_many(self, job: str | Job[..., Any], payloads: Sequence[Mapping[str, Any]]) -> list[str]:
        """Add many messages of one job in one statement (one NOTIFY); returns their ids.

        Args:
            job: the job's name, or a ``Job`` (each payload is then validated first).
            payloads: the jobs' arguments, one mapping per message.
        """
        rows = []
        for payload in payloads:
            name, args = job_name(job, payload)
            rows.append((name, encode_payload(args).encode("utf-8")))
        if not rows:
            return []
        return await self._insert(f"enqueue of {len(rows)} message(s)", rows, None, None, 1, None)

    async def _insert(
        self,
        op: str,
        rows: list[tuple[str, bytes]],
        delay: float | None,
        at: float | None,
        attempt: int,
        headers: str | None,
    ) -> list[str]:
        statement = (
            f'WITH m AS (INSERT INTO "{self.table}" (job, payload, attempt, enqueued_at, run_at, headers) '
            f"SELECT j, p, $3, {_NOW}, COALESCE($5::float8, {_NOW} + $4), $7::text "
            f"FROM unnest($1::text[], $2::bytea[]) WITH ORDINALITY AS u(j, p, n) ORDER BY n "
            f"RETURNING id, run_at <= {_NOW} AS due) "
            f"SELECT id, CASE WHEN due THEN pg_notify($6, '')::text END FROM m ORDER BY id"
        )
        names = [name for name, _ in rows]
        bodies = [body for _, body in rows]
        async with self._conn(op) as conn:
            records = await conn.fetch(
                statement, names, bodies, attempt, max(delay or 0.0, 0.0), at, self.channel, headers
            )
        return [str(record[0]) for record in records]

    # -- consuming ----------------------------------------------------------------------
    def _claim_statement(self) -> str:
        t = f'"{self.table}"'
        return (
            f"WITH expired AS (SELECT id FROM {t} WHERE owner IS NOT NULL AND lease_until < {_NOW} "
            f"AND NOT (owner = $1 AND id = ANY($4::bigint[])) ORDER BY lease_until LIMIT $3 FOR UPDATE SKIP LOCKED), "
            f"ready AS (SELECT id FROM {t} WHERE owner IS NULL AND run_at <= {_NOW} "
            f"ORDER BY run_at, id LIMIT $3 FOR UPDATE SKIP LOCKED), "
            f"picked AS ((SELECT id, true AS reclaimed FROM expired UNION ALL "
            f"SELECT id, false FROM ready) LIMIT $3) "
            f"UPDATE {t} m SET owner = $1, token = $2, lease_until = {_NOW} + $5, deliveries = m.deliveries + 1 "
            f"FROM picked WHERE m.id = picked.id "
            f"RETURNING m.id, m.job, m.payload, m.attempt, m.deliveries, m.enqueued_at, m.headers, picked.reclaimed"
        )

    async def _next_due(self, conn: Any) -> float | None:
        """Seconds until a delayed message falls due or a lease expires, if any."""
        value = await conn.fetchval(
            f'SELECT LEAST((SELECT min(run_at) FROM "{self.table}" WHERE owner IS NULL), '
            f'(SELECT min(lease_until) FROM "{self.table}" WHERE owner IS NOT NULL)) - {_NOW}'
        )
        return None if value is None else max(float(value), 0.0)

    async def _listen(self) -> None:
        """LISTEN on a connection of its own, if not already (retried after a failure at
        most once per ``poll_interval``; polling covers the gap)."""
        if self._listener is not None and not self._listener.is_closed():
            return
        if time.monotonic() - self._listen_failed_at < self.poll_interval:
            return
        asyncpg = import_client("asyncpg", "PostgresQueue", "postgres")
        if self._wakeup is None:
            self._wakeup = asyncio.Event()
        wakeup = self._wakeup

        def notified(*_args: Any) -> None:
            wakeup.set()

        def terminated(*_args: Any) -> None:
            self._listener = None
            wakeup.set()  # the waiting receive polls at once

        try:
            conn = await asyncpg.connect(
                self._dsn,
                timeout=self.connect_timeout,
                command_timeout=self.command_timeout,
                server_settings={"application_name": self.application_name},
            )
            await conn.add_listener(self.channel, notified)
            conn.add_termination_listener(terminated)
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError, ValueError) as exc:
            self._listen_failed_at = time.monotonic()
            LOG.debug("queue.listen_failed", table=self.table, error=self._scrub(f"{type(exc).__name__}: {exc}"))
            return
        self._listener = conn

    async def receive(self, limit: int, timeout: float) -> list[Delivery]:
        """Up to ``limit`` messages: leases expired with another consumer first (a
        delivery counted), then due ones, oldest first. Waits up to ``timeout`` seconds
        for the first: woken by NOTIFY, looking again every ``poll_interval`` (sooner
        when a delayed message falls due or a lease expires)."""
        if limit < 1:
            return []
        deadline = time.monotonic() + max(timeout, 0.0)
        statement = self._claim_statement()
        while True:
            if self._wakeup is not None:
                self._wakeup.clear()  # before the claim: a NOTIFY after it is not missed
            token = next(self._tokens)
            held = [int(key) for key in self._held]
            with anyio.CancelScope(shield=True):  # a committed claim always reaches _held
                async with self._conn("receive") as conn:
                    rows = await conn.fetch(statement, self.consumer, token, limit, held, self.lease)
                    due = None if rows or deadline <= time.monotonic() else await self._next_due(conn)
                deliveries = [decode_row(tuple(row)[:7], token) for row in rows]
                for delivery in deliveries:
                    self._held[delivery.id] = _Claim(token)
            if deliveries:
                reclaimed = [str(row[0]) for row in rows if row[7]]
                if reclaimed:
                    LOG.info("queue.reclaimed", table=self.table, consumer=self.consumer, ids=reclaimed)
                deliveries.sort(key=lambda d: int(d.id))
                return deliveries
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return []
            wait = min(remaining, self.poll_interval)
            if due is not None:
                wait = min(wait, due + 0.005)
            await self._listen()
            assert self._wakeup is not None
            with anyio.move_on_after(wait):
                await self._wakeup.wait()

    # -- the job's transaction --------------------------------------------------------------
    async def transaction(self, ctx: JobContext) -> AsyncIterator[asyncpg.Connection]:
        """A job-scoped dependency: a connection in an open transaction whose commit is the
        message's ack. Use it as ``tx: Annotated[asyncpg.Connection,
        Depends(queue.transaction)]`` in a job run by a ``Worker`` consuming this queue.

        The job's writes through ``tx`` commit in the same transaction that deletes the
        message, when the worker acknowledges it after the job and its whole teardown
        succeeded; a failed job, a retry, a dead letter, a release (shutdown) or a lost
        lease rolls them back. A commit that fails (a deferred constraint, a
        serialization failure) rolls them back and makes the ack raise
        ``lifecycle.CommitFailed`` with the message still owned: the worker retries or
        dead-letters the job like any failure. The connection is the queue's own (from
        its pool): do not commit, roll back or close it.

        Args:
            ctx: the job's context (injected): its ``id`` names the message.

        Raises:
            LifecycleError: the job is not running from a delivery of this queue (say,
                ``rt.run`` or a worker on another queue): override the dependency there.
            BrokerUnavailable: no connection could be had; the job fails and is retried.
        """
        claim = self._held.get(ctx.id)
        if claim is None:
            raise LifecycleError(
                f"job {ctx.name!r}, dependency lifecycle.queues.PostgresQueue.transaction, parameter 'ctx': job id "
                f"{ctx.id!r} is not a message this queue ({self!r}) handed out and still holds; the dependency "
                f"works only in a Worker consuming this queue (override it elsewhere)"
            )
        if claim.tx is not None:
            raise LifecycleError(
                f"job {ctx.name!r}, dependency lifecycle.queues.PostgresQueue.transaction: the message already has "
                f"its transaction (Depends(..., use_cache=False) cannot give a job a second one)"
            )
        with self._errors(f"transaction of job {ctx.name!r} (message {ctx.id})"):
            pool = await self._ready()
            conn = await pool.acquire(timeout=self.connect_timeout + self.command_timeout)
            try:
                transaction = conn.transaction()
                await transaction.start()
            except BaseException:
                await self._put_back(conn)
                raise
        tx = claim.tx = _Tx(conn, transaction)
        try:
            yield conn
        except BaseException:
            if claim.tx is tx:
                claim.tx = None
            await self._discard(tx)
            raise
        if tx.state == "doomed" or claim.tx is not tx:
            await self._discard(tx)  # the lease was lost while the job ran
        else:
            tx.state = "pending"

    async def _put_back(self, conn: Any) -> None:
        with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
            await self._pool.release(conn, timeout=self.command_timeout)

    async def _discard(self, tx: _Tx) -> None:
        """Roll a job's transaction back and return its connection (a broken one is
        closed by the pool)."""
        with anyio.CancelScope(shield=True):
            with contextlib.suppress(Exception):
                if not tx.conn.is_closed() and tx.conn.is_in_transaction():
                    await tx.transaction.rollback()
            await self._put_back(tx.conn)

    async def _rollback_pending(self, claim: _Claim | None) -> None:
        """Before any settle but an ack: the job's writes must not commit."""
        if claim is not None and claim.tx is not None:
            tx, claim.tx = claim.tx, None
            await self._discard(tx)

    # -- settling -----------------------------------------------------------------------
    def _token(self, delivery: Delivery) -> int:
        return delivery.raw.token if isinstance(delivery.raw, _Handle) else -1

    @staticmethod
    def _id(delivery: Delivery) -> int:
        return int(delivery.id) if delivery.id.isdigit() and len(delivery.id) <= 18 else -1

    async def _settle(self, op: str, delivery: Delivery, statement: str, *args: Any) -> bool:
        """Run one owner-checked statement (``$1`` id, ``$2`` owner, ``$3`` token, then
        ``args``); False when the delivery was no longer ours: then nothing changed."""
        where = f"{op} of message {delivery.id} (job {delivery.job!r})"
        claim = self._held.get(delivery.id)
        await self._rollback_pending(claim)
        try:
            with anyio.CancelScope(shield=True):
                async with self._conn(where) as conn:
                    found = await conn.fetchval(
                        statement, self._id(delivery), self.consumer, self._token(delivery), *args
                    )
        except BrokerUnavailable:
            raise  # still ours: the worker settles it again when the server answers
        except BaseException:
            # Given up on: no longer excluded from reclaiming, so it is redelivered
            # once its lease expires.
            self._held.pop(delivery.id, None)
            raise
        self._held.pop(delivery.id, None)
        if found is None:
            LOG.debug("queue.settle_skipped", op=op, job=delivery.job, job_id=delivery.id, consumer=self.consumer)
        return found is not None

    def _owned(self, alias: str = "") -> str:
        prefix = f"{alias}." if alias else ""
        return f"{prefix}id = $1 AND {prefix}owner = $2 AND {prefix}token = $3"

    async def ack(self, delivery: Delivery) -> bool:
        """Done: delete the message, if the delivery is still this consumer's (else
        False). With a pending ``transaction``, the delete runs in it and commits the
        job's writes with it (see ``transaction``)."""
        claim = self._held.get(delivery.id)
        if claim is not None and (claim.tx is not None or claim.commit_failed is not None):
            return await self._ack_in_transaction(delivery, claim)
        return await self._settle("ack", delivery, f'DELETE FROM "{self.table}" WHERE {self._owned()} RETURNING id')

    async def _ack_in_transaction(self, delivery: Delivery, claim: _Claim) -> bool:
        tx = claim.tx
        if tx is not None and tx.state != "pending":
            await self._rollback_pending(claim)  # never handed over (a misuse): nothing of the job commits
            claim.commit_failed = "the job's transaction was not handed over by its teardown"
        elif tx is not None:
            claim.tx = None
            asyncpg = import_client("asyncpg", "PostgresQueue", "postgres")
            with anyio.CancelScope(shield=True):
                try:
                    deleted = await tx.conn.fetchval(
                        f'DELETE FROM "{self.table}" WHERE {self._owned()} RETURNING id',
                        self._id(delivery),
                        self.consumer,
                        self._token(delivery),
                    )
                    if deleted is None:
                        await tx.transaction.rollback()
                        await self._put_back(tx.conn)
                        self._held.pop(delivery.id, None)
                        LOG.debug(
                            "queue.settle_skipped", op="ack", job=delivery.job, job_id=delivery.id,
                            consumer=self.consumer,
                        )  # fmt: skip
                        return False  # the lease was lost: the job's writes are rolled back with it
                    await tx.transaction.commit()
                except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
                    claim.commit_failed = self._scrub(f"{type(exc).__name__}: {exc}")
                    await self._discard(tx)
                else:
                    await self._put_back(tx.conn)
                    self._held.pop(delivery.id, None)
                    return True
        # The commit failed (or its answer was lost): the job's writes are rolled back,
        # and the row is still ours, untouched, so the worker retries or dead-letters it
        # like any failed job. (Had a lost COMMIT landed after all, the row is gone and
        # that retry finds nothing: the job is done, once.)
        reason = claim.commit_failed or "unknown"
        raise CommitFailed(
            f"{self._where('ack')}: job {delivery.job!r} (message {delivery.id}) succeeded but its transaction "
            f"did not commit ({reason}); its writes were rolled back"
        )

    async def _notify(self) -> None:
        with contextlib.suppress(BrokerUnavailable), anyio.CancelScope(shield=True):
            async with self._conn("notify") as conn:
                await conn.execute("SELECT pg_notify($1, '')", self.channel)

    def _move(self, sets: str, notify: bool) -> str:
        """An owner-checked UPDATE that gives the row a new id (so the old delivery's id
        never names the new one), optionally NOTIFYing."""
        t = f'"{self.table}"'
        update = (
            f"UPDATE {t} SET id = nextval('\"{self.table}_seq\"'), owner = NULL, token = NULL, lease_until = NULL, "
            f"{sets} WHERE {self._owned()} RETURNING id"
        )
        if not notify:
            return update
        return f"WITH u AS ({update}) SELECT id, pg_notify('{self.channel}', '')::text FROM u"

    async def retry(self, delivery: Delivery, delay: float, error: str) -> bool:
        """Back on the queue as attempt + 1, due after ``delay`` seconds (the payload
        exactly as it was stored), under a new id, in one statement; ``error`` is kept
        as ``last_error`` (first 500 characters). A pending ``transaction`` is rolled
        back first."""
        if delivery.malformed is not None:
            raise ValueError(
                f"retry of message {delivery.id}: a malformed message ({delivery.malformed}) cannot be "
                f"retried; dead-letter it"
            )
        delay = max(float(delay), 0.0)
        sets = f"attempt = attempt + 1, deliveries = 0, run_at = {_NOW} + $4, last_error = $5"
        return await self._settle("retry", delivery, self._move(sets, delay <= 0), delay, error[:500])

    async def release(self, delivery: Delivery) -> bool:
        """Put it back at once, unchanged (same attempt, enqueued_at and place in line),
        under a new id, and NOTIFY: no delivery counted. A pending ``transaction`` is
        rolled back first."""
        sets = "deliveries = GREATEST(deliveries - 1, 0)"
        return await self._settle("release", delivery, self._move(sets, True))

    async def dead_letter(self, delivery: Delivery, record: Mapping[str, Any]) -> bool:
        """Delete this delivery and add ``record`` (as JSON) to the dead letters, in one
        statement. A malformed delivery's stored columns are kept too
        (``raw:<column>`` in ``dead_letters``). A pending ``transaction`` is rolled
        back first."""
        text = json.dumps(dict(record), default=repr, ensure_ascii=False)
        keep = delivery.malformed is not None
        raw = ", ".join(f"CASE WHEN $5 THEN d.{column} END" for column in RAW_COLUMNS)
        statement = (
            f'WITH d AS (DELETE FROM "{self.table}" WHERE {self._owned()} RETURNING *) '
            f'INSERT INTO "{self.dead_table}" (record, raw_job, raw_payload, raw_attempt, raw_enqueued_at, '
            f"failed_at) SELECT $4, {raw}, {_NOW} FROM d RETURNING id"
        )
        return await self._settle("dead_letter", delivery, statement, text, keep)

    async def renew(self, deliveries: Sequence[Delivery]) -> list[str]:
        """Extend the leases of those deliveries this consumer still owns, by ``lease``
        seconds from now (no delivery counted); returns the ids of the others (lost).
        A lost one's ``transaction`` is rolled back (at its teardown if the job still
        runs)."""
        if not deliveries:
            return []
        ids = [self._id(delivery) for delivery in deliveries]
        tokens = [self._token(delivery) for delivery in deliveries]
        statement = (
            f'UPDATE "{self.table}" m SET lease_until = {_NOW} + $4 FROM unnest($1::bigint[], $2::bigint[]) '
            f"AS o(id, token) WHERE m.id = o.id AND m.owner = $3 AND m.token = o.token RETURNING m.id"
        )
        with anyio.CancelScope(shield=True):
            async with self._conn(f"renew of {len(ids)} message(s)") as conn:
                rows = await conn.fetch(statement, ids, tokens, self.consumer, self.lease)
        kept = {str(row[0]) for row in rows}
        lost = [delivery.id for delivery in deliveries if delivery.id not in kept]
        for message_id in lost:
            claim = self._held.pop(message_id, None)
            if claim is not None and claim.tx is not None:
                if claim.tx.state == "running":
                    claim.tx.state = "doomed"  # the job still uses the connection
                else:
                    await self._rollback_pending(claim)
        return lost

    # -- dead letters ---------------------------------------------------------------------

    @staticmethod
    def _dead_ids(ids: Sequence[str], op: str) -> list[int]:
        numbers = []
        for value in ids:
            if not (isinstance(value, str) and value.isdigit() and len(value) <= 18):
                raise ValueError(f"PostgresQueue {op}: {value!r} is not a dead_letter_id (a positive integer: '12')")
            numbers.append(int(value))
        return numbers

    async def dead_letters(self, count: int = 100, before: str | None = None) -> list[dict[str, Any]]:
        """Dead letters, newest first: at most ``count``, older than the dead letter
        ``before`` (exclusive) when given. Each is the record the worker wrote, plus
        its ``dead_letter_id`` (for ``before``, ``replay`` and ``purge``) and, for a
        malformed message, its stored columns as ``raw:<column>`` (the payload as bytes)."""
        limit = self._dead_ids([before], "dead_letters")[0] if before is not None else 2**63 - 1
        if count < 1:
            return []
        async with self._conn("dead_letters") as conn:
            rows = await conn.fetch(
                f"SELECT id, record, raw_job, raw_payload, raw_attempt, raw_enqueued_at FROM \"{self.dead_table}\" "
                f"WHERE id < $1 ORDER BY id DESC LIMIT $2",
                limit,
                count,
            )
        return [dead_record_from_row(tuple(row)) for row in rows]

    async def replay(self, ids: Sequence[str]) -> int:
        """Put these dead letters back on the queue as new messages (attempt 1, same job
        and payload) and delete them from the dead letters, in one transaction. Missing
        ids and dead letters with nothing to run (malformed: no job or payload) are
        skipped; returns how many were replayed."""
        numbers = self._dead_ids(ids, "replay")
        replayed = 0
        async with self._conn(f"replay of {len(numbers)} dead letter(s)") as conn, conn.transaction():
            rows = await conn.fetch(
                f'SELECT id, record FROM "{self.dead_table}" WHERE id = ANY($1::bigint[]) ORDER BY id FOR UPDATE',
                numbers,
            )
            for dead_id, text in rows:
                record = dead_record_from_row((dead_id, text, None, None, None, None))
                job, payload = record.get("job"), record.get("payload")
                if record.get("reason") == "malformed" or not isinstance(job, str) or not job:
                    continue  # nothing to run; its raw columns stay for a human
                if not isinstance(payload, dict):
                    continue
                await conn.execute(
                    f'INSERT INTO "{self.table}" (job, payload, attempt, enqueued_at, run_at, headers) '
                    f"VALUES ($1, $2, 1, {_NOW}, {_NOW}, $3)",
                    job,
                    encode_payload(payload).encode("utf-8"),
                    encode_headers(job, record_headers(record)),
                )
                await conn.execute(f'DELETE FROM "{self.dead_table}" WHERE id = $1', dead_id)
                replayed += 1
            if replayed:
                await conn.execute("SELECT pg_notify($1, '')", self.channel)
        return replayed

    async def purge(self, ids: Sequence[str] | None = None) -> int:
        """Delete these dead letters, or all of them (``ids=None``); returns how many."""
        numbers = None if ids is None else self._dead_ids(ids, "purge")
        async with self._conn("purge") as conn:
            if numbers is None:
                rows = await conn.fetch(f'DELETE FROM "{self.dead_table}" RETURNING id')
            else:
                rows = await conn.fetch(
                    f'DELETE FROM "{self.dead_table}" WHERE id = ANY($1::bigint[]) RETURNING id', numbers
                )
        return len(rows)

    # -- inspection -----------------------------------------------------------------------
    async def counts(self) -> dict[str, int]:
        """How many messages are ``ready``, ``delayed`` (due later), ``leased`` (with a
        consumer) and ``dead`` (dead letters), for monitoring and tests."""
        async with self._conn("counts") as conn:
            row = await conn.fetchrow(
                f"SELECT count(*) FILTER (WHERE owner IS NULL AND run_at <= {_NOW}), "
                f"count(*) FILTER (WHERE owner IS NULL AND run_at > {_NOW}), "
                f"count(*) FILTER (WHERE owner IS NOT NULL), "
                f'(SELECT count(*) FROM "{self.dead_table}") FROM "{self.table}"'
            )
        ready, delayed, leased, dead = row
        return {"ready": ready, "delayed": delayed, "leased": leased, "dead": dead}

    async def close(self) -> None:
        """Roll back any job transaction still open, close the listener and the pool
        (idempotent; a later call opens new ones)."""
        with anyio.CancelScope(shield=True):
            for claim in list(self._held.values()):
                if claim.tx is not None and claim.tx.state != "running":
                    await self._rollback_pending(claim)
            listener, self._listener = self._listener, None
            if listener is not None:
                with contextlib.suppress(Exception):
                    await listener.close(timeout=2)
            pool, self._pool = self._pool, None
            self._schema_ready = False
            if pool is not None:
                with anyio.move_on_after(5):
                    with contextlib.suppress(Exception):
                        await pool.close()
                    return
                pool.terminate()  # a job still holds a connection: do not wait for it


async def init_schema(dsn: str, *, table: str = "lifecycle_jobs", **options: Any) -> None:
    """Create a queue's tables if they are missing (idempotent, safe to run from several
    processes at once), and check them; for deployment scripts and
    ``lifecycle queue init URL``.

    Args:
        dsn: the database, as for ``PostgresQueue``.
        table: the messages' table (the dead letters go to ``{table}_dead``).
        options: other ``PostgresQueue`` keyword arguments (``connect_timeout``…).

    Raises:
        LifecycleError: bad credentials, a missing database or permission, or a table of
            that name that is not a queue.
        BrokerUnavailable: the server could not be reached.
    """
    queue = PostgresQueue(dsn, table=table, **options)
    try:
        await queue.open()
    finally:
        await queue.close()


_URL_OPTIONS: dict[str, Any] = {
    "table": str,
    "lease": float,
    "poll_interval": float,
    "pool_size": int,
    "command_timeout": float,
    "connect_timeout": float,
    "application_name": str,
    "consumer": str,
}


def from_url(url: str, **options: Any) -> PostgresQueue:
    """``postgresql://user:password@host:port/database?table=jobs&lease=30`` as a
    ``PostgresQueue`` (``queue_from_url`` calls this for ``postgres://`` and
    ``postgresql://``). The queue's options come from the query (``table``, ``lease``,
    ``poll_interval``, ``pool_size``, ``command_timeout``, ``connect_timeout``,
    ``application_name``, ``consumer``); other query items (``sslmode``…) go to asyncpg.

    Args:
        url: the queue's URL.
        options: keyword arguments for ``PostgresQueue``; they win over the URL's.
    """
    parts = urlsplit(url)
    given, kept = _options(url, parse_qsl(parts.query, keep_blank_values=True), _URL_OPTIONS, strict=False)
    dsn = urlunsplit(parts._replace(query=urlencode(kept)))
    return PostgresQueue(dsn, **{**given, **options})
