"""lifecycle.testing.explore: every example job keeps the contract under every fault,
and the explorer finds the bugs it exists to find (swallowed errors, leaks, commits
instead of rollbacks), on asyncio and trio."""

import functools
import importlib.util
import sqlite3
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import ModuleType
from typing import Annotated, Any

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lifecycle import Depends, LifecycleError, PayloadError, dependency, job
from lifecycle.testing import Exploration, ExplorationFailed, FaultKind, FaultRun, InjectedFault, explore

pytestmark = pytest.mark.anyio

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load_example(name: str) -> ModuleType:
    """Import examples/<name>.py under a private module name."""
    spec = importlib.util.spec_from_file_location(f"lifecycle_example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def kinds(exploration: Exploration) -> set[FaultKind]:
    return {run.fault.kind for run in exploration.runs if run.reached}


# -- the examples ------------------------------------------------------------------------


async def test_db_session_example_rolls_back_on_every_fault(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    example = load_example("db_session")
    example.DB_PATH = tmp_path / "example.sqlite3"  # not the shared temp file of the script
    sent = [0]

    def sent_counter() -> int:
        with sqlite3.connect(example.DB_PATH) as db:
            return int(db.execute("SELECT sent FROM users WHERE id = 1").fetchone()[0])

    def committed_only_on_success(run: FaultRun) -> str | None:
        now = sent_counter()
        delta, sent[0] = now - sent[0], now
        if run.outcome.succeeded and delta != 1:
            return f"`transaction` did not commit a successful job (sent counter moved by {delta})"
        # A teardown fault is injected after the real teardown committed; a caller
        # cancelled after the body returned may see the cancellation after the commit.
        after_commit = run.fault.kind is FaultKind.TEARDOWN or (run.outcome.cancelled and run.body_returned)
        if not run.outcome.succeeded and delta and not after_commit:
            return "`transaction` (db_session:transaction) committed instead of rolling back"
        return None

    exploration = await explore(example.send_welcome, user_id=1, checks=[committed_only_on_success])
    exploration.assert_ok()
    assert {FaultKind.NONE, FaultKind.SETUP, FaultKind.BODY, FaultKind.TEARDOWN, FaultKind.CANCEL} <= kinds(exploration)
    assert {FaultKind.TIMEOUT, FaultKind.RETRY} <= kinds(exploration)
    body = next(run for run in exploration.runs if run.fault.kind is FaultKind.BODY)
    assert isinstance(body.seen["lifecycle_example_db_session:transaction"], InjectedFault)
    out = capsys.readouterr().out
    assert "rolled back because of InjectedFault" in out  # the rollback path ran for real
    report = exploration.report()
    assert "all fault points kept the contract" in report
    assert "teardown of `transaction` (lifecycle_example_db_session:transaction) raises" in report
    print(report)


async def test_jobs_example_audits_every_fault(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    example = load_example("jobs")
    monkeypatch.setattr(example, "AUDIT_LOG", tmp_path / "audit.log")
    exploration = await explore(example.greet, name="Ada")
    exploration.assert_ok()
    lines = (tmp_path / "audit.log").read_text().splitlines()
    assert any(line.endswith("failed: InjectedFault") for line in lines)
    assert lines[-1] == "worker scope closed"


async def test_worker_example_returns_every_connection() -> None:
    example = load_example("worker")
    exploration = await explore(example.greet, name="Ada", times=1)
    exploration.assert_ok()
    opened = sum(1 for event in example.EVENTS if event.endswith("returned"))
    assert opened == sum(run.set_up.count("lifecycle_example_worker:connection") for run in exploration.runs)
    assert example.EVENTS[-1] == "pool closed"


async def test_celery_example_job_keeps_the_contract() -> None:
    pytest.importorskip("celery")
    example = load_example("celery_app")
    exploration = await explore(example.lc.jobs["send_welcome"], user_id=3)
    exploration.assert_ok()


# -- what it finds -----------------------------------------------------------------------


class Pool:
    def __init__(self) -> None:
        self.checked_out = 0
        self.commits = 0
        self.rollbacks = 0


POOL = Pool()


@dependency(scope="worker")
async def pool() -> AsyncIterator[Pool]:
    yield POOL


async def leaky_connection(p: Annotated[Pool, Depends(pool)]) -> AsyncIterator[Pool]:
    p.checked_out += 1
    yield p
    p.checked_out -= 1  # not in a finally: skipped when the job fails


def committing_session(p: Annotated[Pool, Depends(leaky_connection)]) -> Iterator[Pool]:
    try:
        yield p
    finally:
        p.commits += 1  # commits whatever happened


def swallowing(p: Annotated[Pool, Depends(pool)]) -> Iterator[None]:
    try:  # noqa: SIM105 - written as users write it
        yield
    except Exception:
        pass  # swallows the job's error


@job
async def buggy(user_id: int, s: Annotated[Pool, Depends(committing_session)]) -> int:
    await anyio.sleep(0)
    return user_id


@job
async def swallower(user_id: int, _: Annotated[None, Depends(swallowing)]) -> int:
    return user_id


async def test_a_users_invariant_names_the_fault_point_and_the_dependency() -> None:
    POOL.__init__()  # type: ignore[misc]

    def no_connection_checked_out(run: FaultRun) -> str | None:
        if POOL.checked_out:
            POOL.checked_out = 0
            return "`leaky_connection` left a connection checked out"
        return None

    def rolled_back_on_failure(run: FaultRun) -> None:
        commits, POOL.commits = POOL.commits, 0
        assert run.outcome.succeeded or not commits, "`committing_session` committed instead of rolling back"

    exploration = await explore(buggy, user_id=3, checks=[no_connection_checked_out, rolled_back_on_failure])
    assert not exploration.ok
    problems = exploration.problems
    assert "when `buggy` raises: `leaky_connection` left a connection checked out" in problems
    assert "when `buggy` raises: `committing_session` committed instead of rolling back" in problems
    assert not any("no fault" in problem for problem in problems)
    with pytest.raises(ExplorationFailed, match="FAIL `buggy` raises"):
        exploration.assert_ok()


async def test_a_swallowed_error_is_reported_without_any_check() -> None:
    exploration = await explore(swallower, user_id=1, cancellations=False)
    [problem] = [p for p in exploration.problems if p.startswith("when `swallower` raises:")]
    assert problem == (
        "when `swallower` raises: `swallowing` (test_testing_explore:swallowing) swallowed the injected fault "
        "(its teardown returned normally)"
    )
    assert "FAIL `swallower` raises" in exploration.report()


async def test_async_checks_run_and_a_crashing_check_is_a_problem() -> None:
    seen: list[FaultKind] = []

    async def record(run: FaultRun) -> None:
        await anyio.sleep(0)
        seen.append(run.fault.kind)

    def crashes(run: FaultRun) -> None:
        raise KeyError("boom")

    exploration = await explore(swallower, user_id=1, checks=[record, crashes], cancellations=False)
    assert seen[0] is FaultKind.NONE and FaultKind.BODY in seen
    assert any("check" in p and "crashes raised KeyError" in p for p in exploration.problems)


async def test_cancellations_cover_every_await_point_and_can_be_bounded() -> None:
    everything = await explore(buggy, user_id=1)
    points = [run for run in everything.runs if run.fault.kind is FaultKind.CANCEL]
    assert points and [run.fault.index for run in points] == list(range(1, len(points) + 1))
    bounded = await explore(buggy, user_id=1, max_await_points=1)
    assert [run.fault.index for run in bounded.runs if run.fault.kind is FaultKind.CANCEL] == [1]
    none = await explore(buggy, user_id=1, cancellations=False)
    assert FaultKind.CANCEL not in kinds(none)


async def test_overrides_are_explored_in_place_of_the_originals() -> None:
    closed: list[str] = []

    async def fake_session() -> AsyncIterator[Pool]:
        try:
            yield Pool()
        finally:
            closed.append("fake")

    exploration = await explore(buggy, user_id=2, dependency_overrides={committing_session: fake_session})
    exploration.assert_ok()
    assert exploration.runs[0].set_up[-1].endswith("<locals>.fake_session")
    assert len(closed) == sum(len(run.torn_down) for run in exploration.runs)


async def test_bad_input_is_refused_before_anything_runs() -> None:
    with pytest.raises(PayloadError, match="user_id"):
        await explore(buggy, user_id="three")

    @job
    async def always_fails(user_id: int) -> None:
        raise RuntimeError("broken")

    with pytest.raises(LifecycleError, match=r"'always_fails'.*did not succeed without faults.*RuntimeError: broken"):
        await explore(always_fails, user_id=1)


# -- the oracle, as a property -----------------------------------------------------------

BEHAVIOURS = st.sampled_from(["reraise", "swallow", "replace"])


@settings(max_examples=25)
@given(chain=st.lists(st.tuples(BEHAVIOURS, st.booleans()), min_size=1, max_size=4))
async def test_explore_reports_exactly_the_swallowing_dependencies(chain: list[tuple[str, bool]]) -> None:
    """A chain of generators, each re-raising, swallowing or replacing what it is
    thrown, sync or async: explore finds no problem in any run except a "swallowed" one
    for each swallowing generator that saw an exception."""
    providers: list[Any] = []
    for index, (behaviour, is_async) in enumerate(chain):
        providers.append(_generator(index, behaviour, is_async, providers[-1] if providers else None))
    last = providers[-1]

    async def body(value: Annotated[int, Depends(last)]) -> int:
        return value

    exploration = await explore(job(name="chain")(body), cancellations=False, timeout=None)
    for run in exploration.runs:
        for problem in run.problems:
            assert " swallowed " in problem, (run.fault.description, problem)
        swallowers = {label for label, seen in run.seen.items() if isinstance(seen, Exception) and "swallow" in label}
        reported = {p.split("`")[1] for p in run.problems}
        assert reported == {label.rpartition(":")[2] for label in swallowers}


def _generator(index: int, behaviour: str, is_async: bool, inner: Any) -> Any:
    name = f"{behaviour}_{index}"
    if is_async:

        async def agen(*, previous: Any = None) -> AsyncIterator[int]:
            try:
                yield index
            except Exception as exc:
                if behaviour == "reraise":
                    raise
                if behaviour == "replace":
                    raise ValueError(name) from exc

        fn: Any = agen
    else:

        def gen(*, previous: Any = None) -> Iterator[int]:
            try:
                yield index
            except Exception as exc:
                if behaviour == "reraise":
                    raise
                if behaviour == "replace":
                    raise ValueError(name) from exc

        fn = gen
    fn.__name__ = fn.__qualname__ = name
    if inner is not None:
        fn.__annotations__ = {"previous": Annotated[int, Depends(inner)]}
        fn.__kwdefaults__ = None
    return fn


async def test_bad_options_are_refused_with_the_option_named() -> None:
    with pytest.raises(ValueError, match="max_await_points must be >= 0"):
        await explore(buggy, user_id=1, max_await_points=-1)
    with pytest.raises(ValueError, match="timeout must be a positive number"):
        await explore(buggy, user_id=1, timeout=0)
    with pytest.raises(TypeError, match="each check must be callable"):
        await explore(buggy, user_id=1, checks=["not a check"])


# -- every kind of dependency ------------------------------------------------------------

CLOSED: list[str] = []


class Client:
    """A class dependency: constructed, nothing to tear down."""

    def __init__(self, user_id: int) -> None:
        self.user_id = user_id


class Sessions:
    def __init__(self) -> None:
        self.prefix = "s"

    async def open(self, c: Annotated[Client, Depends(Client)]) -> AsyncIterator[str]:
        try:
            yield f"{self.prefix}{c.user_id}"
        finally:
            CLOSED.append("session")


SESSIONS = Sessions()


class Tracer:
    """A callable instance whose ``__call__`` is a sync generator."""

    def __call__(self, label: str = "t") -> Iterator[str]:
        try:
            yield label
        finally:
            CLOSED.append("tracer")


def scratch(size: int) -> Iterator[list[int]]:
    try:
        yield [0] * size
    finally:
        CLOSED.append("scratch")


async def settings_value() -> str:
    return "settings"


@dependency(threaded=False)
def inline_counter() -> Iterator[int]:
    try:
        yield 1
    finally:
        CLOSED.append("inline")


@job(retries=1)
def sync_job(
    user_id: int,
    session: Annotated[str, Depends(SESSIONS.open)],
    trace: Annotated[str, Depends(Tracer())],
    buf: Annotated[list[int], Depends(functools.partial(scratch, 2))],
    again: Annotated[list[int], Depends(functools.partial(scratch, 2), use_cache=False)],
    conf: Annotated[str, Depends(settings_value)],
    n: Annotated[int, Depends(inline_counter)],
) -> str:
    return f"{session}/{trace}/{len(buf) + len(again)}/{conf}/{n}"


async def test_every_kind_of_dependency_and_a_sync_body_are_explored() -> None:
    """Bound async-generator methods, callable instances, partials, classes, coroutine
    functions, inline sync generators, a use_cache=False twin and a sync job body (in a
    thread): wrapped as what they are, each torn down once per run."""
    CLOSED.clear()
    exploration = await explore(sync_job, user_id=7)
    exploration.assert_ok()
    assert exploration.runs[0].outcome.result == "s7/t/4/settings/1"
    generators = 5  # session, tracer, scratch twice, inline
    assert len(exploration.runs[0].torn_down) == generators
    assert FaultKind.TIMEOUT not in kinds(exploration)  # a sync body cannot be made to wait
    retry = next(run for run in exploration.runs if run.fault.kind is FaultKind.RETRY)
    assert retry.outcome.succeeded and len(retry.torn_down) == 2 * generators  # fresh on attempt 2
    assert len(CLOSED) == sum(len(run.torn_down) for run in exploration.runs)
