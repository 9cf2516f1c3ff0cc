"""What a job knows about itself: injected wherever a parameter is annotated
``JobContext``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ._log import LOG, JobLog


class JobContext:
    """Identity of one attempt of one job. ``log`` is bound lazily: most jobs never
    touch it, and binding a structlog logger is not free.

    Attributes:
        id: the job's id (a queue message's id under a worker); the same for every
            attempt.
        name: the job's name.
        attempt: 1-based.
        args: the job's payload, read-only, as the job receives it: validated and
            converted by its payload model (``"2026-11-23"`` arrives as a ``date``, a
            dict as the model), with the defaults of arguments not given. Arguments
            taken by a ``**kwargs`` parameter are not in it.
    """

    __slots__ = ("_log", "args", "attempt", "id", "name")

    def __init__(self, id: str, name: str, attempt: int, args: Mapping[str, Any]) -> None:
        self.id = id
        self.name = name
        self.attempt = attempt
        self.args = args
        self._log: Any = None

    @property
    def log(self) -> Any:
        """A structlog logger bound to ``job_id``, ``job`` and ``attempt``."""
        log = self._log
        if log is None:
            log = LOG.bind(job=self.name, job_id=self.id, attempt=self.attempt)
        elif isinstance(log, JobLog):  # the runtime's lazily bound logger: bind it now
            log = log.bound()
        self._log = log
        return log

    def __repr__(self) -> str:
        return f"JobContext(id={self.id!r}, name={self.name!r}, attempt={self.attempt})"
