"""The CLI is an application, so it (unlike the library) configures structlog: JSON
lines on stderr when it is not a terminal, a console renderer when it is.

Every rendered line passes through ``redact`` last, so a password in a URL (a queue's
``redis://user:password@host``, say) never reaches the log whichever field, message or
traceback carries it. Tracebacks never include frame locals: they would print payloads
and connection settings verbatim.

Every line the CLI writes while a batch's progress line is on the terminal (log lines,
results, the summary) goes through ``STATUS``: it erases the progress line, writes the
line, and draws the progress line again below it, so the two never share a row."""

from __future__ import annotations

import logging
import sys
import threading
from typing import Any, TextIO

import structlog

from .._log import describe, redact

__all__ = ["LEVELS", "STATUS", "StatusLine", "configure", "describe", "redact"]

LEVELS = ["debug", "info", "warning", "error", "critical"]

_ERASE_LINE = "\r\033[K"  # carriage return, then erase to the end of the line


class StatusLine:
    """One status line at the bottom of a terminal (stderr), kept clear of every other
    line written through ``write_line``. Thread-safe: sync dependencies log from worker
    threads; an ``RLock``, because a signal handler may log while the main thread writes."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._text = ""
        self._stream: TextIO | None = None

    def show(self, text: str, stream: TextIO | None = None) -> None:
        """Draw ``text`` as the status line (replacing the previous one).

        Args:
            text: one line, shorter than the terminal is wide.
            stream: the terminal to draw on; ``None``: ``sys.stderr``.
        """
        with self._lock:
            self._stream = stream or sys.stderr
            self._text = text
            self._stream.write(_ERASE_LINE + text)
            self._stream.flush()

    def clear(self) -> None:
        """Erase the status line, if one is shown, and stop redrawing it."""
        with self._lock:
            if self._stream is not None:
                self._stream.write(_ERASE_LINE)
                self._stream.flush()
            self._stream, self._text = None, ""

    def write_line(self, stream: TextIO, line: str) -> None:
        """Write ``line`` and a newline to ``stream`` (flushed), on a row of its own.

        Args:
            stream: where the line goes (stdout or stderr).
            line: the text, without its newline.
        """
        with self._lock:
            status = self._stream
            if status is not None:
                status.write(_ERASE_LINE)
                status.flush()
            stream.write(line + "\n")
            stream.flush()
            if status is not None:
                status.write(self._text)
                status.flush()


STATUS = StatusLine()


class _LineLogger:
    """structlog's final logger for the CLI: each rendered event is one ``STATUS`` line."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def msg(self, message: str) -> None:
        STATUS.write_line(self._stream, message)

    log = debug = info = warn = warning = error = err = critical = exception = fatal = failure = msg


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
        logger_factory=lambda *args: _LineLogger(stream),
        cache_logger_on_first_use=False,
    )
    return chosen
