"""Observing jobs from outside the engine: an OpenTelemetry span per job attempt, a child
span per dependency setup and teardown, and the numbers a metrics sink records.

Why it is shaped this way:

- The engine (``_plan``, ``_codegen``, ``_engine``) knows nothing of observers, so a
  runtime with no observer runs exactly the code it always ran. With one, the runtime
  compiles its plans through ``Observer.overrides``: a mapping that hands the plan
  builder, for every dependency, a wrapper of the same kind (sync or async, function or
  generator) and the same signature. The wrapper times the setup, and for a generator
  also sees what is thrown in at its ``yield`` and whether the user's generator
  re-raised, replaced or swallowed it, which is how a swallowed error is recorded on
  the teardown span where it happened (README, "Semantics", rule 3).
- One wrapper per original callable and observer, memoised, so the per-job cache and
  the worker scope see one stable key per dependency.
- OpenTelemetry and prometheus-client are optional: nothing here imports them. The
  tracer and the metrics sink are handed in (``lifecycle.prometheus.Metrics`` is one
  sink); ``trace_api()`` imports ``opentelemetry.trace`` only once the application has
  imported it itself, so an application without it pays one dictionary lookup.
- Trace context crosses brokers in the message headers (W3C ``traceparent`` and
  ``tracestate``), written and read by OpenTelemetry's configured propagator."""

from __future__ import annotations

import contextlib
import contextvars
import sys
import time
from collections.abc import Callable, Hashable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import anyio

from ._analysis import Kind, Provider, analyse
from ._errors import DependencyError, JobTimeout, Reject, Retry
from ._plan import cache_key

# Span and metric label values for one attempt's outcome.
SUCCEEDED, FAILED, RETRY, REJECTED, TIMED_OUT, CANCELLED = (
    "succeeded",
    "failed",
    "retry",
    "rejected",
    "timed_out",
    "cancelled",
)


class MetricsSink(Protocol):
    """What an observer reports numbers to (``lifecycle.prometheus.Metrics`` is one)."""

    def attempt_started(self, job: str) -> None:
        """A job attempt started (jobs in flight + 1)."""

    def attempt_finished(self, job: str, outcome: str, seconds: float) -> None:
        """A job attempt ended with ``outcome`` after ``seconds`` (in flight - 1)."""

    def dependency_timed(self, dependency: str, scope: str, phase: str, seconds: float, ok: bool) -> None:
        """One dependency's ``setup`` or ``teardown`` took ``seconds``."""

    def resource_changed(self, dependency: str, delta: int) -> None:
        """A worker-scoped value was created (+1) or torn down (-1)."""


def trace_api() -> Any | None:
    """The ``opentelemetry.trace`` module if the application imported OpenTelemetry,
    else None: an application that never did pays nothing more."""
    if "opentelemetry.trace" not in sys.modules:
        return None
    return sys.modules["opentelemetry.trace"]


def configured_tracer_provider() -> Any | None:
    """The global tracer provider, or None while it is OpenTelemetry's no-op default
    (no SDK configured): tracing then stays off and costs nothing."""
    trace = trace_api()
    if trace is None:
        return None
    provider = trace.get_tracer_provider()
    if isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider):
        return None
    return provider


def inject_headers(headers: Mapping[str, str] | None) -> Mapping[str, str] | None:
    """``headers`` plus the current trace context (``traceparent``, ``tracestate``) when a
    span is recording and the headers carry none yet: a retry, release or replay keeps
    the context of the producer that first enqueued the message. Called by every queue
    backend's header encoding (``queues._base.encode_headers``)."""
    trace = trace_api()
    if trace is None or (headers and "traceparent" in headers):
        return headers
    if not trace.get_current_span().get_span_context().is_valid:
        return headers
    from opentelemetry import propagate  # imported by the application already (trace is)

    carrier: dict[str, str] = dict(headers or {})
    propagate.inject(carrier)
    return carrier


@dataclass(slots=True)
class Carried:
    """What a consumer knows about the message an attempt runs for (set by the worker
    or the Celery task for the attempt's task; read when its span starts)."""

    headers: Mapping[str, str] = field(default_factory=dict)
    attributes: dict[str, Any] = field(default_factory=dict)


carried: contextvars.ContextVar[Carried | None] = contextvars.ContextVar("lifecycle_carried", default=None)


def outcome_of(exc: BaseException | None) -> str:
    """The outcome label of an attempt that raised ``exc`` (None: it succeeded)."""
    if exc is None:
        return SUCCEEDED
    if isinstance(exc, Retry):
        return RETRY
    if isinstance(exc, Reject):
        return REJECTED
    if isinstance(exc, JobTimeout):
        return TIMED_OUT
    if _is_cancellation(exc):
        return CANCELLED
    return FAILED


def _is_cancellation(exc: BaseException) -> bool:
    try:
        return isinstance(exc, anyio.get_cancelled_exc_class())
    except Exception:  # no event loop (a sync caller): not a cancellation of ours
        return False


class _Phase:
    """One dependency setup or teardown being observed: its span and its clock."""

    __slots__ = ("_detach", "dependency", "observer", "phase", "scope", "span", "started")

    def __init__(self, observer: Observer, dependency: str, scope: str, phase: str) -> None:
        self.observer = observer
        self.dependency = dependency
        self.scope = scope
        self.phase = phase
        self.span: Any = None
        self._detach: Any = None
        if observer.tracer is not None:
            parent = None
            if scope == "worker" and phase == "teardown":
                # At runtime close, long after the job that created it: a trace of its own.
                trace = trace_api()
                assert trace is not None
                parent = trace.set_span_in_context(trace.INVALID_SPAN)
            self.span = observer.tracer.start_span(
                f"{phase} {_short(dependency)}",
                context=parent,
                attributes={
                    "lifecycle.dependency": dependency,
                    "lifecycle.dependency.scope": scope,
                    "lifecycle.dependency.phase": phase,
                },
            )
        self.started = time.perf_counter()

    @contextlib.contextmanager
    def current(self) -> Iterator[None]:
        """Make this span the current one while the user's code runs, so spans it opens
        nest under it."""
        if self.span is None:
            yield
            return
        trace = trace_api()
        assert trace is not None
        with trace.use_span(self.span, end_on_exit=False, record_exception=False, set_status_on_exception=False):
            yield

    def thrown_in(self, exc: BaseException) -> None:
        """The job's exception is about to be thrown in at the ``yield``."""
        if self.span is not None:
            self.span.set_attribute("lifecycle.exception.thrown_in", _type_name(exc))

    def end(self, error: BaseException | None = None, *, swallowed: BaseException | None = None) -> None:
        ok = error is None or _is_cancellation(error)
        if self.span is not None:
            if swallowed is not None:
                # The user's generator returned normally with the job's error thrown in:
                # never silent (rule 3), so the span where it happened says so.
                self.span.record_exception(swallowed, attributes={"lifecycle.exception.swallowed": True})
                self.span.set_attribute("lifecycle.exception.swallowed", _type_name(swallowed))
            if error is not None:
                if ok:
                    self.span.set_attribute("lifecycle.cancelled", True)
                else:
                    self.span.record_exception(error)
                    self.span.set_status(_error_status(error))
            self.span.end()
        sink = self.observer.metrics
        if sink is not None:
            sink.dependency_timed(self.dependency, self.scope, self.phase, time.perf_counter() - self.started, ok)

    def passed_on(self, raised: BaseException, thrown: BaseException) -> None:
        """The teardown ended by raising ``raised`` with ``thrown`` thrown in."""
        if raised is thrown:
            # Re-raised: the error happened elsewhere (and is recorded there).
            if self.span is not None:
                self.span.set_attribute("lifecycle.exception.reraised", True)
            self.end()
        else:
            self.end(raised)


def _short(label: str) -> str:
    """A span name's part of a ``module:qualname`` label: the qualname, without the
    ``outer.<locals>.`` of a function defined inside another."""
    if label.startswith("partial(") and label.endswith(")"):
        return f"partial({_short(label[8:-1])})"
    return label.rpartition(":")[2].rpartition("<locals>.")[2]


def _type_name(exc: BaseException) -> str:
    return f"{type(exc).__module__}.{type(exc).__qualname__}"


def _error_status(exc: BaseException) -> Any:
    trace = trace_api()
    assert trace is not None
    return trace.Status(trace.StatusCode.ERROR, f"{type(exc).__name__}: {exc}"[:500])


class _ObservedOverrides(Mapping[Any, Any]):
    """A runtime's overrides as the plan builder reads them, each answer wrapped."""

    def __init__(self, observer: Observer, base: Mapping[Any, Any]) -> None:
        self._observer = observer
        self._base = base

    def get(self, key: Any, default: Any = None) -> Any:
        return self._observer.wrap(self._base.get(key, default))

    def __getitem__(self, key: Any) -> Any:
        return self._observer.wrap(self._base[key])

    def __iter__(self) -> Iterator[Any]:
        return iter(self._base)

    def __len__(self) -> int:
        return len(self._base)


class Observer:
    """Traces and/or measures every job and dependency of one runtime.

    Args:
        tracer: an OpenTelemetry ``Tracer``, or None for no spans.
        metrics: a ``MetricsSink``, or None for no numbers.
    """

    def __init__(self, tracer: Any | None, metrics: MetricsSink | None) -> None:
        self.tracer = tracer
        self.metrics = metrics
        self._wrappers: dict[Hashable, Callable[..., Any]] = {}
        self._originals: dict[Hashable, Any] = {}  # keeps unweakrefable originals alive with their key

    def overrides(self, base: Mapping[Any, Any]) -> Mapping[Any, Any]:
        """The mapping to compile plans with: ``base``'s replacements, every dependency
        wrapped."""
        return _ObservedOverrides(self, base)

    # -- wrapping dependencies ------------------------------------------------------------
    def wrap(self, call: Any) -> Any:
        """The observed stand-in for ``call`` (one per callable, memoised)."""
        if call is None or getattr(call, "__lifecycle_observed__", None) is self:
            return call
        key = cache_key(call)
        found = self._wrappers.get(key)
        if found is None:
            try:
                provider = analyse(call)
            except DependencyError:
                return call  # not a valid dependency: the plan builder reports it, in context
            found = self._wrappers[key] = self._make_wrapper(call, provider)
            self._originals[key] = call
        return found

    def _make_wrapper(self, call: Any, provider: Provider) -> Callable[..., Any]:
        observer, name, scope = self, provider.label, provider.scope
        wrapper: Callable[..., Any]
        if provider.kind == Kind.FUNCTION:

            def wrapper(*args: Any, **kwargs: Any) -> Any:
                phase = _Phase(observer, name, scope, "setup")
                try:
                    with phase.current():
                        value = call(*args, **kwargs)
                except BaseException as exc:
                    phase.end(exc)
                    raise
                phase.end()
                return value

        elif provider.kind == Kind.COROUTINE:

            async def wrapper(*args: Any, **kwargs: Any) -> Any:
                phase = _Phase(observer, name, scope, "setup")
                try:
                    with phase.current():
                        value = await call(*args, **kwargs)
                except BaseException as exc:
                    phase.end(exc)
                    raise
                phase.end()
                return value

        elif provider.kind == Kind.GENERATOR:
            wrapper = _observed_generator(observer, call, name, scope)
        else:
            wrapper = _observed_async_generator(observer, call, name, scope)
        # What the plan builder reads: the signature and @dependency options (both
        # found through __wrapped__), the label (module and qualname) and the kind
        # (the wrapper's own code, which detection looks at first).
        target: Any = wrapper  # setting attributes on a function
        target.__wrapped__ = call
        wrapper.__module__ = getattr(call, "__module__", None) or wrapper.__module__
        for attribute in ("__qualname__", "__name__", "__doc__"):
            value = getattr(call, attribute, None)
            if isinstance(value, str):
                setattr(wrapper, attribute, value)
        if not isinstance(getattr(call, "__qualname__", None), str):  # a callable instance
            wrapper.__qualname__ = provider.label.partition(":")[2]
        target.__lifecycle_observed__ = self
        return wrapper

    # -- job attempts -----------------------------------------------------------------------
    @contextlib.contextmanager
    def attempt(self, job: str, job_id: str, attempt: int) -> Iterator[None]:
        """Observe one attempt: its span (current while it runs, a child of the trace
        context its message carried) and its duration and outcome."""
        sink = self.metrics
        started = time.perf_counter()
        if sink is not None:
            sink.attempt_started(job)
        span = None
        if self.tracer is not None:
            span = self._job_span(job, job_id, attempt)
        error: BaseException | None = None
        try:
            if span is None:
                yield
            else:
                trace = trace_api()
                assert trace is not None
                with trace.use_span(span, end_on_exit=False, record_exception=False, set_status_on_exception=False):
                    yield
        except BaseException as exc:
            error = exc
            raise
        finally:
            outcome = outcome_of(error)
            if span is not None:
                span.set_attribute("lifecycle.job.outcome", outcome)
                if error is not None and outcome != CANCELLED:
                    span.record_exception(error)
                    span.set_status(_error_status(error))
                span.end()
            if sink is not None:
                sink.attempt_finished(job, outcome, time.perf_counter() - started)

    def _job_span(self, job: str, job_id: str, attempt: int) -> Any:
        trace = trace_api()
        assert trace is not None
        assert self.tracer is not None
        attributes: dict[str, Any] = {
            "lifecycle.job.id": job_id,
            "lifecycle.job.name": job,
            "lifecycle.job.attempt": attempt,
        }
        parent = None
        kind = trace.SpanKind.INTERNAL
        message = carried.get()
        if message is not None:
            from opentelemetry import propagate  # the application imported OpenTelemetry (trace is)

            parent = propagate.extract(message.headers) if message.headers else None
            attributes.update(message.attributes)
            kind = trace.SpanKind.CONSUMER
        return self.tracer.start_span(f"job {job}", context=parent, kind=kind, attributes=attributes)


def _observed_generator(observer: Observer, call: Any, name: str, scope: str) -> Callable[..., Any]:
    """A sync generator function that runs ``call``'s generator step by step, observing
    its setup (up to the ``yield``) and its teardown (what was thrown in, and whether it
    was re-raised, replaced or swallowed)."""
    sink = observer.metrics
    counted = scope == "worker" and sink is not None

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        setup = _Phase(observer, name, scope, "setup")
        try:
            with setup.current():
                gen = call(*args, **kwargs)
                value = next(gen)
        except StopIteration:
            setup.end()  # it never yielded: the engine reports that
            return
        except BaseException as exc:
            setup.end(exc)
            raise
        setup.end()
        if counted:
            sink.resource_changed(name, 1)  # type: ignore[union-attr]
        try:
            try:
                yield value
            except GeneratorExit:
                gen.close()
                raise
            except BaseException as thrown:
                teardown = _Phase(observer, name, scope, "teardown")
                teardown.thrown_in(thrown)
                try:
                    with teardown.current():
                        gen.throw(thrown)
                except StopIteration:
                    teardown.end(swallowed=thrown)
                    return
                except BaseException as raised:
                    teardown.passed_on(raised, thrown)
                    raise
                teardown.end()
            else:
                teardown = _Phase(observer, name, scope, "teardown")
                try:
                    with teardown.current():
                        next(gen)
                except StopIteration:
                    teardown.end()
                    return
                except BaseException as raised:
                    teardown.end(raised)
                    raise
                teardown.end()
            # The user's generator yielded a second time: yield too, so the engine sees it.
            try:
                yield None
            finally:
                gen.close()
        finally:
            if counted:
                sink.resource_changed(name, -1)  # type: ignore[union-attr]

    return wrapper


def _observed_async_generator(observer: Observer, call: Any, name: str, scope: str) -> Callable[..., Any]:
    """``_observed_generator`` for an async generator function."""
    sink = observer.metrics
    counted = scope == "worker" and sink is not None

    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        setup = _Phase(observer, name, scope, "setup")
        try:
            with setup.current():
                agen = call(*args, **kwargs)
                value = await agen.__anext__()
        except StopAsyncIteration:
            setup.end()
            return
        except BaseException as exc:
            setup.end(exc)
            raise
        setup.end()
        if counted:
            sink.resource_changed(name, 1)  # type: ignore[union-attr]
        try:
            try:
                yield value
            except GeneratorExit:
                await agen.aclose()
                raise
            except BaseException as thrown:
                teardown = _Phase(observer, name, scope, "teardown")
                teardown.thrown_in(thrown)
                try:
                    with teardown.current():
                        await agen.athrow(thrown)
                except StopAsyncIteration:
                    teardown.end(swallowed=thrown)
                    return
                except BaseException as raised:
                    teardown.passed_on(raised, thrown)
                    raise
                teardown.end()
            else:
                teardown = _Phase(observer, name, scope, "teardown")
                try:
                    with teardown.current():
                        await agen.__anext__()
                except StopAsyncIteration:
                    teardown.end()
                    return
                except BaseException as raised:
                    teardown.end(raised)
                    raise
                teardown.end()
            try:
                yield None
            finally:
                await agen.aclose()
        finally:
            if counted:
                sink.resource_changed(name, -1)  # type: ignore[union-attr]

    return wrapper
