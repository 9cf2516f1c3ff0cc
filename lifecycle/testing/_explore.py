"""``explore``: run a real job once per fault point and check each run against the
contract (README, "Semantics", rules 1 to 7).

Why the faults are injected around the user's code rather than into lifecycle: the
point is to test the user's dependencies as they are (a real SQLite transaction, a
real pool), so each job-scoped dependency is replaced, through the runtime's
``dependency_overrides``, by a wrapper of the same kind that calls it (``_wrappers``).
The job body is wrapped the same way, in a copy of the ``Job`` with the same name and
options. The oracle is the nested ``async with`` semantics of ``AsyncExitStack``,
replayed over what the wrappers saw: the innermost generator must see the fault, each
one further out what the one inside it passed on, and the caller what the outermost
passed on (or the original error, when one swallowed it)."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio

from .._analysis import Kind
from .._errors import JobTimeout, LifecycleError, Retry
from .._job import Job, as_job
from .._plan import Step
from .._runtime import Runtime
from ._trace import NOTHING, YIELDED_AGAIN, Fault, FaultKind, InjectedFault, Instance, Recorder, Trace, short_label
from ._wrappers import Counted, wrap_body, wrap_dependency


class _Cancellation:
    """The expectation "the backend's cancellation exception" (its instance is the
    backend's own, so it is matched by class, not identity)."""

    def __repr__(self) -> str:
        return "the backend's cancellation"


_CANCELLED: Any = _Cancellation()


@dataclass(frozen=True, slots=True)
class RunOutcome:
    """What the caller of one run saw.

    Attributes:
        result: the job's result (None unless ``succeeded``).
        error: the exception the caller got (None if it succeeded or was cancelled).
        cancelled: the caller's cancellation took effect (it saw the backend's
            cancellation exception).
    """

    result: Any = None
    error: BaseException | None = None
    cancelled: bool = False

    @property
    def succeeded(self) -> bool:
        """The job returned a result."""
        return self.error is None and not self.cancelled

    def __str__(self) -> str:
        if self.cancelled:
            return "cancelled"
        if self.error is not None:
            return f"failed with {_describe(self.error)}"
        return f"returned {_short(repr(self.result))}"


@dataclass(slots=True)
class FaultRun:
    """One run of the job under one fault.

    Attributes:
        fault: the fault point.
        outcome: what the caller saw.
        set_up: the job-scoped dependencies set up, by label, in completion order.
        torn_down: the job-scoped generators torn down, by label, in teardown order.
        seen: for each job-scoped generator torn down (by label; the last call of a
            ``use_cache=False`` one), what it saw at its ``yield``: None for a normal
            exit, else the exception.
        problems: what went wrong, in words (empty: the run kept the contract).
        reached: False when the fault point did not occur in this run (an await point
            beyond the last one): the job ran without a fault (and was checked so).
        body_returned: the job body returned normally (on the last attempt): a
            dependency may then have committed even if the caller was cancelled later.
    """

    fault: Fault
    outcome: RunOutcome
    set_up: list[str] = field(default_factory=list)
    torn_down: list[str] = field(default_factory=list)
    seen: dict[str, BaseException | None] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    reached: bool = True
    body_returned: bool = False

    @property
    def ok(self) -> bool:
        """No problem was found."""
        return not self.problems


Check = Callable[[FaultRun], "Awaitable[str | None] | str | None"]


class ExplorationFailed(AssertionError):
    """``Exploration.assert_ok`` found problems; the message is the report."""


@dataclass(slots=True)
class Exploration:
    """Every run of one exploration.

    Attributes:
        job: the job's name.
        runs: one per fault point, the baseline (no fault) first.
        problems: every problem, each prefixed by its fault point; the shutdown of the
            runtime (worker-scoped dependencies) is checked too.
    """

    job: str
    runs: list[FaultRun] = field(default_factory=list)
    shutdown_problems: list[str] = field(default_factory=list)

    @property
    def problems(self) -> list[str]:
        """Every problem found, in words."""
        found = [f"when {run.fault.description}: {problem}" for run in self.runs for problem in run.problems]
        return found + [f"at runtime shutdown: {problem}" for problem in self.shutdown_problems]

    @property
    def ok(self) -> bool:
        """Every run kept the contract and passed every check."""
        return not self.problems

    def report(self) -> str:
        """The exploration in plain words, one line per fault point."""
        reached = sum(run.reached for run in self.runs)
        lines = [f"explored job {self.job!r}: {reached} runs"]
        for run in self.runs:
            mark = "ok  " if run.ok else "FAIL"
            note = "" if run.reached else " (not reached: it ran without a fault)"
            lines.append(f"  {mark} {run.fault.description}{note} -> {run.outcome}")
            lines += [f"         {problem}" for problem in run.problems]
        if self.shutdown_problems:
            lines.append("  FAIL runtime shutdown")
            lines += [f"         {problem}" for problem in self.shutdown_problems]
        failed = sum(not run.ok for run in self.runs) + bool(self.shutdown_problems)
        lines.append("all fault points kept the contract" if not failed else f"{failed} fault point(s) failed")
        return "\n".join(lines)

    def assert_ok(self) -> None:
        """Raise ``ExplorationFailed`` (an ``AssertionError``) with the report if any
        problem was found."""
        if not self.ok:
            raise ExplorationFailed(self.report())


async def explore(
    job: Callable[..., Any],
    /,
    *args: Any,
    dependency_overrides: Mapping[Any, Any] | None = None,
    checks: Iterable[Check] = (),
    cancellations: bool = True,
    max_await_points: int | None = 200,
    timeout: float | None = 0.2,
    **kwargs: Any,
) -> Exploration:
    """Run ``job`` once per fault point and check every run against the contract.

    The fault points, in order: none (the baseline); an ``InjectedFault`` raised at
    the setup of each job-scoped dependency, by the body, and after the teardown of
    each job-scoped generator; a cancellation by the caller at each await point of the
    baseline run (see ``Counted``: every suspension of the job's task, in setup, body
    and teardown); the job's timeout expiring while its body waits (async bodies); and
    ``Retry`` raised by the body on the first attempt (run with the job's own
    ``retries``). Each run uses the real dependencies; worker-scoped ones are created
    once and shared by every run, as in a worker, and checked when the runtime closes.

    For each run it checks that every job-scoped generator set up was torn down
    exactly once, in the reverse order of setup; that each saw at its ``yield`` what
    the contract says (the fault for the innermost, then what each inner one passed
    on); that none swallowed an exception; that the body never ran after a failed
    setup; and that the caller saw what the contract says. Then it runs ``checks``.

    Args:
        job: a ``@job`` or any callable ``Runtime.run`` accepts.
        args: the job's positional payload arguments.
        dependency_overrides: ``{original: replacement}`` for the runtime, as in
            ``Runtime(dependency_overrides=...)``; replacements are explored in place
            of the originals.
        checks: the user's invariants, called after every run with its ``FaultRun``
            (sync or async). One returns a problem in words (None: fine) or raises
            ``AssertionError``; the problem is reported with the fault point.
        cancellations: False skips the cancellation runs (one per await point).
        max_await_points: at most this many cancellation runs (the first await points);
            None: no limit.
        timeout: the job timeout, in seconds, of the timeout fault (its body waits
            until cancelled): long enough for the setup to finish on a loaded machine
            (the report says where the deadline fell); None skips the timeout fault.
        kwargs: the job's payload arguments by name.

    Returns:
        the ``Exploration``; call ``assert_ok()`` on it to fail a test with its report.

    Raises:
        ValueError: ``max_await_points`` is negative, or ``timeout`` not positive.
        TypeError: a check is not callable.
        PayloadError: the arguments do not fit the job.
        DependencyError: the job's graph is invalid.
        LifecycleError: the baseline run (no fault) failed: there is nothing to explore.
    """
    if max_await_points is not None and max_await_points < 0:
        raise ValueError(f"explore: max_await_points must be >= 0 or None, got {max_await_points!r}")
    if timeout is not None and timeout <= 0:
        raise ValueError(f"explore: timeout must be a positive number of seconds or None, got {timeout!r}")
    checks = tuple(checks)
    for check in checks:
        if not callable(check):
            raise TypeError(f"explore: each check must be callable (taking a FaultRun), got {check!r}")
    original = as_job(job)
    payload, extras = original.bind_payload(args, kwargs)
    user_overrides = dict(dependency_overrides or {})
    recorder = Recorder()
    async with Runtime(dependency_overrides=user_overrides) as rt:
        plan = rt.plan(original)
        _install_wrappers(rt, user_overrides, plan.steps, recorder)
        body_kind = Kind.COROUTINE if plan.body.kind is Kind.COROUTINE else Kind.FUNCTION
        plain = _variant(original, wrap_body(original.fn, body_kind, recorder), timeout=original.timeout)
        exploration = Exploration(original.name)
        baseline = await _run(rt, recorder, Fault(FaultKind.NONE, 0, "no fault is injected"), plain, payload, extras)
        exploration.runs.append(await _checked(baseline, checks))
        if not baseline.outcome.succeeded:
            raise LifecycleError(
                f"job {original.name!r} ({original.body.label}) did not succeed without faults "
                f"({baseline.outcome}); explore needs a payload it succeeds with"
            )
        # Once more, with the worker scope warm: the await points of every later run
        # are those of this one (the first run also created the worker-scoped values).
        again = Fault(FaultKind.NONE, 0, "no fault is injected (worker scope warm)")
        warm = await _run(rt, recorder, again, plain, payload, extras)
        exploration.runs.append(await _checked(warm, checks))
        base_trace = recorder.trace
        faults = _faults(original.name, base_trace, body_kind if timeout else None, cancellations, max_await_points)
        waiting = _variant(original, wrap_body(original.fn, body_kind, recorder, wait=True), timeout=timeout)
        for fault in faults:
            variant = waiting if fault.kind is FaultKind.TIMEOUT else plain
            run = await _run(rt, recorder, fault, variant, payload, extras)
            # An await point not reached ran the job without a fault: checked all the same.
            exploration.runs.append(await _checked(run, checks))
    exploration.shutdown_problems = _check_shutdown(recorder)
    return exploration


def _install_wrappers(
    rt: Runtime, user_overrides: Mapping[Any, Any], steps: Sequence[Step], recorder: Recorder
) -> None:
    """Override every dependency of the plan (as the user's overrides left it) with
    its observing wrapper."""
    keys = {id(replacement): original for original, replacement in user_overrides.items()}
    done: set[int] = set()
    for step in steps:
        provider = step.provider
        if id(provider.call) in done:
            continue
        done.add(id(provider.call))
        scope = "worker" if step.worker is not None else "job"
        wrapper = wrap_dependency(provider.call, provider.kind, provider.label, scope, recorder)
        rt.dependency_overrides[keys.get(id(provider.call), provider.call)] = wrapper


def _variant(job: Job[..., Any], body: Callable[..., Any], *, timeout: float | None) -> Job[..., Any]:
    """The job with its body wrapped: same name, retries and dependencies."""
    return Job(body, name=job.name, retries=job.retries, timeout=timeout, dependencies=job.dependencies)


def _faults(
    name: str,
    trace: Trace,
    body_kind: Kind | None,
    cancellations: bool,
    max_await_points: int | None,
) -> list[Fault]:
    named = f"`{name}`"
    faults: list[Fault] = []
    for index, instance in enumerate(trace.instances, start=1):
        described = f"setup of `{_short_label(instance.label)}` ({instance.label}) raises"
        faults.append(Fault(FaultKind.SETUP, index, described))
    faults.append(Fault(FaultKind.BODY, 0, f"{named} raises"))
    for index, instance in enumerate(trace.attempt_instances(1), start=1):
        faults.append(
            Fault(FaultKind.TEARDOWN, index, f"teardown of `{_short_label(instance.label)}` ({instance.label}) raises")
        )
    if cancellations:
        points = trace.suspensions if max_await_points is None else min(trace.suspensions, max_await_points)
        for index in range(1, points + 1):
            phase = trace.suspension_phases[index - 1]
            faults.append(Fault(FaultKind.CANCEL, index, f"{named} is cancelled at await point {index} ({phase})"))
    if body_kind is Kind.COROUTINE:
        faults.append(Fault(FaultKind.TIMEOUT, 0, f"{named} times out"))
    faults.append(Fault(FaultKind.RETRY, 0, f"{named} raises Retry"))
    return faults


def _short_label(label: str) -> str:
    return short_label(label)


async def _run(
    rt: Runtime,
    recorder: Recorder,
    fault: Fault,
    job: Job[..., Any],
    payload: dict[str, Any],
    extras: dict[str, Any] | None,
) -> FaultRun:
    trace = recorder.start(fault)
    outcome: RunOutcome
    with anyio.CancelScope() as scope:
        if fault.kind is FaultKind.CANCEL:

            def cancel_at(current: Trace) -> None:
                if current.suspensions == fault.index:
                    current.cancel_phase = current.phase
                    scope.cancel()

            recorder.on_suspend = cancel_at
        try:
            if fault.kind is FaultKind.RETRY:
                arguments = {**payload, **(extras or {})}
                result = await Counted(rt.run(job, **arguments), recorder)
            else:
                result = await Counted(rt.run_attempt(job, payload, extras), recorder)
        except Exception as exc:
            outcome = RunOutcome(error=exc)
        else:
            outcome = RunOutcome(result=result)
        finally:
            recorder.on_suspend = None
    if scope.cancelled_caught:
        outcome = RunOutcome(cancelled=True)
    run = FaultRun(fault, outcome)
    if fault.kind is FaultKind.CANCEL and trace.cancel_phase is None:
        run.reached = False
    elif fault.kind is FaultKind.CANCEL:
        run.fault = Fault(fault.kind, fault.index, fault.description.split(" (")[0] + f" ({trace.cancel_phase})")
    run.set_up = [i.label for i in trace.setups]
    run.torn_down = [i.label for i in trace.teardowns]
    run.seen = {i.label: i.seen for i in trace.teardowns}
    run.body_returned = trace.body_error.get(trace.attempt, NOTHING) is None
    run.problems = _oracle(trace, run, job)
    return run


async def _checked(run: FaultRun, checks: Iterable[Check]) -> FaultRun:
    for check in checks:
        name = getattr(check, "__qualname__", repr(check))
        try:
            found = check(run)
            if inspect.isawaitable(found):
                found = await found
        except AssertionError as exc:
            # The message's first line: pytest's assertion rewriting appends its own detail.
            found = str(exc).split("\n", 1)[0] or f"check {name} failed"
        except Exception as exc:
            found = f"check {name} raised {_describe(exc)}"
        if found:
            run.problems.append(str(found))
    return run


def _oracle(trace: Trace, run: FaultRun, job: Job[..., Any]) -> list[str]:
    """The contract's checks of one run; problems in words."""
    problems: list[str] = []
    fault = trace.fault
    outcome = run.outcome
    attempts = range(1, trace.attempt + 1)
    carried: Any = None
    for attempt in attempts:
        problems += _attempt_problems(trace, attempt, job)
        carried = _passed_on(trace, attempt)
    final_primary = _primary(trace, trace.attempt)
    expected: Any
    if carried is not None:
        expected = carried
    elif final_primary is not None:
        expected = final_primary  # swallowed: the job still fails with its own error
    else:
        expected = None
    if fault.kind is FaultKind.RETRY and job.retries >= 1:
        if trace.attempt < 2:
            problems.append("the job asked to retry and has retries left, but no second attempt ran")
        elif len(trace.attempt_instances(2)) != len(trace.attempt_instances(1)):
            problems.append("the second attempt did not set up fresh job-scoped dependencies")
    problems += _outcome_problems(expected, outcome, fault)
    return problems


def _primary(trace: Trace, attempt: int) -> Any:
    """The exception the innermost generator of ``attempt`` must see."""
    failure = trace.setup_failure.get(attempt)
    if failure is not None:
        return failure
    body = trace.body_error.get(attempt, NOTHING)
    if body is not NOTHING and body is not None:
        return body
    fault = trace.fault
    if fault.kind is FaultKind.TIMEOUT and attempt == 1:
        return _CANCELLED
    if fault.kind is FaultKind.CANCEL and trace.cancel_phase is not None:
        if body is NOTHING:
            return _CANCELLED  # cancelled before the body ran (or in lifecycle's own code)
        # The body returned. Whether the cancellation still reached the generators
        # depends on whether it was requested before lifecycle took the body's result
        # (a sync body in a thread returns to a task that is already cancelled) or
        # during the shielded teardown (rule 6): the event loop side cannot tell a wait
        # for the body's thread from a wait for a teardown's, so both are accepted, and
        # what the innermost generator saw is then checked outward as usual.
        generators = trace.attempt_instances(attempt)
        innermost = next((i for i in reversed(generators) if i.teardowns), None)
        if innermost is not None and isinstance(innermost.seen, anyio.get_cancelled_exc_class()):
            return _CANCELLED
    return None


def _attempt_problems(trace: Trace, attempt: int, job: Job[..., Any]) -> list[str]:
    problems: list[str] = []
    generators = trace.attempt_instances(attempt)
    for instance in generators:
        name = _name(instance)
        if instance.teardowns == 0:
            problems.append(f"{name} was set up but never torn down (a leak)")
        elif instance.teardowns > 1:
            problems.append(f"{name} was torn down {instance.teardowns} times")
    torn = [i for i in trace.teardowns if i.attempt == attempt]
    expected_order = [i for i in reversed(generators) if i.teardowns]
    if [i.serial for i in torn] != [i.serial for i in expected_order]:
        problems.append(
            "teardown order was "
            + ", ".join(_short_label(i.label) for i in torn)
            + "; the contract says the reverse of setup: "
            + ", ".join(_short_label(i.label) for i in expected_order)
        )
    if attempt in trace.setup_failure and trace.body_error.get(attempt, NOTHING) is not NOTHING:
        problems.append(f"the body of `{job.name}` ran although a dependency's setup failed")
    current = _primary(trace, attempt)
    for instance in reversed(generators):
        if not instance.teardowns:
            continue
        name = _name(instance)
        if not _matches(instance.seen, current):
            problems.append(
                f"{name} saw {_describe(instance.seen)} at its yield; the contract says {_describe(current)}"
            )
        output = instance.output
        if output is YIELDED_AGAIN:
            problems.append(f"{name} yielded a second time")
            output = None
        if instance.seen is not None and output is None:
            problems.append(f"{name} swallowed {_describe(instance.seen)} (its teardown returned normally)")
        current = output
    return problems


def _passed_on(trace: Trace, attempt: int) -> Any:
    """What the outermost generator of ``attempt`` passed on to the caller."""
    current = _primary(trace, attempt)
    for instance in reversed(trace.attempt_instances(attempt)):
        if instance.teardowns:
            current = None if instance.output is YIELDED_AGAIN else instance.output
    return current


def _outcome_problems(expected: Any, outcome: RunOutcome, fault: Fault) -> list[str]:
    if fault.kind is FaultKind.CANCEL and outcome.cancelled and (expected is None or expected is _CANCELLED):
        return []  # the caller was cancelled: it may see that even after a finished job
    if expected is None:
        if outcome.succeeded:
            return []
        return [f"the caller saw {outcome}; the contract says the job succeeds"]
    cancelled = anyio.get_cancelled_exc_class()
    if expected is _CANCELLED or isinstance(expected, cancelled):
        if fault.kind is FaultKind.TIMEOUT:
            if isinstance(outcome.error, JobTimeout):
                return []
            return [f"the caller saw {outcome}; the contract says JobTimeout"]
        if outcome.cancelled:
            return []
        return [f"the caller saw {outcome}; the contract says the caller's cancellation"]
    if fault.kind is FaultKind.RETRY and isinstance(expected, Retry) and outcome.succeeded:
        return []  # retried: the next attempt succeeded
    if outcome.error is expected:
        return []
    return [f"the caller saw {outcome}; the contract says it fails with {_describe(expected)}"]


def _matches(seen: Any, expected: Any) -> bool:
    cancelled = anyio.get_cancelled_exc_class()
    if expected is _CANCELLED or isinstance(expected, cancelled):
        # The backend may raise a fresh instance at each checkpoint: match the class.
        return isinstance(seen, cancelled)
    return seen is expected


def _name(instance: Instance) -> str:
    return f"`{_short_label(instance.label)}` ({instance.label})"


def _describe(value: Any) -> str:
    if value is None:
        return "a normal exit"
    if value is _CANCELLED:
        return "the backend's cancellation"
    if value is NOTHING:
        return "nothing"
    if isinstance(value, InjectedFault):
        return "the injected fault"
    if isinstance(value, anyio.get_cancelled_exc_class()):
        return f"a cancellation ({type(value).__name__})"
    text = str(value)
    return f"{type(value).__name__}: {_short(text)}" if text else type(value).__name__


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_shutdown(recorder: Recorder) -> list[str]:
    """Worker-scoped generators: each created one torn down once, in reverse order."""
    problems: list[str] = []
    created = [i for i in recorder.worker_instances if i.setup_done and i.generator]
    for instance in created:
        if instance.teardowns != 1:
            problems.append(f"worker-scoped {_name(instance)} was torn down {instance.teardowns} times, not once")
        elif instance.seen is not None:
            problems.append(f"worker-scoped {_name(instance)} saw {_describe(instance.seen)} at its yield")
    torn = [i.serial for i in recorder.worker_teardowns]
    if torn != [i.serial for i in reversed(created) if i.teardowns]:
        problems.append("worker-scoped dependencies were not torn down in the reverse order of their creation")
    return problems
