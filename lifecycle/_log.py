"""The library's logging. It never configures structlog; it asks structlog (once per
job) which levels the application lets through, so that a filtered-out event costs
neither a logger bind nor its arguments."""

from __future__ import annotations

import logging
import re
from typing import Any

import structlog

LOG: Any = structlog.get_logger("lifecycle")
_levels_by_wrapper: dict[Any, tuple[bool, bool]] = {}


_MISSING = object()

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
    and dead letters); for an exception group, its leaf exceptions joined with ``; ``,
    so a crash inside a task group reads as its cause instead of ``unhandled errors in
    a TaskGroup (1 sub-exception)``.

    Args:
        exc: the exception (or group) to describe.
    """
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(describe(leaf) for leaf in exc.exceptions)
    message = str(exc)
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def _wrapper_class() -> Any:
    # One attribute read instead of get_config(), which builds a dict per call; this
    # runs once per job. Falls back to the public API if structlog's internals move.
    config = getattr(structlog._config, "_CONFIG", None)
    wrapper = getattr(config, "default_wrapper_class", _MISSING)
    return wrapper if wrapper is not _MISSING else structlog.get_config()["wrapper_class"]


def enabled_levels() -> tuple[bool, bool]:
    """(debug, info) enabled under the current structlog configuration. Wrapper classes
    that cannot say (stdlib's BoundLogger, custom ones) count as enabled: the event is
    then emitted and their own filtering decides."""
    wrapper = _wrapper_class()
    known = _levels_by_wrapper.get(wrapper)
    if known is None:
        known = (True, True)
        check = getattr(wrapper, "is_enabled_for", None)
        if check is not None:
            try:
                probe = wrapper(None, processors=[], context={})
                known = (bool(probe.is_enabled_for(logging.DEBUG)), bool(probe.is_enabled_for(logging.INFO)))
            except Exception:  # an unusual wrapper: do not guess
                known = (True, True)
        _levels_by_wrapper[wrapper] = known
    return known


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
