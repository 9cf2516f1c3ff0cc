"""RabbitMQ, on aio-pika: a durable quorum queue shared by the workers' consumers.

AMQP already hands each message to one consumer and takes it back when that consumer's
channel dies, so most of the contract maps onto the broker directly; the rest is shaped
here. Invariants:

- Messages live in a durable quorum queue and are published persistent, with publisher
  confirms: ``enqueue`` returns once the broker has the message.
- A delivery is acknowledged (``basic.ack``) only when the Worker calls ``ack``: after
  the job and its whole teardown. The consumer's prefetch (``basic.qos``) is set at each
  ``receive`` to what this consumer holds plus ``limit``, so it never buffers more
  unacknowledged messages than it was asked for.
- Ownership is the channel: a delivery belongs to the channel it came on. When that
  channel or the connection dies, the broker puts every message it held back in the
  queue (counted in the quorum queue's ``x-delivery-count``), so this consumer has lost
  them: ``renew`` reports them and every settle returns False; none raises.
- ``lease`` is None by default: a delivery stays with a live consumer however long its
  job takes (up to RabbitMQ's own ``consumer_timeout``, 30 minutes by default, after
  which the broker closes the channel). With ``lease`` set, a delivery not renewed for
  that long means the code holding it stopped: the consumer's channel is closed, so the
  broker redelivers everything it held (counted) to the other consumers.
- ``retry`` and ``dead_letter`` publish (confirmed) and then ack; ``release``
  republishes the message with its own headers and acks it, so no delivery is counted
  (a ``nack`` with requeue would count one on a quorum queue). A connection lost
  between the two steps leaves the original to be redelivered as well: at least once.
- Delays: no plugin. A delayed message waits in a per-delay queue whose message TTL
  dead-letters it back to the main queue. Delays are rounded up to one of
  ``DELAY_BUCKETS`` (so a message runs up to that much later, never earlier); a longer
  delay hops through the largest bucket again until it is due.
- Dead letters go to a stream queue (``x-queue-type: stream``): an append-only log read
  by offset, so the offset is the ``dead_letter_id`` and newest first with ``before``
  needs no index. Replay and purge append tombstones instead of deleting (a stream
  cannot delete one entry); the stream's retention (``dead_letter_max_age``) reclaims
  the space. Reading scans the stream from its start up to a fence it appends: dead
  letters are an operator's tool, rarely read, so a scan is the price of a simple
  log.
- Every field is decoded here: a message whose headers or body do not decode comes
  back as a ``Delivery`` whose ``malformed`` says why; its dead letter keeps the body's
  exact bytes.
- De-duplication (``enqueue(dedup_key=)``): RabbitMQ has none without a plugin. A key
  is a small classic queue of length one that refuses more (``x-max-length: 1``,
  ``x-overflow: reject-publish``) whose one message lives the key's ttl
  (``x-message-ttl``): the producer whose publish the broker confirms owns the key and
  publishes the message; the others are refused (nack). The message's id is derived
  from the key, so every producer returns it without reading. The claim and the
  message are two publishes: a producer that dies between them leaves the key without
  a message (that enqueue is lost, never doubled). Every producer of a key must give
  the same ttl (the queue is declared with it).
- Cancelling works for delayed messages: each has a state queue of the same shape
  (``<queue>.state.<id>``); ``cancel`` and the consumer race to publish into it, the
  broker confirms one. A message that is due cannot be taken out of a queue's middle:
  ``cancel`` returns False for it.
- Transient failures (refused or lost connection, a broker that does not answer within
  ``timeout``) raise ``BrokerUnavailable``; the next call connects again."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import math
import os
import socket
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

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
    from aio_pika.abc import (
        AbstractChannel,
        AbstractConnection,
        AbstractIncomingMessage,
        AbstractQueue,
    )

    from .._job import Job

# Seconds a delayed message may wait in one hop, rounded up to the next of these. A
# queue per bucket is declared on first use. Steps of at most ~2x: a delay runs late
# by less than its own length.
DELAY_BUCKETS = (
    1, 2, 3, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 21600, 43200, 86400,
)  # fmt: skip
_MAX_ATTEMPT = 10**18
_RECEIVE_CAP = 1.0  # seconds; a receive waits at most this long, then returns []
_OPTIONS = {
    "queue": str,
    "dead_letter_queue": str,
    "lease": float,
    "timeout": float,
    "dead_letter_max_age": str,
}


def _bucket(delay: float) -> int:
    """The delay queue for ``delay`` seconds: the smallest bucket at least as long, or
    the largest one (the message then hops again)."""
    for bucket in DELAY_BUCKETS:
        if bucket >= delay:
            return bucket
    return DELAY_BUCKETS[-1]


def _text(value: Any) -> str | None:
    """A header value as text (aio-pika gives str or bytes), None for anything else."""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return None
    return value if isinstance(value, str) else None


def _number(value: Any) -> float | None:
    """A number carried as text (AMQP's float header is 32-bit: a time would lose
    seconds), or as an int; None for anything else."""
    if isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    text = _text(value)
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        return None


def _json_safe(value: Any) -> Any:
    """Headers as JSON can carry them (bytes as base64) for a malformed message's record."""
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, bytes):
        return {"base64": base64.b64encode(value).decode("ascii")}
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return repr(value)


class _Retry(Exception):
    """``_claim_on`` found the queue changing under it (another ttl, an expiry)."""


def decode_message(message_id: str, headers: Mapping[str, Any], body: bytes) -> Delivery:
    """A message as a ``Delivery``; one that does not decode comes back with
    ``malformed`` set (``"<field>: <why>"``) and ``raw`` holding ``{"body": bytes,
    "headers": {...}}``.

    Args:
        message_id: the delivery's id.
        headers: the AMQP headers: ``job`` (non-empty text, required), ``attempt`` (a
            positive integer, default 1), ``enqueued_at`` (finite, non-negative epoch
            seconds as text, default 0), ``returns`` (deliveries counted before a release),
            ``headers`` (the enqueue's headers as JSON text, see ``decode_headers``), and
            the broker's ``x-delivery-count``.
        body: the payload's JSON bytes (see ``decode_payload``).
    """
    raw = {"body": body, "headers": dict(headers)}
    counted = headers.get("x-delivery-count", 0)
    returns = headers.get("returns", 0)
    deliveries = 1
    for value in (counted, returns):
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < _MAX_ATTEMPT:
            deliveries += value

    def bad(why: str) -> Delivery:
        return Delivery(message_id, "", None, 1, deliveries, 0.0, raw=raw, malformed=why)

    if "job" not in headers:
        return bad("job: missing")
    name = _text(headers["job"])
    if name is None:
        return bad(f"job: not text: {headers['job']!r:.40}")
    if not name:
        return bad("job: empty")
    attempt = headers.get("attempt", 1)
    if isinstance(attempt, bool) or not isinstance(attempt, int) or not 1 <= attempt < _MAX_ATTEMPT:
        return bad(f"attempt: not a positive integer: {attempt!r:.40}")
    enqueued_raw = headers.get("enqueued_at", "0")
    enqueued = _number(enqueued_raw)
    if enqueued is None:
        return bad(f"enqueued_at: not a number: {enqueued_raw!r:.40}")
    if not math.isfinite(enqueued) or enqueued < 0:
        return bad(f"enqueued_at: not a finite time in seconds since the epoch: {enqueued!r:.40}")
    try:
        payload = decode_payload(body)
    except MalformedMessage as exc:
        return bad(f"payload: {exc}")
    header_text = headers.get("headers")
    if header_text is not None and _text(header_text) is None:
        return bad(f"headers: not text: {header_text!r:.40}")
    try:
        decoded_headers = decode_headers(_text(header_text))
    except MalformedMessage as exc:
        return bad(f"headers: {exc}")
    return Delivery(message_id, name, payload, attempt, deliveries, float(enqueued), raw=raw, headers=decoded_headers)


@dataclass(slots=True)
class _Held:
    """A delivery handed out and not settled: its message and when its lease ends."""

    message: AbstractIncomingMessage
    generation: int
    expires: float


class RabbitQueue:
    """A queue on a RabbitMQ quorum queue (see the module docstring).

    Construction does no I/O; ``open()`` (the worker calls it at start-up) connects,
    declares the queues and checks the configuration. Producers may call ``enqueue``
    without ``open``.

    Args:
        url: an AMQP URL, ``amqp://user:password@host:5672/vhost`` (``amqps://`` for
            TLS). Its password never appears in logs or errors.
        queue: the quorum queue's name; the delay queues are ``{queue}.delay.{seconds}``.
        dead_letter_queue: the stream queue that keeps dead letters; default
            ``{queue}.dead``.
        lease: seconds a delivery stays with this consumer without ``renew``; None (the
            default) keeps it as long as the consumer's channel lives.
        timeout: seconds (> 0) to connect, and for the broker to answer any request,
            before ``BrokerUnavailable``.
        dead_letter_max_age: how long the dead-letter stream keeps entries (RabbitMQ's
            ``x-max-age``: ``7D``, ``12h``, ``30m``); default ``30D``. Set when the
            stream is first declared; a stream declared otherwise refuses to open.
    """

    def __init__(
        self,
        url: str = "amqp://guest:guest@127.0.0.1:5672/",
        *,
        queue: str = "jobs",
        dead_letter_queue: str | None = None,
        lease: float | None = None,
        timeout: float = 10.0,
        dead_letter_max_age: str = "30D",
    ) -> None:
        require_asyncio("RabbitQueue", "aio-pika")
        if lease is not None and not lease > 0:
            raise ValueError(f"RabbitQueue lease must be positive or None, got {lease!r}")
        if not timeout > 0:
            raise ValueError(f"RabbitQueue timeout must be positive, got {timeout!r}")
        if not queue:
            raise ValueError("RabbitQueue queue must be a non-empty name")
        self._url = url  # kept private: it may hold the password
        self.url = redact(url)
        self.queue = queue
        self.dead_letter_queue = dead_letter_queue or f"{queue}.dead"
        self.lease = lease
        self.timeout = timeout
        self.dead_letter_max_age = dead_letter_max_age
        self.consumer = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._connection: AbstractConnection | None = None
        self._publisher: AbstractChannel | None = None
        self._consumer: AbstractChannel | None = None
        self._queue: AbstractQueue | None = None
        self._consumer_tag: str | None = None
        self._buffer: asyncio.Queue[tuple[int, AbstractIncomingMessage]] = asyncio.Queue()
        self._generation = 0  # channel generation: deliveries of an older one are lost
        self._prefetch = 0
        self._held: dict[str, _Held] = {}
        self._delay_queues: set[int] = set()
        self._control: Any = None  # (connection, channel) for key and state queues, see _claim
        self._connect_lock = asyncio.Lock()
        self._watchdog: asyncio.Task[None] | None = None
        self._closed = False

    # -- connection ---------------------------------------------------------------------
    @contextlib.contextmanager
    def _errors(self, operation: str) -> Iterator[None]:
        """Transient failures as BrokerUnavailable (and the connection dropped, so the
        next call connects again); configuration errors as LifecycleError."""
        import_client("aio_pika", "RabbitQueue", "rabbitmq")
        from aiormq import exceptions  # present with aio-pika, its transport

        try:
            yield
        except (LifecycleError, ValueError, TypeError):
            raise
        except (exceptions.ProbableAuthenticationError, exceptions.AuthenticationError) as exc:
            raise LifecycleError(
                f"RabbitQueue {self.url}: {operation}: authentication failed ({type(exc).__name__}); "
                f"check the user and password in the URL"
            ) from None
        except exceptions.InvalidFrameError as exc:
            # A vhost that does not exist or is not allowed: the broker answers the
            # Connection.Open with a Connection.Close (530 NOT_ALLOWED), which aiormq
            # reports as an unexpected frame, naming only the frame's class.
            if "Connection.Close" not in str(exc):
                self._drop()
                raise BrokerUnavailable(
                    f"RabbitQueue {self.url}, queue {self.queue!r}: {operation}: {type(exc).__name__}"
                ) from None
            raise LifecycleError(
                f"RabbitQueue {self.url}: {operation}: the broker refused the connection after login; "
                f"check that the vhost exists and that the user may use it"
            ) from None
        except (
            exceptions.ConnectionNotAllowed,
            exceptions.ChannelAccessRefused,
            exceptions.ChannelPreconditionFailed,
        ) as exc:
            self._drop()
            raise LifecycleError(
                f"RabbitQueue {self.url}, queue {self.queue!r}: {operation}: {redact(str(exc))}"
            ) from None
        except (exceptions.AMQPError, exceptions.ChannelInvalidStateError, OSError, TimeoutError) as exc:
            self._drop()
            raise BrokerUnavailable(
                f"RabbitQueue {self.url}, queue {self.queue!r}: {operation}: {type(exc).__name__}: "
                f"{redact(str(exc)) or 'no answer'}"
            ) from None

    def _drop(self) -> None:
        """Forget the connection: its deliveries are lost to this consumer (the broker
        takes them back when it notices), and the next call connects again."""
        connection, self._connection = self._connection, None
        self._publisher = self._consumer = None
        self._lose_all()
        if connection is not None and not connection.is_closed:
            asyncio.get_running_loop().create_task(self._close_quietly(connection))

    def _lose_all(self) -> None:
        self._generation += 1
        self._prefetch = 0
        if self._held:
            LOG.warning("queue.deliveries_lost", queue=self.queue, count=len(self._held))
        self._held.clear()
        self._buffer = asyncio.Queue()

    @staticmethod
    async def _close_quietly(resource: Any) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(resource.close(), 5)

    def _on_closed(self, connection: Any) -> Any:
        def closed(*_args: Any) -> None:
            if self._connection is connection:
                self._connection = None
                self._publisher = self._consumer = None
                self._lose_all()

        return closed

    async def _connect(self) -> AbstractConnection:
        require_asyncio("RabbitQueue", "aio-pika")
        if self._closed:
            raise LifecycleError(f"RabbitQueue {self.url}, queue {self.queue!r}: used after close()")
        connection = self._connection
        if connection is not None and not connection.is_closed:
            return connection
        async with self._connect_lock:
            if self._connection is not None and not self._connection.is_closed:
                return self._connection  # another call connected while this one waited
            aio_pika = import_client("aio_pika", "RabbitQueue", "rabbitmq")
            with self._errors("connect"):
                opened: AbstractConnection = await aio_pika.connect(
                    self._url,
                    timeout=self.timeout,
                    client_properties={"connection_name": f"lifecycle {self.queue} {self.consumer}"},
                )
                try:
                    publisher = await asyncio.wait_for(opened.channel(publisher_confirms=True), self.timeout)
                    await asyncio.wait_for(self._declare(opened, publisher), self.timeout)
                except BaseException:
                    await self._close_quietly(opened)
                    raise
            opened.close_callbacks.add(self._on_closed(opened))
            self._connection, self._publisher = opened, publisher
            self._delay_queues.clear()
            return opened

    async def _declare(self, connection: AbstractConnection, channel: AbstractChannel) -> None:
        await channel.declare_queue(self.queue, durable=True, arguments={"x-queue-type": "quorum"})
        # The dead-letter stream on a channel of its own: a declare the broker refuses
        # closes its channel. A stream whose member has not come back yet after a crash
        # of the broker ("home node ... is down or inaccessible"; seen for minutes after
        # a kill -9) must not stop the work queue from being consumed: only dead-letter
        # operations wait for it (they fail with BrokerUnavailable until it is back).
        side = await connection.channel()
        try:
            await side.declare_queue(
                self.dead_letter_queue,
                durable=True,
                arguments={"x-queue-type": "stream", "x-max-age": self.dead_letter_max_age},
            )
        except Exception as exc:
            if "down or inaccessible" not in str(exc):
                raise
            LOG.warning(
                "queue.dead_letters_unavailable",
                queue=self.queue,
                dead_letter_queue=self.dead_letter_queue,
                error=redact(str(exc))[:300],
            )
        finally:
            if not side.is_closed:
                with contextlib.suppress(Exception):
                    await side.close()

    async def _publish_channel(self) -> AbstractChannel:
        await self._connect()
        assert self._publisher is not None
        return self._publisher

    async def open(self) -> None:
        """Connect and declare the queues (idempotent). Authentication, permissions, or
        a queue declared with other arguments raise ``LifecycleError``; an unreachable
        broker raises ``BrokerUnavailable`` (a worker waits for it)."""
        await self._connect()

    # -- producing ----------------------------------------------------------------------
    async def _publish(
        self,
        routing_key: str,
        body: bytes,
        headers: Mapping[str, Any],
        message_id: str,
        operation: str,
        expiration: float | None = None,
    ) -> None:
        aio_pika = import_client("aio_pika", "RabbitQueue", "rabbitmq")
        with self._errors(operation):
            channel = await self._publish_channel()
            message = aio_pika.Message(
                body,
                headers=dict(headers),
                message_id=message_id,
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            )
            await channel.default_exchange.publish(message, routing_key=routing_key, timeout=self.timeout)

    async def _delay_queue(self, seconds: int) -> str:
        """The queue that holds messages for ``seconds`` then dead-letters them back."""
        name = f"{self.queue}.delay.{seconds}"
        if seconds not in self._delay_queues:
            with self._errors(f"declare of delay queue {name!r}"):
                channel = await self._publish_channel()
                arguments: dict[str, Any] = {
                    "x-queue-type": "quorum",
                    "x-message-ttl": seconds * 1000,
                    "x-dead-letter-exchange": "",
                    "x-dead-letter-routing-key": self.queue,
                    # at-least-once dead-lettering: an expired message is moved, never dropped
                    "x-dead-letter-strategy": "at-least-once",
                    "x-overflow": "reject-publish",
                }
                await asyncio.wait_for(channel.declare_queue(name, durable=True, arguments=arguments), self.timeout)
            self._delay_queues.add(seconds)
        return name

    async def _send(
        self, body: bytes, headers: dict[str, Any], message_id: str, due: float | None, operation: str
    ) -> None:
        """Publish now, or through a delay queue when ``due`` is in the future."""
        remaining = due - time.time() if due is not None else 0.0
        if remaining > 0:
            headers = {**headers, "due": repr(due)}
            target = await self._delay_queue(_bucket(remaining))
        else:
            headers = {key: value for key, value in headers.items() if key != "due"}
            target = self.queue
        await self._publish(target, body, headers, message_id, operation)

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
        """Add a message (confirmed by the broker); returns its message id.

        Args:
            job: the job's name, or a ``Job`` (then the payload is validated first:
                ``PayloadError``).
            payload: the job's arguments, a JSON-serialisable mapping (``TypeError`` or
                ``ValueError`` otherwise, here rather than at the worker).
            delay: seconds from now; None or <= 0 means now. Rounded up to one of
                ``DELAY_BUCKETS``. Not with ``at``.
            at: when to run it, in seconds since the epoch (a past time means now).
            attempt: the attempt number the message carries (>= 1).
            headers: string metadata handed back as ``Delivery.headers``.
            dedup_key: while a message enqueued with this key is remembered, add
                nothing and return its id (see the module docstring for how, and for
                what it guarantees).
            dedup_ttl: seconds the key is remembered after its last use (default
                ``DEDUP_TTL``, a day). Every producer of one key must give the same.
        """
        ttl = check_enqueue(job, delay, at, attempt, dedup_key, dedup_ttl)
        name, args = job_name(job, payload)
        body = encode_payload(args).encode("utf-8")
        header_text = encode_headers(name, headers)
        now = time.time()
        due = now + delay if delay is not None else at
        message_id = uuid.uuid4().hex
        fields: dict[str, Any] = {"job": name, "attempt": attempt, "enqueued_at": repr(now)}
        if header_text is not None:
            fields["headers"] = header_text
        operation = f"enqueue of job {name!r}"
        if dedup_key is not None and ttl is not None:
            # The id is the key's digest: a refused producer knows it without reading
            # the key's queue (a read would take its message out for a moment, and
            # x-max-length counts only messages ready in the queue).
            digest = hashlib.sha256(dedup_key.encode()).hexdigest()
            message_id = f"k{digest[:32]}"
            outcome, _ = await self._claim(f"{self.queue}.dedup.{digest[:40]}", b"", ttl, operation, key=True)
            if outcome == "held":
                return message_id
        later = due is not None and due > now
        if later:
            fields["cancellable"] = "1"
        await self._send(body, fields, message_id, due, operation)
        if later and due is not None:
            # Cancellable until a consumer takes it: an empty state queue that outlives
            # the delay by ten minutes unused (then the message simply runs). Declared
            # after the send, so a slow declare never makes a delayed message late; a
            # consumer that finds no state queue runs the message.
            await self._claim(f"{self.queue}.state.{message_id}", None, due - time.time() + 600, operation)
        return message_id

    async def _claim(
        self, name: str, body: bytes | None, ttl: float | None, operation: str, *, key: bool = False
    ) -> tuple[str, bytes]:
        """Publish ``body`` into the one-message queue ``name``, declared with ``ttl``
        as its ``x-expires`` (None: only if it exists; ``key``: ``ttl`` is the
        message's ``x-message-ttl``, so the key is free again ``ttl`` after its claim,
        and the queue goes a minute later unused). Returns ``("claimed", b"")``
        when the broker confirmed it (this caller holds the queue now), ``("held",
        body)`` with the body it holds otherwise, ``("missing", b"")`` when there is no
        such queue. ``body`` None only declares it. A fresh channel each time: a
        refused declare closes its channel, never the publisher's."""
        with self._errors(operation):
            connection = await self._connect()
            for _ in range(5):
                # One channel kept for key and state queues, apart from the publisher's
                # and the consumer's: a declare the broker refuses (other arguments)
                # closes it, and only this one is opened again, next time. A consumer's
                # check is one mandatory publish on it, confirmed: one round trip.
                held_channel = self._control
                if held_channel is None or held_channel[0] is not connection or held_channel[1].is_closed:
                    opened = await asyncio.wait_for(connection.channel(), self.timeout)
                    self._control = held_channel = (connection, opened)
                channel = held_channel[1]
                try:
                    return await self._claim_on(channel, name, body, ttl, key)
                except _Retry:
                    ttl = None
                    continue
            raise BrokerUnavailable(f"RabbitQueue {self.url}: {operation}: queue {name!r} kept changing; try again")

    async def _claim_on(
        self, channel: Any, name: str, body: bytes | None, ttl: float | None, key: bool
    ) -> tuple[str, bytes]:
        """``_claim``'s work on one channel; raises ``_Retry`` to be called again."""
        aio_pika = import_client("aio_pika", "RabbitQueue", "rabbitmq")
        from aiormq import exceptions, spec

        try:
            if ttl is None:
                # An existing queue only: no declare (a passive one that misses closes the
                # channel); the publish below is mandatory, and comes back if it is missing.
                queue = await channel.get_queue(name, ensure=False)
            else:
                ms = max(1, math.ceil(ttl * 1000))
                arguments: dict[str, Any] = {
                    "x-max-length": 1,
                    "x-overflow": "reject-publish",
                    "x-expires": ms + 60_000 if key else max(1000, ms),
                }
                if key:
                    arguments["x-message-ttl"] = ms
                queue = await asyncio.wait_for(
                    channel.declare_queue(name, durable=True, arguments=arguments), self.timeout
                )
        except exceptions.ChannelPreconditionFailed:
            raise _Retry from None  # declared by another producer with another ttl: it exists
        if body is None:
            return "claimed", b""
        message = aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
        try:
            confirmed = await channel.default_exchange.publish(
                message, routing_key=name, mandatory=True, timeout=self.timeout
            )
        except exceptions.DeliveryError:
            confirmed = None
        if isinstance(getattr(confirmed, "delivery", None), spec.Basic.Return):
            return "missing", b""  # no such queue: the mandatory publish came back
        if isinstance(confirmed, spec.Basic.Ack):
            return "claimed", b""
        # Nacked: the queue is full, it holds a message already.
        if key:
            return "held", b""
        held = await queue.get(no_ack=False, fail=False, timeout=self.timeout)
        if held is not None:
            await held.reject(requeue=True)
            return "held", held.body
        raise _Retry  # emptied in between (it expired): try again

    async def cancel(self, message_id: str) -> bool:
        """See ``Queue.cancel``: a delayed message is cancelled unless its consumer
        claimed it first (the broker confirms one of the two publishes to its state
        queue). A message that is due, or unknown, cannot be cancelled: False."""
        if not message_id or not message_id.isalnum():
            return False
        outcome, _ = await self._claim(f"{self.queue}.state.{message_id}", b"cancelled", None, "cancel")
        return outcome == "claimed"

    async def _cancelled(self, message_id: str) -> bool:
        """A consumer's side of ``cancel``: claim a cancellable message as started;
        True if a cancel got there first (the message is then dropped)."""
        # The state queue is left to expire (x-expires): it holds "started" or
        # "cancelled" meanwhile, so a later cancel, or a redelivery, reads the outcome.
        outcome, held = await self._claim(f"{self.queue}.state.{message_id}", b"started", None, "receive")
        return outcome == "held" and held == b"cancelled"

    # -- consuming ----------------------------------------------------------------------
    async def _consume(self, prefetch: int) -> None:
        """Consume with at least ``prefetch`` unacknowledged messages allowed. RabbitMQ
        applies ``basic.qos`` to a quorum queue's consumer when it starts, so a larger
        prefetch cancels the consumer and starts it again on the same channel: what it
        holds stays held (acks are per channel), and nothing is redelivered."""
        await self._connect()
        channel = self._consumer
        if channel is None or channel.is_closed:
            assert self._connection is not None
            channel = await asyncio.wait_for(self._connection.channel(), self.timeout)
            self._lose_all()  # the old channel's deliveries went back to the broker with it
            self._consumer_tag = None

            def on_channel_closed(*_args: Any) -> None:
                if self._consumer is channel:
                    self._consumer = None
                    self._lose_all()

            channel.close_callbacks.add(on_channel_closed)
            self._consumer = channel
            self._queue = await asyncio.wait_for(channel.get_queue(self.queue, ensure=False), self.timeout)
        elif prefetch <= self._prefetch:
            return
        assert self._queue is not None
        if self._consumer_tag is not None:
            await asyncio.wait_for(self._queue.cancel(self._consumer_tag), self.timeout)
            self._consumer_tag = None
        await asyncio.wait_for(channel.set_qos(prefetch_count=prefetch), self.timeout)
        self._prefetch = prefetch
        generation, buffer = self._generation, self._buffer

        async def on_message(message: AbstractIncomingMessage) -> None:
            buffer.put_nowait((generation, message))

        self._consumer_tag = await asyncio.wait_for(self._queue.consume(on_message, no_ack=False), self.timeout)
        if self.lease is not None and (self._watchdog is None or self._watchdog.done()):
            self._watchdog = asyncio.get_running_loop().create_task(self._watch_leases())

    async def receive(self, limit: int, timeout: float) -> list[Delivery]:
        """Up to ``limit`` messages, waiting at most ``timeout`` seconds (and at most a
        second) for the first. The consumer's prefetch is what this consumer holds plus
        ``limit`` (raised when a call asks for more), so the broker never sends it more
        than it was asked for."""
        if limit < 1:
            return []
        with self._errors("receive"):
            await self._consume(len(self._held) + limit)
            buffer = self._buffer
            messages: list[AbstractIncomingMessage] = []
            generation = self._generation
            wait = min(max(timeout, 0.0), _RECEIVE_CAP)
            first: tuple[int, AbstractIncomingMessage] | None = None
            if not buffer.empty():
                first = buffer.get_nowait()
            elif wait > 0:
                with contextlib.suppress(TimeoutError, asyncio.TimeoutError):
                    first = await asyncio.wait_for(buffer.get(), wait)
            if first is not None:
                messages.append(first[1])
                while len(messages) < limit and not buffer.empty():
                    messages.append(buffer.get_nowait()[1])
            if generation != self._generation:
                return []  # the channel died while we waited: those went back to the broker
            deliveries = []
            for message in messages:
                delivery = await self._accept(message, generation)
                if delivery is not None:
                    deliveries.append(delivery)
            return deliveries

    async def _accept(self, message: AbstractIncomingMessage, generation: int) -> Delivery | None:
        """Hold a message as a delivery; a delayed one that is not due yet (a delay
        longer than the largest bucket) hops through a delay queue again."""
        headers = dict(message.headers or {})
        due = _number(headers.get("due"))
        if due is not None and due - time.time() > 0.5:
            await self._send(message.body, headers, message.message_id or uuid.uuid4().hex, float(due), "delay hop")
            await message.ack()
            return None
        cancellable = headers.get("cancellable") in ("1", b"1") and message.message_id
        if cancellable and await self._cancelled(str(message.message_id)):
            await message.ack()
            return None
        delivery_id = f"{message.message_id or 'message'}@{generation}.{message.delivery_tag}"
        delivery = decode_message(delivery_id, headers, message.body)
        expires = time.monotonic() + self.lease if self.lease is not None else math.inf
        self._held[delivery_id] = _Held(message, generation, expires)
        return delivery

    async def _watch_leases(self) -> None:
        """With ``lease`` set: close the consumer's channel when a delivery went
        unrenewed for longer (its holder stopped), so the broker redelivers what it
        held. A late wake-up (the whole loop stalled, renewals too) extends the leases
        instead: a stall is not a dead holder."""
        assert self.lease is not None
        interval = min(self.lease / 4, 0.25)
        while not self._closed:
            asked = time.monotonic()
            await asyncio.sleep(interval)
            now = time.monotonic()
            if now - asked > interval + self.lease / 2:
                for held in self._held.values():
                    held.expires = max(held.expires, now + self.lease)
                continue
            if any(held.expires <= now for held in self._held.values()):
                channel, self._consumer = self._consumer, None
                LOG.warning("queue.lease_expired", queue=self.queue, consumer=self.consumer, held=len(self._held))
                self._lose_all()
                if channel is not None:
                    await self._close_quietly(channel)

    # -- settling -----------------------------------------------------------------------
    def _owned(self, delivery: Delivery) -> _Held | None:
        held = self._held.get(delivery.id)
        if held is None or held.generation != self._generation:
            return None
        return held

    async def _finish(self, op: str, delivery: Delivery, held: _Held) -> bool:
        """Ack the held message; False if its channel died meanwhile (lost)."""
        self._held.pop(delivery.id, None)
        if held.generation != self._generation:
            return False
        try:
            await held.message.ack()
        except Exception as exc:  # a dead channel: the broker has taken the message back
            LOG.debug("queue.settle_lost", op=op, job=delivery.job, job_id=delivery.id, error=type(exc).__name__)
            return False
        return True

    async def ack(self, delivery: Delivery) -> bool:
        """Done: ``basic.ack``, if the delivery is still this consumer's (else False)."""
        held = self._owned(delivery)
        if held is None:
            return False
        return await self._finish("ack", delivery, held)

    def _body(self, delivery: Delivery) -> bytes:
        raw = delivery.raw.get("body") if isinstance(delivery.raw, Mapping) else None
        return raw if isinstance(raw, bytes) else encode_payload(delivery.payload).encode("utf-8")

    async def retry(self, delivery: Delivery, delay: float, error: str) -> bool:
        """Publish it again as attempt + 1 (after ``delay`` seconds, rounded up to a
        bucket), confirmed, then ack this delivery; ``error`` is kept as the
        ``last_error`` header (first 500 characters). False if it was not ours."""
        if delivery.malformed is not None:
            raise ValueError(
                f"retry of message {delivery.id}: a malformed message ({delivery.malformed}) cannot be "
                f"retried; dead-letter it"
            )
        held = self._owned(delivery)
        if held is None:
            return False
        headers = {
            "job": delivery.job,
            "attempt": delivery.attempt + 1,
            "enqueued_at": repr(delivery.enqueued_at),
            "last_error": error[:500],
        }
        header_text = encode_headers(delivery.job, delivery.headers)
        if header_text is not None:
            headers["headers"] = header_text
        due = time.time() + delay if delay > 0 else None
        message_id = held.message.message_id or uuid.uuid4().hex
        await self._send(self._body(delivery), headers, message_id, due, f"retry of job {delivery.job!r}")
        return await self._finish("retry", delivery, held)

    async def dead_letter(self, delivery: Delivery, record: Mapping[str, Any]) -> bool:
        """Append ``record`` to the dead-letter stream (confirmed), then ack this
        delivery. A malformed delivery's body is kept as its exact bytes, and its
        headers with it."""
        held = self._owned(delivery)
        if held is None:
            return False
        entry = dict(record)
        body = json.dumps(entry, default=repr).encode("utf-8")
        headers: dict[str, Any] = {"kind": "dead"}
        if delivery.malformed is not None and isinstance(delivery.raw, Mapping):
            # The body is the message's own bytes; the record rides in a header.
            entry["raw:headers"] = _json_safe(delivery.raw.get("headers", {}))
            headers = {"kind": "malformed", "record": json.dumps(entry, default=repr)}
            body = self._body(delivery) if isinstance(delivery.raw.get("body"), bytes) else b""
        await self._publish(
            self.dead_letter_queue, body, headers, uuid.uuid4().hex, f"dead letter of job {delivery.job!r}"
        )
        return await self._finish("dead_letter", delivery, held)

    async def release(self, delivery: Delivery) -> bool:
        """Put it back now, unchanged (same headers and body), as a new message, then
        ack this one: redelivered at once, no delivery counted (the deliveries counted
        so far travel in the ``returns`` header)."""
        held = self._owned(delivery)
        if held is None:
            return False
        headers = {k: v for k, v in (held.message.headers or {}).items() if k != "x-delivery-count"}
        headers["returns"] = delivery.deliveries - 1
        message_id = held.message.message_id or uuid.uuid4().hex
        await self._publish(self.queue, held.message.body, headers, message_id, f"release of job {delivery.job!r}")
        return await self._finish("release", delivery, held)

    async def renew(self, deliveries: Sequence[Delivery]) -> list[str]:
        """Extend the leases of the deliveries still held on a live channel; returns
        the ids of the others (their channel died, or they were settled)."""
        lost = []
        expires = time.monotonic() + self.lease if self.lease is not None else math.inf
        for delivery in deliveries:
            held = self._owned(delivery)
            if held is None:
                lost.append(delivery.id)
            else:
                held.expires = expires
        return lost

    # -- dead letters -------------------------------------------------------------------
    async def _scan(self) -> tuple[dict[int, dict[str, Any]], int]:
        """Every live dead letter by offset, and the fence's offset. Reads the stream
        from its first entry up to a fence appended now, applying tombstones."""
        fence = uuid.uuid4().hex
        await self._publish(self.dead_letter_queue, b"", {"kind": "fence", "fence": fence}, fence, "dead letter scan")
        live: dict[int, dict[str, Any]] = {}
        removed: set[int] = set()
        cleared_below = -1
        fence_offset = -1
        with self._errors("dead letter scan"):
            await self._connect()
            assert self._connection is not None
            channel = await asyncio.wait_for(self._connection.channel(), self.timeout)
            try:
                await asyncio.wait_for(channel.set_qos(prefetch_count=500), self.timeout)
                stream = await asyncio.wait_for(channel.get_queue(self.dead_letter_queue, ensure=False), self.timeout)
                done = asyncio.get_running_loop().create_future()

                async def on_entry(message: AbstractIncomingMessage) -> None:
                    nonlocal cleared_below, fence_offset
                    await message.ack()
                    headers = message.headers or {}
                    offset = headers.get("x-stream-offset")
                    if not isinstance(offset, int) or done.done():
                        return
                    kind = _text(headers.get("kind"))
                    if kind == "fence":
                        if _text(headers.get("fence")) == fence:
                            fence_offset = offset
                            done.set_result(None)
                    elif kind == "tombstone":
                        ids = _text(headers.get("ids")) or ""
                        removed.update(int(i) for i in ids.split(",") if i.isdigit())
                        below = headers.get("below")
                        if isinstance(below, int):
                            cleared_below = max(cleared_below, below)
                    elif kind in ("dead", "malformed"):
                        live[offset] = self._dead_record(offset, kind, headers, message.body)

                await asyncio.wait_for(
                    stream.consume(on_entry, arguments={"x-stream-offset": "first"}), self.timeout
                )
                await asyncio.wait_for(done, self.timeout * 3)
            finally:
                await self._close_quietly(channel)
        return {
            offset: record
            for offset, record in live.items()
            if offset not in removed and offset >= cleared_below and offset < fence_offset
        }, fence_offset

    @staticmethod
    def _dead_record(offset: int, kind: str, headers: Mapping[str, Any], body: bytes) -> dict[str, Any]:
        text = _text(headers.get("record")) if kind == "malformed" else body.decode("utf-8", "replace")
        try:
            record = json.loads(text or "{}")
        except ValueError:
            record = {"error": "unreadable dead letter record"}
        if not isinstance(record, dict):
            record = {"record": record}
        if kind == "malformed":
            record["raw:body"] = body
        record["dead_letter_id"] = str(offset)
        return record

    async def _tombstone(self, ids: Sequence[int] = (), below: int | None = None) -> None:
        # Text: aio-pika drops a list header, and AMQP floats are 32-bit.
        headers: dict[str, Any] = {"kind": "tombstone", "ids": ",".join(map(str, ids))}
        if below is not None:
            headers["below"] = below
        await self._publish(self.dead_letter_queue, b"", headers, uuid.uuid4().hex, "dead letter removal")

    @staticmethod
    def _offset(dead_id: str, operation: str) -> int:
        try:
            offset = int(dead_id)
        except (TypeError, ValueError):
            offset = -1
        if offset < 0 or str(offset) != str(dead_id):
            raise ValueError(f"{operation}: {dead_id!r} is not a dead_letter_id (a stream offset like '42')")
        return offset

    async def dead_letters(self, count: int = 100, before: str | None = None) -> list[dict[str, Any]]:
        """Dead letters, newest first: at most ``count``, older than the dead letter
        ``before`` (exclusive) when given. Each has its ``dead_letter_id`` (the stream
        offset); a malformed message's record has ``raw:body`` (its exact bytes) and
        ``raw:headers``."""
        limit = self._offset(before, "dead_letters: before") if before is not None else None
        if count < 1:
            return []
        live, _fence = await self._scan()
        offsets = sorted((o for o in live if limit is None or o < limit), reverse=True)
        return [live[offset] for offset in offsets[:count]]

    async def replay(self, ids: Sequence[str]) -> int:
        """Publish these dead letters to the queue as new messages (attempt 1, same job
        and payload), then tombstone them. Missing ids and malformed dead letters are
        skipped; returns how many were replayed."""
        offsets = [self._offset(dead_id, "replay") for dead_id in ids]
        if not offsets:
            return 0
        live, _fence = await self._scan()
        replayed: list[int] = []
        for offset in dict.fromkeys(offsets):
            record = live.get(offset)
            if record is None:
                continue
            job, payload = record.get("job"), record.get("payload")
            if not isinstance(job, str) or not job or not isinstance(payload, dict):
                continue  # malformed: nothing to run; it stays for a human
            await self.enqueue(job, payload, headers=record_headers(record))
            replayed.append(offset)
        if replayed:
            await self._tombstone(replayed)
        return len(replayed)

    async def purge(self, ids: Sequence[str] | None = None) -> int:
        """Delete these dead letters, or all of them (``ids=None``), by appending a
        tombstone; returns how many were deleted."""
        offsets = None if ids is None else [self._offset(dead_id, "purge") for dead_id in ids]
        if offsets == []:
            return 0
        live, fence = await self._scan()
        if offsets is None:
            if live:
                await self._tombstone(below=fence)
            return len(live)
        gone = [offset for offset in dict.fromkeys(offsets) if offset in live]
        if gone:
            await self._tombstone(gone)
        return len(gone)

    async def close(self) -> None:
        """Close the connection (idempotent; a dead broker is not an error here). What
        this consumer held and did not settle goes back to the queue."""
        self._closed = True
        if self._watchdog is not None:
            self._watchdog.cancel()
            with contextlib.suppress(BaseException):
                await self._watchdog
            self._watchdog = None
        connection, self._connection = self._connection, None
        self._publisher = self._consumer = None
        self._held.clear()
        if connection is not None:
            await self._close_quietly(connection)


def from_url(url: str, **options: Any) -> RabbitQueue:
    """A ``RabbitQueue`` from ``amqp://user:password@host:port/vhost?queue=jobs``
    (``amqps://`` for TLS); query options ``queue``, ``dead_letter_queue``, ``lease``,
    ``timeout``, ``dead_letter_max_age``; ``options`` win over the URL's.

    Args:
        url: the AMQP URL with the queue's options in its query.
        options: keyword arguments for ``RabbitQueue``.
    """
    parts = urlsplit(url)
    given, kept = _options(url, parse_qsl(parts.query, keep_blank_values=True), _OPTIONS, strict=False)
    plain = urlunsplit(parts._replace(query="&".join(f"{k}={v}" for k, v in kept)))
    return RabbitQueue(plain, **{**given, **options})
