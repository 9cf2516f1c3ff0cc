"""One string names a queue: ``queue_from_url`` turns ``sqlite:///jobs.db``,
``redis://host:6379/0?stream=jobs&group=workers`` or ``memory://`` into the queue object,
so the command line and configuration files need no Python to choose a backend.

Query options are the queue's keyword arguments, converted to the argument's type; a
keyword given to ``queue_from_url`` wins over the same option in the URL. An option the
backend does not have is an error that lists the ones it has, so a typo is not silently
ignored. URLs appear in errors with the password masked."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

from .._log import redact
from ._base import Queue
from ._memory import MemoryQueue
from ._sqlite import SqliteQueue

KNOWN_SCHEMES = (
    "sqlite:///PATH",
    "redis://HOST[:PORT][/DB]",
    "rediss://HOST[:PORT][/DB]",
    "memory://",
    "postgresql://…",
    "amqp://…",
    "nats://…",
)

# Backends whose client library is optional: the scheme names the module, imported only
# when used, whose ``from_url(url, **options)`` builds the queue (with ``_options`` for
# its query).
_PLUGGED = {
    "postgres": "._postgres",
    "postgresql": "._postgres",
    "amqp": "._rabbit",
    "amqps": "._rabbit",
    "nats": "._nats",
    "tls": "._nats",
}

_SQLITE_OPTIONS: dict[str, Callable[[str], Any]] = {
    "name": str,
    "lease": float,
    "poll_interval": float,
    "busy_timeout": float,
    "synchronous": str,
    "consumer": str,
}
_REDIS_OPTIONS: dict[str, Callable[[str], Any]] = {
    "stream": str,
    "group": str,
    "consumer": str,
    "dead_letter_stream": str,
    "claim_idle": float,
    "claim_interval": float,
    "consumer_timeout": float,
    "max_connections": int,
    "socket_timeout": float,
    "connect_timeout": float,
    "health_check_interval": float,
}
_MEMORY_OPTIONS: dict[str, Callable[[str], Any]] = {"lease": float}


def _options(
    url: str, query: list[tuple[str, str]], known: Mapping[str, Callable[[str], Any]], *, strict: bool = True
) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """The queue's options from the query, converted; and the query items left over
    (passed on to the driver when not ``strict``)."""
    options: dict[str, Any] = {}
    rest: list[tuple[str, str]] = []
    for key, value in query:
        convert = known.get(key)
        if convert is None:
            if strict:
                raise ValueError(
                    f"queue URL {redact(url)}: unknown option {key!r}; this backend takes: {', '.join(sorted(known))}"
                )
            rest.append((key, value))
            continue
        try:
            options[key] = convert(value)
        except ValueError:
            raise ValueError(
                f"queue URL {redact(url)}: option {key!r} must be {'a number' if convert is not str else 'text'}, "
                f"got {value!r}"
            ) from None
    return options, rest


def queue_from_url(url: str, **options: Any) -> Queue:
    """The queue a URL names.

    - ``sqlite:///relative/path.db``, ``sqlite:////absolute/path.db`` (the path is what
      follows ``sqlite:///``; ``sqlite:///:memory:`` is a private in-memory database):
      a ``SqliteQueue``; options ``name``, ``lease``, ``poll_interval``,
      ``busy_timeout``, ``synchronous``, ``consumer``.
    - ``redis://[user:password@]host[:port][/db]`` or ``rediss://…``: a
      ``RedisStreamQueue`` (needs ``redis``); options ``stream``, ``group``,
      ``consumer``, ``dead_letter_stream``, ``claim_idle``, ``claim_interval``,
      ``consumer_timeout``, ``max_connections``, ``socket_timeout``,
      ``connect_timeout``, ``health_check_interval``; other query items go to redis-py.
    - ``memory://``: a ``MemoryQueue`` (one process only); option ``lease``.

    Args:
        url: the queue's URL, options in its query (``?lease=10&name=emails``).
        options: keyword arguments for the queue's constructor; they win over the same
            option in the URL.

    Raises:
        ValueError: an unknown scheme (the message lists the known ones), a missing
            path, an unknown option or one that does not convert.
    """
    if not isinstance(url, str):
        raise TypeError(f"queue_from_url: url must be a string, got {type(url).__name__}")
    scheme, _, rest = url.partition("://")
    scheme = scheme.lower()
    if not _:
        raise ValueError(f"queue URL {redact(url)!r} has no scheme; expected one of: {', '.join(KNOWN_SCHEMES)}")
    if scheme == "sqlite":
        location, _, query = rest.partition("?")
        if not location.startswith("/") or location == "/":
            raise ValueError(
                f"queue URL {redact(url)!r}: expected sqlite:///relative/path.db or sqlite:////absolute/path.db "
                f"(three slashes, then the path)"
            )
        path = unquote(location[1:])
        given, _rest = _options(url, parse_qsl(query, keep_blank_values=True), _SQLITE_OPTIONS)
        return SqliteQueue(path, **{**given, **options})
    if scheme in ("redis", "rediss"):
        from ._redis import RedisStreamQueue  # redis is an optional dependency

        parts = urlsplit(url)
        given, kept = _options(url, parse_qsl(parts.query, keep_blank_values=True), _REDIS_OPTIONS, strict=False)
        plain = urlunsplit(parts._replace(query=urlencode(kept)))
        return RedisStreamQueue(plain, **{**given, **options})
    if scheme == "memory":
        location, _, query = rest.partition("?")
        if location.strip("/"):
            raise ValueError(
                f"queue URL {redact(url)!r}: a memory queue has no address; use memory:// (or memory://?lease=10)"
            )
        given, _rest = _options(url, parse_qsl(query, keep_blank_values=True), _MEMORY_OPTIONS)
        return MemoryQueue(**{**given, **options})
    if scheme in _PLUGGED:
        module = importlib.import_module(_PLUGGED[scheme], __package__)
        queue: Queue = module.from_url(url, **options)
        return queue
    raise ValueError(f"queue URL {redact(url)!r}: unknown scheme {scheme!r}; known: {', '.join(KNOWN_SCHEMES)}")
