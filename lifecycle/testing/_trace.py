"""What one fault run recorded: every dependency instance's setup and teardown, what
each generator saw at its ``yield``, what the body did, and where the job was when it
suspended.

The recorder is fed by the wrappers of ``_wrappers`` (they run in the event loop and in
worker threads alike, so every update is a single assignment or append, atomic under
the GIL) and read by the oracle in ``_oracle`` once the run is over."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

from .._errors import Retry


class FaultKind(IntEnum):
    """Where a fault is injected (see ``Fault``)."""

    NONE = 0  # the baseline run: nothing injected
    SETUP = 1  # an exception raised at the setup of the n-th dependency set up
    BODY = 2  # an exception raised by the job body
    TEARDOWN = 3  # an exception raised after the n-th generator's own teardown
    CANCEL = 4  # the caller cancels the job at its n-th await point
    TIMEOUT = 5  # the job's timeout expires while its body waits
    RETRY = 6  # the body raises ``Retry`` on its first attempt


@dataclass(frozen=True, slots=True)
class Fault:
    """One fault point of an exploration.

    Attributes:
        kind: where the fault is injected.
        index: for ``SETUP``, the 1-based position of the dependency setup that raises
            (in the order setups begin); for ``TEARDOWN``, the 1-based position, in
            setup order, of the generator whose teardown raises; for ``CANCEL``, the
            1-based await point; 0 otherwise.
        description: the fault point in words ("setup of `get_db` (app.db:get_db)
            raises").
    """

    kind: FaultKind
    index: int = 0
    description: str = "no fault"


class _Missing:
    def __repr__(self) -> str:
        return "<nothing>"


# A generator that has not reached its teardown has seen nothing yet.
NOTHING: Any = _Missing()
# A generator that yielded a second time: its teardown produced no outcome of its own.
YIELDED_AGAIN: Any = _Missing()


@dataclass(eq=False, slots=True)
class Instance:
    """One call of one dependency within a run (``use_cache=False`` calls it twice)."""

    serial: int
    label: str
    scope: str
    generator: bool
    attempt: int
    setup_done: bool = False
    setup_error: BaseException | None = None
    teardowns: int = 0
    seen: Any = NOTHING  # what was thrown in at its yield (None: a normal exit)
    output: Any = NOTHING  # what its teardown passed on (None: a normal exit)


@dataclass(slots=True)
class Trace:
    """The record of one run (one or more attempts)."""

    fault: Fault
    instances: list[Instance] = field(default_factory=list)
    setups: list[Instance] = field(default_factory=list)  # completion order
    teardowns: list[Instance] = field(default_factory=list)  # teardown start order
    setup_calls: int = 0
    attempt: int = 1
    body_runs: int = 0
    body_error: dict[int, BaseException | None] = field(default_factory=dict)  # attempt -> outcome
    setup_failure: dict[int, BaseException] = field(default_factory=dict)  # attempt -> first failure
    phase: str = "before setup"
    suspensions: int = 0
    suspension_phases: list[str] = field(default_factory=list)
    cancel_phase: str | None = None
    teardown_begun: bool = False
    injected: BaseException | None = None

    def attempt_instances(self, attempt: int, scope: str = "job") -> list[Instance]:
        return [i for i in self.setups if i.attempt == attempt and i.scope == scope and i.generator]


class Recorder:
    """Shared by every wrapper of one exploration; holds the current run's trace."""

    def __init__(self) -> None:
        self.trace = Trace(Fault(FaultKind.NONE))
        self.worker_instances: list[Instance] = []
        self.worker_teardowns: list[Instance] = []
        self._serials = itertools.count(1)
        self.on_suspend: Any = None  # set by the runner while a cancellation run is armed

    def start(self, fault: Fault) -> Trace:
        self.trace = Trace(fault)
        return self.trace

    # -- called by the wrappers ----------------------------------------------------------
    def setup_begin(self, label: str, scope: str, generator: bool) -> Instance:
        trace = self.trace
        if scope == "worker":
            trace.phase = f"during setup of worker-scoped `{short_label(label)}`"
            instance = Instance(next(self._serials), label, scope, generator, 0)
            self.worker_instances.append(instance)
            return instance
        if trace.teardown_begun:  # a setup after a teardown: the next attempt began
            trace.attempt += 1
            trace.teardown_begun = False
        instance = Instance(next(self._serials), label, scope, generator, trace.attempt)
        trace.instances.append(instance)
        trace.setup_calls += 1
        trace.phase = f"during setup of `{short_label(label)}`"
        fault = trace.fault
        if fault.kind is FaultKind.SETUP and fault.index == trace.setup_calls and trace.attempt == 1:
            error = InjectedFault(fault.description)
            trace.injected = error
            self.setup_failed(instance, error)
            raise error
        return instance

    def setup_done(self, instance: Instance) -> None:
        instance.setup_done = True
        if instance.scope == "job":
            self.trace.setups.append(instance)
        # Threaded providers report from their thread: an await point counted while one
        # runs may already read "after setup of ...".
        self.trace.phase = f"after setup of `{short_label(instance.label)}`"

    def setup_failed(self, instance: Instance, error: BaseException | None) -> None:
        instance.setup_error = error
        if instance.scope == "job" and error is not None:
            self.trace.setup_failure.setdefault(instance.attempt, error)

    def teardown_begin(self, instance: Instance, thrown: BaseException | None) -> None:
        instance.teardowns += 1
        instance.seen = thrown
        if instance.scope == "worker":
            self.worker_teardowns.append(instance)
            return
        trace = self.trace
        trace.teardowns.append(instance)
        trace.teardown_begun = True
        trace.phase = f"during teardown of `{short_label(instance.label)}`"

    def teardown_end(self, instance: Instance, output: Any) -> None:
        instance.output = output
        if instance.scope == "job":
            self.trace.phase = f"after teardown of `{short_label(instance.label)}`"

    def teardown_fault(self, instance: Instance) -> None:
        """Raise the injected teardown fault if this instance is the one it targets."""
        trace = self.trace
        fault = trace.fault
        if fault.kind is not FaultKind.TEARDOWN or instance.scope != "job" or instance.attempt != 1:
            return
        generators = trace.attempt_instances(1)
        if fault.index <= len(generators) and generators[fault.index - 1] is instance:
            error = InjectedFault(fault.description)
            trace.injected = error
            instance.output = error
            raise error

    def body_begin(self) -> BaseException | None:
        """Record the body's start; return the fault it must raise, if any."""
        trace = self.trace
        trace.body_runs += 1
        trace.phase = "in the body"
        fault = trace.fault
        if trace.attempt != 1:
            return None
        if fault.kind is FaultKind.BODY:
            trace.injected = InjectedFault(fault.description)
            return trace.injected
        if fault.kind is FaultKind.RETRY:
            trace.injected = Retry(0)
            return trace.injected
        return None

    def body_end(self, error: BaseException | None) -> None:
        trace = self.trace
        trace.body_error[trace.attempt] = error
        trace.phase = "after the body"

    def suspended(self) -> None:
        trace = self.trace
        trace.suspensions += 1
        trace.suspension_phases.append(trace.phase)
        if self.on_suspend is not None:
            self.on_suspend(trace)


class InjectedFault(Exception):
    """The exception ``explore`` raises at a fault point (a setup, the body, a
    teardown). A test seeing it knows it came from the explorer, not from the code
    under test.

    Args:
        point: the fault point in words, kept as ``point``.
    """

    def __init__(self, point: str) -> None:
        self.point = point
        super().__init__(f"fault injected by lifecycle.testing: {point}")


def short_label(label: str) -> str:
    """``get_db`` for ``app.db:get_db``, ``partial(scratch)`` for
    ``partial(app.db:scratch)``: phases name the function, the report adds the path."""
    if label.startswith("partial(") and label.endswith(")"):
        return f"partial({short_label(label[8:-1])})"
    return label.rpartition(":")[2]
