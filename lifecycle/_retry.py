"""The retry policy: what a failed attempt leads to, and after how long.

One policy serves every runner: ``Runtime.run`` (retry at once unless ``Retry(delay)``
asks for a wait), the queue ``Worker`` (exponential backoff with jitter) and Celery
(``Retry`` only; Celery's own countdown when no delay is given). They differ only in
the backoff they configure and in what they do with the verdict (raise, dead-letter,
``task.retry``), so the rules themselves (README, "Semantics": ``Retry``, ``Reject``,
graph and payload errors are never retried) are written once, here."""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass
from typing import NamedTuple

from ._errors import DependencyError, PayloadError, Reject, Retry


class Verdict(enum.IntEnum):
    RETRY = 0  # run the job again, after ``Decision.delay``
    EXHAUSTED = 1  # it failed (or asked to retry) with no attempts left
    REJECTED = 2  # ``Reject``: fail now, never retry
    BROKEN = 3  # a graph or payload error: another attempt cannot fix it
    FATAL = 4  # not an ``Exception`` (cancellation, KeyboardInterrupt): never retried


class Decision(NamedTuple):
    verdict: Verdict
    delay: float | None = None  # seconds before the next attempt; None: the runner's default


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Decides retry-or-fail from the exception, the attempt and the job's retries.

    Args:
        backoff: seconds before the first retry of a failed attempt, doubled per
            attempt, with jitter (half to all of it), capped at ``backoff_max``. None
            (the default): no delay of its own, so ``Decision.delay`` is None unless
            ``Retry(delay)`` gives one.
        backoff_max: the cap on the backoff, in seconds.
    """

    backoff: float | None = None
    backoff_max: float = 300.0

    def decide(self, exc: BaseException, attempt: int, retries: int) -> Decision:
        """What attempt ``attempt`` (1-based) ending with ``exc`` leads to, for a job
        allowed ``retries`` retries (so ``retries + 1`` attempts)."""
        if isinstance(exc, Reject):
            return Decision(Verdict.REJECTED)
        if isinstance(exc, DependencyError | PayloadError):
            return Decision(Verdict.BROKEN)
        if not isinstance(exc, Exception):
            return Decision(Verdict.FATAL)
        if attempt > retries:
            return Decision(Verdict.EXHAUSTED)
        if isinstance(exc, Retry) and exc.delay is not None:
            return Decision(Verdict.RETRY, exc.delay)
        return Decision(Verdict.RETRY, None if self.backoff is None else self.delay(attempt))

    def delay(self, attempt: int) -> float:
        """The backoff after attempt ``attempt`` failed: between half and all of
        ``backoff * 2**(attempt-1)``, capped at ``backoff_max``; 0 with no backoff."""
        if self.backoff is None:
            return 0.0
        ceiling = min(self.backoff_max, self.backoff * 2.0 ** min(attempt - 1, 64))
        return ceiling * random.uniform(0.5, 1.0)

    @staticmethod
    def used_up(attempt: int, retries: int) -> str:
        """Why a ``Retry`` on attempt ``attempt`` was not honoured, in words."""
        return f"no attempts left ({attempt} of {retries + 1})"
