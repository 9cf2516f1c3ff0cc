"""OpenTelemetry traces: a span per job attempt, a child span per dependency setup and
teardown, exceptions recorded where they happened (swallowed ones included), trace
context carried through a queue's headers; and nothing at all without a tracer provider.

Everything runs against the real OpenTelemetry SDK with an in-memory exporter. Each test
hands its own ``TracerProvider`` to the runtime or worker (the global one can be set
only once per process)."""


import contextvars
import threading
import uuid
from collections.abc import Iterator
from typing import Annotated, Any

import anyio
import pytest
from hypothesis import given
from hypothesis import strategies as st
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from lifecycle import Depends, JobTimeout, Reject, Retry, Runtime, Worker, dependency, job
from lifecycle.queues import MemoryQueue

pytestmark = pytest.mark.anyio


class Traces:
    """A tracer provider whose finished spans can be read back."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider()
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))

    @property
    def spans(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())

    def named(self, name: str) -> list[ReadableSpan]:
        return [span for span in self.spans if span.name == name]

    def one(self, name: str) -> ReadableSpan:
        found = self.named(name)
        assert len(found) == 1, (name, [span.name for span in self.spans])
        return found[0]

    def children(self, parent: ReadableSpan) -> list[str]:
        assert parent.context is not None
        return [span.name for span in self.spans if span.parent is not None and span.parent.span_id == parent.context.span_id]


@pytest.fixture
def traces() -> Iterator[Traces]:
    found = Traces()
    yield found
    found.provider.shutdown()


# -- the span tree ----------------------------------------------------------------------------

events: list[str] = []


@dependency(scope="worker")
async def pool() -> Any:
    events.append("pool up")
    yield "pool"
    events.append("pool down")


def settings() -> dict[str, int]:
    return {"retries": 1}


async def connection(p: Annotated[str, Depends(pool)], s: Annotated[dict[str, int], Depends(settings)]) -> Any:
    events.append("conn up")
    yield f"conn({p})"
    events.append("conn down")


def cursor(c: Annotated[str, Depends(connection)]) -> Any:  # a sync generator, run in a thread
    events.append(f"cursor up in {threading.current_thread().name != 'MainThread'}")
    yield f"cursor({c})"
    events.append("cursor down")


@job(name="send_email")
async def send_email(user_id: int, cur: Annotated[str, Depends(cursor)]) -> str:
    return f"{user_id}:{cur}"


async def test_a_job_attempt_is_one_span_with_a_child_per_dependency_setup_and_teardown(traces: Traces) -> None:
    events.clear()
    async with Runtime(tracer_provider=traces.provider) as rt:
        assert await rt.run(send_email, user_id=3) == "3:cursor(conn(pool))"
    assert events == ["pool up", "conn up", "cursor up in True", "cursor down", "conn down", "pool down"]
    root = traces.one("job send_email")
    assert root.parent is None
    assert root.kind == SpanKind.INTERNAL
    assert root.attributes is not None
    assert root.attributes["lifecycle.job.name"] == "send_email"
    assert root.attributes["lifecycle.job.attempt"] == 1
    assert root.attributes["lifecycle.job.outcome"] == "succeeded"
    assert len(str(root.attributes["lifecycle.job.id"])) == 32
    # The worker-scoped pool is created lazily inside the first job, so its setup is there too.
    assert traces.children(root) == [
        "setup pool",
        "setup settings",
        "setup connection",
        "setup cursor",
        "teardown cursor",
        "teardown connection",
    ]
    job_spans = [span for span in traces.spans if span.name != "teardown pool"]
    assert all(span.context.trace_id == root.context.trace_id for span in job_spans)  # type: ignore[union-attr]
    # A worker-scoped teardown happens at close, long after the job: a trace of its own.
    assert traces.one("teardown pool").parent is None
    setup = traces.one("setup connection")
    assert setup.attributes == {
        "lifecycle.dependency": f"{__name__}:connection",
        "lifecycle.dependency.scope": "job",
        "lifecycle.dependency.phase": "setup",
    }
    assert traces.one("setup pool").attributes["lifecycle.dependency.scope"] == "worker"  # type: ignore[index]
    assert [span.name for span in traces.spans][-1] == "teardown pool"  # at runtime close
    # Each span covers its own phase: setups end before the teardowns start.
    assert setup.end_time <= traces.one("teardown connection").start_time  # type: ignore[operator]


async def test_the_observed_runtime_keeps_context_variables_and_the_per_job_cache(traces: Traces) -> None:
    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="unset")
    calls: list[str] = []

    def shared() -> str:
        calls.append("shared")
        return "value"

    def setter(s: Annotated[str, Depends(shared)]) -> Any:
        token = var.set("from dependency")
        yield s
        var.reset(token)

    @job
    async def reads(a: Annotated[str, Depends(setter)], b: Annotated[str, Depends(shared)]) -> str:
        return var.get()

    async with Runtime(tracer_provider=traces.provider) as rt:
        assert await rt.run(reads) == "from dependency"
    assert calls == ["shared"]
    assert len(traces.named("setup shared")) == 1


# -- exceptions where they happened ------------------------------------------------------------


async def test_a_failing_setup_is_recorded_on_its_span_and_the_job_span(traces: Traces) -> None:
    def broken() -> str:
        raise ConnectionError("database down")

    @job
    async def uses(b: Annotated[str, Depends(broken)]) -> None:
        raise AssertionError("never runs")

    async with Runtime(tracer_provider=traces.provider) as rt:
        with pytest.raises(ConnectionError):
            await rt.run(uses)
    setup = traces.one("setup broken")
    assert setup.status.status_code == StatusCode.ERROR
    assert [event.attributes["exception.type"] for event in setup.events] == ["ConnectionError"]  # type: ignore[index]
    root = traces.one("job uses")
    assert root.status.status_code == StatusCode.ERROR
    assert root.attributes["lifecycle.job.outcome"] == "failed"  # type: ignore[index]


async def test_a_swallowed_error_is_recorded_on_the_teardown_span_that_swallowed_it(traces: Traces) -> None:
    async def swallows() -> Any:
        try:  # noqa: SIM105 - a generator that swallows the job's error; the job still fails (rule 3)
            yield "x"
        except ValueError:
            pass

    def replaces() -> Any:
        try:
            yield "y"
        except KeyError as exc:
            raise ValueError("replaced") from exc

    def reraises() -> Any:
        yield "z"

    @job
    async def fails(
        a: Annotated[str, Depends(swallows)], b: Annotated[str, Depends(replaces)], c: Annotated[str, Depends(reraises)]
    ) -> None:
        raise KeyError("body")

    async with Runtime(tracer_provider=traces.provider) as rt:
        with pytest.raises(KeyError) as caught:
            await rt.run(fails)
    assert "swallowed" in " ".join(caught.value.__notes__)
    reraised = traces.one("teardown reraises")
    assert reraised.attributes["lifecycle.exception.thrown_in"] == "builtins.KeyError"  # type: ignore[index]
    assert reraised.attributes["lifecycle.exception.reraised"] is True  # type: ignore[index]
    assert reraised.status.status_code != StatusCode.ERROR  # it happened elsewhere
    replaced = traces.one("teardown replaces")
    assert replaced.status.status_code == StatusCode.ERROR
    assert [e.attributes["exception.message"] for e in replaced.events] == ["replaced"]  # type: ignore[index]
    swallowed = traces.one("teardown swallows")
    assert swallowed.attributes["lifecycle.exception.thrown_in"] == "builtins.ValueError"  # type: ignore[index]
    assert swallowed.attributes["lifecycle.exception.swallowed"] == "builtins.ValueError"  # type: ignore[index]
    (event,) = swallowed.events
    assert event.attributes["exception.message"] == "replaced"  # type: ignore[index]
    assert event.attributes["lifecycle.exception.swallowed"] is True  # type: ignore[index]
    body = traces.one("job fails")
    assert body.attributes["lifecycle.job.outcome"] == "failed"  # type: ignore[index]
    assert [e.attributes["exception.type"] for e in body.events] == ["KeyError"]  # type: ignore[index]


@pytest.mark.parametrize(
    ("raised", "outcome"),
    [(Retry(), "retry"), (Reject("no"), "rejected"), (JobTimeout("slow"), "timed_out"), (None, "succeeded")],
)
async def test_the_job_span_names_the_attempts_outcome(traces: Traces, raised: Exception | None, outcome: str) -> None:
    @job(name="outcome")
    async def run_it() -> None:
        if raised is not None:
            raise raised

    async with Runtime(tracer_provider=traces.provider) as rt:
        with pytest.raises(type(raised)) if raised is not None else _nothing():
            await rt.run(run_it)
    assert traces.one("job outcome").attributes["lifecycle.job.outcome"] == outcome  # type: ignore[index]


async def test_a_job_cancelled_by_its_timeout_records_the_cancellation_in_teardown_not_as_an_error(
    traces: Traces,
) -> None:
    async def waits() -> Any:
        yield "w"

    @job(timeout=0.2)
    async def sleeps(w: Annotated[str, Depends(waits)]) -> None:
        await anyio.sleep(30)

    async with Runtime(tracer_provider=traces.provider) as rt:
        with pytest.raises(JobTimeout):
            await rt.run(sleeps)
    teardown = traces.one("teardown waits")
    assert teardown.status.status_code != StatusCode.ERROR
    assert traces.one("job sleeps").attributes["lifecycle.job.outcome"] == "timed_out"  # type: ignore[index]


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


# -- the observed runtime behaves exactly like the plain one (oracle) ------------------------

BEHAVIOURS = ("reraise", "swallow", "replace", "fail_setup", "sync_reraise", "sync_swallow")


def _make_chain(log: list[str], behaviours: list[str]) -> list[Any]:
    """A chain of generator dependencies, each depending on the one before."""
    made: list[Any] = []
    for index, behaviour in enumerate(behaviours):
        name = f"d{index}"

        def build(name: str = name, behaviour: str = behaviour, previous: Any = made[-1] if made else None) -> Any:
            if behaviour.startswith("sync"):

                def gen(**_: Any) -> Any:
                    log.append(f"{name} up")
                    try:
                        yield name
                    except Exception as exc:
                        log.append(f"{name} saw {type(exc).__name__}")
                        if behaviour == "sync_reraise":
                            raise
                    else:
                        log.append(f"{name} down")

                fn = gen
            else:

                async def agen(**_: Any) -> Any:
                    if behaviour == "fail_setup":
                        log.append(f"{name} fails")
                        raise OSError(name)
                    log.append(f"{name} up")
                    try:
                        yield name
                    except Exception as exc:
                        log.append(f"{name} saw {type(exc).__name__}")
                        if behaviour == "reraise":
                            raise
                        if behaviour == "replace":
                            raise LookupError(name) from exc
                    else:
                        log.append(f"{name} down")

                fn = agen
            fn.__name__ = fn.__qualname__ = name
            if previous is not None:
                fn.__signature__ = _signature_on(previous)  # type: ignore[attr-defined]
            return fn

        made.append(build())
    return made


def _signature_on(previous: Any) -> Any:
    import inspect

    return inspect.Signature(
        [
            inspect.Parameter(
                "up", inspect.Parameter.KEYWORD_ONLY, annotation=Annotated[str, Depends(previous)]
            )
        ]
    )


async def _run_chain(behaviours: list[str], body_fails: bool, provider: Any) -> tuple[list[str], str]:
    log: list[str] = []
    chain = _make_chain(log, behaviours)

    async def body(**_: Any) -> str:
        log.append("body")
        if body_fails:
            raise ValueError("body")
        return "ok"

    import inspect

    body.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [inspect.Parameter("last", inspect.Parameter.KEYWORD_ONLY, annotation=Annotated[str, Depends(chain[-1])])]
    )
    async with Runtime(tracer_provider=provider) as rt:
        try:
            result = await rt.run(job(body))
        except Exception as exc:
            return log, f"{type(exc).__name__}({exc})"
    return log, result


@given(
    behaviours=st.lists(st.sampled_from(BEHAVIOURS), min_size=1, max_size=5),
    body_fails=st.booleans(),
)
def test_tracing_changes_no_order_and_no_outcome(behaviours: list[str], body_fails: bool) -> None:
    traces = Traces()
    for backend in ("asyncio", "trio"):
        traces.exporter.clear()
        plain = anyio.run(_run_chain, behaviours, body_fails, None, backend=backend)
        observed = anyio.run(_run_chain, behaviours, body_fails, traces.provider, backend=backend)
        assert observed == plain
        log = plain[0]
        # One teardown span per generator that was set up, and a swallowed error where
        # (and only where) the log shows a dependency that saw one and did not pass it on.
        set_up = [entry.split()[0] for entry in log if entry.endswith(" up")]
        teardowns = [span for span in traces.spans if span.name.startswith("teardown ")]
        assert sorted(span.name.split()[1] for span in teardowns) == sorted(set_up)
        swallowed = {
            span.name.split()[1]
            for span in teardowns
            if span.attributes is not None and "lifecycle.exception.swallowed" in span.attributes
        }
        expected = {
            f"d{index}"
            for index, behaviour in enumerate(behaviours)
            if behaviour in ("swallow", "sync_swallow") and f"d{index} saw" in " ".join(log)
        }
        assert swallowed == expected
    traces.provider.shutdown()


# -- zero cost without a tracer provider ------------------------------------------------------


async def test_without_a_tracer_provider_the_runtime_runs_the_unobserved_plans() -> None:
    # No SDK configured globally in this process: OpenTelemetry's default is a proxy.
    assert isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)
    async with Runtime() as rt:
        assert rt._observer is None
        assert rt._compiled(send_email) is send_email.runners  # the very plan @job compiled
        events.clear()
        assert await rt.run(send_email, user_id=1) == "1:cursor(conn(pool))"


# -- across a queue ----------------------------------------------------------------------------


async def test_a_worker_continues_the_trace_of_the_producer_that_enqueued(traces: Traces) -> None:
    seen: list[tuple[int, int]] = []

    @job(name="traced_job")
    async def traced_job(n: int) -> None:
        context = trace.get_current_span().get_span_context()
        seen.append((context.trace_id, n))

    queue = MemoryQueue()
    tracer = traces.provider.get_tracer("producer")
    with tracer.start_as_current_span("request", kind=SpanKind.PRODUCER) as producer:
        await queue.enqueue(traced_job, {"n": 1})
    await queue.enqueue(traced_job, {"n": 2})  # no span: a trace of its own
    worker = Worker(queue, [traced_job], tracer_provider=traces.provider, poll_interval=0.05)
    async with anyio.create_task_group() as group:
        group.start_soon(worker.run)
        with anyio.fail_after(30):
            while worker.stats["succeeded"] < 2:
                await anyio.sleep(0.02)
        worker.stop()
    spans = {span.attributes["lifecycle.job.id"]: span for span in traces.named("job traced_job")}  # type: ignore[index]
    assert len(spans) == 2
    continued = [span for span in spans.values() if span.parent is not None]
    assert len(continued) == 1
    (child,) = continued
    assert child.parent.span_id == producer.get_span_context().span_id  # type: ignore[union-attr]
    assert child.context.trace_id == producer.get_span_context().trace_id  # type: ignore[union-attr]
    assert child.kind == SpanKind.CONSUMER
    assert child.attributes["messaging.system"] == "memory"  # type: ignore[index]
    assert child.attributes["messaging.operation.type"] == "process"  # type: ignore[index]
    assert child.attributes["messaging.message.id"] == child.attributes["lifecycle.job.id"]  # type: ignore[index]
    assert {trace_id for trace_id, _ in seen} == {span.context.trace_id for span in spans.values()}  # type: ignore[union-attr]


async def test_enqueue_adds_trace_context_only_inside_a_span_and_never_replaces_one(traces: Traces) -> None:
    queue = MemoryQueue()
    await queue.enqueue("plain", {})
    tracer = traces.provider.get_tracer("producer")
    with tracer.start_as_current_span("request") as span:
        await queue.enqueue("traced", {})
        await queue.enqueue("own", {}, headers={"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01", "x": "y"})
    deliveries = {d.job: d for d in await queue.receive(10, 1)}
    assert deliveries["plain"].headers == {}
    expected = f"00-{span.get_span_context().trace_id:032x}-{span.get_span_context().span_id:016x}-"
    assert list(deliveries["traced"].headers) == ["traceparent"]
    assert deliveries["traced"].headers["traceparent"].startswith(expected)  # then the trace flags
    assert deliveries["own"].headers["traceparent"] == "00-" + "1" * 32 + "-" + "2" * 16 + "-01"
    assert deliveries["own"].headers["x"] == "y"


@pytest.mark.redis
@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # redis-py's client is asyncio-only
async def test_a_trace_continues_across_redis_through_a_retry(traces: Traces, redis_url: str) -> None:
    from redis.asyncio import Redis

    from lifecycle.queues import RedisStreamQueue

    stream = f"lifecycle-trace-{uuid.uuid4().hex[:12]}"
    attempts: list[int] = []

    @job(name="flaky", retries=1)
    async def flaky(n: int) -> int:
        attempts.append(n)
        if len(attempts) == 1:
            raise Retry(delay=0)
        return n

    queue = RedisStreamQueue(redis_url, stream=stream, group="workers")
    tracer = traces.provider.get_tracer("producer")
    try:
        with tracer.start_as_current_span("web request", kind=SpanKind.PRODUCER) as producer:
            await queue.enqueue(flaky, {"n": 7})
        worker = Worker(queue, [flaky], tracer_provider=traces.provider, poll_interval=0.1, retry_backoff=0.01)
        async with anyio.create_task_group() as group:
            group.start_soon(worker.run)
            with anyio.fail_after(60):
                while worker.stats["succeeded"] < 1:
                    await anyio.sleep(0.05)
            worker.stop()
    finally:
        await queue.close()
        client = Redis.from_url(redis_url)
        keys = [key async for key in client.scan_iter(f"{stream}*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()
    spans = sorted(traces.named("job flaky"), key=lambda span: span.attributes["lifecycle.job.attempt"])  # type: ignore[index]
    assert [span.attributes["lifecycle.job.outcome"] for span in spans] == ["retry", "succeeded"]  # type: ignore[index]
    producer_context = producer.get_span_context()
    for span in spans:  # both attempts continue the producer's trace (a retry keeps its headers)
        assert span.context.trace_id == producer_context.trace_id  # type: ignore[union-attr]
        assert span.parent is not None and span.parent.span_id == producer_context.span_id
        assert span.kind == SpanKind.CONSUMER
        assert span.attributes["messaging.system"] == "redis"  # type: ignore[index]
        assert span.attributes["messaging.destination.name"] == stream  # type: ignore[index]
        assert span.attributes["messaging.consumer.group.name"] == "workers"  # type: ignore[index]


# -- every kind of dependency, observed ---------------------------------------------------------


class Settings:
    def __init__(self, prefix: str = "s") -> None:
        self.prefix = prefix


class AsyncCallable:
    async def __call__(self, s: Annotated[Settings, Depends(Settings)]) -> str:
        return f"{s.prefix}-async-instance"


class Holder:
    def method(self, job_arg: int) -> str:
        return f"method({job_arg})"


holder = Holder()


def with_default(tag: str, job_arg: int) -> str:
    return f"{tag}:{job_arg}"


@dependency(threaded=False)
def inline_gen() -> Any:
    yield threading.current_thread().name == "MainThread"


async def test_every_kind_of_dependency_gives_the_same_values_and_a_span_each(traces: Traces) -> None:
    import functools

    partial = functools.partial(with_default, "p")
    instance = AsyncCallable()

    @job(name="kinds")
    async def kinds(
        job_arg: int,
        s: Annotated[Settings, Depends()],
        a: Annotated[str, Depends(instance)],
        m: Annotated[str, Depends(holder.method)],
        p: Annotated[str, Depends(partial)],
        on_loop: Annotated[bool, Depends(inline_gen)],
    ) -> tuple[str, str, str, str, bool]:
        return s.prefix, a, m, p, on_loop

    expected = ("s", "s-async-instance", "method(4)", "p:4", True)
    async with Runtime() as rt:
        assert await rt.run(kinds, job_arg=4) == expected
    async with Runtime(tracer_provider=traces.provider) as rt:
        assert await rt.run(kinds, job_arg=4) == expected
    names = {span.name for span in traces.spans}
    assert {
        "setup Settings",
        "setup AsyncCallable() instance",
        "setup Holder.method",
        "setup partial(with_default)",
        "setup inline_gen",
        "teardown inline_gen",
    } <= names
    assert len([name for name in names if name.startswith("setup ")]) == 5  # Settings once (cached)


async def test_an_invalid_override_is_reported_by_the_plan_as_without_tracing(traces: Traces) -> None:
    from lifecycle import DependencyError

    async with Runtime(tracer_provider=traces.provider) as rt:
        rt.dependency_overrides[settings] = lambda *, unknown_param: None
        with pytest.raises(DependencyError, match="unknown_param"):
            await rt.run(send_email, user_id=1)
