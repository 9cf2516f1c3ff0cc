"""``Runtime.attempt``: one attempt, returned as what a consumer loop should do with its
message. A hypothesis property drives a simulated consumer loop over scripts of
succeed/raise/Retry/Reject/timeout per attempt and checks every outcome against an
oracle written from the README's retry rules; the other tests pin each case."""

from dataclasses import dataclass
from typing import Annotated, Any

import anyio
import pytest
from hypothesis import given
from hypothesis import strategies as st
from structlog.testing import capture_logs

from lifecycle import (
    DependencyError,
    Depends,
    Failed,
    JobContext,
    JobTimeout,
    LifecycleError,
    Outcome,
    PayloadError,
    Reject,
    Rejected,
    Retry,
    RetryLater,
    Runtime,
    Succeeded,
    dependency,
    job,
)

pytestmark = pytest.mark.anyio


class Boom(Exception):
    pass


# -- the property ------------------------------------------------------------------------

ACTIONS = ("succeed", "raise", "retry", "retry_delay", "reject", "timeout")
PLACES = ("body", "setup", "teardown")


@dataclass(frozen=True)
class Step:
    action: str
    place: str  # where the action happens: the job body, a dependency's setup or teardown
    delay: float = 0.0


steps = st.builds(
    Step,
    action=st.sampled_from(ACTIONS),
    place=st.sampled_from(PLACES),
    delay=st.sampled_from([0.0, 0.5, 7.0]),
)


def _exception(step: Step, attempt: int) -> Exception:
    match step.action:
        case "raise":
            return Boom(f"attempt {attempt}")
        case "retry":
            return Retry()
        case "retry_delay":
            return Retry(step.delay)
        case "reject":
            return Reject(f"no thanks on attempt {attempt}")
        case "timeout":
            return JobTimeout(f"pretend overran on attempt {attempt}")
    raise AssertionError(step)


def oracle(script: list[Step], retries: int) -> list[tuple[str, Any]]:
    """The outcomes a consumer loop sees, from the README's rules alone: ``Reject`` is
    final; anything else that fails is retried while attempt <= retries (after
    ``Retry``'s own delay, else the backoff, here None: 0), then it is ``Failed``."""
    seen: list[tuple[str, Any]] = []
    for attempt, step in enumerate(script, start=1):
        if step.action == "succeed":
            seen.append(("succeeded", f"done on attempt {attempt}"))
            return seen
        if step.action == "reject":
            seen.append(("rejected", f"no thanks on attempt {attempt}"))
            return seen
        if attempt > retries:
            seen.append(("failed", step.action))
            return seen
        seen.append(("retry", step.delay if step.action == "retry_delay" else 0.0))
    raise AssertionError("the script ran out before the job ended")


def _kind(error: BaseException) -> str:
    if isinstance(error, Retry):
        return "retry_delay" if error.delay is not None else "retry"
    if isinstance(error, JobTimeout):
        return "timeout"
    if isinstance(error, Reject):
        return "reject"
    assert isinstance(error, Boom), error
    return "raise"


def _seen(outcome: Outcome) -> tuple[str, Any]:
    match outcome:
        case Succeeded(result):
            return ("succeeded", result)
        case RetryLater(delay, error):
            assert isinstance(error, Exception)
            return ("retry", delay)
        case Rejected(reason, error):
            assert isinstance(error, Reject) and error.reason == reason
            return ("rejected", reason)
        case Failed(error):
            return ("failed", _kind(error))


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@given(
    retries=st.integers(min_value=0, max_value=3),
    script=st.lists(steps, min_size=5, max_size=5),
)
def test_attempt_outcomes_match_the_retry_rules_over_a_consumer_loop(
    backend: str, retries: int, script: list[Step]
) -> None:
    # The script is longer than retries + 1, so the job always ends within it.
    setups: list[int] = []
    teardowns: list[int] = []

    async def resource(ctx: JobContext) -> Any:
        step = script[ctx.attempt - 1]
        setups.append(ctx.attempt)
        if step.place == "setup" and step.action != "succeed":
            raise _exception(step, ctx.attempt)
        try:
            yield ctx.attempt
        finally:
            teardowns.append(ctx.attempt)
        if step.place == "teardown" and step.action != "succeed":
            raise _exception(step, ctx.attempt)

    @job(retries=retries)
    async def work(tag: str, value: Annotated[int, Depends(resource)], ctx: JobContext) -> str:
        assert value == ctx.attempt and tag == "t"
        step = script[ctx.attempt - 1]
        if step.place == "body" and step.action != "succeed":
            raise _exception(step, ctx.attempt)
        return f"done on attempt {ctx.attempt}"

    async def main() -> list[tuple[str, Any]]:
        seen: list[tuple[str, Any]] = []
        async with Runtime() as rt:
            attempt = 1
            while True:
                outcome = await rt.attempt(work, {"tag": "t"}, attempt=attempt, backoff=None)
                seen.append(_seen(outcome))
                if not isinstance(outcome, RetryLater):
                    return seen
                attempt += 1

    seen = anyio.run(main, backend=backend)
    assert seen == oracle(script, retries)
    # Each attempt set up fresh job-scoped dependencies, and tore down what it set up.
    attempts = list(range(1, len(seen) + 1))
    assert setups == attempts
    assert teardowns == [
        n for n in attempts if not (script[n - 1].place == "setup" and script[n - 1].action != "succeed")
    ]


# -- each case on its own -------------------------------------------------------------------


async def test_succeeded_carries_the_result_and_the_attempt_number_reaches_the_job() -> None:
    @job(retries=5)
    async def echo(x: int, ctx: JobContext) -> tuple[int, int, str]:
        return x * 2, ctx.attempt, ctx.id

    async with Runtime() as rt:
        outcome = await rt.attempt(echo, {"x": "21"}, attempt=3, job_id="msg-7")
    assert outcome == Succeeded((42, 3, "msg-7"))


async def test_an_invalid_payload_is_rejected_with_every_problem_and_nothing_set_up() -> None:
    setups: list[str] = []

    def resource() -> Any:
        setups.append("resource")
        yield "r"

    @job(retries=3)
    async def typed(count: int, name: str, r: Annotated[str, Depends(resource)]) -> None:
        raise AssertionError("never runs")

    async with Runtime() as rt:
        outcome = await rt.attempt(typed, {"count": "many", "extra": 1}, attempt=1)
    match outcome:
        case Rejected(reason, PayloadError() as error):
            assert "typed" in reason and "count" in reason
            locations = {tuple(problem["loc"]) for problem in error.errors}
            assert ("count",) in locations and ("name",) in locations and ("extra",) in locations
        case _:
            pytest.fail(f"expected Rejected, got {outcome!r}")
    assert setups == []


@pytest.mark.parametrize("payload", [[1, 2], "x=1", None])
async def test_a_payload_that_is_not_a_mapping_is_rejected(payload: Any) -> None:
    @job
    async def takes(x: int) -> int:
        return x

    async with Runtime() as rt:
        outcome = await rt.attempt(takes, payload, attempt=1)
    assert isinstance(outcome, Rejected)
    assert isinstance(outcome.error, PayloadError)
    assert f"got {type(payload).__name__}" in outcome.reason and "'takes'" in outcome.reason


async def test_reject_is_final_even_with_attempts_left_and_keeps_its_reason() -> None:
    @job(retries=10)
    async def picky() -> None:
        raise Reject("spam")

    async with Runtime() as rt:
        outcome = await rt.attempt(picky, {}, attempt=1)
    assert isinstance(outcome, Rejected)
    assert outcome.reason == "spam" and isinstance(outcome.error, Reject)


async def test_a_real_job_timeout_retries_while_attempts_remain_then_fails() -> None:
    torn_down: list[int] = []

    async def resource(ctx: JobContext) -> Any:
        try:
            yield None
        finally:
            torn_down.append(ctx.attempt)

    @job(retries=1, timeout=0.05)
    async def slow(r: Annotated[None, Depends(resource)]) -> None:
        await anyio.sleep(60)

    async with Runtime() as rt:
        first = await rt.attempt(slow, {}, attempt=1, backoff=2.0, backoff_max=3.0)
        last = await rt.attempt(slow, {}, attempt=2)
    assert isinstance(first, RetryLater) and isinstance(first.error, JobTimeout)
    assert 1.0 <= first.delay <= 2.0  # the backoff: half to all of 2.0 on attempt 1
    assert isinstance(last, Failed) and isinstance(last.error, JobTimeout)
    assert torn_down == [1, 2]


async def test_retry_with_no_attempts_left_is_failed_with_a_note() -> None:
    @job(retries=2)
    async def again() -> None:
        raise Retry(5)

    async with Runtime() as rt:
        early = await rt.attempt(again, {}, attempt=2)
        late = await rt.attempt(again, {}, attempt=3)
    assert early == RetryLater(5, early.error)
    assert isinstance(late, Failed) and isinstance(late.error, Retry)
    assert any("no attempts left (3 of 3)" in note for note in late.error.__notes__)


async def test_the_default_backoff_is_the_workers_and_grows_per_attempt() -> None:
    @job(retries=10)
    async def flaky() -> None:
        raise Boom("down")

    async with Runtime() as rt:
        first = await rt.attempt(flaky, {}, attempt=1)
        fourth = await rt.attempt(flaky, {}, attempt=4)
        immediate = await rt.attempt(flaky, {}, attempt=4, backoff=None)
    assert isinstance(first, RetryLater) and 0.5 <= first.delay <= 1.0
    assert isinstance(fourth, RetryLater) and 4.0 <= fourth.delay <= 8.0
    assert immediate == RetryLater(0.0, immediate.error)


async def test_a_broken_graph_is_failed_not_raised() -> None:
    @dependency(scope="worker")
    async def pool(region: str) -> Any:  # a worker-scoped dependency cannot take job arguments
        yield region

    async def handler(region: str, p: Annotated[str, Depends(pool)]) -> str:
        return p

    async with Runtime() as rt:
        outcome = await rt.attempt(handler, {"region": "eu"}, attempt=1)
    assert isinstance(outcome, Failed) and isinstance(outcome.error, DependencyError)
    assert "region" in str(outcome.error)


async def test_an_override_that_breaks_the_graph_is_failed() -> None:
    async def original() -> int:
        return 1

    @job(retries=3)
    async def uses(v: Annotated[int, Depends(original)]) -> int:
        return v

    @dependency(scope="worker")
    async def replacement(ctx: JobContext) -> Any:  # worker scope cannot see a job's context
        yield 2

    async with Runtime(dependency_overrides={original: replacement}) as rt:
        outcome = await rt.attempt(uses, {}, attempt=1)
    assert isinstance(outcome, Failed)
    assert isinstance(outcome.error, DependencyError) and "JobContext" in str(outcome.error)


async def test_cancellation_propagates_and_is_never_an_outcome() -> None:
    torn_down: list[str] = []
    started = anyio.Event()
    outcomes: list[Outcome] = []

    async def resource() -> Any:
        try:
            yield None
        finally:
            torn_down.append("resource")

    @job(retries=3)
    async def waits(r: Annotated[None, Depends(resource)]) -> None:
        started.set()
        await anyio.sleep(60)

    async with Runtime() as rt:
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as tg:

                async def consume() -> None:
                    outcomes.append(await rt.attempt(waits, {}, attempt=1))

                tg.start_soon(consume)
                await started.wait()
                scope.cancel()
    assert scope.cancelled_caught
    assert outcomes == []
    assert torn_down == ["resource"]


async def test_bad_attempt_numbers_and_a_closed_runtime_raise() -> None:
    @job
    async def noop() -> None:
        return None

    async with Runtime() as rt:
        for bad in (0, -1, True, 1.0):
            with pytest.raises(ValueError, match=r"job 'noop': attempt must be an int >= 1"):
                await rt.attempt(noop, {}, attempt=bad)  # type: ignore[arg-type]
    with pytest.raises(LifecycleError, match="not open"):
        await rt.attempt(noop, {}, attempt=1)


async def test_outcomes_are_logged_like_run_logs_them() -> None:
    @job(retries=1)
    async def flaky(x: int) -> None:
        raise Boom("down")

    async with Runtime() as rt:
        with capture_logs() as logs:
            await rt.attempt(flaky, {"x": 1}, attempt=1, job_id="m1")
            await rt.attempt(flaky, {"x": 1}, attempt=2, job_id="m1")
            await rt.attempt(flaky, {"x": "no"}, attempt=1, job_id="m2")
    events = [(e["event"], e["job_id"], e["attempt"]) for e in logs]
    assert events == [("job.retrying", "m1", 1), ("job.failed", "m1", 2), ("job.rejected", "m2", 1)]
    assert "Boom: down" in logs[1]["error"]
