"""lifecycle: FastAPI-style yield dependencies for workers, CLI tasks and Celery.

Each job is treated as a request: its dependency tree is set up, injected and torn down
in reverse order, with per-job and per-worker scopes."""

from ._context import JobContext
from ._errors import (
    CommitFailed,
    DependencyError,
    JobTimeout,
    LifecycleError,
    PayloadError,
    Reject,
    Retry,
    ScheduleError,
    StartupError,
    TeardownTimeout,
)
from ._job import Job, job
from ._markers import Depends, dependency
from ._outcome import Failed, Outcome, Rejected, RetryLater, Succeeded
from ._runtime import Runtime, run
from ._schedule import Schedule
from ._worker import Worker

__version__ = "0.1.0"

__all__ = [
    "CommitFailed",
    "DependencyError",
    "Depends",
    "Failed",
    "Job",
    "JobContext",
    "JobTimeout",
    "LifecycleError",
    "Outcome",
    "PayloadError",
    "Reject",
    "Rejected",
    "Retry",
    "RetryLater",
    "Runtime",
    "Schedule",
    "ScheduleError",
    "StartupError",
    "Succeeded",
    "TeardownTimeout",
    "Worker",
    "dependency",
    "job",
    "run",
]

# Public objects report their public path: a traceback says lifecycle.DependencyError,
# a dead letter records lifecycle.Reject, help() shows lifecycle.Runtime.
for _public in (
    CommitFailed,
    DependencyError,
    Depends,
    Failed,
    Job,
    JobContext,
    JobTimeout,
    LifecycleError,
    PayloadError,
    Reject,
    Rejected,
    Retry,
    RetryLater,
    Runtime,
    Schedule,
    ScheduleError,
    StartupError,
    Succeeded,
    TeardownTimeout,
    Worker,
    dependency,
    job,
    run,
):
    _public.__module__ = __name__
del _public
