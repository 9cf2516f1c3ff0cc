"""The pytest plugin of lifecycle.testing, run in inner pytest sessions (pytester):
its fixtures work on asyncio and trio, the leak check catches a leaky job and passes a
correct one, ``explore_faults`` fails a test whose job breaks the contract, and a test
suite that uses none of it is unaffected."""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]

HEADER = """
from typing import Annotated
from collections.abc import AsyncIterator, Iterator
import threading

import anyio
import pytest

from lifecycle import Depends, JobContext, Reject, Retry, dependency, job
from lifecycle.testing import explore_faults, frozen_context


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request):
    return request.param
"""


def run_inner(pytester: pytest.Pytester, body: str, *args: str) -> pytest.RunResult:
    pytester.makepyfile(test_inner=HEADER + body)
    # A short leak grace: the leaky tests here leak for good, waiting longer proves nothing.
    return pytester.runpytest("-p", "no:cacheprovider", "--strict-markers", "-o", "lifecycle_leak_grace=0.3", *args)


def test_the_leak_check_catches_a_leaky_job_and_passes_a_correct_one(pytester: pytest.Pytester) -> None:
    result = run_inner(
        pytester,
        """
STOP = threading.Event()


def leaky_resource():
    # Starts a thread the teardown never stops, and leaves its generator open.
    thread = threading.Thread(target=STOP.wait, name="leaky-poller", daemon=True)
    thread.start()
    yield "resource"


def tidy_resource():
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait, name="tidy-poller", daemon=True)
    thread.start()
    try:
        yield "resource"
    finally:
        stop.set()
        thread.join()


@job
async def leaky(r: Annotated[str, Depends(leaky_resource)]) -> str:
    return r


@job
async def tidy(r: Annotated[str, Depends(tidy_resource)]) -> str:
    return r


OPEN = []


@pytest.mark.anyio
async def test_leaky_job(lifecycle_leaks, lifecycle_runtime):
    assert await lifecycle_runtime.run(leaky) == "resource"   # its teardown left the thread running


@pytest.mark.anyio
async def test_unclosed_generator(lifecycle_leaks):
    gen = leaky_resource()
    OPEN.append(gen)
    assert next(gen) == "resource"   # a resource opened and never closed


@pytest.mark.anyio
async def test_tidy(lifecycle_leaks, lifecycle_runtime):
    assert await lifecycle_runtime.run(tidy) == "resource"


def teardown_module():
    STOP.set()
""",
    )
    result.assert_outcomes(passed=6, errors=4)
    out = result.stdout.str()
    assert "ERROR at teardown of test_leaky_job[asyncio]" in out and "ERROR at teardown of test_leaky_job[trio]" in out
    assert "thread 'leaky-poller' is still running" in out
    assert "generator leaky_resource" in out and "is suspended at a yield and was never closed" in out
    assert "tidy-poller" not in out


def test_the_leak_check_catches_a_task_and_an_open_runtime(pytester: pytest.Pytester) -> None:
    result = run_inner(
        pytester,
        """
from lifecycle import Runtime

KEEP = []


@pytest.mark.anyio
async def test_open_runtime(lifecycle_leaks):
    rt = Runtime()
    await rt.__aenter__()
    KEEP.append(rt)


@pytest.mark.anyio
async def test_task(lifecycle_leaks, anyio_backend):
    if anyio_backend != "asyncio":
        pytest.skip("trio has no unstructured tasks")
    import asyncio
    KEEP.append(asyncio.get_running_loop().create_task(asyncio.sleep(3600), name="forgotten"))
""",
    )
    result.assert_outcomes(passed=3, skipped=1, errors=3)
    out = result.stdout.str()
    assert "a lifecycle.Runtime is still open" in out
    assert "task 'forgotten'" in out


def test_explore_faults_fails_a_test_whose_job_swallows_errors(pytester: pytest.Pytester) -> None:
    result = run_inner(
        pytester,
        """
def swallowing():
    try:
        yield "conn"
    except Exception:
        pass


def correct():
    try:
        yield "conn"
    except Exception:
        raise


@job
async def bad(user_id: int, c: Annotated[str, Depends(swallowing)]) -> str:
    return c


@job
async def good(user_id: int, c: Annotated[str, Depends(correct)]) -> str:
    return c


@explore_faults(bad, user_id=3)
async def test_bad():
    pass


@explore_faults(good, user_id=3)
async def test_good(lifecycle_exploration):
    assert lifecycle_exploration.ok and lifecycle_exploration.job == "good"
""",
    )
    result.assert_outcomes(passed=2, errors=2)  # the fixture fails the bad ones before they run
    out = result.stdout.str()
    assert "`swallowing` (test_inner:swallowing) swallowed the injected fault (its teardown returned normally)" in out
    assert "FAIL `bad` raises -> failed with the injected fault" in out


def test_the_runtime_worker_and_context_fixtures(pytester: pytest.Pytester) -> None:
    result = run_inner(
        pytester,
        """
def real_db():
    raise RuntimeError("tests must not reach the real database")


def fake_db():
    return "fake"


@job(retries=1)
async def store(n: int, db: Annotated[str, Depends(real_db)], ctx: JobContext) -> str:
    if n < 0:
        raise Reject("negative")
    if n == 0 and ctx.attempt == 1:
        raise Retry()
    return f"{db}:{n}"


@pytest.fixture
def lifecycle_overrides():
    return {real_db: fake_db}


@pytest.mark.anyio
async def test_runtime(lifecycle_runtime):
    assert await lifecycle_runtime.run(store, n=1) == "fake:1"
    lifecycle_runtime.dependency_overrides[real_db] = lambda: "changed"


@pytest.mark.anyio
async def test_runtime_again(lifecycle_runtime):
    assert await lifecycle_runtime.run(store, n=2) == "fake:2"   # the last test's change is gone


@pytest.mark.anyio
async def test_worker(lifecycle_worker):
    worker = lifecycle_worker([store])
    ok = await worker.enqueue(store, {"n": 5})
    retried = await worker.enqueue(store, {"n": 0})
    rejected = await worker.enqueue("store", {"n": -1})
    drained = await worker.drain()
    assert drained.results == {ok: "fake:5", retried: "fake:0"}
    assert (drained.succeeded, drained.retried) == (2, 1)
    [dead] = drained.dead_letters
    assert dead["message_id"] == rejected and dead["reason"] == "rejected"
    assert [type(e).__name__ for e in drained.errors[retried]] == ["Retry"]
    again = await worker.drain()   # nothing left: returns at once
    assert again.results == {} and again.dead_letters == []


@pytest.mark.anyio
async def test_drain_times_out(lifecycle_worker):
    @job
    async def forever() -> None:
        await anyio.sleep_forever()

    worker = lifecycle_worker([forever], shutdown_grace=0)
    await worker.enqueue(forever, {})
    with pytest.raises(TimeoutError, match="still held 1 message"):
        await worker.drain(timeout=0.2)


def test_context(job_context):
    assert job_context.name == "test_context" and job_context.attempt == 1 and dict(job_context.args) == {}
    with pytest.raises(AttributeError, match="frozen"):
        job_context.attempt = 2
    ctx = frozen_context("store", args={"n": 1}, attempt=2)
    assert ctx.args["n"] == 1 and ctx.attempt == 2 and ctx.log is not None
    with pytest.raises(TypeError):
        ctx.args["n"] = 2
    with pytest.raises(ValueError, match="1-based"):
        frozen_context(attempt=0)
""",
    )
    result.assert_outcomes(passed=9)


def test_the_exploration_fixture_without_the_marker_is_a_usage_error(pytester: pytest.Pytester) -> None:
    result = run_inner(
        pytester,
        """
@pytest.mark.anyio
async def test_unmarked(lifecycle_exploration):
    pass
""",
    )
    result.assert_outcomes(errors=2)
    assert "needs the test to be decorated with @lifecycle.testing.explore_faults" in result.stdout.str()


def test_a_suite_that_does_not_use_the_plugin_is_unaffected(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_plain="""
import sys

def test_plain():
    # The plugin is loaded (through its pytest11 entry point) and adds no autouse fixture.
    assert "lifecycle.testing._plugin" in sys.modules

def test_no_autouse(request):
    assert not [f for f in request.fixturenames if f.startswith(("lifecycle", "job_context"))]
"""
    )
    result = pytester.runpytest("-p", "no:cacheprovider", "--strict-markers")
    result.assert_outcomes(passed=2)
    listed = pytester.runpytest("--fixtures", "-p", "no:cacheprovider")
    for name in ("lifecycle_runtime", "lifecycle_worker", "lifecycle_leaks", "job_context", "lifecycle_exploration"):
        assert name in listed.stdout.str()
