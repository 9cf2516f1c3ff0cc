"""NATS JetStream as a queue: a work-queue stream and one durable pull consumer shared
by every worker, on nats-py's asyncio client.

JetStream settles a message by its stream sequence alone: an ack, a ``+WPI`` (work in
progress) or a term from a consumer whose ``ack_wait`` ran out is accepted even when
the message has since been redelivered to another consumer (checked against
nats-server 2.9: every late ack is answered as a good one). The server cannot say
whose delivery it was, so the owner check of the queue contract is kept here, by a
lease clock per delivery. Invariants:

- Three streams per queue: ``stream`` (retention ``workqueue``, subject ``subject``) for
  messages due now; ``{stream}_DELAYED`` for later ones; ``{stream}_DEAD`` (limits
  retention) for dead letters, read newest first by sequence.
- Receiving is a pull request (``$JS.API.CONSUMER.MSG.NEXT``) of the durable consumer,
  whose ``ack_wait`` is ``lease``. Each request has a reply subject of its own, so its
  end (``404``/``408``) is told from a late message of an earlier one; a message that
  arrives after its request was given up waits in a buffer with its arrival time, and
  is handed out only while most of its lease is left.
- A delivery is this consumer's while its lease clock runs: from the pull request (or
  its arrival) to ``lease`` seconds after, moved on by each ``renew`` (``+WPI``,
  confirmed by a flush). Once it ran out, the server may have handed the message to
  another consumer, so ``renew`` reports it lost and every settle returns False
  without touching the broker. That is conservative: when nobody took it, the server
  redelivers it after ``ack_wait`` (at least once, never a settle of another's run).
  A settle repeated by the same consumer returns False too (it is remembered here);
  a repeat from another process is harmless on the broker (an ack of an acked
  message is a no-op, republishes carry a ``Nats-Msg-Id``).
- Attempts are a header (``Lifecycle-Attempt``), deliveries the server's
  ``num_delivered``. A retry or a release cannot be a ``nak``: a nak counts a delivery
  and cannot change a header. So both republish the message (retry: attempt + 1;
  release: unchanged) with a ``Nats-Msg-Id`` made of the sequence and delivery count,
  then ack the delivery: a repeat after a lost answer is de-duplicated by the server.
- Delayed messages (``enqueue(delay=…)``, ``retry(delay>0)``) wait in the delayed
  stream with a ``Lifecycle-Not-Before`` header; ``receive`` moves due ones into the
  work stream (de-duplicated by their delayed sequence) and ``nak``s the others with
  the time left, so they come back when due. Their naks count deliveries in the
  delayed stream only: a promoted message starts with a clean count.
- Dead letters (``term`` of the delivery after the record was stored) keep a malformed
  message's body and headers as they arrived (``raw:payload`` bytes, ``raw:headers``).
- ``max_deliver`` (None: unlimited): the server's ``MaxDeliver`` is one more, so that
  the delivery past the limit reaches ``receive``, which dead-letters it (reason
  ``max_deliver``) instead of leaving it in the stream for ever.
- A server killed -9 can come back with messages its consumer had acknowledged still
  in the work stream (its deletions were not on disk, the consumer's ack floor was):
  they would never be delivered, and never leave. Every (re)connection, and every
  ``_SWEEP_EVERY`` seconds of a ``receive`` that found nothing, purges the streams
  below their consumer's ack floor, where every message was acknowledged.
- Transient failures (connection lost, timeout, no responders) raise
  ``BrokerUnavailable``; nats-py reconnects by itself and keeps the subscriptions
  (after a reconnection the streams and consumers are checked again: the server may
  have restarted without them)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import math
import re
import time
import uuid
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, unquote, urlsplit, urlunsplit

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
    import_client,
    job_name,
    record_headers,
    require_asyncio,
)
from ._url import _options

if TYPE_CHECKING:
    from nats.aio.client import Client
    from nats.aio.msg import Msg
    from nats.aio.subscription import Subscription
    from nats.js import JetStreamContext

    from .._job import Job

JOB = "Lifecycle-Job"
ATTEMPT = "Lifecycle-Attempt"
ENQUEUED_AT = "Lifecycle-Enqueued-At"
NOT_BEFORE = "Lifecycle-Not-Before"
LAST_ERROR = "Lifecycle-Last-Error"
HEADERS = "Lifecycle-Headers"  # the enqueue's own headers, as one JSON text (no newline can occur in it)
MSG_ID = "Nats-Msg-Id"
_MAX_WAIT = 1.0  # seconds; a pull request never lingers longer (due delayed ones are moved meanwhile)
_PROMOTE_EVERY = 0.1  # seconds between passes over the delayed stream
_SWEEP_EVERY = 10.0  # seconds between sweeps of an idle queue (``NatsQueue._sweep_acknowledged``)
_PROMOTE_BATCH = 256
_MAX_ATTEMPT = re.compile(r"[1-9][0-9]{0,17}")
_NAME = re.compile(r"[A-Za-z0-9_-]{1,200}")
_SUBJECT = re.compile(r"[A-Za-z0-9_$-]+(\.[A-Za-z0-9_$-]+)*")


def _nats() -> Any:
    import_client("nats.js.errors", "NatsQueue", "nats")  # the submodule too: its error classes
    return import_client("nats", "NatsQueue", "nats")


_Target = tuple[str, str, bytes, dict[str, str]]  # stream, subject, body, headers of a republish


@dataclass(slots=True)
class _Held:
    """A delivery handed out by this consumer, and when its lease runs out here."""

    delivery: Delivery
    expires: float  # time.monotonic()


def decode_message(message_id: str, headers: Mapping[str, str] | None, body: bytes, deliveries: int) -> Delivery:
    """A work-stream message as a ``Delivery``; one that does not decode is returned with
    ``malformed`` set (``"<header or payload>: <why>"``).

    Args:
        message_id: the message's stream sequence, as text.
        headers: its headers (None: it has none).
        body: its body, the payload's JSON.
        deliveries: the server's ``num_delivered``.
    Required: the ``Lifecycle-Job`` header (non-empty) and a body ``decode_payload``
    accepts; optional: ``Lifecycle-Attempt`` (a positive integer, default 1),
    ``Lifecycle-Enqueued-At`` (finite, non-negative epoch seconds, default 0) and
    ``Lifecycle-Headers`` (see ``decode_headers``)."""
    fields = dict(headers or {})

    def bad(why: str) -> Delivery:
        return Delivery(message_id, "", None, 1, deliveries, 0.0, malformed=why)

    name = fields.get(JOB, "")
    if not name.strip():
        return bad(f"{JOB}: missing" if JOB not in fields else f"{JOB}: empty")
    attempt_raw = fields.get(ATTEMPT, "1")
    if not _MAX_ATTEMPT.fullmatch(attempt_raw):
        return bad(f"{ATTEMPT}: not a positive integer: {attempt_raw[:40]!r}")
    enqueued_raw = fields.get(ENQUEUED_AT, "0")
    try:
        enqueued_at = float(enqueued_raw)
    except ValueError:
        return bad(f"{ENQUEUED_AT}: not a number: {enqueued_raw[:40]!r}")
    if not math.isfinite(enqueued_at) or enqueued_at < 0:
        return bad(f"{ENQUEUED_AT}: not a finite time in seconds since the epoch: {enqueued_raw[:40]!r}")
    try:
        payload = decode_payload(body)
    except MalformedMessage as exc:
        return bad(f"payload: {exc}")
    try:
        decoded_headers = decode_headers(fields.get(HEADERS))
    except MalformedMessage as exc:
        return bad(f"{HEADERS}: {exc}")
    return Delivery(message_id, name, payload, int(attempt_raw), deliveries, enqueued_at, headers=decoded_headers)


class _Puller:
    """Pull requests of one durable consumer, each with a reply subject of its own; the
    messages they bring wait in ``buffer`` with their arrival time."""

    def __init__(self, api_subject: str, inbox: str) -> None:
        self.api_subject = api_subject
        self.inbox = inbox
        self.buffer: deque[tuple[Msg, float]] = deque()
        self.ended: set[int] = set()  # request numbers answered with a status (done)
        self.consumer_gone = False
        self.sub: Subscription | None = None
        self._serial = 0
        self._wake = asyncio.Event()

    async def handle(self, msg: Msg) -> None:
        status = (msg.headers or {}).get("Status")
        if status is None:
            self.buffer.append((msg, time.monotonic()))
        elif status != "100":  # 100: a heartbeat
            with contextlib.suppress(ValueError):
                self.ended.add(int(msg.subject.rpartition(".")[2]))
            if status == "409" and "Deleted" in (msg.headers or {}).get("Description", ""):
                self.consumer_gone = True
        self._wake.set()

    async def pull(self, nc: Client, limit: int, wait: float, answer_timeout: float) -> None:
        """Ask for up to ``limit`` messages, waiting up to ``wait`` seconds for the first
        (0: only those ready now); return once ``limit`` are buffered, the request
        ended, or its time is up."""
        self._serial += 1
        serial = self._serial
        request: dict[str, Any] = {"batch": limit}
        if wait < 0.05:
            request["no_wait"] = True
            deadline = time.monotonic() + answer_timeout
        else:
            request["expires"] = int(wait * 1e9)
            deadline = time.monotonic() + wait + answer_timeout
        self.ended.discard(serial)
        self._wake.clear()
        await nc.publish(self.api_subject, json.dumps(request).encode(), reply=f"{self.inbox}.{serial}")
        while len(self.buffer) < limit and serial not in self.ended:
            if self.buffer:
                # Messages of a batch arrive back to back: a moment more gathers them.
                deadline = min(deadline, time.monotonic() + 0.005)
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._wake.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), left)
        self.ended.discard(serial)


class NatsQueue:
    """A queue on NATS JetStream (see the module docstring). asyncio only.

    Construction does no I/O; ``open()`` (the worker calls it at start-up) connects and
    creates or checks the streams and the consumer. Producers may ``enqueue`` without
    ``open`` (the streams must then exist).

    Args:
        url: the server, ``nats://[user:password@]host:port`` (``tls://`` for TLS).
            Its password never appears in logs or errors.
        stream: the work stream's name (letters, digits, ``-`` and ``_``);
            ``{stream}_DELAYED`` and ``{stream}_DEAD`` go with it.
        subject: the subject producers publish to and the work stream holds.
        durable: the durable pull consumer all workers of this queue share.
        lease: seconds (> 0) a delivery stays with its consumer without ``renew``: the
            consumer's ``ack_wait``.
        max_deliver: deliveries after which a message is dead-lettered by ``receive``
            (reason ``max_deliver``); None (the default) leaves it to the worker's
            ``max_deliveries``.
        connect_timeout: seconds (> 0) to connect before ``BrokerUnavailable``.
        request_timeout: seconds (> 0) a JetStream request (publish, ack, stream
            command) may take before ``BrokerUnavailable``.
        duplicate_window: seconds (> 0) the work stream remembers ``Nats-Msg-Id``s
            (set when the stream is created).
        dedup_max_age: seconds (> 0) the stream of ``dedup_key``s keeps a key at most
            (its ``max_age``, set when it is created; a key's own ``dedup_ttl`` is cut
            to it). Default a week: one small message per key lives that long.
        name: the connection's name as the server shows it; default ``lifecycle-<stream>``.
    """

    def __init__(
        self,
        url: str = "nats://127.0.0.1:4222",
        *,
        stream: str = "JOBS",
        subject: str = "jobs",
        durable: str = "workers",
        lease: float = 30.0,
        max_deliver: int | None = None,
        connect_timeout: float = 5.0,
        request_timeout: float = 5.0,
        duplicate_window: float = 120.0,
        name: str | None = None,
        dedup_max_age: float = 7 * 86400.0,
    ) -> None:
        require_asyncio("NatsQueue", "nats-py's client")
        for label, value in (
            ("lease", lease),
            ("connect_timeout", connect_timeout),
            ("request_timeout", request_timeout),
            ("duplicate_window", duplicate_window),
            ("dedup_max_age", dedup_max_age),
        ):
            if not value > 0:
                raise ValueError(f"NatsQueue {label} must be positive, got {value!r}")
        if max_deliver is not None and max_deliver < 1:
            raise ValueError(f"NatsQueue max_deliver must be >= 1 or None, got {max_deliver!r}")
        for label, text in (("stream", stream), ("durable", durable)):
            if not _NAME.fullmatch(text):
                raise ValueError(f"NatsQueue {label} {text!r}: use letters, digits, '-' and '_' only")
        if not _SUBJECT.fullmatch(subject):
            raise ValueError(f"NatsQueue subject {subject!r}: use dot-separated tokens without wildcards")
        self.url = redact(url)  # the only form kept in the open: it is printed
        self._url = url
        self._secrets = _url_secrets(url)
        self.stream = stream
        self.subject = subject
        self.durable = durable
        self.lease: float | None = lease
        self.max_deliver = max_deliver
        self.delayed_stream = f"{stream}_DELAYED"
        self.delayed_subject = f"_lifecycle.{stream}.delayed"
        self.dead_letter_stream = f"{stream}_DEAD"
        self.dead_letter_subject = f"_lifecycle.{stream}.dead"
        self.connect_timeout = connect_timeout
        self.request_timeout = request_timeout
        self.duplicate_window = duplicate_window
        self.dedup_stream = f"{stream}_DEDUP"
        self.dedup_subject = f"_lifecycle.{stream}.dedup"
        self.dedup_max_age = dedup_max_age
        self._dedup_ready = False
        self.name = name or f"lifecycle-{stream}"
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._connecting: asyncio.Lock | None = None
        self._ready = False
        self._work: _Puller | None = None
        self._delayed: _Puller | None = None
        self._last_promote = -math.inf
        self._last_sweep = -math.inf
        self._held: dict[str, _Held] = {}

    # -- plumbing -----------------------------------------------------------------------
    def _where(self, op: str) -> str:
        return f"NatsQueue {op} (stream {self.stream!r}, consumer {self.durable!r}, url {self.url})"

    def _scrub(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return redact(text)

    @contextlib.contextmanager
    def _errors(self, op: str) -> Iterator[None]:
        """Transient failures become BrokerUnavailable, misconfiguration a clear
        LifecycleError; texts pass through _scrub."""
        nats = _nats()
        try:
            yield
        except LifecycleError:
            raise
        except nats.errors.AuthorizationError as exc:
            raise LifecycleError(
                f"{self._where(op)}: NATS refused the credentials: {self._scrub(str(exc))}; "
                f"check the user name and password in the URL"
            ) from None
        except nats.js.errors.ServiceUnavailableError as exc:
            raise self._unavailable(op, exc) from exc
        except nats.js.errors.APIError as exc:
            raise LifecycleError(f"{self._where(op)}: JetStream answered an error: {self._scrub(str(exc))}") from None
        except (TimeoutError, nats.errors.Error, OSError) as exc:
            # Timeouts, a closed or reconnecting connection, no responders (JetStream
            # restarting, or a cluster electing a leader), a full reconnect buffer.
            raise self._unavailable(op, exc) from exc

    def _unavailable(self, op: str, exc: BaseException) -> BrokerUnavailable:
        text = self._scrub(str(exc)) or "no answer"
        return BrokerUnavailable(f"{self._where(op)}: NATS unavailable: {type(exc).__name__}: {text}")

    async def _client(self) -> tuple[Client, JetStreamContext]:
        """The connection, made on first use; nats-py reconnects it by itself."""
        require_asyncio("NatsQueue", "nats-py's client")
        if self._nc is not None and self._js is not None and not self._nc.is_closed:
            return self._nc, self._js
        nats = _nats()
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self._nc is not None and self._js is not None and not self._nc.is_closed:
                return self._nc, self._js
            parts = urlsplit(self._url)
            if parts.scheme not in ("nats", "tls") or not parts.hostname:
                raise LifecycleError(
                    f"{self._where('open')}: invalid NATS URL; expected nats://[user:password@]host:port "
                    f"or tls://host:port"
                )

            errors: list[Exception] = []

            async def on_error(exc: Exception) -> None:
                errors.append(exc)
                error = self._scrub(f"{type(exc).__name__}: {exc}")
                LOG.warning("queue.connection_error", stream=self.stream, error=error)

            async def on_disconnected() -> None:
                LOG.warning("queue.disconnected", stream=self.stream, url=self.url)

            async def on_reconnected() -> None:
                LOG.info("queue.reconnected", stream=self.stream, url=self.url)
                # The server may have restarted: check the streams and consumers again,
                # and sweep what its store brought back (``_sweep_acknowledged``).
                self._ready = False

            with self._errors("connect"):
                try:
                    nc = await asyncio.wait_for(
                        nats.connect(
                            servers=[self._url],
                            name=self.name,
                            connect_timeout=self.connect_timeout,
                            allow_reconnect=True,
                            max_reconnect_attempts=-1,
                            reconnect_time_wait=0.25,
                            ping_interval=5,
                            max_outstanding_pings=3,
                            error_cb=on_error,
                            disconnected_cb=on_disconnected,
                            reconnected_cb=on_reconnected,
                        ),
                        self.connect_timeout * 2,
                    )
                except (nats.errors.Error, TimeoutError) as exc:
                    # nats-py keeps trying a server that refuses the credentials (it
                    # reconnects for ever), so the refusal is known from error_cb.
                    refused = [e for e in [exc, *errors] if "authorization" in str(e).lower()]
                    if refused:
                        raise nats.errors.AuthorizationError() from exc
                    raise
            self._nc, self._js = nc, nc.jetstream(timeout=self.request_timeout)
            self._ready = False
            return nc, self._js

    async def _ensure(self) -> tuple[Client, JetStreamContext]:
        """Connected, with the streams, the consumers and the pull subscriptions."""
        nc, js = await self._ensure_streams()
        if self._work is not None and self._delayed is not None and not self._work.consumer_gone:
            return nc, js
        nats = _nats()
        for puller in (self._work, self._delayed):
            if puller is not None and puller.sub is not None:
                with contextlib.suppress(nats.errors.Error):
                    await puller.sub.unsubscribe()
        self._work = await self._subscribe(nc, self.stream)
        self._delayed = await self._subscribe(nc, self.delayed_stream)
        return nc, js

    async def _ensure_streams(self) -> tuple[Client, JetStreamContext]:
        """Connected, with the three streams and the two durable consumers (created
        once per connection; a producer needs them too, to publish to)."""
        nc, js = await self._client()
        if self._ready and not (self._work is not None and self._work.consumer_gone):
            return nc, js
        nats = _nats()
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, RetentionPolicy, StorageType, StreamConfig

        streams = (
            (self.stream, self.subject, RetentionPolicy.WORK_QUEUE),
            (self.delayed_stream, self.delayed_subject, RetentionPolicy.WORK_QUEUE),
            (self.dead_letter_stream, self.dead_letter_subject, RetentionPolicy.LIMITS),
        )
        for name, subject, retention in streams:
            try:
                info = await js.stream_info(name)
            except nats.js.errors.NotFoundError:
                config = StreamConfig(
                    name=name,
                    subjects=[subject],
                    retention=retention,
                    storage=StorageType.FILE,
                    duplicate_window=self.duplicate_window,
                )
                await js.add_stream(config)
                continue
            if info.config.retention != retention or subject not in (info.config.subjects or []):
                raise LifecycleError(
                    f"{self._where('open')}: stream {name!r} exists with retention "
                    f"{getattr(info.config.retention, 'value', info.config.retention)!r} and subjects "
                    f"{info.config.subjects!r}, but the queue needs retention {retention.value!r} on subject "
                    f"{subject!r}; choose another stream name or delete that stream"
                )
        server_max = -1 if self.max_deliver is None else self.max_deliver + 1
        for name, ack_wait, max_deliver in (
            (self.stream, self.lease or 30.0, server_max),
            (self.delayed_stream, 30.0, -1),
        ):
            await js.add_consumer(
                name,
                ConsumerConfig(
                    durable_name=self.durable,
                    ack_policy=AckPolicy.EXPLICIT,
                    deliver_policy=DeliverPolicy.ALL,
                    ack_wait=ack_wait,
                    max_deliver=max_deliver,
                    max_ack_pending=-1,
                    max_waiting=4096,
                ),
            )
        await self._sweep_acknowledged(js)
        if self._work is not None:
            self._work.consumer_gone = False
        self._ready = True
        return nc, js

    async def _sweep_acknowledged(self, js: JetStreamContext) -> None:
        """Delete the messages of the work and delayed streams that their consumer has
        acknowledged already but the stream still holds.

        A work-queue stream deletes a message when it is acknowledged, but a server
        killed -9 can come back with the consumer's acknowledgements and without the
        deletions (seen with nats-server 2.9: the consumer's ack floor survived, a
        thousand acknowledged messages came back to the stream). The consumer never
        delivers them again, so they would sit in the stream for ever, counted as
        backlog. Every message up to the consumer's ack floor was acknowledged (that is
        what the floor means), so purging below it removes only those. Done on every
        (re)connection and every ``_SWEEP_EVERY`` seconds of an idle ``receive``: the
        acknowledgements of messages redelivered after the restart can leave some
        behind too."""
        self._last_sweep = time.monotonic()
        for name in (self.stream, self.delayed_stream):
            floor = (await js.consumer_info(name, self.durable)).ack_floor
            first = (await js.stream_info(name)).state.first_seq
            if floor is not None and floor.stream_seq and first <= floor.stream_seq:
                await js.purge_stream(name, seq=floor.stream_seq + 1)
                LOG.warning(
                    "queue.acknowledged_swept",
                    stream=name,
                    up_to_sequence=floor.stream_seq,
                    reason="the server's store kept messages its consumer had acknowledged",
                )

    async def _subscribe(self, nc: Client, stream: str) -> _Puller:
        inbox = nc.new_inbox()
        puller = _Puller(f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{self.durable}", inbox)
        puller.sub = await nc.subscribe(f"{inbox}.*", cb=puller.handle)
        return puller

    # -- set-up -------------------------------------------------------------------------
    async def open(self) -> None:
        """Connect, then create (or check) the three streams and the durable consumers.
        A bad URL, rejected credentials, a server without JetStream or a stream of the
        wrong kind raise ``LifecycleError``; an unreachable server ``BrokerUnavailable``."""
        nats = _nats()
        try:
            with self._errors("open"):
                self._ready = False
                await self._ensure()
        except BrokerUnavailable as exc:
            cause = exc.__cause__
            no_jetstream = (nats.errors.NoRespondersError, nats.js.errors.ServiceUnavailableError)
            if isinstance(cause, no_jetstream) and self._nc is not None and self._nc.is_connected:
                # Connected, but nothing answers the JetStream API: not enabled.
                raise LifecycleError(
                    f"{self._where('open')}: the server does not answer JetStream requests; "
                    f"start nats-server with JetStream enabled (-js)"
                ) from None
            raise

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
        message_id: str | None = None,
        dedup_key: str | None = None,
        dedup_ttl: float | None = None,
    ) -> str:
        """Publish a message; returns its stream sequence (``delayed:<sequence>`` for a
        later one). A repeat with the same ``message_id`` within ``duplicate_window``
        is not stored twice, and returns the first one's sequence.

        Args:
            job: the job's name, or a ``Job`` (then the payload is validated first:
                ``PayloadError``).
            payload: the job's arguments, a JSON-serialisable mapping (``TypeError``
                or ``ValueError`` otherwise, here rather than at the worker).
            delay: seconds from now; None or <= 0 means now. Not with ``at``.
            at: when to run it, in seconds since the epoch (a past time means now).
            attempt: the attempt number the message carries (>= 1).
            headers: string metadata handed back as ``Delivery.headers``.
            message_id: the ``Nats-Msg-Id`` for de-duplication (a producer that retries
                a publish whose answer it lost passes the same one); default a new
                random id.
            dedup_key: while a message enqueued with this key is remembered, add
                nothing and return its id. The key is claimed first, in the stream
                ``<stream>_DEDUP`` (one subject per key, created only if the subject
                has no message yet: the server decides between racing producers),
                then the message is published; see ``_enqueue_once``.
            dedup_ttl: seconds the key is remembered (default ``DEDUP_TTL``, a day;
                at most ``dedup_max_age``).
        """
        ttl = check_enqueue(job, delay, at, attempt, dedup_key, dedup_ttl)
        if dedup_key is not None and ttl is not None:
            if message_id is not None:
                raise ValueError(f"enqueue of {job!r}: give message_id or dedup_key, not both")
            return await self._enqueue_once(job, payload, delay, at, attempt, headers, dedup_key, ttl)
        name, args = job_name(job, payload)
        body = encode_payload(args).encode()
        header_text = encode_headers(name, headers)
        now = time.time()
        due = now + delay if delay is not None else at
        fields = {JOB: name, ATTEMPT: str(attempt), ENQUEUED_AT: repr(now), MSG_ID: message_id or uuid.uuid4().hex}
        if header_text is not None:
            fields[HEADERS] = header_text
        with self._errors(f"enqueue of job {name!r}"):
            _, js = await self._ensure_streams()
            if due is not None and due > now:
                fields[NOT_BEFORE] = repr(due)
                ack = await js.publish(self.delayed_subject, body, stream=self.delayed_stream, headers=fields)
                return f"delayed:{ack.seq}"
            ack = await js.publish(self.subject, body, stream=self.stream, headers=fields)
            return str(ack.seq)

    async def _dedup_js(self) -> JetStreamContext:
        """The stream of dedup keys, created on first use (a queue that never
        de-duplicates never has it): limits retention, one message per subject."""
        _, js = await self._ensure_streams()
        if self._dedup_ready:
            return js
        nats = _nats()
        from nats.js.api import RetentionPolicy, StorageType, StreamConfig

        try:
            await js.stream_info(self.dedup_stream)
        except nats.js.errors.NotFoundError:
            await js.add_stream(
                StreamConfig(
                    name=self.dedup_stream,
                    subjects=[f"{self.dedup_subject}.>"],
                    retention=RetentionPolicy.LIMITS,
                    storage=StorageType.FILE,
                    max_msgs_per_subject=1,
                    max_age=self.dedup_max_age,
                )
            )
        self._dedup_ready = True
        return js

    async def _enqueue_once(
        self,
        job: str | Job[..., Any],
        payload: Mapping[str, Any] | None,
        delay: float | None,
        at: float | None,
        attempt: int,
        headers: Mapping[str, str] | None,
        key: str,
        ttl: float,
    ) -> str:
        """Claim ``key``, then publish. The claim is a publish to the key's subject that
        the server accepts only if the subject holds no message (or, for an expired
        key, still holds the expired one): exactly one racing producer wins. The winner
        publishes the message (its ``Nats-Msg-Id`` is the claim's, so its own retry is
        not stored twice) and then records the message's id on the key; the others wait
        for that record and return it. A winner that dies between the claim and the
        publish leaves the key without a message: that enqueue is lost, never doubled."""
        nats = _nats()
        name, _ = job_name(job, payload)
        subject = f"{self.dedup_subject}.{hashlib.sha256(key.encode()).hexdigest()}"
        ttl = min(ttl, self.dedup_max_age)
        claim = uuid.uuid4().hex
        with self._errors(f"enqueue of job {name!r} (dedup_key)"):
            js = await self._dedup_js()
            expected = "0"
            deadline = time.monotonic() + 5 * self.request_timeout
            while True:
                now = time.time()
                record = json.dumps({"expires": now + ttl, "claim": claim, "id": None}).encode()
                try:
                    ack = await js.publish(
                        subject,
                        record,
                        stream=self.dedup_stream,
                        headers={"Nats-Expected-Last-Subject-Sequence": expected},
                    )
                except nats.js.errors.BadRequestError as exc:
                    if getattr(exc, "err_code", None) != 10071:  # not "wrong last sequence"
                        raise
                else:
                    break
                try:
                    last = await js.get_last_msg(self.dedup_stream, subject)
                except nats.js.errors.NotFoundError:
                    expected = "0"  # the key aged out meanwhile: claim it afresh
                    continue
                held = json.loads(last.data or b"{}")
                if float(held.get("expires", 0)) <= now:
                    expected = str(last.seq)  # expired: take it over, if nobody else does first
                    continue
                if held.get("id"):
                    return str(held["id"])
                if time.monotonic() >= deadline:
                    # Claimed, and its message never recorded: its producer died in between.
                    return f"claimed:{held.get('claim')}"
                await asyncio.sleep(0.05)
        message_id = await self.enqueue(
            job, payload, delay=delay, at=at, attempt=attempt, headers=headers, message_id=claim
        )
        with self._errors(f"enqueue of job {name!r} (dedup_key)"):
            done = json.dumps({"expires": now + ttl, "claim": claim, "id": message_id}).encode()
            await js.publish(
                subject, done, stream=self.dedup_stream, headers={"Nats-Expected-Last-Subject-Sequence": str(ack.seq)}
            )
        return message_id

    async def cancel(self, message_id: str) -> bool:
        """See ``Queue.cancel``: a delayed message still in the delayed stream, or a
        work-stream message the consumer has not delivered yet, is deleted. The check
        and the delete are two requests: a cancel in the same milliseconds as the
        message's delivery (or, for a delayed one, its promotion when due) can lose."""
        nats = _nats()
        delayed = message_id.startswith("delayed:")
        try:
            sequence = int(message_id.removeprefix("delayed:"))
        except ValueError:
            return False
        stream = self.delayed_stream if delayed else self.stream
        with self._errors(f"cancel of message {message_id!r}"):
            _, js = await self._ensure_streams()
            if not delayed:
                info = await js.consumer_info(self.stream, self.durable)
                if sequence <= info.delivered.stream_seq:
                    return False
            try:
                return bool(await js.delete_msg(stream, sequence))
            except (nats.js.errors.NotFoundError, nats.js.errors.ServerError):
                return False  # no such message (any more)

    # -- consuming ----------------------------------------------------------------------
    async def receive(self, limit: int, timeout: float) -> list[Delivery]:
        """Up to ``limit`` messages: due delayed ones are moved in first (every 0.1 s),
        then buffered ones are handed out, else one pull request waits at most
        ``timeout`` seconds, and at most a second: an empty answer is normal."""
        if limit < 1:
            return []
        with self._errors("receive"):
            nc, _ = await self._ensure()
            if time.monotonic() - self._last_promote >= _PROMOTE_EVERY:
                await self._promote(nc)
            work = self._work
            assert work is not None  # set by _ensure
            if not work.buffer:
                wait = min(max(timeout, 0.0), _MAX_WAIT)
                await work.pull(nc, limit, wait, self.request_timeout)
            handed = await self._hand_out(work, limit)
            if not handed and time.monotonic() - self._last_sweep >= _SWEEP_EVERY:
                # Idle: nothing to deliver, so look for acknowledged messages a
                # restarted server kept (they are never delivered, so never idle-free).
                _, js = await self._client()
                await self._sweep_acknowledged(js)
            return handed

    async def _hand_out(self, work: _Puller, limit: int) -> list[Delivery]:
        lease = self.lease or 30.0
        # The server's ack_wait started when it sent the message, a little before it
        # arrived here: the clock here runs out first.
        margin = min(0.25, lease / 10)
        now = time.monotonic()
        deliveries: list[Delivery] = []
        while work.buffer and len(deliveries) < limit:
            msg, arrived = work.buffer.popleft()
            expires = arrived + lease - margin
            if expires - now < lease / 2:
                # Buffered too long (a request's late answer): the server redelivers it.
                LOG.debug("queue.stale_buffered", stream=self.stream, subject=msg.subject)
                continue
            try:
                meta = msg.metadata
            except Exception:  # not a JetStream message: nothing to settle it with
                LOG.warning("queue.unexpected_message", stream=self.stream, subject=msg.subject)
                continue
            mine = self._held.get(str(meta.sequence.stream))
            if mine is not None:
                # Our own, still running here: its ack_wait ran out (a stall, an outage)
                # and the server handed it back to us. Not a second run: the delivery
                # we hold is ours again, with a fresh lease.
                mine.delivery.raw = msg
                mine.expires = expires
                LOG.info("queue.redelivered_to_holder", stream=self.stream, job_id=mine.delivery.id)
                continue
            delivery = decode_message(str(meta.sequence.stream), msg.headers, msg.data, meta.num_delivered)
            delivery.raw = msg
            if self.max_deliver is not None and delivery.deliveries > self.max_deliver:
                await self._over_max_deliver(delivery)
                continue
            self._held[delivery.id] = _Held(delivery, expires)
            deliveries.append(delivery)
        return deliveries

    async def _over_max_deliver(self, delivery: Delivery) -> None:
        record = {
            "job": delivery.job,
            "payload": delivery.payload,
            "message_id": delivery.id,
            "reason": "max_deliver",
            "error": f"delivered {delivery.deliveries} times, over the queue's max_deliver={self.max_deliver}",
            "attempts": delivery.attempt,
            "deliveries": delivery.deliveries,
            "failed_at": time.time(),
        }
        LOG.error("job.dead_lettered", job=delivery.job, job_id=delivery.id, reason="max_deliver")
        self._held[delivery.id] = _Held(delivery, math.inf)
        await self._dead_letter(delivery, record)

    async def _promote(self, nc: Client) -> None:
        """Move due delayed messages into the work stream; nak the others with the time
        they have left (so the server holds them back until then)."""
        delayed = self._delayed
        assert delayed is not None
        if not delayed.buffer:
            await delayed.pull(nc, _PROMOTE_BATCH, 0.0, self.request_timeout)
        _, js = await self._client()
        now = time.time()
        while delayed.buffer:
            msg, _arrived = delayed.buffer.popleft()
            headers = dict(msg.headers or {})
            try:
                due = float(headers.get(NOT_BEFORE, "0"))
            except ValueError:
                due = 0.0  # unreadable: promoted now, and the worker sees what else is wrong
            if math.isfinite(due) and due > now:
                await msg.nak(delay=due - now)
                continue
            headers.pop(NOT_BEFORE, None)
            headers[MSG_ID] = f"promoted:{msg.metadata.sequence.stream}"
            await js.publish(self.subject, msg.data, stream=self.stream, headers=headers)
            await nc.request(msg.reply, b"+ACK", timeout=self.request_timeout)
        self._last_promote = time.monotonic()

    # -- settling -----------------------------------------------------------------------
    def _owned(self, delivery: Delivery) -> Msg | None:
        """The delivery's message if this consumer still holds it (lease clock running);
        else None, and it is forgotten."""
        held = self._held.get(delivery.id)
        if held is None or held.delivery is not delivery:
            return None
        if time.monotonic() >= held.expires:
            del self._held[delivery.id]
            LOG.debug("queue.lease_expired", stream=self.stream, job=delivery.job, job_id=delivery.id)
            return None
        msg: Msg = delivery.raw
        return msg

    async def _settle(self, op: str, delivery: Delivery, verb: bytes, republish: _Target | None) -> bool:
        """Republish (to stream, subject: body, headers) if asked, then send ``verb``
        for the delivery and wait for the server's answer; False when the delivery is
        not this consumer's any more (nothing is sent then)."""
        msg = self._owned(delivery)
        if msg is None:
            LOG.debug("queue.settle_skipped", op=op, job=delivery.job, job_id=delivery.id)
            return False
        nc, js = await self._client()
        with self._errors(f"{op} of message {delivery.id} (job {delivery.job!r})"):
            if republish is not None:
                stream, subject, body, headers = republish
                await js.publish(subject, body, stream=stream, headers=headers)
            await nc.request(msg.reply, verb, timeout=self.request_timeout)
        self._held.pop(delivery.id, None)
        return True

    @staticmethod
    def _dedupe_id(op: str, delivery: Delivery) -> str:
        """The same for a repeat of this settle of this delivery, unique otherwise."""
        return f"{op}:{delivery.id}:{delivery.deliveries}"

    async def ack(self, delivery: Delivery) -> bool:
        """Done: ack it (the work-queue stream then deletes it), if this consumer still
        holds it (else False)."""
        return await self._settle("ack", delivery, b"+ACK", None)

    async def retry(self, delivery: Delivery, delay: float, error: str) -> bool:
        """Republish as attempt + 1 (to the delayed stream when ``delay`` > 0) and ack
        this delivery; ``error`` is kept in the ``Lifecycle-Last-Error`` header (first
        500 characters, one line)."""
        if delivery.malformed is not None:
            raise ValueError(
                f"retry of message {delivery.id}: a malformed message ({delivery.malformed}) cannot be "
                f"retried; dead-letter it"
            )
        headers = {
            JOB: delivery.job,
            ATTEMPT: str(delivery.attempt + 1),
            ENQUEUED_AT: repr(delivery.enqueued_at),
            LAST_ERROR: " ".join(error.split())[:500],
            MSG_ID: self._dedupe_id("retry", delivery),
        }
        header_text = encode_headers(delivery.job, delivery.headers)
        if header_text is not None:
            headers[HEADERS] = header_text
        body = self._body(delivery)
        if delay > 0:
            headers[NOT_BEFORE] = repr(time.time() + delay)
            target = (self.delayed_stream, self.delayed_subject, body, headers)
        else:
            target = (self.stream, self.subject, body, headers)
        return await self._settle("retry", delivery, b"+ACK", target)

    def _body(self, delivery: Delivery) -> bytes:
        """The payload as it arrived (no float or int drift), else re-encoded."""
        raw = getattr(delivery.raw, "data", None)
        return raw if isinstance(raw, bytes) else encode_payload(delivery.payload).encode()

    async def dead_letter(self, delivery: Delivery, record: Mapping[str, Any]) -> bool:
        """Store ``record`` in the dead-letter stream (as JSON) and ``term`` this
        delivery. A malformed delivery's body and headers are kept as they arrived
        (``raw:payload``, ``raw:headers``)."""
        return await self._dead_letter(delivery, record)

    async def _dead_letter(self, delivery: Delivery, record: Mapping[str, Any]) -> bool:
        document = dict(record)
        if delivery.malformed is not None and delivery.raw is not None:
            document["raw:payload"] = base64.b64encode(self._body(delivery)).decode("ascii")
            document["raw:headers"] = dict(getattr(delivery.raw, "headers", None) or {})
        body = json.dumps(document, default=repr).encode()
        headers = {MSG_ID: self._dedupe_id("dead", delivery)}
        target = (self.dead_letter_stream, self.dead_letter_subject, body, headers)
        return await self._settle("dead_letter", delivery, b"+TERM", target)

    async def release(self, delivery: Delivery) -> bool:
        """Put it back now, unchanged (same headers and body), as a new message, and ack
        this delivery: redelivered at once, no delivery counted."""
        msg = delivery.raw
        headers = dict(getattr(msg, "headers", None) or {})
        if delivery.malformed is None:
            headers.update({JOB: delivery.job, ATTEMPT: str(delivery.attempt), ENQUEUED_AT: repr(delivery.enqueued_at)})
        headers[MSG_ID] = self._dedupe_id("release", delivery)
        headers.pop(NOT_BEFORE, None)
        target = (self.stream, self.subject, self._body(delivery), headers)
        return await self._settle("release", delivery, b"+ACK", target)

    async def renew(self, deliveries: Sequence[Delivery]) -> list[str]:
        """Send ``+WPI`` for those this consumer still holds (the server restarts their
        ``ack_wait``; no delivery counted) and confirm with a flush; returns the ids of
        the others: settled, or their lease ran out here (see the module docstring)."""
        if not deliveries:
            return []
        lost: list[Delivery] = []
        owned: list[Delivery] = []
        for delivery in deliveries:
            (owned if self._owned(delivery) is not None else lost).append(delivery)
        if owned:
            nc, _ = await self._client()
            started = time.monotonic()
            with self._errors(f"renew of {len(owned)} message(s)"):
                for delivery in owned:
                    await nc.publish(delivery.raw.reply, b"+WPI")
                await nc.flush(timeout=max(1, math.ceil(self.request_timeout)))
            lease = self.lease or 30.0
            for delivery in owned:
                held = self._held.get(delivery.id)
                if held is not None and held.delivery is delivery:
                    held.expires = started + lease
        return [delivery.id for delivery in lost]

    # -- dead letters -------------------------------------------------------------------
    async def dead_letters(self, count: int = 100, before: str | None = None) -> list[dict[str, Any]]:
        """Dead letters, newest first: at most ``count``, older than the dead letter
        ``before`` (exclusive) when given. ``raw:payload`` (a malformed message's body)
        is bytes. Each record has its ``dead_letter_id`` (its sequence in the dead
        stream, for ``before``, ``replay`` and ``purge``)."""
        if before is not None and not _MAX_ATTEMPT.fullmatch(before):
            raise ValueError(f"dead_letters: before must be a dead_letter_id (a sequence number), got {before!r}")
        if count < 1:
            return []
        _, js = await self._ensure_quiet("dead_letters")
        nats = _nats()
        records: list[dict[str, Any]] = []
        with self._errors("dead_letters"):
            state = (await js.stream_info(self.dead_letter_stream)).state
            seq = state.last_seq if before is None else min(int(before) - 1, state.last_seq)
            while seq >= max(state.first_seq, 1) and len(records) < count:
                try:
                    raw = await js.get_msg(self.dead_letter_stream, seq)
                except nats.js.errors.NotFoundError:  # deleted (replayed or purged)
                    seq -= 1
                    continue
                records.append(self._dead_record(seq, raw.data or b""))
                seq -= 1
        return records

    async def _ensure_quiet(self, op: str) -> tuple[Client, JetStreamContext]:
        with self._errors(op):
            return await self._ensure()

    @staticmethod
    def _dead_record(seq: int, data: bytes) -> dict[str, Any]:
        try:
            record = json.loads(data)
        except ValueError:
            record = None
        if not isinstance(record, dict):  # not written by dead_letter: as it is
            record = {"raw:payload": data}
        elif isinstance(record.get("raw:payload"), str):
            with contextlib.suppress(ValueError):
                record["raw:payload"] = base64.b64decode(record["raw:payload"], validate=True)
        record["dead_letter_id"] = str(seq)
        return record

    async def replay(self, ids: Sequence[str]) -> int:
        """Publish these dead letters to the work stream as new messages (attempt 1,
        same job and payload, de-duplicated by dead letter id) and delete them from the
        dead stream. Missing ids and malformed dead letters (no job or payload) are
        skipped; returns how many were replayed."""
        for dead_id in ids:
            if not _MAX_ATTEMPT.fullmatch(dead_id):
                raise ValueError(f"replay: {dead_id!r} is not a dead_letter_id (a sequence number)")
        _, js = await self._ensure_quiet("replay")
        nats = _nats()
        replayed = 0
        for dead_id in ids:
            with self._errors(f"replay of dead letter {dead_id}"):
                try:
                    raw = await js.get_msg(self.dead_letter_stream, int(dead_id))
                except nats.js.errors.NotFoundError:
                    continue
                record = self._dead_record(int(dead_id), raw.data or b"")
                job, payload = record.get("job"), record.get("payload")
                if not isinstance(job, str) or not job or not isinstance(payload, dict):
                    continue  # malformed: nothing to run; its raw body stays for a human
                headers = {
                    JOB: job,
                    ATTEMPT: "1",
                    ENQUEUED_AT: repr(time.time()),
                    MSG_ID: f"replay:{self.dead_letter_stream}:{dead_id}",
                }
                header_text = encode_headers(job, record_headers(record))
                if header_text is not None:
                    headers[HEADERS] = header_text
                await js.publish(self.subject, encode_payload(payload).encode(), stream=self.stream, headers=headers)
                try:
                    await js.delete_msg(self.dead_letter_stream, int(dead_id))
                except nats.js.errors.NotFoundError:
                    continue  # replayed by another caller at the same moment (its publish was de-duplicated)
            replayed += 1
        return replayed

    async def purge(self, ids: Sequence[str] | None = None) -> int:
        """Delete these dead letters, or all of them (``ids=None``); returns how many."""
        _, js = await self._ensure_quiet("purge")
        nats = _nats()
        with self._errors("purge"):
            if ids is None:
                before = (await js.stream_info(self.dead_letter_stream)).state.messages
                await js.purge_stream(self.dead_letter_stream)
                return int(before)
            deleted = 0
            for dead_id in dict.fromkeys(ids):
                if not _MAX_ATTEMPT.fullmatch(dead_id):
                    raise ValueError(f"purge: {dead_id!r} is not a dead_letter_id (a sequence number)")
                try:
                    deleted += bool(await js.delete_msg(self.dead_letter_stream, int(dead_id)))
                except nats.js.errors.NotFoundError:
                    continue
            return deleted

    async def close(self) -> None:
        """Close the connection (idempotent; a dead server is not an error here).
        Deliveries still held are redelivered by the server after ``lease``."""
        nc, self._nc, self._js = self._nc, None, None
        self._ready = False
        self._held.clear()
        if nc is not None and not nc.is_closed:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(nc.close(), self.connect_timeout)


def _url_secrets(url: str) -> list[str]:
    """The password (and a token in the user part) as it may appear in an error text."""
    try:
        parts = urlsplit(url)
        password, user = parts.password, parts.username
    except ValueError:
        return []
    found = {password, unquote(password or "")}
    if user and not password:
        found |= {user, unquote(user)}  # nats://TOKEN@host: the user part is the secret
    return [secret for secret in found if secret and len(secret) > 2]


_URL_OPTIONS = {
    "stream": str,
    "subject": str,
    "durable": str,
    "lease": float,
    "max_deliver": int,
    "connect_timeout": float,
    "request_timeout": float,
    "duplicate_window": float,
    "name": str,
    "dedup_max_age": float,
}


def from_url(url: str, **options: Any) -> NatsQueue:
    """The ``NatsQueue`` a ``nats://`` or ``tls://`` URL names (for ``queue_from_url``):
    ``nats://[user:password@]host:port?stream=JOBS&subject=jobs&durable=workers&lease=30``.

    Args:
        url: the server's URL; query options ``stream``, ``subject``, ``durable``,
            ``lease``, ``max_deliver``, ``connect_timeout``, ``request_timeout``,
            ``duplicate_window``, ``name``, ``dedup_max_age``.
        options: keyword arguments for ``NatsQueue``; they win over the URL's.
    """
    parts = urlsplit(url)
    given, _rest = _options(url, parse_qsl(parts.query, keep_blank_values=True), _URL_OPTIONS)
    return NatsQueue(urlunsplit(parts._replace(query="")), **{**given, **options})
