"""The benchmark's dependency tree, declared once per library.

config (sync, once per job, shared by cache and logger), pool -> conn -> tx (async generators; tx commits in its
teardown), cache (async generator on config), logger (sync on config), clock (async
function), repo (sync on tx and cache), a sync generator, and a job taking repo,
logger, clock, the sync generator and ``user_id: int``.

Every provider records its setup (``+name``) and teardown (``-name``, in a ``finally``;
``tx`` commits on a normal exit and records a rollback when an exception is thrown in) in
``EVENTS`` so that each library can be checked before it is timed, failing jobs too."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from typing import Any, NewType

import anyio

EVENTS: list[str] = []


async def commit() -> None:
    """tx's teardown awaits this, as a real commit would (it returns without
    suspending, so no library pays for an event-loop round trip). An ``await`` in
    teardown is what makes lifecycle shield and bound it (see benchmarks/README.md)."""
    EVENTS.append("-tx(commit)")


def make_tree(depends: Callable[..., Any], inline: Callable[[Any], Any] = lambda f: f) -> Callable[..., Any]:
    """The tree with ``depends`` as the marker (FastAPI, FastDepends, taskiq and lifecycle
    all spell it ``param = Depends(f)``); ``inline`` marks sync providers to run on the
    loop where the library has such an option. Returns the job function."""

    @inline
    def config() -> dict[str, str]:
        EVENTS.append("config")
        return {"dsn": "memory://"}

    async def pool() -> AsyncIterator[str]:
        EVENTS.append("+pool")
        try:
            yield "pool"
        finally:
            EVENTS.append("-pool")

    async def conn(p: str = depends(pool)) -> AsyncIterator[str]:
        EVENTS.append("+conn")
        try:
            yield "conn"
        finally:
            EVENTS.append("-conn")

    async def tx(c: str = depends(conn)) -> AsyncIterator[str]:
        EVENTS.append("+tx")
        try:
            yield "tx"
        except BaseException:
            EVENTS.append("-tx(rollback)")
            raise
        await commit()

    async def cache(cfg: dict[str, str] = depends(config)) -> AsyncIterator[str]:
        EVENTS.append("+cache")
        try:
            yield "cache"
        finally:
            EVENTS.append("-cache")

    @inline
    def logger(cfg: dict[str, str] = depends(config)) -> str:
        return "logger"

    async def clock() -> float:
        return 0.0

    @inline
    def repo(t: str = depends(tx), c: str = depends(cache)) -> tuple[str, str]:
        return (t, c)

    @inline
    def sync_gen() -> Iterator[str]:
        EVENTS.append("+sync_gen")
        try:
            yield "sync_gen"
        finally:
            EVENTS.append("-sync_gen")

    async def handle(
        user_id: int,
        r: tuple[str, str] = depends(repo),
        lg: str = depends(logger),
        ck: float = depends(clock),
        s: str = depends(sync_gen),
    ) -> int:
        return user_id

    handle.providers = {"pool": pool, "config": config}  # type: ignore[attr-defined]
    return handle


# -- the floor: the same tree written by hand with AsyncExitStack -------------------------


def _config() -> dict[str, str]:
    EVENTS.append("config")
    return {"dsn": "memory://"}


@asynccontextmanager
async def _pool() -> AsyncIterator[str]:
    EVENTS.append("+pool")
    try:
        yield "pool"
    finally:
        EVENTS.append("-pool")


@asynccontextmanager
async def _conn(p: str) -> AsyncIterator[str]:
    EVENTS.append("+conn")
    try:
        yield "conn"
    finally:
        EVENTS.append("-conn")


@asynccontextmanager
async def _tx(c: str) -> AsyncIterator[str]:
    EVENTS.append("+tx")
    try:
        yield "tx"
    except BaseException:
        EVENTS.append("-tx(rollback)")
        raise
    await commit()


@asynccontextmanager
async def _cache(cfg: dict[str, str]) -> AsyncIterator[str]:
    EVENTS.append("+cache")
    try:
        yield "cache"
    finally:
        EVENTS.append("-cache")


@contextmanager
def _sync_gen() -> Iterator[str]:
    EVENTS.append("+sync_gen")
    try:
        yield "sync_gen"
    finally:
        EVENTS.append("-sync_gen")


async def _clock() -> float:
    return 0.0


async def _handle(user_id: int, r: tuple[str, str], lg: str, ck: float, s: str) -> int:
    return user_id


async def floor_job(user_id: int, pool: str | None = None) -> int:
    async with AsyncExitStack() as stack:
        cfg = _config()
        p = pool if pool is not None else await stack.enter_async_context(_pool())
        c = await stack.enter_async_context(_conn(p))
        t = await stack.enter_async_context(_tx(c))
        ca = await stack.enter_async_context(_cache(cfg))
        r = (t, ca)
        lg = "logger"
        ck = await _clock()
        s = stack.enter_context(_sync_gen())
        return await _handle(user_id, r, lg, ck, s)


async def floor_job_threaded(user_id: int) -> int:
    """``floor_job`` keeping every sync step off the event loop, as a careful hand would
    with the fewest thread hops the setup order allows (the promise of lifecycle's
    default ``threaded=True``): ``config``; ``repo`` and ``logger`` together; entering
    ``sync_gen``; leaving it. Four ``to_thread.run_sync`` calls."""
    async with AsyncExitStack() as stack:
        p = await stack.enter_async_context(_pool())
        c = await stack.enter_async_context(_conn(p))
        t = await stack.enter_async_context(_tx(c))
        cfg = await anyio.to_thread.run_sync(_config)
        ca = await stack.enter_async_context(_cache(cfg))
        r, lg = await anyio.to_thread.run_sync(lambda: ((t, ca), "logger"))
        ck = await _clock()
        manager = _sync_gen()
        s = await anyio.to_thread.run_sync(manager.__enter__)
        stack.push_async_exit(lambda *exc: anyio.to_thread.run_sync(manager.__exit__, *exc))
        return await _handle(user_id, r, lg, ck, s)


# -- dishka: providers are keyed by type --------------------------------------------------

Config = NewType("Config", dict)
Pool = NewType("Pool", str)
Conn = NewType("Conn", str)
Tx = NewType("Tx", str)
Cache = NewType("Cache", str)
Logger = NewType("Logger", str)
Clock = NewType("Clock", float)
Repo = NewType("Repo", tuple)
SyncGen = NewType("SyncGen", str)


def make_dishka_provider(pool_scope: str) -> Any:
    from dishka import Provider, Scope, provide

    class Tree(Provider):
        @provide(scope=Scope.REQUEST)
        def config(self) -> Config:
            EVENTS.append("config")
            return Config({"dsn": "memory://"})

        @provide(scope=Scope.APP if pool_scope == "worker" else Scope.REQUEST)
        async def pool(self) -> AsyncIterator[Pool]:
            EVENTS.append("+pool")
            try:
                yield Pool("pool")
            finally:
                EVENTS.append("-pool")

        @provide(scope=Scope.REQUEST)
        async def conn(self, p: Pool) -> AsyncIterator[Conn]:
            EVENTS.append("+conn")
            try:
                yield Conn("conn")
            finally:
                EVENTS.append("-conn")

        @provide(scope=Scope.REQUEST)
        async def tx(self, c: Conn) -> AsyncIterator[Tx]:
            EVENTS.append("+tx")
            try:
                yield Tx("tx")
            except BaseException:
                EVENTS.append("-tx(rollback)")
                raise
            await commit()

        @provide(scope=Scope.REQUEST)
        async def cache(self, cfg: Config) -> AsyncIterator[Cache]:
            EVENTS.append("+cache")
            try:
                yield Cache("cache")
            finally:
                EVENTS.append("-cache")

        @provide(scope=Scope.REQUEST)
        def logger(self, cfg: Config) -> Logger:
            return Logger("logger")

        @provide(scope=Scope.REQUEST)
        async def clock(self) -> Clock:
            return Clock(0.0)

        @provide(scope=Scope.REQUEST)
        def repo(self, t: Tx, c: Cache) -> Repo:
            return Repo((t, c))

        @provide(scope=Scope.REQUEST)
        def sync_gen(self) -> Iterator[SyncGen]:
            EVENTS.append("+sync_gen")
            try:
                yield SyncGen("sync_gen")
            finally:
                EVENTS.append("-sync_gen")

    return Tree()


async def dishka_job(container: Any, user_id: int) -> int:
    async with container() as request:
        return await _handle(
            user_id,
            await request.get(Repo),
            await request.get(Logger),
            await request.get(Clock),
            await request.get(SyncGen),
        )
