"""Cancellation at any moment ends a Worker and a Runtime promptly, runs every teardown
owed, and loses no message.

The property tests cancel (or ``stop()``) after a random number of scheduler
checkpoints, from the very first through start-up, warm-up of worker-scoped
dependencies, jobs in flight, draining and worker-scope teardown, with random
worker-scoped and job-scoped dependency trees. Each time they check: the call returns
within its bound, every dependency set up was torn down exactly once, no task is left
running, and every message is either settled or back in the queue."""

from __future__ import annotations

import inspect
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lifecycle import Depends, Runtime, Worker, dependency, job
from lifecycle.queues import MemoryQueue

KINDS = ("async_generator", "generator", "threaded_generator", "coroutine")
SHUTDOWN_GRACE = 0.2
TEARDOWN_TIMEOUT = 2.0
SLACK = 5.0  # a loaded CI machine: the bound is about shape, not speed


@dataclass(frozen=True)
class Dep:
    kind: str
    deps: tuple[int, ...]  # earlier indices in the same list (job deps: or worker ones, negative - 1)
    setup_checkpoints: int
    teardown_checkpoints: int


@dataclass(frozen=True)
class Scenario:
    worker: tuple[Dep, ...]
    job: tuple[Dep, ...]
    messages: int
    body_checkpoints: int
    slow_body: bool  # one job outlives the grace period and is cancelled
    cancel_after: int
    stop: bool  # worker.stop() instead of cancelling run()


@st.composite
def deps(draw: st.DrawFn, count: int, outside: int) -> tuple[Dep, ...]:
    made = []
    for index in range(count):
        choices = list(range(index)) + [-1 - w for w in range(outside)]
        parents = tuple(draw(st.lists(st.sampled_from(choices), max_size=2, unique=True))) if choices else ()
        made.append(
            Dep(draw(st.sampled_from(KINDS)), parents, draw(st.integers(0, 3)), draw(st.integers(0, 3)))
        )
    return tuple(made)


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    worker_count = draw(st.integers(0, 3))
    worker = draw(deps(worker_count, 0))
    job_deps = draw(deps(draw(st.integers(0, 3)), worker_count))
    return Scenario(
        worker=worker,
        job=job_deps,
        messages=draw(st.integers(0, 6)),
        body_checkpoints=draw(st.integers(0, 4)),
        slow_body=draw(st.booleans()),
        cancel_after=draw(st.integers(0, 250)),
        stop=draw(st.booleans()),
    )


def user_tasks() -> int:
    """Running tasks, less trio's own system tasks (which it starts lazily)."""
    return sum(not task.name.startswith("<") for task in anyio.get_running_tasks())


class Ledger:
    """Records each setup and teardown with a unique token per instance."""

    def __init__(self) -> None:
        self.setups: Counter[str] = Counter()
        self.teardowns: Counter[str] = Counter()
        self._count = 0

    def new(self, name: str) -> str:
        self._count += 1
        token = f"{name}#{self._count}"
        self.setups[token] += 1
        return token

    def check(self) -> None:
        assert self.setups == self.teardowns, (
            f"set up but not torn down exactly once: "
            f"{ {k: (self.setups[k], self.teardowns[k]) for k in self.setups | self.teardowns if self.setups[k] != self.teardowns[k]} }"
        )


def build(scenario: Scenario, ledger: Ledger) -> Any:
    """The dependency functions and the job of a scenario."""

    def make(name: str, spec: Dep, scope: str, parents: list[Any]) -> Any:
        setup_n, teardown_n = spec.setup_checkpoints, spec.teardown_checkpoints
        if spec.kind == "async_generator":

            async def fn(**_: Any) -> Any:
                for _ in range(setup_n):
                    await anyio.lowlevel.checkpoint()
                token = ledger.new(name)
                try:
                    yield token
                finally:
                    with anyio.CancelScope(shield=True):  # teardown checkpoints run to the end
                        for _ in range(teardown_n):
                            await anyio.lowlevel.checkpoint()
                    ledger.teardowns[token] += 1

        elif spec.kind in ("generator", "threaded_generator"):

            def fn(**_: Any) -> Any:  # type: ignore[misc]
                token = ledger.new(name)
                try:
                    yield token
                finally:
                    ledger.teardowns[token] += 1

        else:

            async def fn(**_: Any) -> Any:  # type: ignore[misc]
                for _ in range(setup_n):
                    await anyio.lowlevel.checkpoint()
                return name  # nothing to tear down

        fn.__qualname__ = name
        fn.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
            [
                inspect.Parameter(f"p{i}", inspect.Parameter.KEYWORD_ONLY, default=Depends(parent))
                for i, parent in enumerate(parents)
            ]
        )
        return dependency(scope=scope, threaded=spec.kind == "threaded_generator")(fn)

    worker_fns: list[Any] = []
    for index, spec in enumerate(scenario.worker):
        worker_fns.append(make(f"w{index}", spec, "worker", [worker_fns[p] for p in spec.deps]))
    job_fns: list[Any] = []
    for index, spec in enumerate(scenario.job):
        parents = [job_fns[p] if p >= 0 else worker_fns[-1 - p] for p in spec.deps]
        job_fns.append(make(f"j{index}", spec, "job", parents))
    roots = job_fns + worker_fns

    async def body(n: int, **values: Any) -> int:
        for _ in range(scenario.body_checkpoints):
            await anyio.lowlevel.checkpoint()
        if scenario.slow_body and n == 0:
            await anyio.sleep(3600)
        return n

    body.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [inspect.Parameter("n", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=int)]
        + [inspect.Parameter(f"r{i}", inspect.Parameter.KEYWORD_ONLY, default=Depends(f)) for i, f in enumerate(roots)]
    )
    body.__annotations__ = {"n": int, "return": int}
    return job(name="work")(body)


async def cancel_after(checkpoints: int, action: Any) -> None:
    for _ in range(checkpoints):
        await anyio.lowlevel.checkpoint()
    action()


def run_worker_scenario(backend: str, scenario: Scenario) -> None:
    ledger = Ledger()
    work = build(scenario, ledger)
    queue = MemoryQueue()
    for n in range(scenario.messages):
        queue.enqueue_nowait("work", {"n": n})
    worker = Worker(queue, [work], concurrency=4, shutdown_grace=SHUTDOWN_GRACE, teardown_timeout=TEARDOWN_TIMEOUT)

    async def main() -> None:
        tasks_before = user_tasks()
        returned_at: float | None = None
        fired_at: list[float] = []
        with anyio.fail_after(60):  # a hang fails here instead of blocking the suite
            async with anyio.create_task_group() as tg:

                async def runner() -> None:
                    nonlocal returned_at
                    try:
                        await worker.run()
                    finally:
                        returned_at = time.monotonic()

                tg.start_soon(runner)

                def fire() -> None:
                    fired_at.append(time.monotonic())
                    if scenario.stop:
                        worker.stop()
                    else:
                        tg.cancel_scope.cancel()

                await cancel_after(scenario.cancel_after, fire)  # after stop(), run() returns by itself
        assert returned_at is not None and fired_at
        # Start-up, a grace period, one cancelled job's teardown, worker-scope teardown.
        bound = SHUTDOWN_GRACE + TEARDOWN_TIMEOUT * (1 + len(scenario.worker)) + SLACK
        assert returned_at - fired_at[0] <= bound
        await anyio.lowlevel.checkpoint()
        assert user_tasks() == tasks_before, "a task outlived Worker.run()"

    anyio.run(main, backend=backend)
    ledger.check()
    # No message lost: each one was acked, or is back in the queue (none are in flight).
    assert queue.in_flight == 0
    assert queue.acked + len(queue) == scenario.messages
    assert worker.stats["dead_lettered"] == 0


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@given(scenario=scenarios())
def test_worker_cancelled_or_stopped_at_any_checkpoint_tears_down_everything_and_loses_nothing(
    backend: str, scenario: Scenario
) -> None:
    run_worker_scenario(backend, scenario)


def run_runtime_scenario(backend: str, scenario: Scenario) -> None:
    ledger = Ledger()
    work = build(scenario, ledger)

    async def main() -> None:
        tasks_before = user_tasks()
        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:

                async def use_runtime() -> None:
                    async with Runtime(teardown_timeout=TEARDOWN_TIMEOUT) as rt, anyio.create_task_group() as jobs:
                        for n in range(scenario.messages):
                            jobs.start_soon(rt.run, work, n)
                        if scenario.stop:  # here: the bound wrapper instead of rt.run
                            await rt.bind(work)(n=99)

                tg.start_soon(use_runtime)
                await cancel_after(scenario.cancel_after, tg.cancel_scope.cancel)
        await anyio.lowlevel.checkpoint()
        assert user_tasks() == tasks_before

    anyio.run(main, backend=backend)
    ledger.check()


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@given(scenario=scenarios())
def test_runtime_cancelled_at_any_checkpoint_tears_down_everything(backend: str, scenario: Scenario) -> None:
    run_runtime_scenario(backend, scenario)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_worker_cancelled_right_after_start_returns(backend: str) -> None:
    """The reported hang: cancelled one checkpoint after it was started."""

    @job(name="j")
    async def j(n: int) -> None:
        pass

    async def main() -> None:
        with anyio.fail_after(10):
            worker = Worker(MemoryQueue(), jobs=[j], shutdown_grace=1)
            async with anyio.create_task_group() as tg:
                tg.start_soon(worker.run)
                await anyio.sleep(0)
                tg.cancel_scope.cancel()

    anyio.run(main, backend=backend)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_stop_before_run_returns_right_after_start_up(backend: str) -> None:
    events: list[str] = []

    @dependency(scope="worker")
    async def resource() -> Any:
        events.append("setup")
        yield "r"
        events.append("teardown")

    @job(name="j")
    async def j(n: int, r: str = Depends(resource)) -> None:
        events.append("job")

    async def main() -> None:
        queue = MemoryQueue()
        await queue.enqueue("j", {"n": 1})
        worker = Worker(queue, jobs=[j])
        worker.stop()
        with anyio.fail_after(10):
            await worker.run()
        assert len(queue) == 1  # nothing was read

    anyio.run(main, backend=backend)
    assert "job" not in events and events.count("setup") == events.count("teardown")
