"""A durable queue in one SQLite file: no server to run, shared by the worker processes
of one machine. Works on asyncio and trio: every database call runs in a worker thread
(``anyio.to_thread``), since the standard library's ``sqlite3`` blocks.

Invariants:

- One row per message in ``lifecycle_messages``. It is ready when ``owner`` is NULL and
  ``run_at`` (epoch seconds) has come, and leased while ``owner`` (a consumer) and
  ``claim`` (which of that consumer's claims) are set, until ``lease_until``.
- Claims are ``UPDATE … RETURNING`` statements under ``BEGIN IMMEDIATE``: SQLite admits
  one writer at a time, so two processes never claim one row. Taking over an expired
  lease counts a delivery (``deliveries + 1``); ``renew`` moves ``lease_until`` only.
- Every settle is one transaction that first checks ``owner`` and ``claim``: a repeated
  or stale settle (the lease went to another consumer) changes nothing and returns False.
  A retry or a release writes the message as a new row (a new id, ids are never reused)
  and deletes the old one, so one id never names two deliveries a worker could mix up.
- Every column is decoded here (the connection returns text as bytes): a row that does
  not decode comes back as a ``Delivery`` whose ``malformed`` says why, never as an
  exception, and its dead letter keeps the original values (``raw:<column>``).
- A database that stays locked beyond ``busy_timeout``, an I/O error or a full disk is
  ``BrokerUnavailable`` (the worker backs off and calls again); a path that cannot be
  opened or written, or a file that is not a SQLite database, is a ``LifecycleError``.
- Every call runs to completion and delivers its answer even if the caller is cancelled
  meanwhile (the thread hop is shielded; the cancellation lands at the caller's next
  checkpoint), so a committed claim or settle is never lost to a cancellation.
- Nothing notifies a waiting consumer: ``receive`` polls every ``poll_interval`` (a
  cheap read, no write lock, so idle workers do not queue for the writer); an enqueue
  through the same queue object wakes its own waiting receivers at once.

One connection per queue object, opened with ``check_same_thread=False`` and used by
one thread at a time (a ``threading.Lock``; the calls also queue on the event loop
behind a ``CapacityLimiter(1)``, so waiting calls hold no thread of anyio's default
pool, which the jobs' threaded dependencies share). A connection per thread buys
nothing here: SQLite serialises writers anyway, and ``close()`` could not close
connections owned by other threads. A process forked with an open queue reconnects in
the child (a SQLite connection must not cross a fork) under a new consumer name."""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import math
import os
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import sniffio

from .._errors import LifecycleError
from .._log import LOG
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
    job_name,
    record_headers,
)

if TYPE_CHECKING:
    from .._job import Job

T = TypeVar("T")

MIN_SQLITE = (3, 35, 0)  # UPDATE ... RETURNING
# Primary result codes that mean "try again later": BUSY, LOCKED, IOERR, FULL, PROTOCOL.
_TRANSIENT_CODES = frozenset({5, 6, 10, 13, 15})
_MAX_ATTEMPT = 10**18

_SCHEMA = """
CREATE TABLE IF NOT EXISTS lifecycle_messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    queue TEXT NOT NULL,
    job TEXT NOT NULL,
    payload TEXT NOT NULL,
    attempt INTEGER NOT NULL DEFAULT 1,
    deliveries INTEGER NOT NULL DEFAULT 0,
    enqueued_at REAL NOT NULL,
    run_at REAL NOT NULL,
    owner TEXT,
    claim INTEGER,
    lease_until REAL,
    last_error TEXT,
    headers TEXT
);
CREATE INDEX IF NOT EXISTS lifecycle_messages_ready
    ON lifecycle_messages (queue, run_at, id) WHERE owner IS NULL;
CREATE INDEX IF NOT EXISTS lifecycle_messages_leased
    ON lifecycle_messages (queue, lease_until) WHERE owner IS NOT NULL;
CREATE TABLE IF NOT EXISTS lifecycle_dead_letters (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    queue TEXT NOT NULL,
    record TEXT NOT NULL,
    raw_job, raw_payload, raw_attempt, raw_enqueued_at,
    failed_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS lifecycle_dead_letters_queue ON lifecycle_dead_letters (queue, id);
CREATE TABLE IF NOT EXISTS lifecycle_dedup (
    queue TEXT NOT NULL,
    key TEXT NOT NULL,
    message_id TEXT NOT NULL,
    expires_at REAL NOT NULL,
    PRIMARY KEY (queue, key)
);
"""
_MESSAGE_COLUMNS = {
    "id", "queue", "job", "payload", "attempt", "deliveries", "enqueued_at", "run_at", "owner", "claim",
    "lease_until", "last_error",
}  # fmt: skip
# A settle's work, run in its transaction: (connection, owner-check WHERE clause, its arguments).
_Settle = Callable[[sqlite3.Connection, str, tuple[Any, ...]], bool]
_RETURNING = "RETURNING id, job, payload, attempt, deliveries, enqueued_at, headers"


@dataclass(frozen=True, slots=True)
class _Handle:
    """``Delivery.raw`` of a SqliteQueue delivery: which claim handed it out, and the
    row's columns as stored (kept in the dead letter of a malformed row)."""

    claim: int
    columns: dict[str, Any]


def check_sqlite_version(version: tuple[int, int, int] | None = None) -> None:
    """Raise ``LifecycleError`` if the SQLite library is older than 3.35 (no RETURNING).

    Args:
        version: the version to check; None reads ``sqlite3.sqlite_version_info``.
    """
    found = version if version is not None else sqlite3.sqlite_version_info
    if tuple(found) < MIN_SQLITE:
        raise LifecycleError(
            f"SqliteQueue needs SQLite >= {'.'.join(map(str, MIN_SQLITE))} (UPDATE ... RETURNING), but Python's "
            f"sqlite3 module uses SQLite {'.'.join(map(str, found))}; use a Python built against a newer SQLite, "
            f"or RedisStreamQueue"
        )


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _ids(ids: Sequence[str], op: str) -> list[int]:
    numbers = []
    for value in ids:
        if not (isinstance(value, str) and value.isdigit() and len(value) <= 19):
            raise ValueError(f"SqliteQueue {op}: {value!r} is not a dead_letter_id (a positive integer like '12')")
        numbers.append(int(value))
    return numbers


def decode_row(row: Sequence[Any], claim: int) -> Delivery:
    """A claimed row (``id, job, payload, attempt, deliveries, enqueued_at, headers``) as a
    ``Delivery``; one that does not decode is returned with ``malformed`` set
    (``"<column>: <why>"``) and its columns kept in ``raw``.

    Args:
        row: the values as the connection returned them (text as bytes).
        claim: the claim that handed the row out (the owner check of every settle).
    """
    message_id, job, payload, attempt, deliveries, enqueued_at, headers = row
    handle = _Handle(claim, dict(zip(RAW_COLUMNS, (job, payload, attempt, enqueued_at), strict=True)))
    count = deliveries if type(deliveries) is int and deliveries >= 1 else 1

    def bad(why: str) -> Delivery:
        return Delivery(str(message_id), "", None, 1, count, 0.0, raw=handle, malformed=why)

    if not isinstance(job, bytes):
        return bad(f"job: not text: {job!r:.40}")
    try:
        name = job.decode("utf-8")
    except UnicodeDecodeError as exc:
        return bad(f"job: not valid UTF-8 ({exc.reason} at byte {exc.start})")
    if not name:
        return bad("job: empty")
    if type(attempt) is not int or not 1 <= attempt <= _MAX_ATTEMPT:
        return bad(f"attempt: not a positive integer: {attempt!r:.40}")
    if type(enqueued_at) not in (int, float) or not math.isfinite(enqueued_at) or enqueued_at < 0:
        return bad(f"enqueued_at: not a finite time in seconds since the epoch: {enqueued_at!r:.40}")
    if not isinstance(payload, bytes | str):
        return bad(f"payload: not text: {payload!r:.40}")
    try:
        body = decode_payload(payload)
    except MalformedMessage as exc:
        return bad(f"payload: {exc}")
    try:
        decoded_headers = decode_headers(headers)
    except MalformedMessage as exc:
        return bad(f"headers: {exc}")
    enqueued = float(enqueued_at)
    return Delivery(str(message_id), name, body, attempt, count, enqueued, raw=handle, headers=decoded_headers)


class SqliteQueue:
    """A queue in a SQLite database file (see the module docstring).

    Construction does no I/O; ``open()`` (the worker calls it at start-up) creates the
    file and its tables if needed and checks that it can write there. Producers may call
    ``enqueue`` without ``open``.

    Args:
        path: the database file (created if missing; its directory must exist and be
            writable, since SQLite keeps its ``-wal`` and ``-shm`` files beside it).
            ``":memory:"`` is a private in-memory database, for tests in one process.
        name: the queue's name; several queues may share one file. Default ``"jobs"``.
        lease: seconds (> 0) a received message stays with its consumer without
            ``renew``; after that any consumer takes it over, counting a delivery.
        poll_interval: seconds (> 0) between looks at the database while ``receive``
            waits: the most a new message from another process waits to be noticed.
        busy_timeout: seconds (> 0) a call waits for another process's write lock
            before it fails with ``BrokerUnavailable``.
        synchronous: SQLite's ``synchronous`` setting in WAL mode: ``"NORMAL"`` (the
            default) survives a crashed or killed process, and a power loss may undo
            the last transactions; ``"FULL"`` syncs every commit to disk (slower).
        consumer: this consumer's name, stored as a leased row's owner; default
            host-pid-random, unique.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        name: str = "jobs",
        lease: float = 30.0,
        poll_interval: float = 0.1,
        busy_timeout: float = 5.0,
        synchronous: str = "NORMAL",
        consumer: str | None = None,
    ) -> None:
        check_sqlite_version()
        for option, value in (("lease", lease), ("poll_interval", poll_interval), ("busy_timeout", busy_timeout)):
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"SqliteQueue {option} must be a positive number of seconds, got {value!r}")
        if synchronous.upper() not in ("OFF", "NORMAL", "FULL", "EXTRA"):
            raise ValueError(f"SqliteQueue synchronous must be OFF, NORMAL, FULL or EXTRA, got {synchronous!r}")
        if not name:
            raise ValueError("SqliteQueue name must not be empty")
        self.path = os.fspath(path)
        self.name = name
        self.lease: float | None = float(lease)
        self.poll_interval = float(poll_interval)
        self.busy_timeout = float(busy_timeout)
        self.synchronous = synchronous.upper()
        self._given_consumer = consumer
        self.consumer = consumer or self._new_consumer()
        self._pid = os.getpid()
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        self._limiter: tuple[str, anyio.CapacityLimiter] | None = None
        self._claims = itertools.count(1)
        self._held: set[str] = set()  # ids handed out by this object and not settled
        self._waiters: set[anyio.Event] = set()

    def __repr__(self) -> str:
        return f"SqliteQueue({self.path!r}, name={self.name!r}, lease={self.lease!r})"

    @staticmethod
    def _new_consumer() -> str:
        return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"

    # -- plumbing (these run in the worker thread) ------------------------------------------
    def _where(self, op: str) -> str:
        return f"SqliteQueue {op} (database {self.path!r}, queue {self.name!r})"

    def _error(self, op: str, exc: sqlite3.Error) -> LifecycleError:
        code = getattr(exc, "sqlite_errorcode", None)
        label = getattr(exc, "sqlite_errorname", None) or type(exc).__name__
        if code is not None and code & 0xFF in _TRANSIENT_CODES:
            return BrokerUnavailable(f"{self._where(op)}: database unavailable ({label}: {exc})")
        hint = {
            14: "check that the path names a file in an existing directory this process may write to",  # CANTOPEN
            8: "the file or its directory is read-only; SQLite needs to write the file and its -wal file",  # READONLY
            26: "the file exists but is not a SQLite database; give another path",  # NOTADB
            11: "the database file is damaged; restore it or give another path",  # CORRUPT
            23: "this process may not open the file; check its permissions",  # AUTH
        }.get(code & 0xFF if code is not None else -1, "")
        return LifecycleError(f"{self._where(op)}: {label}: {exc}" + (f"; {hint}" if hint else ""))

    def _connection(self) -> sqlite3.Connection:
        """The connection, opened (and the schema created) on first use. Called with
        ``_lock`` held."""
        if self._pid != os.getpid():
            # A forked child: the parent's connection must not be used (nor closed) here.
            self._conn, self._pid = None, os.getpid()
            self.consumer = self._given_consumer or self._new_consumer()
            self._held.clear()
        if self._conn is not None:
            return self._conn
        conn = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None, check_same_thread=False)
        try:
            conn.text_factory = bytes  # decoded here: text that is not UTF-8 must not raise in fetch
            mode = self._set_wal(conn)
            if mode.lower() not in (b"wal", b"memory"):
                raise LifecycleError(
                    f"{self._where('open')}: SQLite refused WAL mode (journal_mode is {_text(mode)}); the queue "
                    f"needs WAL so that readers and one writer work at once. Is the file on a network filesystem?"
                )
            conn.execute(f"PRAGMA synchronous={self.synchronous}")
            conn.execute("BEGIN IMMEDIATE")
            try:
                # A table of that name made by something else: say so, rather than
                # fail on a missing column in some later statement.
                columns = {_text(row[1]) for row in conn.execute("PRAGMA table_info(lifecycle_messages)")}
                if columns and not columns >= _MESSAGE_COLUMNS:
                    raise LifecycleError(
                        f"{self._where('open')}: table lifecycle_messages exists but lacks the columns "
                        f"{sorted(_MESSAGE_COLUMNS - columns)}; it belongs to something else: give another path"
                    )
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                if columns and "headers" not in columns:  # a queue file made before headers existed
                    conn.execute("ALTER TABLE lifecycle_messages ADD COLUMN headers TEXT")
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        return conn

    def _set_wal(self, conn: sqlite3.Connection) -> Any:
        """``PRAGMA journal_mode=WAL``, retried for up to ``busy_timeout``: while another
        connection opens the same new file, the switch can fail at once with "database
        is locked" (SQLite does not call its busy handler for it), which racing
        producers of a fresh queue hit."""
        deadline = time.monotonic() + self.busy_timeout
        while True:
            try:
                return conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.005)

    def _run(self, op: str, fn: Callable[[sqlite3.Connection], T], *, write: bool = True) -> T:
        """Run ``fn`` with the connection, in one ``BEGIN IMMEDIATE`` transaction when
        ``write``; sqlite3 errors become BrokerUnavailable or LifecycleError."""
        with self._lock:
            try:
                conn = self._connection()
                if not write:
                    return fn(conn)
                conn.execute("BEGIN IMMEDIATE")
                try:
                    result = fn(conn)
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
                return result
            except sqlite3.Error as exc:
                raise self._error(op, exc) from None

    async def _call(self, op: str, fn: Callable[[sqlite3.Connection], T], *, write: bool = True) -> T:
        try:
            backend = sniffio.current_async_library()
        except sniffio.AsyncLibraryNotFoundError:
            backend = ""
        if self._limiter is None or self._limiter[0] != backend:
            self._limiter = (backend, anyio.CapacityLimiter(1))  # a limiter belongs to one backend
        limiter = self._limiter[1]
        # Shielded: the thread runs to completion anyway, and its answer (a claimed
        # batch, a settle's outcome) must reach the caller, not vanish in a cancellation.
        with anyio.CancelScope(shield=True):
            result = await anyio.to_thread.run_sync(lambda: self._run(op, fn, write=write), limiter=limiter)
        return result

    def _wake(self) -> None:
        for event in self._waiters:
            event.set()
        self._waiters.clear()

    # -- set-up -------------------------------------------------------------------------------
    async def open(self) -> None:
        """Open the database (creating the file and tables if needed) and check that
        this process can write to it. Idempotent. ``LifecycleError`` for a path that
        cannot be opened or written or a file that is not a SQLite database;
        ``BrokerUnavailable`` if another process holds the write lock too long."""
        await self._call("open", lambda conn: None)

    # -- producing ----------------------------------------------------------------------------
    def _due(self, job: str | Job[..., Any], delay: float | None, at: float | None, attempt: int) -> float:
        if delay is not None and at is not None:
            raise ValueError(f"enqueue of {job!r}: give delay or at, not both (delay={delay!r}, at={at!r})")
        if type(attempt) is not int or attempt < 1:
            raise ValueError(f"enqueue of {job!r}: attempt must be an integer >= 1, got {attempt!r}")
        now = time.time()
        due = now + delay if delay is not None else at if at is not None else now
        if not math.isfinite(due):
            raise ValueError(f"enqueue of {job!r}: delay and at must be finite, got delay={delay!r}, at={at!r}")
        return due

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
        """Add a message; returns its id.

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
                nothing and return its id. The key row and the message row are written
                in one ``BEGIN IMMEDIATE`` transaction, so racing producers (of any
                process) make one message.
            dedup_ttl: seconds the key is remembered (default ``DEDUP_TTL``, a day).
        """
        due = self._due(job, delay, at, attempt)  # its own wording for these, kept
        ttl = check_enqueue(job, delay, at, attempt, dedup_key, dedup_ttl)
        if dedup_key is None or ttl is None:
            [message_id] = await self.enqueue_many(
                job, [payload or {}], delay=delay, at=at, attempt=attempt, headers=headers
            )
            return message_id
        key, remember = dedup_key, ttl
        header_text = encode_headers(job, headers)
        name, args = job_name(job, payload)
        body = encode_payload(args)
        now = time.time()
        created = False

        def insert_once(conn: sqlite3.Connection) -> str:
            nonlocal created
            held = conn.execute(
                "SELECT message_id FROM lifecycle_dedup WHERE queue = ? AND key = ? AND expires_at > ?",
                (self.name, key, now),
            ).fetchone()
            if held is not None:
                return _text(held[0])
            conn.execute("DELETE FROM lifecycle_dedup WHERE queue = ? AND expires_at <= ?", (self.name, now))
            cursor = conn.execute(
                "INSERT INTO lifecycle_messages (queue, job, payload, attempt, enqueued_at, run_at, headers) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (self.name, name, body, attempt, now, max(due, now), header_text),
            )
            message_id = str(cursor.lastrowid)
            conn.execute(
                "INSERT INTO lifecycle_dedup (queue, key, message_id, expires_at) VALUES (?, ?, ?, ?)",
                (self.name, key, message_id, now + remember),
            )
            created = True
            return message_id

        message_id = await self._call(f"enqueue of job {name!r}", insert_once)
        if created and due <= now:
            self._wake()
        return message_id

    async def cancel(self, message_id: str) -> bool:
        """See ``Queue.cancel``: deletes the row if no consumer holds it."""
        try:
            row_id = int(message_id)
        except ValueError:
            return False

        def delete(conn: sqlite3.Connection) -> bool:
            cursor = conn.execute(
                "DELETE FROM lifecycle_messages WHERE queue = ? AND id = ? AND owner IS NULL", (self.name, row_id)
            )
            return cursor.rowcount == 1

        return await self._call(f"cancel of message {message_id!r}", delete)

    async def enqueue_many(
        self,
        job: str | Job[..., Any],
        payloads: Sequence[Mapping[str, Any]],
        *,
        delay: float | None = None,
        at: float | None = None,
        attempt: int = 1,
        headers: Mapping[str, str] | None = None,
    ) -> list[str]:
        """Add one message per payload, all in one transaction (all or none); returns
        their ids in order. Much faster than one ``enqueue`` per message. Arguments as
        for ``enqueue``; every payload is validated and encoded before any is written."""
        due = self._due(job, delay, at, attempt)
        header_text = encode_headers(job, headers)
        rows = []
        for payload in payloads:
            name, args = job_name(job, payload)
            rows.append((name, encode_payload(args)))
        now = time.time()

        def insert(conn: sqlite3.Connection) -> list[str]:
            ids = []
            for name, body in rows:
                cursor = conn.execute(
                    "INSERT INTO lifecycle_messages (queue, job, payload, attempt, enqueued_at, run_at, headers) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (self.name, name, body, attempt, now, max(due, now), header_text),
                )
                ids.append(str(cursor.lastrowid))
            return ids

        label = job if isinstance(job, str) else job.name
        ids = await self._call(f"enqueue of job {label!r}", insert)
        if due <= now:
            self._wake()
        return ids

    # -- consuming ----------------------------------------------------------------------------
    def _next_due(self, conn: sqlite3.Connection, held: set[str]) -> float | None:
        """Epoch seconds when the next message falls due or the next lease of another
        holder expires (ours, still running here, are not ours to take over)."""
        (ready,) = conn.execute(
            "SELECT MIN(run_at) FROM lifecycle_messages WHERE queue = ? AND owner IS NULL", (self.name,)
        ).fetchone()
        due = ready if isinstance(ready, int | float) else None
        for message_id, until in conn.execute(
            "SELECT id, lease_until FROM lifecycle_messages WHERE queue = ? AND owner IS NOT NULL "
            "ORDER BY lease_until LIMIT ?",
            (self.name, len(held) + 1),
        ):
            if str(message_id) not in held and isinstance(until, int | float):
                due = until if due is None else min(due, until)
                break
        return due

    def _claim(self, conn: sqlite3.Connection, limit: int, held: set[str]) -> tuple[list[Delivery], float | None]:
        """Claim up to ``limit`` messages: expired leases first, then ready ones. Runs
        in autocommit mode: a cheap read first, the write lock only if there is work."""
        due = self._next_due(conn, held)
        now = time.time()
        if due is None or due > now:
            return [], due
        claim = next(self._claims)
        lease_until = now + (self.lease or 0)
        rows: list[Any] = []
        conn.execute("BEGIN IMMEDIATE")
        try:
            expired = [
                message_id
                for (message_id,) in conn.execute(
                    "SELECT id FROM lifecycle_messages WHERE queue = ? AND owner IS NOT NULL AND lease_until <= ? "
                    "ORDER BY lease_until LIMIT ?",
                    (self.name, now, limit + len(held)),
                )
                if str(message_id) not in held
            ][:limit]
            if expired:
                marks = ", ".join("?" * len(expired))
                rows += conn.execute(
                    f"UPDATE lifecycle_messages SET owner = ?, claim = ?, lease_until = ?, "
                    f"deliveries = deliveries + 1 WHERE id IN ({marks}) {_RETURNING}",
                    (self.consumer, claim, lease_until, *expired),
                ).fetchall()
                LOG.info("queue.reclaimed", queue=self.name, consumer=self.consumer, ids=[str(i) for i in expired])
            if len(rows) < limit:
                rows += conn.execute(
                    "UPDATE lifecycle_messages SET owner = ?, claim = ?, lease_until = ?, "
                    "deliveries = deliveries + 1 WHERE id IN (SELECT id FROM lifecycle_messages "
                    "WHERE queue = ? AND owner IS NULL AND run_at <= ? ORDER BY run_at, id LIMIT ?) "
                    f"{_RETURNING}",
                    (self.consumer, claim, lease_until, self.name, now, limit - len(rows)),
                ).fetchall()
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        rows.sort(key=lambda row: row[0])
        deliveries = [decode_row(row, claim) for row in rows]
        return deliveries, None if deliveries else self._next_due(conn, held)

    async def receive(self, limit: int, timeout: float) -> list[Delivery]:
        """Up to ``limit`` messages: leases expired with another consumer first (a
        delivery counted), then due ones, oldest first. Waits up to ``timeout`` seconds
        for the first, looking every ``poll_interval`` (sooner when a delayed message
        falls due, or when this object enqueues one)."""
        if limit < 1:
            return []
        deadline = time.monotonic() + max(timeout, 0.0)
        while True:
            held = set(self._held)  # a snapshot: the thread must not see it change
            claim = functools.partial(self._claim, limit=limit, held=held)
            batch, due = await self._call("receive", claim, write=False)
            if batch:
                # Here, not in the thread: only the event loop touches _held. The call
                # is shielded, so a claimed batch always gets this far.
                self._held.update(delivery.id for delivery in batch)
                return batch
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return []
            wait = min(remaining, self.poll_interval)
            if due is not None:
                wait = min(wait, max(due - time.time(), 0.001))
            event = anyio.Event()
            self._waiters.add(event)
            try:
                with anyio.move_on_after(wait):
                    await event.wait()
            finally:
                self._waiters.discard(event)

    # -- settling -----------------------------------------------------------------------------
    def _owned(self, delivery: Delivery) -> tuple[str, int, str]:
        """The owner check's ``WHERE`` clause and its arguments."""
        claim = delivery.raw.claim if isinstance(delivery.raw, _Handle) else -1
        return "id = ? AND queue = ? AND owner = ? AND claim = ?", claim, delivery.id

    async def _settle(self, op: str, delivery: Delivery, fn: _Settle) -> bool:
        where, claim, message_id = self._owned(delivery)
        args = (int(message_id) if message_id.isdigit() else -1, self.name, self.consumer, claim)
        try:
            settled = await self._call(
                f"{op} of message {delivery.id} (job {delivery.job!r})", lambda conn: fn(conn, where, args)
            )
        except BrokerUnavailable:
            raise  # still ours: the worker settles it again when the database answers
        except BaseException:
            self._held.discard(delivery.id)
            raise
        self._held.discard(delivery.id)
        if not settled:
            LOG.debug("queue.settle_skipped", op=op, job=delivery.job, job_id=delivery.id, consumer=self.consumer)
        return settled

    @staticmethod
    def _move(conn: sqlite3.Connection, where: str, args: tuple[Any, ...], copy: str, values: tuple[Any, ...]) -> bool:
        """Copy the owned row as a new message (``copy``: the SELECT list of the new
        row's columns) and delete it; False (nothing changed) if it is not owned."""
        cursor = conn.execute(
            "INSERT INTO lifecycle_messages (queue, job, payload, attempt, deliveries, enqueued_at, run_at, "
            f"last_error, headers) SELECT {copy}, headers FROM lifecycle_messages WHERE {where}",
            (*values, *args),
        )
        if cursor.rowcount != 1:
            return False
        conn.execute(f"DELETE FROM lifecycle_messages WHERE {where}", args)
        return True

    async def ack(self, delivery: Delivery) -> bool:
        """Done: delete the message, if the delivery is still this consumer's (else False)."""

        def ack(conn: sqlite3.Connection, where: str, args: tuple[Any, ...]) -> bool:
            return conn.execute(f"DELETE FROM lifecycle_messages WHERE {where}", args).rowcount == 1

        return await self._settle("ack", delivery, ack)

    async def retry(self, delivery: Delivery, delay: float, error: str) -> bool:
        """Re-enqueue as attempt + 1 after ``delay`` seconds (the payload exactly as it
        was stored) and delete this delivery, in one transaction; ``error`` is kept as
        ``last_error`` (first 500 characters)."""
        if delivery.malformed is not None:
            raise ValueError(
                f"retry of message {delivery.id}: a malformed message ({delivery.malformed}) cannot be "
                f"retried; dead-letter it"
            )
        run_at = time.time() + max(delay, 0.0)

        def retry(conn: sqlite3.Connection, where: str, args: tuple[Any, ...]) -> bool:
            copy = "queue, job, payload, attempt + 1, 0, enqueued_at, ?, ?"
            return self._move(conn, where, args, copy, (run_at, error[:500]))

        settled = await self._settle("retry", delivery, retry)
        if settled and delay <= 0:
            self._wake()
        return settled

    async def release(self, delivery: Delivery) -> bool:
        """Put it back at once, unchanged (same attempt, enqueued_at and place in line),
        as a new row, and delete this delivery, in one transaction: no delivery counted."""

        def release(conn: sqlite3.Connection, where: str, args: tuple[Any, ...]) -> bool:
            copy = "queue, job, payload, attempt, MAX(deliveries - 1, 0), enqueued_at, run_at, last_error"
            return self._move(conn, where, args, copy, ())

        settled = await self._settle("release", delivery, release)
        if settled:
            self._wake()
        return settled

    async def dead_letter(self, delivery: Delivery, record: Mapping[str, Any]) -> bool:
        """Add ``record`` (as JSON) to the dead letters and delete this delivery, in one
        transaction. A malformed delivery's original columns are kept too, exactly as
        they were stored (``raw:<column>`` in ``dead_letters``)."""
        text = json.dumps(dict(record), default=repr, ensure_ascii=False)
        raw: tuple[Any, ...] = (None,) * len(RAW_COLUMNS)
        if delivery.malformed is not None and isinstance(delivery.raw, _Handle):
            raw = tuple(delivery.raw.columns.get(column) for column in RAW_COLUMNS)
        failed_at = time.time()

        def dead_letter(conn: sqlite3.Connection, where: str, args: tuple[Any, ...]) -> bool:
            if conn.execute(f"DELETE FROM lifecycle_messages WHERE {where}", args).rowcount != 1:
                return False
            conn.execute(
                "INSERT INTO lifecycle_dead_letters (queue, record, raw_job, raw_payload, raw_attempt, "
                "raw_enqueued_at, failed_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (self.name, text, *raw, failed_at),
            )
            return True

        return await self._settle("dead_letter", delivery, dead_letter)

    async def renew(self, deliveries: Sequence[Delivery]) -> list[str]:
        """Extend the leases of those deliveries this consumer still owns, by ``lease``
        seconds from now (no delivery counted); returns the ids of the others (lost)."""
        if not deliveries:
            return []
        checks = [(delivery.id, self._owned(delivery)) for delivery in deliveries]

        def renew(conn: sqlite3.Connection) -> list[str]:
            until = time.time() + (self.lease or 0)
            lost = []
            for message_id, (where, claim, _) in checks:
                args = (int(message_id) if message_id.isdigit() else -1, self.name, self.consumer, claim)
                cursor = conn.execute(f"UPDATE lifecycle_messages SET lease_until = ? WHERE {where}", (until, *args))
                if cursor.rowcount != 1:
                    lost.append(message_id)
            return lost

        lost = await self._call(f"renew of {len(checks)} message(s)", renew)
        self._held.difference_update(lost)
        return lost

    # -- dead letters ---------------------------------------------------------------------------

    async def dead_letters(self, count: int = 100, before: str | None = None) -> list[dict[str, Any]]:
        """Dead letters, newest first: at most ``count``, older than the dead letter
        ``before`` (exclusive) when given. Each is the record the worker wrote, plus
        its ``dead_letter_id`` (for ``before``, ``replay`` and ``purge``) and, for a
        malformed message, its original columns as ``raw:<column>`` (text as bytes)."""
        limit = _ids([before], "dead_letters")[0] if before is not None else None
        if count < 1:
            return []

        def select(conn: sqlite3.Connection) -> list[Any]:
            return conn.execute(
                "SELECT id, record, raw_job, raw_payload, raw_attempt, raw_enqueued_at FROM lifecycle_dead_letters "
                "WHERE queue = ? AND id < ? ORDER BY id DESC LIMIT ?",
                (self.name, limit if limit is not None else 2**63 - 1, count),
            ).fetchall()

        return [dead_record_from_row(row) for row in await self._call("dead_letters", select, write=False)]

    async def replay(self, ids: Sequence[str]) -> int:
        """Put these dead letters back on the queue as new messages (attempt 1, same job
        and payload) and delete them from the dead letters, in one transaction. Missing
        ids and dead letters with nothing to run (malformed: no job or payload) are
        skipped; returns how many were replayed."""
        numbers = _ids(ids, "replay")

        def replay(conn: sqlite3.Connection) -> int:
            replayed = 0
            now = time.time()
            for dead_id in numbers:
                row = conn.execute(
                    "SELECT id, record, NULL, NULL, NULL, NULL FROM lifecycle_dead_letters WHERE id = ? AND queue = ?",
                    (dead_id, self.name),
                ).fetchone()
                if row is None:
                    continue
                record = dead_record_from_row(row)
                job, payload = record.get("job"), record.get("payload")
                if record.get("reason") == "malformed" or not isinstance(job, str) or not job:
                    continue  # nothing to run; its raw columns stay for a human
                if not isinstance(payload, dict):
                    continue
                headers = record_headers(record)
                conn.execute(
                    "INSERT INTO lifecycle_messages (queue, job, payload, attempt, enqueued_at, run_at, headers) "
                    "VALUES (?, ?, ?, 1, ?, ?, ?)",
                    (self.name, job, encode_payload(payload), now, now, encode_headers(job, headers)),
                )
                conn.execute("DELETE FROM lifecycle_dead_letters WHERE id = ?", (dead_id,))
                replayed += 1
            return replayed

        replayed = await self._call(f"replay of {len(numbers)} dead letter(s)", replay)
        if replayed:
            self._wake()
        return replayed

    async def purge(self, ids: Sequence[str] | None = None) -> int:
        """Delete these dead letters, or all of this queue's (``ids=None``); returns how many."""
        numbers = None if ids is None else _ids(ids, "purge")

        def purge(conn: sqlite3.Connection) -> int:
            if numbers is None:
                return conn.execute("DELETE FROM lifecycle_dead_letters WHERE queue = ?", (self.name,)).rowcount
            deleted = 0
            for dead_id in set(numbers):
                cursor = conn.execute(
                    "DELETE FROM lifecycle_dead_letters WHERE id = ? AND queue = ?", (dead_id, self.name)
                )
                deleted += cursor.rowcount
            return deleted

        return await self._call("purge", purge)

    # -- inspection -----------------------------------------------------------------------------
    async def counts(self) -> dict[str, int]:
        """How many messages are ``ready``, ``delayed`` (due later), ``leased`` (with a
        consumer) and ``dead`` (dead letters), for monitoring and tests."""

        def count(conn: sqlite3.Connection) -> dict[str, int]:
            now = time.time()
            ready, delayed, leased = conn.execute(
                "SELECT COALESCE(SUM(owner IS NULL AND run_at <= ?), 0), "
                "COALESCE(SUM(owner IS NULL AND run_at > ?), 0), COALESCE(SUM(owner IS NOT NULL), 0) "
                "FROM lifecycle_messages WHERE queue = ?",
                (now, now, self.name),
            ).fetchone()
            dead_letters = "SELECT COUNT(*) FROM lifecycle_dead_letters WHERE queue = ?"
            (dead,) = conn.execute(dead_letters, (self.name,)).fetchone()
            return {"ready": ready, "delayed": delayed, "leased": leased, "dead": dead}

        return await self._call("counts", count, write=False)

    async def close(self) -> None:
        """Close the connection (idempotent; a later call opens a new one)."""

        def close() -> None:
            with self._lock:
                conn, self._conn = self._conn, None
                if conn is not None and self._pid == os.getpid():
                    with contextlib.suppress(sqlite3.Error):
                        conn.close()

        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(close)
