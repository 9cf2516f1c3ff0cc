"""The CLI is an application, so it (unlike the library) configures structlog: JSON
lines on stderr when it is not a terminal, a console renderer when it is."""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

LEVELS = ["debug", "info", "warning", "error", "critical"]


def configure(log_format: str | None, level: str) -> str:
    stream = sys.stderr
    chosen = log_format or ("console" if stream.isatty() else "json")
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if chosen == "json":
        processors += [structlog.processors.dict_tracebacks, structlog.processors.JSONRenderer()]
    else:
        processors += [
            structlog.dev.ConsoleRenderer(colors=stream.isatty(), exception_formatter=structlog.dev.plain_traceback)
        ]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )
    return chosen
