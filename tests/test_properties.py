"""Property-based tests: random dependency DAGs with random faults, checked against an
oracle built from nested ``contextlib.AsyncExitStack`` (the reference semantics of
the README's "Semantics" rules), and a concurrency property for scopes."""

from __future__ import annotations

import inspect
import logging
from collections import Counter
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any

import anyio
import pytest
from hypothesis import given
from hypothesis import strategies as st
from support import structlog_level

from lifecycle import Depends, JobContext, Runtime, dependency

# A "quiet" async generator never awaits: its teardown cannot suspend, so a plan made
# only of those (and inline sync generators) runs without the guard scope.
KINDS = ("function", "coroutine", "generator", "async_generator", "quiet_async_generator")
BEHAVIOURS = ("reraise", "convert", "swallow", "fail_teardown")


class SetupError(Exception):
    pass


class BodyError(Exception):
    pass


class TeardownError(Exception):
    pass


@dataclass(frozen=True)
class Node:
    kind: str
    deps: tuple[tuple[int, bool], ...]  # (index of an earlier node, use_cache)
    behaviour: str
    threaded: bool


@dataclass(frozen=True)
class Scenario:
    nodes: tuple[Node, ...]
    roots: tuple[tuple[int, bool], ...]
    fail_setup: int | None
    fail_body: bool


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    count = draw(st.integers(1, 7))
    nodes = []
    for index in range(count):
        deps: tuple[tuple[int, bool], ...] = ()
        if index:
            deps = tuple(draw(st.lists(st.tuples(st.integers(0, index - 1), st.booleans()), max_size=3)))
        nodes.append(Node(draw(st.sampled_from(KINDS)), deps, draw(st.sampled_from(BEHAVIOURS)), draw(st.booleans())))
    roots = tuple(draw(st.lists(st.tuples(st.integers(0, count - 1), st.booleans()), min_size=1, max_size=4)))
    fail_setup = draw(st.none() | st.integers(0, count - 1))
    return Scenario(tuple(nodes), roots, fail_setup, draw(st.booleans()))


def describe(exc: BaseException | None) -> str | None:
    return None if exc is None else f"{type(exc).__name__}({exc})"


class World:
    """The providers of one scenario; both the engine and the oracle call these same
    functions, which record every setup and what each generator saw at its yield."""

    def __init__(self, scenario: Scenario) -> None:
        self.scenario = scenario
        self.trace: list[tuple[Any, ...]] = []
        self.instances: Counter[int] = Counter()
        self.functions: list[Any] = []
        for index, node in enumerate(scenario.nodes):
            fn = self._make(index, node)
            params = [
                inspect.Parameter(
                    f"d{j}", inspect.Parameter.KEYWORD_ONLY, default=Depends(self.functions[dep], use_cache=cache)
                )
                for j, (dep, cache) in enumerate(node.deps)
            ]
            fn.__signature__ = inspect.Signature(params)
            fn.__qualname__ = f"node{index}"
            if node.kind in ("function", "generator"):
                fn = dependency(threaded=node.threaded)(fn)
            self.functions.append(fn)

    def reset(self) -> None:
        self.trace.clear()
        self.instances.clear()

    def _enter(self, index: int) -> str:
        self.instances[index] += 1
        instance = self.instances[index]
        if self.scenario.fail_setup == index:
            self.trace.append(("setup-failed", index, instance))
            raise SetupError(f"node{index}")
        self.trace.append(("setup", index, instance))
        return f"n{index}.{instance}"

    def _exit(self, index: int, value: str, seen: BaseException | None) -> bool:
        """Record the teardown; return True to swallow. Raises for convert/fail."""
        self.trace.append(("teardown", index, value, describe(seen)))
        behaviour = self.scenario.nodes[index].behaviour
        if seen is not None:
            if behaviour == "swallow":
                return True
            if behaviour in ("convert", "fail_teardown"):
                raise TeardownError(f"node{index} over {type(seen).__name__}") from seen
            return False
        if behaviour == "fail_teardown":
            raise TeardownError(f"node{index}")
        return False

    def _make(self, index: int, node: Node) -> Any:
        world = self
        if node.kind == "function":

            def function(**_: Any) -> str:
                return world._enter(index)

            return function
        if node.kind == "coroutine":

            async def coroutine(**_: Any) -> str:
                await anyio.lowlevel.checkpoint()
                return world._enter(index)

            return coroutine
        if node.kind == "generator":

            def generator(**_: Any) -> Any:
                value = world._enter(index)
                try:
                    yield value
                except BaseException as exc:
                    if world._exit(index, value, exc):
                        return
                    raise
                else:
                    world._exit(index, value, None)

            return generator

        async def async_generator(**_: Any) -> Any:
            value = world._enter(index)
            try:
                yield value
            except BaseException as exc:
                await anyio.lowlevel.checkpoint()
                if world._exit(index, value, exc):
                    return
                raise
            else:
                world._exit(index, value, None)

        async def quiet_async_generator(**_: Any) -> Any:
            value = world._enter(index)
            try:
                yield value
            except BaseException as exc:
                if world._exit(index, value, exc):
                    return
                raise
            else:
                world._exit(index, value, None)

        return quiet_async_generator if node.kind == "quiet_async_generator" else async_generator

    def body(self) -> Any:
        world = self

        async def body(**values: str) -> tuple[str, ...]:
            world.trace.append(("body",))
            if world.scenario.fail_body:
                raise BodyError("body")
            return tuple(values[f"r{i}"] for i in range(len(values)))

        body.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
            [
                inspect.Parameter(
                    f"r{i}", inspect.Parameter.KEYWORD_ONLY, default=Depends(self.functions[n], use_cache=c)
                )
                for i, (n, c) in enumerate(self.scenario.roots)
            ]
        )
        return body

    # -- the oracle: nested AsyncExitStack -----------------------------------------------
    async def oracle(self) -> tuple[str, Any]:
        cache: dict[int, Any] = {}

        async def resolve(index: int, use_cache: bool, stack: AsyncExitStack) -> Any:
            if use_cache and index in cache:
                return cache[index]
            node = self.scenario.nodes[index]
            kwargs = {f"d{j}": await resolve(dep, c, stack) for j, (dep, c) in enumerate(node.deps)}
            fn = self.functions[index]
            if node.kind == "function":
                value = fn(**kwargs)
            elif node.kind == "coroutine":
                value = await fn(**kwargs)
            elif node.kind == "generator":
                value = stack.enter_context(contextmanager(fn)(**kwargs))
            else:
                value = await stack.enter_async_context(asynccontextmanager(fn)(**kwargs))
            if use_cache:
                cache[index] = value
            return value

        original: BaseException | None = None
        try:
            async with AsyncExitStack() as stack:
                try:
                    values = {f"r{i}": await resolve(n, c, stack) for i, (n, c) in enumerate(self.scenario.roots)}
                    self.trace.append(("body",))
                    if self.scenario.fail_body:
                        raise BodyError("body")
                    result = tuple(values[f"r{i}"] for i in range(len(values)))
                except BaseException as exc:
                    original = exc
                    raise
        except BaseException as exc:
            return "error", describe(exc)
        if original is not None:  # swallowed: the job still fails with the original
            return "error", describe(original)
        return "ok", result


def check_scenario(scenario: Scenario, backend: str, traced: bool = False) -> None:
    """``traced``: run the plan's traced runner (DEBUG logging), whose teardown after a
    successful body is the general loop; untraced, it is the generated clean path."""
    world = World(scenario)

    async def main() -> None:
        expected = await world.oracle()
        expected_trace = list(world.trace)
        world.reset()
        async with Runtime() as rt:
            try:
                outcome: tuple[str, Any] = ("ok", await rt.run(world.body()))
                error: BaseException | None = None
            except Exception as exc:
                outcome, error = ("error", describe(exc)), exc
        report = f"oracle: {expected} {expected_trace}\nengine: {outcome} {world.trace}"
        assert outcome == expected, report
        assert world.trace == expected_trace, report
        # Every generator that was set up is torn down exactly once; nothing else is.
        generators = {i for i, n in enumerate(scenario.nodes) if n.kind.endswith("generator")}
        set_up = Counter(f"n{e[1]}.{e[2]}" for e in world.trace if e[0] == "setup" and e[1] in generators)
        torn = Counter(e[2] for e in world.trace if e[0] == "teardown")
        assert set_up == torn and all(count == 1 for count in torn.values())
        # Teardown is the exact reverse of setup completion.
        assert [e[2] for e in world.trace if e[0] == "teardown"] == [
            f"n{e[1]}.{e[2]}" for e in reversed(world.trace) if e[0] == "setup" and e[1] in generators
        ]
        # A swallowed failure is never silent: the caller's exception carries a note.
        if error is not None and any(e[0] == "teardown" and e[3] for e in world.trace):
            swallowers = [
                e for e in world.trace if e[0] == "teardown" and e[3] and scenario.nodes[e[1]].behaviour == "swallow"
            ]
            if swallowers and isinstance(error, (SetupError, BodyError)):
                assert any("swallowed" in n for n in getattr(error, "__notes__", []))

    with structlog_level(logging.DEBUG if traced else logging.INFO):
        anyio.run(main, backend=backend)


@pytest.mark.parametrize("traced", [False, True], ids=["untraced", "traced"])
@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@given(scenario=scenarios())
def test_engine_matches_async_exit_stack_oracle(backend: str, traced: bool, scenario: Scenario) -> None:
    check_scenario(scenario, backend, traced)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_oracle_regressions(backend: str) -> None:
    """Hand-picked shapes: shared node with and without cache, swallow then fail."""
    gen, agen = "generator", "async_generator"
    cases = [
        Scenario((Node(agen, (), "swallow", False), Node(gen, ((0, True),), "fail_teardown", True)), ((1, True),), None, True),
        Scenario((Node(agen, (), "reraise", False), Node(agen, ((0, False),), "convert", False)), ((1, True), (0, True)), None, True),
        Scenario((Node(gen, (), "swallow", False), Node(agen, (), "reraise", False)), ((0, True), (1, False)), 1, False),
        Scenario((Node(agen, (), "fail_teardown", False), Node(agen, (), "fail_teardown", False)), ((0, True), (1, True)), None, False),
    ]  # fmt: skip
    for case in cases:
        for traced in (False, True):
            check_scenario(case, backend, traced)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@given(
    jobs=st.integers(1, 40), workers=st.integers(1, 3), checkpoints=st.lists(st.integers(0, 3), min_size=1, max_size=5)
)
def test_concurrent_jobs_never_share_job_values_and_create_worker_values_once(
    backend: str, jobs: int, workers: int, checkpoints: list[int]
) -> None:
    created: Counter[str] = Counter()
    closed: Counter[str] = Counter()
    sessions: dict[str, object] = {}

    def make_worker(name: str) -> Any:
        @dependency(scope="worker")
        async def worker_dep() -> Any:
            created[name] += 1
            for _ in range(checkpoints[len(created) % len(checkpoints)]):
                await anyio.lowlevel.checkpoint()
            yield object()
            closed[name] += 1

        worker_dep.__qualname__ = name
        return worker_dep

    worker_deps = [make_worker(f"w{i}") for i in range(workers)]

    async def session(ctx: JobContext) -> Any:
        value = object()
        sessions[ctx.id] = value
        for _ in range(checkpoints[len(sessions) % len(checkpoints)]):
            await anyio.lowlevel.checkpoint()
        yield value

    params = [inspect.Parameter("ctx", inspect.Parameter.KEYWORD_ONLY, annotation=JobContext)]
    params.append(inspect.Parameter("s", inspect.Parameter.KEYWORD_ONLY, default=Depends(session)))
    params += [
        inspect.Parameter(f"w{i}", inspect.Parameter.KEYWORD_ONLY, default=Depends(w))
        for i, w in enumerate(worker_deps)
    ]

    async def job_body(ctx: JobContext, s: Any, **worker_values: object) -> tuple[str, object, tuple[object, ...]]:
        await anyio.lowlevel.checkpoint()
        return ctx.id, s, tuple(worker_values[f"w{i}"] for i in range(workers))

    job_body.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    results: list[tuple[str, object, tuple[object, ...]]] = []

    async def main() -> None:
        async with Runtime() as rt:

            async def one() -> None:
                results.append(await rt.run(job_body))

            async with anyio.create_task_group() as tg:
                for _ in range(jobs):
                    tg.start_soon(one)
            assert sum(closed.values()) == 0

    anyio.run(main, backend=backend)
    assert len(results) == jobs
    assert all(sessions[job_id] is value for job_id, value, _ in results)  # each job got its own
    assert len({id(value) for _, value, _ in results}) == jobs
    assert len({worker_values for _, _, worker_values in results}) == 1  # all shared the same
    assert created == Counter({f"w{i}": 1 for i in range(workers)})
    assert closed == created
