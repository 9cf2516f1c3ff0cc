"""Cache, overrides, extra dependencies, scopes, threads, context variables, logging
and the entry points (run, bind, lifecycle.run)."""

import contextvars
import threading
from typing import Annotated, Any

import anyio
import pytest
from structlog.testing import capture_logs

import lifecycle
from lifecycle import Depends, JobContext, Runtime, dependency, job

pytestmark = pytest.mark.anyio


# -- per-job cache ---------------------------------------------------------------------


async def test_same_dependency_is_called_once_per_job_and_shared() -> None:
    calls: list[int] = []

    def config() -> object:
        calls.append(1)
        return object()

    def a(c=Depends(config)) -> object:
        return c

    def b(c=Depends(config)) -> object:
        return c

    async def body(x=Depends(a), y=Depends(b), z=Depends(config)) -> bool:
        return x is y is z

    async with Runtime() as rt:
        assert await rt.run(body) is True
        assert await rt.run(body) is True
    assert len(calls) == 2  # once per job, not shared across jobs


async def test_use_cache_false_gets_a_fresh_value() -> None:
    created: list[object] = []

    async def session() -> Any:
        value = object()
        created.append(value)
        yield value

    async def body(a=Depends(session), b=Depends(session, use_cache=False), c=Depends(session)) -> tuple[bool, bool]:
        return a is c, a is b

    async with Runtime() as rt:
        assert await rt.run(body) == (True, False)
    assert len(created) == 2


# -- overrides and extra dependencies -------------------------------------------------


def get_db() -> str:
    return "real"


async def uses_db(db: Annotated[str, Depends(get_db)]) -> str:
    return db


async def test_overrides_dict_and_override_context_manager() -> None:
    def fake_db() -> str:
        return "fake"

    async def other_db(marker: Annotated[str, Depends(lambda: "nested")]) -> Any:
        yield f"other({marker})"

    async with Runtime(dependency_overrides={get_db: fake_db}) as rt:
        assert await rt.run(uses_db) == "fake"
        with rt.override(get_db, other_db):
            assert await rt.run(uses_db) == "other(nested)"
        assert await rt.run(uses_db) == "fake"
        del rt.dependency_overrides[get_db]
        assert await rt.run(uses_db) == "real"
        rt.dependency_overrides[get_db] = fake_db
        assert await rt.run(uses_db) == "fake"
        rt.dependency_overrides.clear()
        with rt.override(get_db, fake_db):
            assert await rt.run(uses_db) == "fake"
        assert get_db not in rt.dependency_overrides
        rt.dependency_overrides = {get_db: other_db}
        assert await rt.run(uses_db) == "other(nested)"


async def test_overridden_dependency_is_cached_under_its_replacement() -> None:
    calls: list[str] = []

    def real() -> str:
        return "real"

    def fake() -> str:
        calls.append("fake")
        return "fake"

    async def body(a=Depends(real), b=Depends(fake)) -> str:
        return a + b

    async with Runtime(dependency_overrides={real: fake}) as rt:
        assert await rt.run(body) == "fakefake"
    assert calls == ["fake"]


async def test_job_and_runtime_dependencies_run_without_injection() -> None:
    events: list[str] = []

    async def audit(ctx: JobContext) -> Any:
        events.append(f"audit up {ctx.name}")
        yield "ignored"
        events.append("audit down")

    def tracing() -> None:
        events.append("tracing")

    @job(dependencies=[Depends(audit)])
    async def work(x: int) -> int:
        events.append("body")
        return x

    async with Runtime(dependencies=[Depends(tracing)]) as rt:
        assert await rt.run(work, 3) == 3
    assert events == ["tracing", "audit up work", "body", "audit down"]


# -- worker scope ----------------------------------------------------------------------


async def test_worker_scope_created_once_under_100_concurrent_jobs() -> None:
    created: list[int] = []
    closed: list[int] = []

    @dependency(scope="worker")
    async def pool() -> Any:
        created.append(1)
        await anyio.sleep(0.01)  # everyone arrives while creation is in progress
        yield {"pool": len(created)}
        closed.append(1)

    async def body(p=Depends(pool)) -> int:
        return id(p)

    results: list[int] = []

    async def one() -> None:
        results.append(await rt.run(body))

    async with Runtime() as rt:
        async with anyio.create_task_group() as tg:
            for _ in range(100):
                tg.start_soon(one)
        assert closed == []
    assert created == [1]
    assert closed == [1]
    assert len(set(results)) == 1 and len(results) == 100


async def test_worker_scope_teardown_in_reverse_creation_order_and_errors_do_not_stop_others() -> None:
    events: list[str] = []

    @dependency(scope="worker")
    async def first() -> Any:
        yield "first"
        events.append("first down")

    @dependency(scope="worker")
    def second(f=Depends(first)) -> Any:
        yield "second"
        events.append("second down")
        raise RuntimeError("second failed")

    @dependency(scope="worker")
    async def third() -> Any:
        yield "third"
        events.append("third down")

    async def body(s=Depends(second), t=Depends(third)) -> str:
        return "ok"

    with capture_logs() as logs, pytest.raises(RuntimeError, match="second failed") as info:
        async with Runtime() as rt:
            await rt.run(body)
    assert events == ["third down", "second down", "first down"]
    assert any("second" in note for note in info.value.__notes__)
    assert any(e["event"] == "dependency.worker_teardown_failed" for e in logs)


async def test_several_worker_teardown_failures_raise_a_group() -> None:
    @dependency(scope="worker")
    async def a() -> Any:
        yield 1
        raise ValueError("a")

    @dependency(scope="worker")
    async def b() -> Any:
        yield 2
        raise KeyError("b")

    async def body(x=Depends(a), y=Depends(b)) -> None:
        pass

    with pytest.raises(BaseExceptionGroup) as info:
        async with Runtime() as rt:
            await rt.run(body)
    assert {type(e) for e in info.value.exceptions} == {ValueError, KeyError}


async def test_worker_scope_setup_failure_is_not_cached() -> None:
    attempts: list[int] = []

    @dependency(scope="worker")
    async def flaky() -> Any:
        attempts.append(1)
        if len(attempts) == 1:
            raise ConnectionError("down")
        yield "up"

    async def body(f=Depends(flaky)) -> str:
        return f

    async with Runtime() as rt:
        with pytest.raises(ConnectionError):
            await rt.run(body)
        assert await rt.run(body) == "up"
    assert len(attempts) == 2


async def test_worker_scoped_generator_may_hold_a_task_group_across_yield() -> None:
    ticks: list[int] = []

    @dependency(scope="worker")
    async def heartbeat() -> Any:
        async def beat() -> None:
            while True:
                ticks.append(1)
                await anyio.sleep(0.001)

        async with anyio.create_task_group() as tg:
            tg.start_soon(beat)
            yield "hb"
            tg.cancel_scope.cancel()

    async def body(h=Depends(heartbeat)) -> str:
        await anyio.sleep(0.01)
        return h

    async with Runtime() as rt, anyio.create_task_group() as tg:
        for _ in range(3):
            tg.start_soon(rt.run, body)
    assert ticks


async def test_job_scoped_generator_may_hold_a_cancel_scope_across_yield() -> None:
    async def scoped() -> Any:
        with anyio.CancelScope():
            yield "x"

    async def body(a=Depends(scoped), b=Depends(scoped, use_cache=False)) -> str:
        raise ValueError("body")

    async with Runtime() as rt:
        with pytest.raises(ValueError, match="body"):
            await rt.run(body)


async def test_worker_scope_teardown_timeout() -> None:
    @dependency(scope="worker")
    async def hangs() -> Any:
        yield 1
        await anyio.sleep(10)

    async def body(h=Depends(hangs)) -> None:
        pass

    with pytest.raises(lifecycle.TeardownTimeout, match="hangs"):
        async with Runtime(teardown_timeout=0.05) as rt:
            await rt.run(body)


# -- threads and context variables ----------------------------------------------------

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


async def test_sync_dependencies_run_in_a_worker_thread_unless_threaded_false() -> None:
    loop_thread = threading.get_ident()

    def threaded() -> Any:
        setup = threading.get_ident()
        yield setup
        seen.append(("threaded teardown", threading.get_ident() != loop_thread))

    @dependency(threaded=False)
    def inline() -> Any:
        yield threading.get_ident()
        seen.append(("inline teardown", threading.get_ident() == loop_thread))

    seen: list[tuple[str, bool]] = []

    async def body(t=Depends(threaded), i=Depends(inline)) -> tuple[bool, bool]:
        return t != loop_thread, i == loop_thread

    async with Runtime() as rt:
        assert await rt.run(body) == (True, True)
    assert seen == [("inline teardown", True), ("threaded teardown", True)]


@pytest.mark.parametrize("kind", ["async_gen", "sync_gen_threaded", "sync_gen_inline", "sync_fn_threaded"])
async def test_context_variables_set_before_yield_are_visible_and_reset_after(kind: str) -> None:
    seen: list[str] = []

    async def async_gen() -> Any:
        token = request_id.set("from-dep")
        yield "v"
        seen.append(f"after yield: {request_id.get()}")
        request_id.reset(token)

    def sync_gen() -> Any:
        token = request_id.set("from-dep")
        yield "v"
        seen.append(f"after yield: {request_id.get()}")
        request_id.reset(token)

    def sync_fn() -> str:
        request_id.set("from-dep")
        return "v"

    provider: Any = {
        "async_gen": async_gen,
        "sync_gen_threaded": sync_gen,
        "sync_gen_inline": dependency(threaded=False)(sync_gen),
        "sync_fn_threaded": sync_fn,
    }[kind]

    async def body(v=Depends(provider)) -> str:
        return request_id.get()

    async def main() -> str:
        async with Runtime() as rt:
            return await rt.run(body)

    assert await main() == "from-dep"
    if kind != "sync_fn_threaded":
        assert seen == ["after yield: from-dep"]
        assert request_id.get() == "-"  # reset after the yield reached the caller's context


# -- logging ---------------------------------------------------------------------------


@pytest.mark.usefixtures("debug_logs")
async def test_structlog_events_carry_job_identity_and_durations() -> None:
    async def dep() -> Any:
        yield 1

    @job(name="send-email")
    async def send(user_id: int, d=Depends(dep), ctx: JobContext = None) -> None:  # type: ignore[assignment]
        ctx.log.bind(extra=1).info("custom")  # a real structlog logger: bind() and friends work
        try:
            raise KeyError("k")
        except KeyError:
            ctx.log.exception("caught")

    async with Runtime() as rt:
        with capture_logs() as logs:
            await rt.run(send, 5)
    events = {entry["event"]: entry for entry in logs}
    for name in ("job.started", "dependency.setup", "custom", "dependency.teardown", "job.succeeded"):
        assert events[name]["job"] == "send-email"
        assert events[name]["attempt"] == 1
        assert len(events[name]["job_id"]) == 32
    assert events["dependency.setup"]["dependency"].endswith("dep")
    assert events["job.succeeded"]["duration_ms"] >= 0
    assert events["custom"]["extra"] == 1
    assert events["caught"]["job"] == "send-email"
    assert events["caught"]["log_level"] == "error"


async def test_failure_is_logged_as_error() -> None:
    async def boom() -> None:
        raise KeyError("k")

    async with Runtime() as rt:
        with capture_logs() as logs, pytest.raises(KeyError):
            await rt.run(boom)
    failed = [e for e in logs if e["event"] == "job.failed"]
    assert failed and failed[0]["log_level"] == "error" and "KeyError" in failed[0]["error"]


# -- entry points ----------------------------------------------------------------------


async def test_bind_returns_a_payload_only_callable() -> None:
    @job
    async def add(a: int, b: int, ctx: JobContext) -> int:
        return a + b + ctx.attempt

    async with Runtime() as rt:
        bound = rt.bind(add)
        assert await bound(1, b=2) == 4
        assert bound.__name__ == "add"


async def test_calling_a_job_directly_skips_injection() -> None:
    def real() -> str:
        raise AssertionError("must not run")

    @job
    async def greet(name: str, db: Annotated[str, Depends(real)]) -> str:
        return f"{name}:{db}"

    assert await greet("x", "fake-db") == "x:fake-db"
    assert greet.name == "greet" and greet.__name__ == "greet"


def test_lifecycle_run_one_shot_on_both_backends() -> None:
    events: list[str] = []

    @dependency(scope="worker")
    async def pool() -> Any:
        events.append("pool up")
        yield "pool"
        events.append("pool down")

    @job
    async def task(n: int, p=Depends(pool)) -> str:
        return f"{p}:{n}"

    assert lifecycle.run(task, 1, backend="asyncio") == "pool:1"
    assert lifecycle.run(task, n=2, backend="trio") == "pool:2"
    assert events == ["pool up", "pool down"] * 2


async def test_exception_inside_runtime_block_propagates_unwrapped() -> None:
    @dependency(scope="worker")
    async def pool() -> Any:
        yield 1

    async def body(p=Depends(pool)) -> None:
        raise KeyError("job")

    with pytest.raises(KeyError):
        async with Runtime() as rt:
            await rt.run(body)


async def test_retried_attempt_logs_retrying_and_only_the_final_failure_logs_failed() -> None:
    @job(retries=1)
    async def failing() -> None:
        raise ValueError("nope")

    async with Runtime() as rt:
        with capture_logs() as logs, pytest.raises(ValueError):
            await rt.run(failing)
    events = [(e["event"], e.get("attempt")) for e in logs if e["event"] in ("job.retrying", "job.failed")]
    assert events == [("job.retrying", 1), ("job.failed", 2)]


async def test_filtered_levels_are_skipped_but_warnings_always_reach_structlog() -> None:
    import logging

    import structlog

    async def swallows() -> Any:
        try:
            yield None
        except ValueError:
            return

    async def body(s: Any = Depends(swallows)) -> None:
        raise ValueError("boom")

    async def fine() -> str:
        return "ok"

    previous = structlog.get_config()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    try:
        async with Runtime() as rt:
            with capture_logs() as logs:
                assert await rt.run(fine) == "ok"
                with pytest.raises(ValueError):
                    await rt.run(body)
    finally:
        structlog.configure(**previous)
    events = [e["event"] for e in logs]
    assert "job.succeeded" not in events and "job.started" not in events  # info/debug filtered
    assert "dependency.swallowed_exception" in events and "job.failed" in events


async def test_tracebacks_through_the_generated_plan_function_show_its_source() -> None:
    import traceback

    async def dep() -> Any:
        yield 1

    @job
    async def fails(d: int = Depends(dep)) -> None:
        raise KeyError("boom")

    async with Runtime() as rt:
        with pytest.raises(KeyError) as info:
            await rt.run(fails)
    text = "".join(traceback.format_exception(info.value))
    assert "lifecycle plan" in text and "for job 'fails'" in text
    assert "result = await fails(d=d)" in text  # the generated line, from linecache
