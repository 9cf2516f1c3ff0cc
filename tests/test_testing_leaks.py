"""lifecycle.testing.no_leaks and the explorer's oracle on its own: the checks are not
vacuous (each kind of leak, and each kind of contract breach, is reported). The oracle
tests are async: it matches cancellations against the running backend's class."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import anyio
import pytest

from lifecycle import Runtime, job
from lifecycle.testing import Fault, FaultKind, FaultRun, InjectedFault, LeakError, RunOutcome, no_leaks
from lifecycle.testing._explore import _oracle
from lifecycle.testing._trace import Recorder

pytestmark = pytest.mark.anyio


async def test_a_clean_block_passes_and_a_finished_thread_is_not_a_leak() -> None:
    async with no_leaks(grace=0.1):
        await anyio.to_thread.run_sync(lambda: None)  # a pool thread, idle again
        thread = threading.Thread(target=lambda: None)
        thread.start()
        thread.join()
        async with Runtime():
            pass


async def test_a_running_thread_an_open_generator_and_an_open_runtime_are_leaks() -> None:
    stop = threading.Event()
    kept: list[object] = []

    def opened() -> Iterator[int]:
        yield 1

    rt = Runtime()
    try:
        with pytest.raises(LeakError) as caught:  # noqa: PT012 - the leaks happen inside the checked block
            async with no_leaks(grace=0.1):
                threading.Thread(target=stop.wait, name="left-running", daemon=True).start()
                gen = opened()
                next(gen)
                kept.append(gen)
                await rt.__aenter__()
    finally:
        stop.set()
        await rt.__aexit__(None, None, None)
    text = str(caught.value)
    assert "thread 'left-running' is still running" in text
    assert "generator test_a_running_thread_an_open_generator_and_an_open_runtime_are_leaks.<locals>.opened" in text
    assert "a lifecycle.Runtime is still open" in text


# -- the oracle --------------------------------------------------------------------------


@job
async def probe() -> None:
    return None


def recorded(fault: Fault) -> tuple[Recorder, list[object]]:
    recorder = Recorder()
    trace = recorder.start(fault)
    outer = recorder.setup_begin("app:outer", "job", True)
    recorder.setup_done(outer)
    inner = recorder.setup_begin("app:inner", "job", True)
    recorder.setup_done(inner)
    return recorder, [trace, outer, inner]


async def test_the_oracle_reports_a_missing_teardown_a_wrong_order_and_a_wrong_exception() -> None:
    fault = Fault(FaultKind.BODY, 0, "`probe` raises")
    recorder, (trace, outer, _inner) = recorded(fault)
    error = recorder.body_begin()
    assert isinstance(error, InjectedFault)
    recorder.body_end(error)
    recorder.teardown_begin(outer, None)  # outer first, and it saw nothing: both wrong
    recorder.teardown_end(outer, None)
    run = FaultRun(fault, RunOutcome(result=None))
    problems = _oracle(trace, run, probe)  # type: ignore[arg-type]
    assert "`inner` (app:inner) was set up but never torn down (a leak)" in problems
    assert "`outer` (app:outer) saw a normal exit at its yield; the contract says the injected fault" in problems
    assert "the caller saw returned None; the contract says it fails with the injected fault" in problems


async def test_the_oracle_reports_a_double_teardown_and_reverse_order_breaches() -> None:
    fault = Fault(FaultKind.NONE)
    recorder, (trace, outer, inner) = recorded(fault)
    recorder.body_begin()
    recorder.body_end(None)
    for instance in (outer, inner, inner):
        recorder.teardown_begin(instance, None)
        recorder.teardown_end(instance, None)
    problems = _oracle(trace, FaultRun(fault, RunOutcome(result=1)), probe)  # type: ignore[arg-type]
    assert "`inner` (app:inner) was torn down 2 times" in problems
    assert any(p.startswith("teardown order was outer, inner, inner; the contract says") for p in problems)


async def test_the_oracle_reports_a_body_that_ran_after_a_failed_setup() -> None:
    fault = Fault(FaultKind.SETUP, 3, "setup of `third` raises")
    recorder, (trace, outer, inner) = recorded(fault)
    with pytest.raises(InjectedFault) as caught:
        recorder.setup_begin("app:third", "job", True)
    recorder.body_begin()
    recorder.body_end(None)
    for instance in (inner, outer):
        recorder.teardown_begin(instance, caught.value)
        recorder.teardown_end(instance, caught.value)
    problems = _oracle(trace, FaultRun(fault, RunOutcome(error=caught.value)), probe)  # type: ignore[arg-type]
    assert problems == ["the body of `probe` ran although a dependency's setup failed"]
