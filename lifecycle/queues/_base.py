"""What a worker needs from a queue, and the helpers every backend shares.

A message names a job and carries its JSON payload; it is acknowledged only after the
job and its whole teardown succeeded. The contract every backend keeps (checked by
``tests/test_queue_contract.py``):

- ``receive`` never raises for a message it cannot decode: it returns that message as
  a ``Delivery`` whose ``malformed`` says why, and the worker dead-letters it with
  reason ``malformed`` (the raw message preserved). The rest of the batch goes on.
- A transient broker failure (lost connection, timeout, restart) raises
  ``BrokerUnavailable`` from any method; the worker backs off and tries again, and the
  message stays with the broker meanwhile. Anything else raised by ``open`` is a
  misconfiguration, and fails the worker at start-up.
- Settling (``ack``, ``retry``, ``dead_letter``, ``release``) is idempotent and
  owner-checked: settling a delivery a second time, or one whose lease this consumer
  lost to another, changes nothing. So the worker may repeat a settle whose answer it
  never got.
- A leased delivery (``lease`` is not None) stays with this consumer while ``renew`` is
  called more often than every ``lease`` seconds; one left unrenewed longer (its worker
  died) is redelivered to another consumer, and only then is ``deliveries`` counted up.
- ``release`` puts the message back for redelivery with the same attempt, without
  counting a delivery: a job cancelled by shutdown does not use up its retries."""

from __future__ import annotations

import importlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import sniffio

from .._errors import LifecycleError
from .._observe import inject_headers

if TYPE_CHECKING:
    from .._job import Job

MAX_PAYLOAD_BYTES = 1 << 20  # a payload larger than this is malformed: 1 MiB of JSON
DEDUP_TTL = 86400.0  # seconds a dedup_key is remembered when enqueue is not told
MAX_PAYLOAD_DEPTH = 64  # nesting deeper than this is malformed (json recurses per level)
MAX_HEADERS_BYTES = 16 << 10  # headers are metadata (trace context, tags), not a second payload


class BrokerUnavailable(LifecycleError):
    """The broker could not be reached or did not answer in time: a transient failure.
    A worker waits with capped exponential backoff and tries again; it never exits."""


class MalformedMessage(ValueError):
    """A message's fields could not be decoded (raised by ``decode_payload`` and the
    backends' field decoders; a backend turns it into ``Delivery.malformed``)."""


@dataclass(slots=True)
class Delivery:
    """One received message.

    Attributes:
        id: the broker's id for this delivery (settling uses it).
        job: the job's name (empty when the message is malformed).
        payload: the decoded JSON payload (None when malformed).
        attempt: 1-based; a retry re-enqueues with ``attempt + 1``.
        deliveries: times the message was handed to a consumer; more than one only
            after a consumer died holding it (its lease expired).
        enqueued_at: when it was first enqueued, in seconds since the epoch.
        raw: the backend's own handle (the raw fields, say).
        malformed: why the message could not be decoded, or None for a good one.
        headers: the string headers given to ``enqueue`` (trace context, say), kept
            through retries, releases and replays; empty when none were given.
    """

    id: str
    job: str
    payload: Any
    attempt: int = 1
    deliveries: int = 1
    enqueued_at: float = 0.0
    raw: Any = field(default=None, repr=False)
    malformed: str | None = None
    headers: dict[str, str] = field(default_factory=dict)


class Queue(Protocol):
    """The seam between a ``Worker`` and a broker (see the module docstring)."""

    lease: float | None
    """Seconds a delivery stays owned without ``renew``; None: not leased."""

    async def open(self) -> None:
        """Connect and check the configuration (address, credentials, permissions);
        raise a clear error if it is wrong. Idempotent; the worker calls it at start."""
        ...

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
        """Add a message; return its id.

        Args:
            job: the job's name, or a ``Job`` (its payload is then validated first and a
                bad one raises ``PayloadError`` here, never entering the broker).
            payload: the job's arguments, a JSON-serialisable mapping (never keyword
                arguments, which could clash with ``delay``/``at`` or a parameter).
            delay: seconds from now; None or <= 0 means now. Not with ``at``.
            at: when to run it, in seconds since the epoch. Not with ``delay``.
            attempt: the attempt number the message carries (1-based).
            headers: string metadata carried with the message and handed back as
                ``Delivery.headers`` (a W3C ``traceparent``, say); at most
                ``MAX_HEADERS_BYTES`` of JSON. Not validated against the job.
            dedup_key: a de-duplication key. While a message enqueued with this key
                is remembered (``dedup_ttl``), enqueueing with it again adds nothing
                and returns that first message's id, atomically with the enqueue
                however many producers race (see each backend for its guarantee).
                None: no de-duplication.
            dedup_ttl: seconds the key is remembered from the enqueue that set it
                (> 0); None: ``DEDUP_TTL`` (a day). Only with ``dedup_key``.
        """
        ...

    async def cancel(self, message_id: str) -> bool:
        """Remove a message that no consumer has received yet (a delayed one, or one
        waiting its turn); True if it was removed. A message already received, started,
        settled, cancelled, or unknown is left alone: False. A cancelled message keeps
        its ``dedup_key`` taken until the key expires (cancelling a schedule's tick
        cancels it for the whole fleet).

        Args:
            message_id: what ``enqueue`` returned.
        """
        ...

    async def receive(self, limit: int, timeout: float) -> list[Delivery]:
        """Hand out up to ``limit`` messages, waiting up to ``timeout`` seconds for the
        first; an empty list is a normal answer. Never raises for a message it cannot
        decode (see ``Delivery.malformed``).

        Args:
            limit: the most messages to return (the worker's free slots).
            timeout: seconds to wait for the first one; a backend may return earlier.
        """
        ...

    async def ack(self, delivery: Delivery) -> bool:
        """The job and its teardown succeeded: the message is done. Like every settle,
        returns False (and changes nothing) if the delivery is not this consumer's any
        more: settled already, or taken over by another consumer.

        Args:
            delivery: what ``receive`` handed out.
        """
        ...

    async def retry(self, delivery: Delivery, delay: float, error: str) -> bool:
        """Run it again after ``delay`` seconds as attempt + 1; done with this delivery.

        Args:
            delivery: what ``receive`` handed out.
            delay: seconds before the next attempt is delivered (>= 0).
            error: the failure, ``Type: message``, kept with the message.
        """
        ...

    async def dead_letter(self, delivery: Delivery, record: Mapping[str, Any]) -> bool:
        """Park it with the failure recorded; done with this delivery.

        Args:
            delivery: what ``receive`` handed out.
            record: what to keep: job, payload, reason, error, error_type, traceback,
                attempts, deliveries, failed_at (a malformed delivery's raw fields are
                kept too).
        """
        ...

    async def release(self, delivery: Delivery) -> bool:
        """Not finished (shutdown): redeliver it with the same attempt, without
        counting a delivery.

        Args:
            delivery: what ``receive`` handed out.
        """
        ...

    async def renew(self, deliveries: Sequence[Delivery]) -> list[str]:
        """Still working on these: extend their leases. Returns the ids of those this
        consumer no longer owns (another consumer took them over).

        Args:
            deliveries: the deliveries this consumer is still running.
        """
        ...

    async def dead_letters(self, count: int = 100, before: str | None = None) -> list[dict[str, Any]]:
        """Dead letters, newest first, each with its ``dead_letter_id``.

        Args:
            count: the most to return.
            before: a ``dead_letter_id``: return only older ones (the next page). None
                starts from the newest.
        """
        ...

    async def replay(self, ids: Sequence[str]) -> int:
        """Put these dead letters back on the queue as new messages (attempt 1) and
        remove them from the dead letters; returns how many were replayed (malformed
        ones, with nothing to run, are skipped).

        Args:
            ids: ``dead_letter_id`` values.
        """
        ...

    async def purge(self, ids: Sequence[str] | None = None) -> int:
        """Delete dead letters; returns how many were deleted.

        Args:
            ids: ``dead_letter_id`` values; None deletes all of them.
        """
        ...

    async def close(self) -> None:
        """Release the connections; idempotent."""
        ...


def require_asyncio(queue: str, client: str) -> None:
    """Refuse to run ``queue`` on another event loop than asyncio, whose ``client``
    library is asyncio-only: a clear error at construction (and again on first use, for
    one constructed outside any event loop) instead of a failure deep in the client."""
    try:
        library = sniffio.current_async_library()
    except sniffio.AsyncLibraryNotFoundError:
        return  # constructed outside any event loop: checked again on first use
    if library != "asyncio":
        raise LifecycleError(
            f"{queue} needs the asyncio backend ({client} is asyncio-only), but it is running under "
            f"{library}; use backend='asyncio' (CLI: --backend asyncio)"
        )


def import_client(module: str, queue: str, extra: str) -> Any:
    """Import an optional client library, or say which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        distribution = module.split(".")[0].replace("_", "-")
        raise LifecycleError(
            f"{queue} needs {distribution}, which is not installed: pip install 'lifecycle[{extra}]'"
        ) from None


RAW_COLUMNS = ("job", "payload", "attempt", "enqueued_at")  # a malformed row's columns, kept raw


def dead_record_from_row(row: Sequence[Any]) -> dict[str, Any]:
    """A dead letter as the SQL backends store it: ``(id, record JSON, *RAW_COLUMNS)``,
    as the ``dead_letters`` dict (the record, its ``dead_letter_id``, and
    ``raw:<column>`` for the raw columns a malformed message kept)."""
    dead_id, text, *raw = row
    try:
        loaded = json.loads(text)
    except (ValueError, TypeError):
        loaded = None
    record: dict[str, Any] = loaded if isinstance(loaded, dict) else {"record": text}
    record["dead_letter_id"] = str(dead_id)
    for column, value in zip(RAW_COLUMNS, raw, strict=True):
        if value is not None:
            record[f"raw:{column}"] = value
    return record


def check_enqueue(
    job: str | Job[..., Any],
    delay: float | None,
    at: float | None,
    attempt: int,
    dedup_key: str | None = None,
    dedup_ttl: float | None = None,
) -> float | None:
    """The arguments every backend's ``enqueue`` refuses the same way (``ValueError``):
    ``delay`` with ``at``, an attempt below 1, an empty or non-string ``dedup_key``, a
    ``dedup_ttl`` that is not positive or comes without a key. Returns the seconds the
    key is to be remembered (None without a key)."""
    if delay is not None and at is not None:
        raise ValueError(f"enqueue of {job!r}: give delay or at, not both (delay={delay!r}, at={at!r})")
    if attempt < 1:
        raise ValueError(f"enqueue of {job!r}: attempt must be >= 1, got {attempt!r}")
    if dedup_key is None:
        if dedup_ttl is not None:
            raise ValueError(f"enqueue of {job!r}: dedup_ttl={dedup_ttl!r} without a dedup_key")
        return None
    if not isinstance(dedup_key, str) or not dedup_key:
        raise ValueError(f"enqueue of {job!r}: dedup_key must be a non-empty string, got {dedup_key!r}")
    ttl = DEDUP_TTL if dedup_ttl is None else dedup_ttl
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not ttl > 0 or ttl == float("inf"):
        raise ValueError(f"enqueue of {job!r}: dedup_ttl must be a positive number of seconds, got {dedup_ttl!r}")
    return float(ttl)


def encode_headers(job: str | Job[..., Any], headers: Mapping[str, str] | None) -> str | None:
    """JSON text of ``enqueue``'s headers, or None for none. A header that is not a
    string, an empty name, or more than ``MAX_HEADERS_BYTES`` in all is a ``ValueError``
    naming the job and the header, at the producer. The current OpenTelemetry trace
    context is added when there is one and the headers carry none (see ``_observe``)."""
    headers = inject_headers(headers)
    if not headers:
        return None
    for name, value in headers.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"enqueue of {job!r}: header names must be non-empty strings, got {name!r}")
        if not isinstance(value, str):
            raise ValueError(f"enqueue of {job!r}: header {name!r} must be a string, got {type(value).__name__}")
    text = json.dumps(dict(headers), separators=(",", ":"))
    if len(text.encode("utf-8")) > MAX_HEADERS_BYTES:
        raise ValueError(f"enqueue of {job!r}: headers are over the limit of {MAX_HEADERS_BYTES} bytes")
    return text


def decode_headers(raw: bytes | str | None) -> dict[str, str]:
    """Headers from the broker (what ``encode_headers`` wrote; None or empty: none);
    anything but a JSON object of strings within ``MAX_HEADERS_BYTES`` raises
    ``MalformedMessage``."""
    if not raw:
        return {}
    if len(raw) > MAX_HEADERS_BYTES:
        raise MalformedMessage(f"headers are {len(raw)} bytes, over the limit of {MAX_HEADERS_BYTES}")
    try:
        loaded = json.loads(raw)
    except (ValueError, TypeError) as exc:  # UnicodeDecodeError is a ValueError
        raise MalformedMessage(f"headers are not JSON: {type(exc).__name__}: {exc}") from None
    if not isinstance(loaded, dict) or not all(
        isinstance(name, str) and isinstance(value, str) for name, value in loaded.items()
    ):
        raise MalformedMessage("headers are not a JSON object of strings")
    return loaded


def record_headers(record: Mapping[str, Any]) -> dict[str, str] | None:
    """The headers a dead letter's record kept (the worker stores ``Delivery.headers``
    there), for ``replay``; None when it has none, or none that are strings."""
    headers = record.get("headers")
    if isinstance(headers, dict) and all(isinstance(k, str) and k and isinstance(v, str) for k, v in headers.items()):
        return headers or None
    return None


def job_name(job: str | Job[..., Any], payload: Mapping[str, Any] | None) -> tuple[str, dict[str, Any]]:
    """The name to put on the message and the payload as a plain dict. A ``Job`` has
    its payload validated and serialised by its payload model (``Job.dump_payload``:
    ``PayloadError`` for a bad payload, so it never enters the broker; models, dates
    and UUIDs become their JSON form, which the worker's validation converts back).
    A name alone cannot be checked: its payload goes as given."""
    if isinstance(job, str):
        return job, dict(payload or {})
    return job.name, job.dump_payload(payload if payload is not None else {})


def encode_payload(payload: Mapping[str, Any]) -> str:
    """JSON text of a payload; a value JSON cannot carry is a ``TypeError`` here, at the
    producer, rather than a dead letter later."""
    return json.dumps(dict(payload), separators=(",", ":"), allow_nan=False)


def decode_payload(raw: bytes | str) -> Any:
    """A payload from the broker: UTF-8 JSON of at most ``MAX_PAYLOAD_BYTES`` bytes and
    ``MAX_PAYLOAD_DEPTH`` levels; anything else raises ``MalformedMessage``."""
    if isinstance(raw, str):
        try:
            raw = raw.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise MalformedMessage(f"payload is not valid UTF-8: {exc}") from None
    if len(raw) > MAX_PAYLOAD_BYTES:
        raise MalformedMessage(f"payload is {len(raw)} bytes, over the limit of {MAX_PAYLOAD_BYTES}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedMessage(f"payload is not valid UTF-8: {exc}") from None
    _check_depth(text)
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise MalformedMessage(f"payload is not JSON: {type(exc).__name__}: {exc}") from None


def _check_depth(text: str) -> None:
    """Refuse nesting deeper than MAX_PAYLOAD_DEPTH before json recurses into it. The
    character scan runs only when there are enough brackets to nest that deep at all."""
    if text.count("[") + text.count("{") <= MAX_PAYLOAD_DEPTH:
        return
    depth = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > MAX_PAYLOAD_DEPTH:
                raise MalformedMessage(f"payload nests deeper than {MAX_PAYLOAD_DEPTH} levels")
        elif char in "]}":
            depth -= 1
