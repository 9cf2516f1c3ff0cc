"""Order and exception rules (README, "Semantics"), on both backends."""

import time
from typing import Annotated, Any

import anyio
import pytest
from structlog.testing import capture_logs

from lifecycle import (
    DependencyError,
    Depends,
    JobContext,
    JobTimeout,
    Reject,
    Retry,
    Runtime,
    TeardownTimeout,
    dependency,
    job,
)

pytestmark = pytest.mark.anyio


class Boom(Exception):
    pass


class Converted(Exception):
    pass


def cancelled_class() -> type[BaseException]:
    return anyio.get_cancelled_exc_class()


async def test_setup_depth_first_in_parameter_order_and_teardown_reversed() -> None:
    events: list[str] = []

    def make(name: str, *deps: Any) -> Any:
        params = {f"d{i}": Depends(d) for i, d in enumerate(deps)}

        async def provider(**_: Any) -> Any:
            events.append(f"up {name}")
            yield name
            events.append(f"down {name}")

        import inspect

        provider.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
            [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=v) for k, v in params.items()]
        )
        provider.__qualname__ = name
        return provider

    config = make("config")
    pool = make("pool", config)
    conn = make("conn", pool, config)
    cache = make("cache", config)
    tx = make("tx", conn)

    async def body(a: Annotated[str, Depends(tx)], b: Annotated[str, Depends(cache)], c=Depends(conn)) -> str:
        events.append("body")
        return "ok"

    async with Runtime() as rt:
        assert await rt.run(body) == "ok"
    assert events == [
        "up config", "up pool", "up conn", "up tx", "up cache", "body",
        "down cache", "down tx", "down conn", "down pool", "down config",
    ]  # fmt: skip


def tracked(events: list[str], name: str, behaviour: str = "reraise") -> Any:
    """An async generator dependency that records what it sees at its yield."""

    async def provider() -> Any:
        events.append(f"up {name}")
        try:
            yield name
        except BaseException as exc:
            events.append(f"{name} saw {type(exc).__name__}")
            if behaviour == "convert":
                raise Converted(f"from {name}") from exc
            if behaviour == "swallow":
                return
            raise
        else:
            events.append(f"{name} saw nothing")
            if behaviour == "fail":
                raise Boom(f"teardown of {name}")
        finally:
            events.append(f"down {name}")

    provider.__qualname__ = name
    return provider


async def test_body_exception_is_thrown_into_generators_innermost_first() -> None:
    events: list[str] = []
    outer, inner = tracked(events, "outer"), tracked(events, "inner")

    async def body(a=Depends(outer), b=Depends(inner)) -> None:
        raise Boom("body")

    async with Runtime() as rt:
        with pytest.raises(Boom, match="body"):
            await rt.run(body)
    assert events == ["up outer", "up inner", "inner saw Boom", "down inner", "outer saw Boom", "down outer"]


async def test_converted_exception_passes_on_with_context() -> None:
    events: list[str] = []
    outer, inner = tracked(events, "outer"), tracked(events, "inner", "convert")

    async def body(a=Depends(outer), b=Depends(inner)) -> None:
        raise Boom("body")

    async with Runtime() as rt:
        with pytest.raises(Converted, match="from inner") as info:
            await rt.run(body)
    assert isinstance(info.value.__cause__, Boom)
    assert isinstance(info.value.__context__, Boom)
    assert "outer saw Converted" in events


async def test_swallowed_exception_still_fails_the_job_with_note_and_warning() -> None:
    events: list[str] = []
    outer, inner = tracked(events, "outer"), tracked(events, "inner", "swallow")

    async def body(a=Depends(outer), b=Depends(inner)) -> None:
        raise Boom("body")

    async with Runtime() as rt:
        with capture_logs() as logs, pytest.raises(Boom, match="body") as info:
            await rt.run(body)
    assert "outer saw nothing" in events  # outer sees a normal exit
    notes = getattr(info.value, "__notes__", [])
    assert any("inner" in note and "swallowed" in note for note in notes)
    warnings = [entry for entry in logs if entry["event"] == "dependency.swallowed_exception"]
    assert len(warnings) == 1
    assert warnings[0]["log_level"] == "warning"
    assert warnings[0]["dependency"].endswith(":inner")


async def test_setup_failure_tears_down_what_was_set_up_and_skips_body() -> None:
    events: list[str] = []
    first = tracked(events, "first")

    async def broken() -> str:
        raise Boom("setup")

    later = tracked(events, "later")

    async def body(a=Depends(first), b=Depends(broken), c=Depends(later)) -> None:
        events.append("body")

    async with Runtime() as rt:
        with pytest.raises(Boom, match="setup"):
            await rt.run(body)
    assert events == ["up first", "first saw Boom", "down first"]


async def test_teardown_failure_on_success_fails_the_job() -> None:
    events: list[str] = []
    outer, inner = tracked(events, "outer"), tracked(events, "inner", "fail")

    async def body(a=Depends(outer), b=Depends(inner)) -> str:
        return "result"

    async with Runtime() as rt:
        with pytest.raises(Boom, match="teardown of inner"):
            await rt.run(body)
    assert events[-2:] == ["outer saw Boom", "down outer"]


async def test_sync_generators_follow_the_same_rules() -> None:
    events: list[str] = []

    def sync_dep(name: str, behaviour: str) -> Any:
        def provider() -> Any:
            events.append(f"up {name}")
            try:
                yield name
            except Boom:
                events.append(f"{name} saw Boom")
                if behaviour == "swallow":
                    return
                raise

        provider.__qualname__ = name
        return provider

    threaded = sync_dep("threaded", "reraise")
    inline = dependency(threaded=False)(sync_dep("inline", "swallow"))

    async def body(a=Depends(threaded), b=Depends(inline)) -> None:
        raise Boom("body")

    async with Runtime() as rt:
        with pytest.raises(Boom) as info:
            await rt.run(body)
    assert events == ["up threaded", "up inline", "inline saw Boom"]
    assert any("inline" in note for note in info.value.__notes__)


async def test_timeout_throws_cancellation_into_generators_and_teardown_completes() -> None:
    events: list[str] = []

    async def resource() -> Any:
        try:
            yield "r"
        except BaseException as exc:
            events.append(f"saw {type(exc).__name__}")
            await anyio.sleep(0.01)  # teardown may await: it is shielded
            events.append("teardown finished")
            raise

    @job(timeout=0.05)
    async def slow(r=Depends(resource)) -> None:
        await anyio.sleep(10)

    async with Runtime() as rt:
        with pytest.raises(JobTimeout, match="slow"):
            await rt.run(slow)
    assert events == [f"saw {cancelled_class().__name__}", "teardown finished"]


async def test_caller_cancellation_runs_teardown_and_propagates() -> None:
    events: list[str] = []
    started = anyio.Event()

    async def resource() -> Any:
        try:
            yield "r"
        finally:
            await anyio.sleep(0.01)
            events.append("teardown finished")

    async def body(r=Depends(resource)) -> None:
        started.set()
        await anyio.sleep(10)

    async with Runtime() as rt, anyio.create_task_group() as tg:
        tg.start_soon(rt.run, body)
        await started.wait()
        tg.cancel_scope.cancel()
    assert events == ["teardown finished"]


def _outer_seeing_timeouts(events: list[str]) -> Any:
    """A generator set up first, so torn down last: it records a TeardownTimeout from
    further in."""

    async def outer() -> Any:
        try:
            yield "outer"
        except TeardownTimeout:
            events.append("outer saw TeardownTimeout")
            raise

    return outer


@pytest.mark.usefixtures("both_runners")
async def test_teardown_overrunning_teardown_timeout_is_cancelled_and_logged() -> None:
    events: list[str] = []

    outer = _outer_seeing_timeouts(events)

    async def hangs() -> Any:
        try:
            yield "x"
        finally:
            try:
                await anyio.sleep(10)
            except BaseException:
                events.append("hanging teardown cancelled")
                raise

    async def body(o=Depends(outer), h=Depends(hangs)) -> str:
        return "done"

    async with Runtime(teardown_timeout=0.05) as rt:
        with capture_logs() as logs, pytest.raises(TeardownTimeout, match="hangs") as info:
            await rt.run(body)
    assert events == ["hanging teardown cancelled", "outer saw TeardownTimeout"]
    assert isinstance(info.value, JobTimeout)
    assert any(e["event"] == "dependency.teardown_timeout" and e["log_level"] == "error" for e in logs)


async def test_teardown_armed_while_the_watchdog_sleeps_on_an_ended_one_is_still_bounded() -> None:
    """The watchdog, woken by one job's teardown, sleeps until that deadline even after
    the teardown ended; a later job's overrun must still be caught at its own deadline,
    neither early nor only when the hanging teardown gives up."""
    timeout = 0.3
    spent: list[float] = []

    async def quick() -> Any:
        yield "q"
        await anyio.sleep(0)  # suspends: the watchdog task gets to run

    async def hangs() -> Any:
        yield "h"
        started = anyio.current_time()
        try:
            await anyio.sleep(10)
        finally:
            spent.append(anyio.current_time() - started)

    async def first(q=Depends(quick)) -> str:
        return "first"

    async def second(h=Depends(hangs)) -> str:
        return "second"

    async with Runtime(teardown_timeout=timeout) as rt:
        assert await rt.run(first) == "first"
        await anyio.sleep(timeout * 2 / 3)  # the watchdog is now asleep until first's deadline
        with pytest.raises(TeardownTimeout, match="hangs"):
            await rt.run(second)
    assert timeout * 0.9 <= spent[0] < 5, spent


async def test_watchdog_woken_after_the_deadline_that_woke_it_keeps_working() -> None:
    """A teardown that blocks the loop past its deadline without suspending ends before
    the watchdog runs; the watchdog then finds that deadline already in the past (and
    must not hand trio a negative sleep, which would crash the runtime)."""

    async def returns_at_once() -> None:
        return None

    async def blocks_the_loop() -> Any:
        yield "b"
        time.sleep(0.05)  # blocks the loop past the deadline, with no checkpoint
        await returns_at_once()

    async def blocking(b=Depends(blocks_the_loop)) -> str:
        return "blocked"

    async def hangs() -> Any:
        yield "h"
        await anyio.sleep(10)

    async def hanging(h=Depends(hangs)) -> str:
        return "hung"

    async with Runtime(teardown_timeout=0.01) as rt:
        await anyio.sleep(0.01)  # the watchdog task is idle, waiting to be woken
        assert await rt.run(blocking) == "blocked"
        await anyio.sleep(0.02)  # the watchdog runs, its wake-up deadline long gone
        with pytest.raises(TeardownTimeout, match="hangs"):
            await rt.run(hanging)


@pytest.mark.usefixtures("both_runners")
async def test_teardown_that_completes_after_overrunning_is_still_a_timeout() -> None:
    events: list[str] = []

    outer = _outer_seeing_timeouts(events)

    async def stubborn() -> Any:
        yield "x"
        with anyio.CancelScope(shield=True):  # ignores the watchdog's cancellation
            await anyio.sleep(0.2)
        events.append("stubborn finished")

    async def body(o=Depends(outer), s=Depends(stubborn)) -> str:
        return "done"

    async with Runtime(teardown_timeout=0.05) as rt:
        with pytest.raises(TeardownTimeout, match="stubborn"):
            await rt.run(body)
    assert events == ["stubborn finished", "outer saw TeardownTimeout"]


@pytest.mark.usefixtures("both_runners")
async def test_teardown_error_swallowed_by_an_outer_dependency_lets_the_job_succeed() -> None:
    """As with nested ``async with``: an outer exit that suppresses the error wins."""
    events: list[str] = []

    async def outer() -> Any:
        try:
            yield "outer"
        except KeyError as exc:
            events.append(f"outer swallowed {exc!r}")

    async def broken() -> Any:
        yield "x"
        raise KeyError("commit failed")

    @dependency(threaded=False)
    def sync_inner() -> Any:
        yield "s"
        events.append("sync_inner closed")

    async def body(o=Depends(outer), b=Depends(broken), s=Depends(sync_inner)) -> str:
        return "done"

    async with Runtime() as rt:
        with capture_logs() as logs:
            assert await rt.run(body) == "done"
    assert events == ["sync_inner closed", "outer swallowed KeyError('commit failed')"]
    assert any(e["event"] == "dependency.swallowed_exception" for e in logs)


async def test_threaded_sync_teardown_overrun_is_abandoned() -> None:
    import threading

    release = threading.Event()

    def hangs() -> Any:
        yield "x"
        release.wait(5)

    async def body(h=Depends(hangs)) -> None:
        return None

    try:
        async with Runtime(teardown_timeout=0.05) as rt:
            with pytest.raises(TeardownTimeout, match="hangs"):
                await rt.run(body)
    finally:
        release.set()


async def test_retry_runs_again_with_fresh_job_scoped_dependencies() -> None:
    created: list[int] = []
    worker_created: list[int] = []

    @dependency(scope="worker")
    def shared() -> object:
        worker_created.append(1)
        return object()

    async def session(ctx: JobContext) -> Any:
        created.append(ctx.attempt)
        yield object()

    @job(retries=2)
    async def flaky(s=Depends(session), w=Depends(shared), ctx: JobContext = None) -> int:  # type: ignore[assignment]
        if ctx.attempt < 3:
            raise Retry()
        return ctx.attempt

    async with Runtime() as rt:
        assert await rt.run(flaky) == 3
    assert created == [1, 2, 3]
    assert worker_created == [1]


async def test_retry_delay_is_honoured() -> None:
    attempts: list[float] = []

    @job(retries=1)
    async def flaky(ctx: JobContext) -> str:
        attempts.append(anyio.current_time())
        if ctx.attempt == 1:
            raise Retry(delay=0.05)
        return "ok"

    async with Runtime() as rt:
        assert await rt.run(flaky) == "ok"
    assert attempts[1] - attempts[0] >= 0.05


async def test_retry_without_attempts_left_fails_with_retry() -> None:
    async def dep() -> Any:
        raise Retry()
        yield  # pragma: no cover

    @job(retries=1)
    async def always(d=Depends(dep)) -> None:
        pass

    async with Runtime() as rt:
        with pytest.raises(Retry) as info:
            await rt.run(always)
    assert any("no attempts left (2 of 2)" in note for note in info.value.__notes__)


async def test_reject_is_never_retried() -> None:
    calls: list[int] = []

    @job(retries=5)
    async def rejected(ctx: JobContext) -> None:
        calls.append(ctx.attempt)
        raise Reject("bad input")

    async with Runtime() as rt:
        with pytest.raises(Reject, match="bad input"):
            await rt.run(rejected)
    assert calls == [1]


async def test_ordinary_errors_are_retried_then_raised() -> None:
    calls: list[int] = []

    @job(retries=2)
    async def failing(ctx: JobContext) -> None:
        calls.append(ctx.attempt)
        raise Boom(f"attempt {ctx.attempt}")

    async with Runtime() as rt:
        with pytest.raises(Boom, match="attempt 3"):
            await rt.run(failing)
    assert calls == [1, 2, 3]


async def test_timeout_is_retried_when_attempts_remain() -> None:
    @job(retries=1, timeout=0.05)
    async def slow_once(ctx: JobContext) -> int:
        if ctx.attempt == 1:
            await anyio.sleep(10)
        return ctx.attempt

    async with Runtime() as rt:
        assert await rt.run(slow_once) == 2


async def test_worker_scope_never_sees_job_exception_and_outlives_job() -> None:
    events: list[str] = []

    @dependency(scope="worker")
    async def pool() -> Any:
        try:
            yield "pool"
        except BaseException as exc:  # pragma: no cover - must not happen
            events.append(f"pool saw {type(exc).__name__}")
            raise
        events.append("pool closed")

    async def body(p=Depends(pool)) -> None:
        raise Boom("job")

    async with Runtime() as rt:
        for _ in range(2):
            with pytest.raises(Boom):
                await rt.run(body)
        assert events == []
    assert events == ["pool closed"]


async def test_generator_that_never_yields_is_a_dependency_error() -> None:
    async def empty() -> Any:
        if False:
            yield  # pragma: no cover

    def empty_sync() -> Any:
        return
        yield  # pragma: no cover

    async def a(x=Depends(empty)) -> None:
        pass

    async def b(x=Depends(empty_sync)) -> None:
        pass

    async with Runtime() as rt:
        with pytest.raises(DependencyError, match=r"test_semantics:.*empty.*without yielding"):
            await rt.run(a)
        with pytest.raises(DependencyError, match=r"empty_sync.*without yielding"):
            await rt.run(b)


@pytest.mark.usefixtures("both_runners")
@pytest.mark.parametrize("threaded", [True, False])
async def test_generator_that_yields_twice_is_a_dependency_error(threaded: bool) -> None:
    closed: list[str] = []

    async def twice() -> Any:
        try:
            yield 1
            yield 2
        finally:
            closed.append("async")

    @dependency(threaded=threaded)
    def twice_sync() -> Any:
        try:
            yield 1
            yield 2
        finally:
            closed.append("sync")

    async def a(x=Depends(twice)) -> None:
        pass

    async def b(x=Depends(twice_sync)) -> None:
        pass

    async with Runtime() as rt:
        with pytest.raises(DependencyError, match=r"test_semantics:.*twice.*yielded a second time"):
            await rt.run(a)
        with pytest.raises(DependencyError, match=r"twice_sync.*yielded a second time"):
            await rt.run(b)
    assert closed == ["async", "sync"]  # both generators were closed, nothing leaks


async def test_second_yield_on_error_path_keeps_the_original_as_context() -> None:
    async def stubborn() -> Any:
        try:
            yield 1
        except Boom:
            yield 2

    async def body(x=Depends(stubborn)) -> None:
        raise Boom("body")

    async with Runtime() as rt:
        with pytest.raises(DependencyError, match="second time") as info:
            await rt.run(body)
    assert isinstance(info.value.__context__, Boom)
