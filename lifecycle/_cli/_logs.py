"""The CLI is an application, so it (unlike the library) configures structlog: JSON
lines on stderr when it is not a terminal, a console renderer when it is.

Every rendered line passes through ``redact`` last, so a password in a URL (a queue's
``redis://user:password@host``, say) never reaches the log whichever field, message or
traceback carries it. Tracebacks never include frame locals: they would print payloads
and connection settings verbatim."""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

from .._log import describe, redact

__all__ = ["LEVELS", "configure", "describe", "redact"]

LEVELS = ["debug", "info", "warning", "error", "critical"]

def _redact_line(_logger: Any, _name: str, line: Any) -> Any:
    return redact(line) if isinstance(line, str) else line


def configure(log_format: str | None, level: str) -> str:
    """Configure structlog for the CLI and return the format chosen.

    Args:
        log_format: ``"console"``, ``"json"``, or ``None`` for console on a terminal and
            JSON lines otherwise.
        level: the lowest level written, one of ``LEVELS`` (any case).
    """
    stream = sys.stderr
    chosen = log_format or ("console" if stream.isatty() else "json")
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if chosen == "json":
        tracebacks = structlog.processors.ExceptionRenderer(
            structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
        )
        processors += [tracebacks, structlog.processors.JSONRenderer()]
    else:
        processors += [
            structlog.dev.ConsoleRenderer(colors=stream.isatty(), exception_formatter=structlog.dev.plain_traceback)
        ]
    processors.append(_redact_line)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )
    return chosen
