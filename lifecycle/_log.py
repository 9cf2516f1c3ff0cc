"""The library's logging: one logger (``LOG``) and one wording for errors (``describe``).

The library never configures logging and never prints. When the application has
configured structlog, that configuration decides everything (levels, processors,
output). While structlog is unconfigured, its defaults would print every event, debug
included, to stdout; instead the library's events then go to the standard library
logger ``lifecycle`` (which has only a ``NullHandler``), so ``logging``'s configuration,
or Celery's, governs them, and nothing is written unless the application asks.

Each job asks once which levels are enabled, so a filtered-out event costs neither a
logger bind nor its arguments, and the traced runner runs only when debug is on.

No log line carries frame locals (they would print payloads and passwords): a failure's
traceback is logged as plain text in the ``exception`` field, which every structlog
renderer prints as it is, and every ``error`` and ``exception`` text is ``redact``-ed."""

from __future__ import annotations

import asyncio
import logging
import re
import sys
import traceback
from collections.abc import MutableMapping
from typing import Any

import structlog

from ._errors import JobTimeout, LifecycleError, Reject

# scheme://user:password@host -> scheme://user:***@host. Greedy up to the last '@' before
# the path or a space, so an unescaped '@' in the password does not leak its tail; and
# ``password=`` query parameters.
_URL_PASSWORD = re.compile(r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.-]*://[^:/@\s\"']*:)[^/\s\"']*(?=@)")
_QUERY_PASSWORD = re.compile(r"(?i)(?P<head>[?&;]password=)[^&#\s\"']*")


def redact(text: str) -> str:
    """``text`` with the password of every URL in it replaced by ``***`` (in the user
    info and in a ``password=`` query parameter): for log lines, error messages and a
    queue's URL.

    Args:
        text: any text.
    """
    return _QUERY_PASSWORD.sub(r"\g<head>***", _URL_PASSWORD.sub(r"\g<head>***", text))


def describe(exc: BaseException) -> str:
    """One line naming an exception as ``Type: message`` (the one wording used in logs
    and dead letters), redacted (see ``redact``); for an exception group, its leaf
    exceptions joined with ``; ``, so a crash inside a task group reads as its cause
    instead of ``unhandled errors in a TaskGroup (1 sub-exception)``.

    Args:
        exc: the exception (or group) to describe.
    """
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(describe(leaf) for leaf in exc.exceptions)
    message = str(exc)
    return redact(f"{type(exc).__name__}: {message}" if message else type(exc).__name__)


def traceback_text(exc: BaseException) -> str:
    """``exc``'s traceback as plain text, redacted: what an unexpected error logs in its
    ``exception`` field. The standard library's formatting, so never any frame locals,
    whatever renderer the application configured.

    Args:
        exc: the exception (or group) to format.
    """
    return redact("".join(traceback.format_exception(exc)).rstrip("\n"))


# -- the standard library fallback --------------------------------------------------------

STDLIB_LOGGER = logging.getLogger("lifecycle")
# A library adds no handler but this one: without it, the standard library's "last
# resort" handler would print warnings and errors to stderr when the application has
# configured no logging at all.
STDLIB_LOGGER.addHandler(logging.NullHandler())

# LogRecord attributes: a field of the same name cannot be passed as ``extra``.
_RESERVED = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime", "taskName"}
_BARE = re.compile(r"[^\s\"'=]+")


def _value(value: Any) -> str:
    if isinstance(value, str) and _BARE.fullmatch(value):
        return value
    return repr(value)


def _to_stdlib(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The fallback chain's renderer: the record's message is ``event key=value ...``
    (redacted), followed by the traceback text if any; the fields also travel as the
    record's attributes (``extra``) for formatters that want them."""
    event = str(event_dict.pop("event", ""))
    exception = event_dict.pop("exception", None)
    message = redact(" ".join([event, *(f"{key}={_value(value)}" for key, value in event_dict.items())]))
    if exception:
        message += "\n" + redact(str(exception))
    extra = {key: value for key, value in event_dict.items() if key not in _RESERVED}
    extra["event"] = event
    return (message,), {"extra": extra}


# filter_by_level first, so a filtered-out event costs no rendering; format_exc_info
# turns an ``exc_info`` (``ctx.log.exception(...)``) into plain text, without locals.
_FALLBACK: Any = structlog.stdlib.BoundLogger(
    STDLIB_LOGGER,
    processors=[structlog.stdlib.filter_by_level, structlog.processors.format_exc_info, _to_stdlib],
    context={},
)
_CONFIGURED: Any = structlog.get_logger("lifecycle")  # a lazy proxy: the current configuration decides


class _LibraryLogger:
    """``LOG``: structlog's logger when the application configured structlog, the
    standard library fallback while it has not. Decided per call, so a configuration
    made after import (the CLI's, a test's) takes effect at once."""

    __slots__ = ()

    @staticmethod
    def current() -> Any:
        return _CONFIGURED if structlog.is_configured() else _FALLBACK

    def bind(self, **fields: Any) -> Any:
        return self.current().bind(**fields)

    def debug(self, event: str, **fields: Any) -> Any:
        return self.current().debug(event, **fields)

    def info(self, event: str, **fields: Any) -> Any:
        return self.current().info(event, **fields)

    def warning(self, event: str, **fields: Any) -> Any:
        return self.current().warning(event, **fields)

    def error(self, event: str, **fields: Any) -> Any:
        return self.current().error(event, **fields)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.current(), name)


LOG: Any = _LibraryLogger()

# Levels by wrapper class, probed once per class: (debug, info, error), or None for
# structlog's stdlib BoundLogger, whose levels are the stdlib logger's.
_levels_by_wrapper: dict[Any, tuple[bool, bool, bool] | None] = {}
_ALL = (True, True, True)


def _stdlib_levels() -> tuple[bool, bool, bool]:
    enabled = STDLIB_LOGGER.isEnabledFor
    return enabled(logging.DEBUG), enabled(logging.INFO), enabled(logging.ERROR)


def _probe(wrapper: Any) -> tuple[bool, bool, bool] | None:
    if isinstance(wrapper, type) and issubclass(wrapper, structlog.stdlib.BoundLogger):
        return None
    check = getattr(wrapper, "is_enabled_for", None)
    if check is None:
        return _ALL
    try:
        probe = wrapper(None, processors=[], context={})
        return (
            bool(probe.is_enabled_for(logging.DEBUG)),
            bool(probe.is_enabled_for(logging.INFO)),
            bool(probe.is_enabled_for(logging.ERROR)),
        )
    except Exception:  # an unusual wrapper: do not guess
        return _ALL


def _levels() -> tuple[bool, bool, bool]:
    """(debug, info, error) enabled for the library's events; see ``enabled_levels``."""
    if not structlog.is_configured():
        return _stdlib_levels()
    config = structlog.get_config()
    wrapper = config["wrapper_class"]
    try:
        known = _levels_by_wrapper[wrapper]
    except KeyError:
        known = _levels_by_wrapper[wrapper] = _probe(wrapper)
    if known is None:
        if isinstance(config["logger_factory"], structlog.stdlib.LoggerFactory):
            return _stdlib_levels()
        return _ALL
    return known


def enabled_levels() -> tuple[bool, bool]:
    """(debug, info) enabled for the library's events, asked once per job.

    Unconfigured structlog: the ``lifecycle`` stdlib logger's levels. Configured: the
    wrapper class's (``make_filtering_bound_logger``), or the stdlib logger's for
    structlog's stdlib ``BoundLogger`` made by its ``LoggerFactory``; wrapper classes
    that cannot say count as enabled, and their own filtering decides. Public API only:
    ``get_config()`` builds a small dict per call (about 0.2 µs), the price of not
    reading structlog's private state; the probe itself is cached by class."""
    debug, info, _ = _levels()
    return debug, info


# -- how a job ended ----------------------------------------------------------------------


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


def _is_cancellation(exc: BaseException) -> bool:
    if isinstance(exc, (asyncio.CancelledError, KeyboardInterrupt, SystemExit)):
        return True
    trio = sys.modules.get("trio")
    return trio is not None and isinstance(exc, trio.Cancelled)


def log_failure(log: Any, exc: BaseException, **fields: Any) -> None:
    """Log the end of a job that did not succeed, as one event.

    Expected outcomes are one line without a traceback: cancellation (``job.cancelled``,
    warning, no exception text: a cancel scope's message names only internals),
    ``Reject`` (``job.rejected``, warning, with its reason), a timeout (``job.timed_out``,
    error), and the library's own errors (``job.failed``, error; their messages name the
    job, dependency and parameter). Anything else is unexpected: ``job.failed`` with the
    traceback as text in ``exception``. An exception group is judged by its leaves, and
    ``error`` names them (``describe``).

    Args:
        log: the logger to log with (``LOG`` or a bound one).
        exc: what ended the job.
        fields: bound to the event (``job``, ``job_id``, ``attempt``, ...).
    """
    leaves = _leaves(exc)
    if all(_is_cancellation(leaf) for leaf in leaves):
        by = {type(leaf).__name__ for leaf in leaves if isinstance(leaf, (KeyboardInterrupt, SystemExit))}
        if by:
            fields["by"] = ", ".join(sorted(by))
        log.warning("job.cancelled", **fields)
        return
    only = leaves[0] if len(leaves) == 1 else None
    if isinstance(only, Reject):
        log.warning("job.rejected", **fields, reason=redact(only.reason))
    elif isinstance(only, JobTimeout):
        log.error("job.timed_out", **fields, error=describe(exc))
    elif isinstance(only, LifecycleError):
        log.error("job.failed", **fields, error=describe(exc))
    elif _levels()[2]:  # formatting a traceback costs far more than the job: only for a reader
        log.error("job.failed", **fields, error=describe(exc), exception=traceback_text(exc))
    else:
        log.error("job.failed", **fields, error=describe(exc))


class JobLog:
    """A logger for one job attempt, bound to job, job_id and attempt on first use."""

    __slots__ = ("_bound", "attempt", "debug_enabled", "info_enabled", "job", "job_id")

    def __init__(self, job: str, job_id: str, attempt: int) -> None:
        self.job = job
        self.job_id = job_id
        self.attempt = attempt
        self._bound: Any = None
        self.debug_enabled, self.info_enabled = enabled_levels()

    def bound(self) -> Any:
        if self._bound is None:
            self._bound = LOG.bind(job=self.job, job_id=self.job_id, attempt=self.attempt)
        return self._bound

    def debug(self, event: str, **kw: Any) -> None:
        if self.debug_enabled:
            self.bound().debug(event, **kw)

    def info(self, event: str, **kw: Any) -> None:
        if self.info_enabled:
            self.bound().info(event, **kw)

    def warning(self, event: str, **kw: Any) -> None:
        self.bound().warning(event, **kw)

    def error(self, event: str, **kw: Any) -> None:
        self.bound().error(event, **kw)
