"""What one attempt of a job means for the message that asked for it: the result of
``Runtime.attempt``, for consumer loops the library does not own (aiokafka, SQS, MQTT,
a websocket).

A closed set of four frozen dataclasses rather than one class with a kind field, so a
``match`` statement reads each case with its own fields (``case RetryLater(delay):``)
and a type checker knows which fields exist in each branch. ``Rejected`` and ``Failed``
are both final; they differ in whose fault it is: a rejected message is bad (its
payload does not fit, or the job called ``Reject``) and should not be offered again as
it is, while a failed one ran out of attempts or hit a broken graph."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeAlias

from ._errors import PayloadError, Reject


@dataclass(frozen=True, slots=True)
class Succeeded:
    """The job and its whole teardown succeeded: acknowledge the message.

    Args:
        result: what the job returned.
    """

    result: Any


@dataclass(frozen=True, slots=True)
class RetryLater:
    """The attempt failed and attempts remain: offer the message again after ``delay``
    seconds, as attempt ``attempt + 1`` (nack with a delay, or re-publish).

    Args:
        delay: seconds to wait (>= 0): ``Retry(delay)``'s own, else the backoff given
            to ``Runtime.attempt``.
        error: what ended the attempt (a ``Retry``, a ``JobTimeout``, any exception).
    """

    delay: float
    error: Exception


@dataclass(frozen=True, slots=True)
class Rejected:
    """The message itself is unacceptable; never retry it (dead-letter or drop it).

    Args:
        reason: why, in words: ``Reject.reason``, or the ``PayloadError`` message.
        error: the ``Reject`` the job raised, or the ``PayloadError`` the payload
            caused (its ``errors`` list every problem as data).
    """

    reason: str
    error: Reject | PayloadError


@dataclass(frozen=True, slots=True)
class Failed:
    """The job failed for good: its last attempt failed (a ``Retry`` on the last attempt
    included), or its dependency graph is broken (``DependencyError``). Dead-letter it.

    Args:
        error: what ended the last attempt.
    """

    error: Exception


Outcome: TypeAlias = Succeeded | RetryLater | Rejected | Failed
"""What ``Runtime.attempt`` returns: one of the four outcomes above."""
