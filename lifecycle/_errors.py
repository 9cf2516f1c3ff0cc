"""The public error types. Every one derives from :class:`LifecycleError` so callers
can catch the library's failures in one place without swallowing their own."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


class LifecycleError(Exception):
    """Base class of every error this library raises on purpose."""


class DependencyError(LifecycleError):
    """The dependency graph is invalid, or a dependency broke the generator protocol."""


class PayloadError(LifecycleError):
    """A job was given arguments that do not match its parameters.

    Args:
        message: every problem, with the job and each problem's location.
        job: the job's name (None when no job is involved).
        errors: the problems as data: ``{"type", "loc", "msg"}`` (plus ``ctx``, and
            ``input`` when it is short and not in a field named like a secret).
    """

    def __init__(self, message: str, *, job: str | None = None, errors: Iterable[dict[str, Any]] = ()) -> None:
        super().__init__(message)
        self.job = job
        self.errors = list(errors)


class CommitFailed(LifecycleError):
    """Raised by a queue's ``ack``: the job succeeded, but the transaction holding its
    own writes could not commit together with the acknowledgement (``PostgresQueue``'s
    ``transaction``: a deferred constraint, a serialization failure, a lost
    connection), so those writes were rolled back. The message is still the consumer's,
    and the worker treats the job as failed: retried with backoff, or dead-lettered."""


class JobTimeout(LifecycleError):
    """A job overran its ``@job(timeout=...)``."""


class TeardownTimeout(JobTimeout):
    """A dependency's code after ``yield`` overran the runtime's ``teardown_timeout``."""


class Retry(LifecycleError):
    """Raised by a job or a dependency: run the job again if attempts remain.

    Args:
        delay: seconds to wait before the next attempt (>= 0). None (the default) uses
            the runner's own policy: at once in ``Runtime.run``, exponential backoff
            with jitter in a ``Worker``, Celery's countdown under Celery.
    """

    def __init__(self, delay: float | None = None) -> None:
        if delay is not None and delay < 0:
            raise ValueError(f"Retry delay must be >= 0, got {delay!r}")
        self.delay = delay
        super().__init__(f"retry requested (delay={delay!r})")


class Reject(LifecycleError):
    """Raised by a job or a dependency: fail now, never retry (a worker dead-letters
    the message with reason ``rejected``).

    Args:
        reason: why, kept as ``reason`` and recorded in the dead letter.
    """

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class StartupError(LifecycleError):
    """A worker could not start: its queue is misconfigured (address, credentials,
    permissions), or a worker-scoped dependency failed to set up. An unreachable broker
    is not a reason: the worker waits for it."""


class ScheduleError(LifecycleError, ValueError):
    """A schedule is declared wrongly (a bad cron expression, time zone, interval or
    option); raised where it is declared, naming the job and the parameter."""
