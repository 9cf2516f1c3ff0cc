"""Every kind of callable is a valid dependency, in every declaration style."""

import functools
from collections.abc import AsyncIterator
from typing import Annotated, Any

import anyio
import pytest

from lifecycle import Depends, JobContext, Runtime, dependency
from lifecycle._analysis import never_awaits

pytestmark = pytest.mark.anyio


def sync_fn() -> str:
    return "sync_fn"


async def async_fn() -> str:
    return "async_fn"


def sync_gen(events: list[str]):  # type: ignore[no-untyped-def]
    events.append("sync_gen up")
    yield "sync_gen"
    events.append("sync_gen down")


async def async_gen(events: list[str]):  # type: ignore[no-untyped-def]
    events.append("async_gen up")
    yield "async_gen"
    events.append("async_gen down")


class Klass:
    def __init__(self, events: list[str]) -> None:
        self.events = events


class SyncCallable:
    def __call__(self) -> str:
        return "sync_callable"


class AsyncCallable:
    async def __call__(self) -> str:
        return "async_callable"


class SyncGenCallable:
    def __call__(self, events: list[str]):  # type: ignore[no-untyped-def]
        events.append("sync_gen_callable up")
        yield "sync_gen_callable"
        events.append("sync_gen_callable down")


class AsyncGenCallable:
    async def __call__(self, events: list[str]):  # type: ignore[no-untyped-def]
        events.append("async_gen_callable up")
        yield "async_gen_callable"
        events.append("async_gen_callable down")


class Service:
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    async def method_gen(self, events: list[str]):  # type: ignore[no-untyped-def]
        events.append("method up")
        yield f"{self.prefix}-method"
        events.append("method down")

    def method(self) -> str:
        return f"{self.prefix}-plain"


async def greeting(word: str, events: list[str]):  # type: ignore[no-untyped-def]
    events.append(f"partial up {word}")
    yield f"hello {word}"
    events.append(f"partial down {word}")


def logged(fn):  # type: ignore[no-untyped-def]
    """A plain sync wrapper; the kind must be read through ``__wrapped__``."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):  # type: ignore[no-untyped-def]
        return fn(*args, **kwargs)

    return wrapper


@logged
async def wrapped_async_gen(events: list[str]):  # type: ignore[no-untyped-def]
    events.append("wrapped up")
    yield "wrapped"
    events.append("wrapped down")


@logged
async def wrapped_coroutine() -> str:
    return "wrapped_coroutine"


service = Service("svc")


async def test_every_kind_is_set_up_injected_and_torn_down() -> None:
    events: list[str] = []

    async def job(
        events: list[str],
        a: Annotated[str, Depends(sync_fn)],
        b: Annotated[str, Depends(async_fn)],
        c: Annotated[str, Depends(sync_gen)],
        d: Annotated[str, Depends(async_gen)],
        e: Annotated[Klass, Depends(Klass)],
        f: Annotated[str, Depends(SyncCallable())],
        g: Annotated[str, Depends(AsyncCallable())],
        h: Annotated[str, Depends(SyncGenCallable())],
        i: Annotated[str, Depends(AsyncGenCallable())],
        j: Annotated[str, Depends(service.method_gen)],
        k: Annotated[str, Depends(service.method)],
        m: Annotated[str, Depends(functools.partial(greeting, "world"))],
        n: Annotated[str, Depends(wrapped_async_gen)],
        o: Annotated[str, Depends(wrapped_coroutine)],
    ) -> list[object]:
        events.append("body")
        return [a, b, c, d, e.events is events, f, g, h, i, j, k, m, n, o]

    async with Runtime() as rt:
        result = await rt.run(job, events=events)
    assert result == [
        "sync_fn", "async_fn", "sync_gen", "async_gen", True, "sync_callable", "async_callable",
        "sync_gen_callable", "async_gen_callable", "svc-method", "svc-plain", "hello world", "wrapped",
        "wrapped_coroutine",
    ]  # fmt: skip
    ups = [e for e in events if e.endswith(" up") or " up " in e]
    downs = [e for e in events if e.endswith(" down") or " down " in e]
    assert events.index("body") == len(ups)
    assert [d.replace("down", "up") for d in downs] == list(reversed(ups))


async def test_default_value_style_and_bare_depends_on_annotated_type() -> None:
    class Settings:
        def __init__(self) -> None:
            self.url = "db://"

    async def job(s: Settings = Depends(), t: Annotated[Settings, Depends()] = None) -> tuple[str, bool]:  # type: ignore[assignment]
        return s.url, s is t

    async with Runtime() as rt:
        assert await rt.run(job) == ("db://", True)


async def test_job_context_and_job_arguments_reach_dependencies() -> None:
    def current_user(user_id: int, ctx: JobContext) -> str:
        return f"user-{user_id}@{ctx.name}#{ctx.attempt}"

    async def audit(user: Annotated[str, Depends(current_user)], ctx: JobContext):  # type: ignore[no-untyped-def]
        yield f"audit({user}, args={dict(ctx.args)})"

    async def send_email(
        user_id: int, note: Annotated[str, Depends(audit)], ctx: JobContext, flag: bool = False
    ) -> str:
        assert ctx.id and isinstance(ctx.id, str)
        return note

    async with Runtime() as rt:
        note = await rt.run(send_email, 7)
    assert note == "audit(user-7@send_email#1, args={'user_id': 7, 'flag': False})"


async def test_dependency_parameter_with_default_not_in_job_uses_default() -> None:
    def limit(page_size: int = 50) -> int:
        return page_size

    async def job(n: Annotated[int, Depends(limit)]) -> int:
        return n

    async with Runtime() as rt:
        assert await rt.run(job) == 50


async def test_sync_job_body_and_sync_callable_with_depends() -> None:
    def value() -> int:
        return 41

    def job(x: Annotated[int, Depends(value)], add: int) -> int:
        return x + add

    async with Runtime() as rt:
        assert await rt.run(job, add=1) == 42


async def test_job_with_extra_keyword_arguments() -> None:
    async def job(name: str, **extra: object) -> dict[str, object]:
        return {"name": name, **extra}

    async with Runtime() as rt:
        assert await rt.run(job, name="a", b=1) == {"name": "a", "b": 1}


@pytest.mark.parametrize("threaded", [True, False])
async def test_sync_job_body_with_extra_keyword_arguments_and_a_dependency(threaded: bool) -> None:
    def gen() -> Any:
        yield "dep"

    @dependency(threaded=threaded)
    def job(name: str, d: str = Depends(gen), **extra: object) -> dict[str, object]:
        return {"name": name, "d": d, **extra}

    async with Runtime() as rt:
        assert await rt.run(job, "a", b=1) == {"name": "a", "d": "dep", "b": 1}
        assert await rt.run(job, "a") == {"name": "a", "d": "dep"}


async def test_positional_only_parameters() -> None:
    def base() -> int:
        return 10

    def dep(x: Annotated[int, Depends(base)], /, y: int = 1) -> int:
        return x * y

    async def job(a: int, /, v: Annotated[int, Depends(dep)]) -> int:
        return a + v

    async with Runtime() as rt:
        assert await rt.run(job, 5) == 15


async def test_dependency_decorator_bare_and_with_arguments() -> None:
    @dependency
    async def bare() -> str:
        return "bare"

    @dependency(threaded=False)
    def inline() -> str:
        return "inline"

    async def job(a: Annotated[str, Depends(bare)], b: Annotated[str, Depends(inline)]) -> str:
        return a + b

    async with Runtime() as rt:
        assert await rt.run(job) == "bareinline"


def test_dependency_decorator_rejects_bad_scope_and_targets() -> None:
    with pytest.raises(ValueError, match="scope"):
        dependency(scope="request")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="callable"):
        dependency()(42)  # type: ignore[type-var]
    with pytest.raises(TypeError, match="cannot store options"):
        dependency(Service("x").method)
    with pytest.raises(TypeError, match="callable"):
        Depends(42)  # type: ignore[arg-type]


# -- async generators that never await need no teardown guard ----------------------------


async def _quiet() -> AsyncIterator[int]:
    yield 1


async def _awaits_in_teardown() -> AsyncIterator[int]:
    yield 1
    await anyio.lowlevel.checkpoint()


async def _awaits_in_setup() -> AsyncIterator[int]:
    await anyio.lowlevel.checkpoint()
    yield 1


async def _async_for() -> AsyncIterator[int]:
    async for value in _quiet():
        yield value


async def _async_with() -> AsyncIterator[int]:
    async with anyio.Lock():
        yield 1


async def _in_comprehension() -> AsyncIterator[list[int]]:
    yield [value async for value in _quiet()]


class _QuietMethods:
    async def method(self) -> AsyncIterator[int]:
        yield 1

    async def __call__(self) -> AsyncIterator[int]:
        yield 1


def _wraps_quiet(fn: Any) -> Any:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)

    return wrapper


@pytest.mark.parametrize(
    ("call", "expected"),
    [
        (_quiet, True),
        (functools.partial(_quiet), True),
        (_QuietMethods().method, True),
        (_QuietMethods(), True),
        (_awaits_in_teardown, False),
        (_awaits_in_setup, False),  # conservative: any await anywhere counts
        (_async_for, False),
        (_async_with, False),
        (_in_comprehension, False),
        (_wraps_quiet(_quiet), False),  # a wrapper may do anything: assume it suspends
        (sync_gen, False),
        (async_fn, False),
    ],
)
def test_never_awaits_is_certain_or_false(call: Any, expected: bool) -> None:
    assert never_awaits(call) is expected


async def test_plan_of_quiet_generators_is_unguarded_and_keeps_cancel_scopes_in_order() -> None:
    events: list[str] = []

    async def scoped() -> AsyncIterator[str]:
        with anyio.CancelScope():  # held across yield, exited at teardown
            yield "scoped"
        events.append("scoped down")

    async def inner(s: str = Depends(scoped)) -> AsyncIterator[str]:
        yield "inner"
        events.append("inner down")

    async def body(i: str = Depends(inner)) -> str:
        return i

    async def loud(s: str = Depends(scoped)) -> AsyncIterator[str]:
        yield "loud"
        await anyio.lowlevel.checkpoint()

    async def guarded_body(x: str = Depends(loud)) -> str:
        return x

    async with Runtime() as rt:
        assert not rt.plan(body).guarded
        assert rt.plan(guarded_body).guarded
        assert await rt.run(body) == "inner"
        assert await rt.run(guarded_body) == "loud"
    assert events == ["inner down", "scoped down", "scoped down"]


async def test_quiet_generators_are_torn_down_when_the_job_is_cancelled() -> None:
    events: list[str] = []
    started = anyio.Event()

    async def quiet() -> AsyncIterator[str]:
        try:
            yield "quiet"
        except BaseException as exc:
            events.append(f"saw {type(exc).__name__}")
            raise

    async def body(q: str = Depends(quiet)) -> None:
        started.set()
        await anyio.sleep_forever()

    async with Runtime() as rt, anyio.create_task_group() as tg:
        tg.start_soon(rt.run, body)
        await started.wait()
        tg.cancel_scope.cancel()
    assert events == [f"saw {anyio.get_cancelled_exc_class().__name__}"]
