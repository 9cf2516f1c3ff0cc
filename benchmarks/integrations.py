"""What the FastAPI bridge and ``Runtime.attempt`` add per job over the plain equivalent
doing the same work, in one process run:

- FastAPI, against a plain FastAPI route doing the work with FastAPI's own ``Depends``
  and a pool kept by the app (an ``async def`` returning it): a route that runs the
  work as a lifecycle job in-process (``lc.run``), and a route using the shared
  ``get_db`` whose worker-scoped pool the lifespan shares through
  ``app.dependency_overrides``. Requests go straight to the ASGI app (no HTTP, no
  client), so the numbers are the frameworks' own cost.
- ``lc.enqueue`` (payload validated at the door) against ``queue.enqueue`` by name,
  both into a ``MemoryQueue``.
- A consumer loop's step: ``Runtime.attempt`` against a hand-written
  ``contextlib.AsyncExitStack`` around the same generator and body, with the same
  try/except a hand-written loop needs to tell success from failure.

Each pair is measured in interleaved rounds; the table shows the median µs per job and
the median of the per-round ratios. Usage::

    pip install -e ".[bench,fastapi]" && python benchmarks/integrations.py [--rounds 15] [--n 2000]
"""

from __future__ import annotations

import argparse
import contextlib
import random
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated, Any

import anyio
from fastapi import Depends, FastAPI

from lifecycle import Runtime, Succeeded, dependency, job
from lifecycle.fastapi import FastAPILifecycle
from lifecycle.queues import MemoryQueue


@dependency(scope="worker")
async def get_pool() -> AsyncIterator[dict[str, int]]:
    yield {"queries": 0}


async def get_db(pool: Annotated[dict[str, int], Depends(get_pool)]) -> AsyncIterator[dict[str, int]]:
    session = {"open": 1}
    try:
        yield session
    finally:
        pool["queries"] += session["open"]


async def work(user_id: int, db: dict[str, int]) -> int:
    return user_id + db["open"]


@job(name="greet")
async def greet(user_id: int, db: Annotated[dict[str, int], Depends(get_db)]) -> int:
    return await work(user_id, db)


POOL = {"queries": 0}


async def native_pool() -> dict[str, int]:
    """Plain FastAPI's way to share a pool: the app keeps it, a dependency returns it."""
    return POOL


async def native_db(pool: Annotated[dict[str, int], Depends(native_pool)]) -> AsyncIterator[dict[str, int]]:
    session = {"open": 1}
    try:
        yield session
    finally:
        pool["queries"] += session["open"]


def build_native_app() -> FastAPI:
    """Plain FastAPI, no lifecycle: the baseline. A separate app, because FastAPI takes
    a slower path for every route of an app with any ``dependency_overrides`` (it
    rebuilds each sub-dependency's ``Dependant`` per request), and the lifespan's
    sharing installs such overrides."""
    app = FastAPI()

    @app.get("/native")
    async def native(db: Annotated[dict[str, int], Depends(native_db)]) -> int:
        return await work(3, db)

    return app


def build_app(lc: FastAPILifecycle) -> FastAPI:
    app = FastAPI(lifespan=lc.lifespan)

    @app.get("/shared")
    async def shared(db: Annotated[dict[str, int], Depends(get_db)]) -> int:
        return await work(3, db)

    @app.get("/job")
    async def as_job() -> int:
        return await lc.run(greet, user_id=3)

    return app


def asgi_get(app: FastAPI, path: str) -> Callable[[], Awaitable[None]]:
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [],
        "server": ("bench", 80),
        "client": ("127.0.0.1", 1),
    }

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def call() -> None:
        status: list[int] = []

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])

        await app(dict(scope), receive, send)
        assert status == [200], status

    return call


async def timed(op: Callable[[], Awaitable[Any]], n: int) -> float:
    started = time.perf_counter()
    for _ in range(n):
        await op()
    return (time.perf_counter() - started) / n * 1e6


async def compare(
    pairs: dict[str, tuple[Callable[[], Awaitable[Any]], Callable[[], Awaitable[Any]]]], rounds: int, n: int
) -> list[tuple[str, float, float, float]]:
    for plain, ours in pairs.values():  # warm up: plans compiled, pool created
        for _ in range(50):
            await plain()
            await ours()
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in pairs}
    for _ in range(rounds):
        names = list(pairs)
        random.shuffle(names)
        for name in names:
            plain, ours = pairs[name]
            first_plain = random.random() < 0.5
            a = await timed(plain if first_plain else ours, n)
            b = await timed(ours if first_plain else plain, n)
            samples[name].append((a, b) if first_plain else (b, a))
    rows = []
    for name, pairs_ in samples.items():
        plain_us = statistics.median(p for p, _ in pairs_)
        ours_us = statistics.median(o for _, o in pairs_)
        ratio = statistics.median(o / p for p, o in pairs_)
        rows.append((name, plain_us, ours_us, ratio))
    return rows


async def main(rounds: int, n: int) -> list[tuple[str, float, float, float]]:
    queue = MemoryQueue()
    lc = FastAPILifecycle(queue=queue)
    app = build_app(lc)
    native = build_native_app()
    payload = {"user_id": 3}
    async with lc.lifespan(app), Runtime() as rt, contextlib.AsyncExitStack() as pool_stack:
        pool = await pool_stack.enter_async_context(contextlib.asynccontextmanager(get_pool)())
        db_cm = contextlib.asynccontextmanager(get_db)

        async def plain_step() -> Any:
            try:
                async with db_cm(pool) as db:
                    result = await work(**payload, db=db)
            except Exception as exc:  # what a hand-written loop must do too
                return ("failed", exc)
            return ("succeeded", result)

        async def attempt_step() -> Any:
            outcome = await rt.attempt(greet, payload, attempt=1)
            assert isinstance(outcome, Succeeded)
            return outcome

        async def plain_enqueue() -> Any:
            return await queue.enqueue("greet", payload)

        async def lc_enqueue() -> Any:
            return await lc.enqueue(greet, payload)

        pairs = {
            "FastAPI route running it as an in-process job (lc.run)": (
                asgi_get(native, "/native"),
                asgi_get(app, "/job"),
            ),
            "FastAPI route, get_db with the pool shared by the lifespan": (
                asgi_get(native, "/native"),
                asgi_get(app, "/shared"),
            ),
            "enqueue: lc.enqueue (validated) vs queue.enqueue by name": (plain_enqueue, lc_enqueue),
            "consumer step: rt.attempt vs AsyncExitStack + try/except": (plain_step, attempt_step),
        }
        return await compare(pairs, rounds, n)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="lifecycle's integration cost per job, one run")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--n", type=int, default=2000, help="jobs per pair per round")
    args = parser.parse_args()
    for backend in ("asyncio", "trio"):
        rows = anyio.run(main, args.rounds, args.n, backend=backend)
        print(f"\n{backend}: median µs per job over {args.rounds} rounds of {args.n}")
        print("| integration | plain µs | lifecycle µs | added µs | ratio |")
        print("|---|---:|---:|---:|---:|")
        for name, plain_us, ours_us, ratio in rows:
            print(f"| {name} | {plain_us:.1f} | {ours_us:.1f} | {ours_us - plain_us:+.1f} | {ratio:.2f}x |")
