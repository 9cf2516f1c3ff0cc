"""Job timeouts count the time spent in worker threads (README, "Semantics", rule 6).

A thread cannot be interrupted, so a job whose deadline passed while one ran fails with
``JobTimeout`` when the thread returns: its result is discarded, its generators receive
the backend's cancellation at their ``yield`` and their teardown runs. Each case below
uses a 0.2 s timeout and a thread that sleeps 1 s, on asyncio and trio."""

import time
from collections.abc import Callable
from typing import Any

import anyio
import pytest
from structlog.testing import capture_logs

from lifecycle import Depends, Job, JobTimeout, Runtime, dependency, job
from lifecycle._engine import deliver_due_cancellation

pytestmark = pytest.mark.anyio

TIMEOUT = 0.2
SLOW = 1.0  # well past TIMEOUT, even if the thread starts late on a loaded machine


def cancelled_name() -> str:
    return anyio.get_cancelled_exc_class().__name__


def recorder(events: list[str], name: str) -> Callable[..., Any]:
    """An async generator dependency that records what it sees at its ``yield``."""

    async def provider() -> Any:
        try:
            yield name
        except BaseException as exc:
            events.append(f"{name} saw {type(exc).__name__}")
            raise
        else:
            events.append(f"{name} saw a normal exit")
        finally:
            events.append(f"{name} torn down")

    provider.__qualname__ = name
    return provider


def case_job(
    case: str, events: list[str], *, slow_attempts: int, retries: int = 0, timeout: float = TIMEOUT
) -> Job[..., Any]:
    """A job whose thread in place ``case`` sleeps ``SLOW`` on its first
    ``slow_attempts`` attempts (and returns at once after that); ``outer`` is set up
    first, so it is torn down last and sees what the job ended with."""
    outer = recorder(events, "outer")
    attempts: list[int] = []

    def pause() -> None:
        attempts.append(1)
        if len(attempts) <= slow_attempts:
            time.sleep(SLOW)

    if case == "sync body":

        @job(timeout=timeout, retries=retries, name="sync_body")
        def sync_body(o: Any = Depends(outer)) -> str:
            pause()
            events.append("body returned")
            return f"result {len(attempts)}"

        return sync_body

    if case == "threaded dependency setup":

        def blocking() -> str:  # a sync function: threaded by default
            pause()
            events.append("blocking returned")
            return "value"

        @job(timeout=timeout, retries=retries, name="threaded_setup")
        async def threaded_setup(o: Any = Depends(outer), b: str = Depends(blocking)) -> str:
            events.append("body ran")
            return f"result {len(attempts)}"

        return threaded_setup

    if case == "threaded generator setup":

        def session() -> Any:  # a sync generator: threaded by default
            pause()
            try:
                yield "session"
            except BaseException as exc:
                events.append(f"session saw {type(exc).__name__}")
                raise
            else:
                events.append("session saw a normal exit")
            finally:
                events.append("session torn down")

        @job(timeout=timeout, retries=retries, name="generator_setup")
        async def generator_setup(o: Any = Depends(outer), s: str = Depends(session)) -> str:
            events.append("body ran")
            return f"result {len(attempts)}"

        return generator_setup

    assert case == "threaded teardown"

    def committing() -> Any:
        try:
            yield "tx"
        except BaseException as exc:
            events.append(f"committing saw {type(exc).__name__}")
            raise
        else:
            events.append("committing saw a normal exit")
        pause()  # the commit, in the thread of the teardown
        events.append("committing torn down")

    @job(timeout=timeout, retries=retries, name="threaded_teardown")
    async def threaded_teardown(o: Any = Depends(outer), c: str = Depends(committing)) -> str:
        events.append("body ran")
        return f"result {len(attempts) + 1}"  # this attempt's pause() is still to come

    return threaded_teardown


SETUP_CASES = ["sync body", "threaded dependency setup", "threaded generator setup"]
ALL_CASES = [*SETUP_CASES, "threaded teardown"]

# What one slow attempt leaves behind, per case. In the three setup cases the thread's
# result never reaches the job (the body does not run after a slow dependency) and every
# generator set up so far sees the cancellation at its yield. In the teardown case the
# body succeeded, so the generators saw a normal exit; the job still fails (see below).
SLOW_EVENTS = {
    "sync body": ["body returned", "outer saw {c}", "outer torn down"],
    "threaded dependency setup": ["blocking returned", "outer saw {c}", "outer torn down"],
    "threaded generator setup": ["session saw {c}", "session torn down", "outer saw {c}", "outer torn down"],
    "threaded teardown": [
        "body ran",
        "committing saw a normal exit",
        "committing torn down",
        "outer saw a normal exit",
        "outer torn down",
    ],
}


def slow_events(case: str) -> list[str]:
    return [event.format(c=cancelled_name()) for event in SLOW_EVENTS[case]]


@pytest.mark.usefixtures("both_runners")
@pytest.mark.parametrize("case", ALL_CASES)
async def test_deadline_passed_in_a_thread_fails_the_job_with_job_timeout(case: str) -> None:
    events: list[str] = []
    slow = case_job(case, events, slow_attempts=1)
    async with Runtime() as rt:
        with pytest.raises(JobTimeout, match=f"job '{slow.name}'.*timed out after {TIMEOUT}s") as info:
            await rt.run(slow)  # would return "result 1" if the thread's time did not count
    assert events == slow_events(case)
    if case == "threaded teardown":
        # The teardown is shielded, so no cancellation ends it; the job is failed when it
        # finishes, because its deadline passed first.
        assert "after its deadline" in str(info.value)
        assert "its result is discarded" in str(info.value)


@pytest.mark.parametrize("case", ALL_CASES)
async def test_a_timeout_in_a_thread_is_retried_with_fresh_dependencies(case: str) -> None:
    events: list[str] = []
    slow_once = case_job(case, events, slow_attempts=1, retries=1)
    async with Runtime() as rt:
        with capture_logs() as logs:
            assert await rt.run(slow_once) == "result 2"
    retrying = [entry for entry in logs if entry["event"] == "job.retrying"]
    assert len(retrying) == 1
    assert retrying[0]["error"].startswith("JobTimeout: ")
    # The first attempt as above, then a clean second attempt (its own generators).
    second = {
        "sync body": ["body returned", "outer saw a normal exit", "outer torn down"],
        "threaded dependency setup": ["blocking returned", "body ran", "outer saw a normal exit", "outer torn down"],
        "threaded generator setup": [
            "body ran",
            "session saw a normal exit",
            "session torn down",
            "outer saw a normal exit",
            "outer torn down",
        ],
        "threaded teardown": slow_events("threaded teardown"),
    }
    assert events == slow_events(case) + second[case]


@pytest.mark.parametrize("case", ALL_CASES)
async def test_a_job_finishing_under_its_deadline_is_not_failed(case: str) -> None:
    events: list[str] = []
    # Its thread sleeps a quarter of the timeout: the margin absorbs a loaded machine.
    quick = case_job(case, events, slow_attempts=1, timeout=4 * SLOW)

    async with Runtime() as rt:
        started = anyio.current_time()
        assert await rt.run(quick) == "result 1"
        assert SLOW * 0.9 <= anyio.current_time() - started < 4 * SLOW
    assert "outer saw a normal exit" in events


async def test_an_error_raised_by_the_thread_after_the_deadline_wins_over_the_timeout() -> None:
    """The thread's own exception is the job's real failure, so it is what the job
    raises, as it would be for async code that raised at the same moment."""
    events: list[str] = []
    outer = recorder(events, "outer")

    class Broken(Exception):
        pass

    def broken() -> str:
        time.sleep(SLOW)
        raise Broken("the driver failed")

    @job(timeout=TIMEOUT)
    async def uses_broken(o: Any = Depends(outer), b: str = Depends(broken)) -> str:
        events.append("body ran")
        return "result"

    async with Runtime() as rt:
        with pytest.raises(Broken):
            await rt.run(uses_broken)
    assert events == ["outer saw Broken", "outer torn down"]


async def test_a_caller_deadline_that_passed_in_a_thread_cancels_the_job() -> None:
    """Not only the job's own timeout: any enclosing deadline is delivered when the
    thread returns, and the generators see it at their yield."""
    events: list[str] = []
    outer = recorder(events, "outer")

    def body(o: Any = Depends(outer)) -> str:  # no @job timeout
        time.sleep(SLOW)
        return "result"

    async with Runtime() as rt:
        with anyio.move_on_after(TIMEOUT) as scope:
            await rt.run(body)
            events.append("rt.run returned")
    assert scope.cancelled_caught
    assert events == [f"outer saw {cancelled_name()}", "outer torn down"]


async def test_a_worker_scoped_value_made_in_a_thread_past_the_deadline_is_kept() -> None:
    """A worker-scoped value is shared and may own a resource: once created it is kept,
    even when the job that happened to create it times out meanwhile."""
    made: list[str] = []

    @dependency(scope="worker")
    def pool() -> str:  # threaded, created inside the first job
        time.sleep(SLOW)
        made.append("pool")
        return "pool"

    @job(timeout=TIMEOUT)
    async def uses_pool(p: str = Depends(pool)) -> str:
        return p

    async with Runtime() as rt:
        with pytest.raises(JobTimeout, match="uses_pool"):
            await rt.run(uses_pool)
        assert await rt.run(uses_pool) == "pool"
    assert made == ["pool"]


async def test_a_deadline_whose_timer_has_not_run_yet_is_delivered() -> None:
    """On asyncio the deadline's timer may not have run when a thread's result wakes the
    task; blocking the loop past the deadline reproduces that exactly (on both backends
    the scope is then not yet cancelled)."""
    reached: list[str] = []
    with anyio.CancelScope(deadline=anyio.current_time() + 0.05) as scope:
        time.sleep(0.1)  # blocks the loop: nothing can cancel the scope yet
        await deliver_due_cancellation()
        reached.append("after the check")
    assert scope.cancelled_caught
    assert reached == []


async def test_without_a_due_deadline_the_check_returns_at_once() -> None:
    with anyio.CancelScope(deadline=anyio.current_time() + 60) as scope:
        await deliver_due_cancellation()
    assert not scope.cancel_called
    await deliver_due_cancellation()  # no deadline at all
