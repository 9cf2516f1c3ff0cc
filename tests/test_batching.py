"""Consecutive threaded sync setups run in one thread hop (``_engine.setup_batch``).

What a batch must keep from one hop per step: plan order, each step off the event loop,
the values and context variables each step sees, generators started before a failure
torn down with it thrown in, a generator that does not yield reported by name, and a
job deadline that passes inside the batch stopping it before the next step. Each test
runs on asyncio and trio; the hypothesis test checks order and outcome against running
the same steps by hand, one after the other."""

from __future__ import annotations

import contextvars
import inspect
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lifecycle import DependencyError, Depends, JobTimeout, Runtime, job

pytestmark = pytest.mark.anyio

VAR: contextvars.ContextVar[str] = contextvars.ContextVar("VAR", default="unset")


def source_of(fn: Any) -> str:
    return str(fn.runners.source)


async def test_consecutive_threaded_setups_share_one_hop_off_the_loop() -> None:
    loop_thread = threading.get_ident()
    threads: dict[str, int] = {}

    def first() -> int:
        threads["first"] = threading.get_ident()
        return 1

    def second(a: int = Depends(first)) -> int:
        threads["second"] = threading.get_ident()
        return a + 1

    def third(b: int = Depends(second)) -> Iterator[int]:
        threads["third"] = threading.get_ident()
        yield b + 1
        threads["third teardown"] = threading.get_ident()

    @job
    async def body(c: int = Depends(third)) -> int:
        return c

    assert "one thread hop: test_batching:" in source_of(body)
    assert source_of(body).count("setup_batch(") == 1
    async with Runtime() as rt:
        assert await rt.run(body) == 3
    assert threads["first"] == threads["second"] == threads["third"] != loop_thread
    assert threads["third teardown"] != loop_thread


async def test_a_blocked_step_in_a_batch_does_not_block_the_loop() -> None:
    release = threading.Event()
    ticks = 0

    def blocks() -> int:
        assert release.wait(30), "the loop never released the step"
        return 1

    def after(a: int = Depends(blocks)) -> int:
        return a + 1

    @job
    async def body(b: int = Depends(after)) -> int:
        return b

    async def tick_then_release() -> None:
        nonlocal ticks
        for _ in range(5):
            await anyio.sleep(0.01)
            ticks += 1
        release.set()

    async with Runtime() as rt, anyio.create_task_group() as tg:
        tg.start_soon(tick_then_release)
        assert await rt.run(body) == 2
    assert ticks == 5


async def test_context_variables_flow_through_a_batch_as_through_single_hops(both_runners: None) -> None:
    # The traced runner keeps one hop per step: both runners must see the same.
    seen: list[str] = []

    def sets() -> Iterator[str]:
        token = VAR.set("from generator")
        yield "g"
        seen.append(f"teardown sees {VAR.get()}")
        VAR.reset(token)

    def reads(g: str = Depends(sets)) -> str:
        seen.append(f"next step sees {VAR.get()}")
        VAR.set("from function")
        return g

    @job
    async def body(r: str = Depends(reads)) -> str:
        seen.append(f"body sees {VAR.get()}")
        return r

    async with Runtime() as rt:
        assert await rt.run(body) == "g"
    assert seen == [
        "next step sees from generator",
        "body sees from function",
        "teardown sees from function",  # the job's changes reach the teardown's Context
    ]
    assert VAR.get() == "unset"


class Boom(Exception):
    pass


async def test_a_failing_step_tears_down_the_generators_the_batch_started() -> None:
    events: list[str] = []

    def opened() -> Iterator[str]:
        events.append("+opened")
        try:
            yield "opened"
        except Boom:
            events.append("opened saw Boom")
            raise
        events.append("-opened (normal exit)")

    def fails(o: str = Depends(opened)) -> str:
        events.append("fails")
        raise Boom("in the batch")

    def never(f: str = Depends(fails)) -> str:
        events.append("never")
        return f

    @job
    async def body(n: str = Depends(never)) -> str:
        events.append("body")
        return n

    async with Runtime() as rt:
        with pytest.raises(Boom, match="in the batch"):
            await rt.run(body)
    assert events == ["+opened", "fails", "opened saw Boom"]


async def test_a_generator_that_does_not_yield_in_a_batch_is_named() -> None:
    events: list[str] = []

    def opened() -> Iterator[str]:
        try:
            yield "opened"
        except DependencyError:
            events.append("opened saw DependencyError")
            raise

    def empty(o: str = Depends(opened)) -> Iterator[str]:
        if False:
            yield o

    @job
    async def body(e: str = Depends(empty)) -> str:
        return e

    async with Runtime() as rt:
        with pytest.raises(DependencyError, match=r"job 'body'.*test_batching:.*empty finished without yielding"):
            await rt.run(body)
    assert events == ["opened saw DependencyError"]


async def test_a_deadline_passing_in_a_batch_stops_it_before_the_next_step() -> None:
    events: list[str] = []

    def slow() -> Iterator[str]:
        time.sleep(1.0)  # well past the 0.2 s timeout, even on a loaded machine
        try:
            yield "slow"
        except BaseException as exc:
            events.append(f"slow saw {type(exc).__name__}")
            raise

    def next_step(s: str = Depends(slow)) -> str:
        events.append("next step ran")
        return s

    @job(timeout=0.2)
    async def body(n: str = Depends(next_step)) -> str:
        events.append("body ran")
        return n

    assert source_of(body).count("setup_batch(") == 1
    async with Runtime() as rt:
        with pytest.raises(JobTimeout, match="job 'body'.*timed out after 0.2s"):
            await rt.run(body)
    assert events == [f"slow saw {anyio.get_cancelled_exc_class().__name__}"]


async def test_a_cancellation_without_a_deadline_lands_when_the_batch_returns() -> None:
    events: list[str] = []
    entered = threading.Event()
    release = threading.Event()

    def waits() -> Iterator[str]:
        entered.set()
        assert release.wait(30)
        try:
            yield "waits"
        except BaseException as exc:
            events.append(f"waits saw {type(exc).__name__}")
            raise

    def second(w: str = Depends(waits)) -> str:
        events.append("second ran")  # the batch is one hop: it finishes
        return w

    @job
    async def body(s: str = Depends(second)) -> str:
        await anyio.sleep(30)
        events.append("body finished")
        return s

    async with Runtime() as rt, anyio.create_task_group() as tg:
        tg.start_soon(rt.run, body)
        while not entered.is_set():
            await anyio.sleep(0.01)
        tg.cancel_scope.cancel()
        release.set()
    assert events == ["second ran", f"waits saw {anyio.get_cancelled_exc_class().__name__}"]


# -- against an oracle: the same steps run by hand, one after the other -------------------

KINDS = st.sampled_from(["value", "generator", "raises", "no_yield"])


def make_step(kind: str, index: int, previous: Callable[..., Any] | None, events: list[str]) -> Callable[..., Any]:
    """Step ``index`` of a chain of threaded sync providers (each takes the one before)."""
    if kind in ("value", "raises"):

        def step(prev: Any = None) -> int:
            events.append(f"+{index}")
            if kind == "raises":
                raise Boom(index)
            return index

        fn: Callable[..., Any] = step
    else:

        def generator(prev: Any = None) -> Iterator[int]:
            events.append(f"+{index}")
            if kind == "no_yield":
                return
            try:
                yield index
            except BaseException as exc:
                events.append(f"-{index} {type(exc).__name__}")
                raise
            events.append(f"-{index}")

        fn = generator
    if previous is not None:
        parameter = inspect.Parameter("prev", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=Depends(previous))
        fn.__signature__ = inspect.Signature([parameter])  # type: ignore[attr-defined]
    else:
        fn.__signature__ = inspect.Signature([])  # type: ignore[attr-defined]
    return fn


def oracle(kinds: list[str]) -> tuple[list[str], str]:
    """Events and outcome of running the chain by hand, then tearing down in reverse."""
    events: list[str] = []
    started: list[int] = []
    error = "ok"
    for index, kind in enumerate(kinds):
        events.append(f"+{index}")
        if kind == "raises":
            error = "Boom"
            break
        if kind == "no_yield":
            error = "DependencyError"
            break
        if kind == "generator":
            started.append(index)
    for index in reversed(started):
        events.append(f"-{index}" if error == "ok" else f"-{index} {error}")
    return events, error


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@given(kinds=st.lists(KINDS, min_size=2, max_size=6))
def test_a_batch_matches_running_its_steps_one_by_one(backend: str, kinds: list[str]) -> None:
    events: list[str] = []
    steps: list[Callable[..., Any]] = []
    for index, kind in enumerate(kinds):
        steps.append(make_step(kind, index, steps[-1] if steps else None, events))

    async def body(last: Any = Depends(steps[-1])) -> str:
        return "ok"

    handle = job(name="chain")(body)
    assert source_of(handle).count("setup_batch(") == 1

    async def main() -> str:
        async with Runtime() as rt:
            try:
                return str(await rt.run(handle))
            except (Boom, DependencyError) as exc:
                return type(exc).__name__

    outcome = anyio.run(main, backend=backend)
    assert (events, outcome) == oracle(kinds)


def test_a_hop_past_the_deadline_still_runs_one_step_so_a_batch_always_progresses() -> None:
    # setup_batch hops again when the thread stopped at a deadline the loop does not
    # see as due yet (the clocks differ, or the deadline moved): each hop runs at least
    # its first step, so that loop ends.
    from lifecycle._analysis import analyse
    from lifecycle._engine import BatchItem, _run_batch

    def one() -> int:
        return 1

    def two(a: int) -> int:
        return a + 1

    items = [BatchItem(analyse(one), (), ()), BatchItem(analyse(two), ((True, 0),), ())]
    values: list[Any] = []
    for expected in ([1], [1, 2]):
        ran = _run_batch(items, (), values, contextvars.copy_context(), 0.0, "job")  # deadline long past
        assert ran.error is None
        assert values == expected
