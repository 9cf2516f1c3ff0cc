"""Worker-scoped dependencies are torn down in the exact reverse of the order in which
their setups completed, whatever order the jobs that asked for them wake up in (trio
randomises that), and a requester cancelled mid-setup leaves nothing behind."""

from __future__ import annotations

import time
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lifecycle import Depends, Runtime, dependency

KINDS = ("async_generator", "threaded_generator")


def make(name: str, kind: str, checkpoints: int, log: list[str]) -> Any:
    if kind == "async_generator":

        async def provider() -> Any:
            for _ in range(checkpoints):
                await anyio.lowlevel.checkpoint()
            log.append(f"up {name}")
            yield name
            log.append(f"down {name}")

    else:

        def provider() -> Any:  # type: ignore[misc]
            time.sleep(checkpoints / 1000)
            log.append(f"up {name}")  # list.append is atomic: threads may race here
            yield name
            log.append(f"down {name}")

    provider.__qualname__ = name
    return dependency(scope="worker", threaded=True)(provider)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@given(
    specs=st.lists(st.tuples(st.sampled_from(KINDS), st.integers(0, 4)), min_size=2, max_size=4),
    jobs_per_dep=st.integers(1, 3),
)
def test_teardown_is_the_reverse_of_completed_setup_under_concurrent_first_requests(
    backend: str, specs: list[tuple[str, int]], jobs_per_dep: int
) -> None:
    log: list[str] = []
    providers = [make(f"d{i}", kind, n, log) for i, (kind, n) in enumerate(specs)]
    users = []
    for provider in providers:

        async def use(value: str = Depends(provider)) -> str:
            return value

        users.append(use)

    async def main() -> None:
        async with Runtime() as rt, anyio.create_task_group() as tg:
            for _ in range(jobs_per_dep):
                for use in users:
                    tg.start_soon(rt.run, use)

    anyio.run(main, backend=backend)
    ups = [entry[3:] for entry in log if entry.startswith("up ")]
    downs = [entry[5:] for entry in log if entry.startswith("down ")]
    assert sorted(ups) == sorted(f"d{i}" for i in range(len(specs)))  # each created once
    assert downs == ups[::-1]


@pytest.mark.anyio
async def test_a_requester_cancelled_during_setup_aborts_it_and_the_next_one_creates_it() -> None:
    log: list[str] = []
    gate = anyio.Event()

    @dependency(scope="worker")
    async def slow() -> Any:
        log.append("setup started")
        try:
            await gate.wait()
        except BaseException:
            log.append("setup cancelled")
            raise
        log.append("up")
        yield "value"
        log.append("down")

    async def use(value: str = Depends(slow)) -> str:
        return value

    async with Runtime() as rt:
        with anyio.move_on_after(0.05):
            await rt.run(use)
        assert log == ["setup started", "setup cancelled"]
        gate.set()
        assert await rt.run(use) == "value"
    assert log == ["setup started", "setup cancelled", "setup started", "up", "down"]


@pytest.mark.anyio
async def test_a_runtime_closed_during_a_worker_setup_cancels_it_without_a_hang() -> None:
    log: list[str] = []

    @dependency(scope="worker")
    async def never_ready() -> Any:
        try:
            await anyio.sleep_forever()
        finally:
            log.append("setup ended")
        yield "never"

    async def use(value: str = Depends(never_ready)) -> str:
        return value

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg, Runtime() as rt:
            tg.start_soon(rt.run, use)
            await anyio.sleep(0.05)
            tg.cancel_scope.cancel()
    assert log == ["setup ended"]
