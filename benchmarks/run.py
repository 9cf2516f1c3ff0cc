"""Per-job overhead of lifecycle against a hand-written AsyncExitStack floor and the peer
libraries, all in one process run.

    pip install -e ".[bench]" && python benchmarks/run.py            # full run
    python benchmarks/run.py --quick                                  # a smoke run
    python benchmarks/run.py --output benchmarks/RESULTS.md           # write the report

Every library is first checked on the tree (teardown exactly reverses setup, config ran
once, the job's result is right); a library that fails is reported, never timed.
Rounds interleave the libraries in a shuffled order; the figure is the median over
rounds of the mean µs per job within a round."""

from __future__ import annotations

import argparse
import functools
import gc
import importlib.metadata
import logging
import platform
import random
import statistics
import sys
import time
import tracemalloc
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import date
from pathlib import Path
from typing import Any

import anyio
import structlog

sys.path.insert(0, str(Path(__file__).parent))

import trees
from trees import EVENTS

import lifecycle

JobFn = Callable[[], Awaitable[Any]]
Candidate = tuple[str, Callable[[], Any]]  # name, async factory returning (job, close)


# -- candidates ---------------------------------------------------------------------------


def lifecycle_candidate(threaded: bool, worker_pool: bool = False) -> Any:
    async def make() -> tuple[JobFn, Any]:
        inline = (lambda f: f) if threaded else lifecycle.dependency(threaded=False)
        handle = trees.make_tree(lifecycle.Depends, inline)
        if worker_pool:
            lifecycle.dependency(scope="worker")(handle.providers["pool"])
        job = lifecycle.job(handle)
        rt = lifecycle.Runtime()
        await rt.__aenter__()
        return (lambda: rt.run(job, 1)), (lambda: rt.__aexit__(None, None, None))

    return make


def floor_candidate(worker_pool: bool = False) -> Any:
    async def make() -> tuple[JobFn, Any]:
        if worker_pool:
            stack = AsyncExitStack()
            pool = await stack.enter_async_context(trees._pool())
            return (lambda: trees.floor_job(1, pool)), stack.aclose
        return (lambda: trees.floor_job(1)), None

    return make


def threaded_floor_candidate() -> Any:
    async def make() -> tuple[JobFn, Any]:
        return (lambda: trees.floor_job_threaded(1)), None

    return make


def fast_depends_candidate() -> Any:
    async def make() -> tuple[JobFn, Any]:
        from fast_depends import Depends, inject

        handle = inject(trees.make_tree(Depends), cast=False, cast_result=False)
        return (lambda: handle(user_id=1)), None

    return make


def taskiq_candidate() -> Any:
    async def make() -> tuple[JobFn, Any]:
        from taskiq_dependencies import DependencyGraph, Depends

        handle = trees.make_tree(Depends)
        graph = DependencyGraph(handle)

        async def job() -> Any:
            async with graph.async_ctx() as ctx:
                kwargs = await ctx.resolve_kwargs()
                return await handle(user_id=1, **kwargs)

        return job, None

    return make


def dishka_candidate(worker_pool: bool = False) -> Any:
    async def make() -> tuple[JobFn, Any]:
        from dishka import make_async_container

        container = make_async_container(trees.make_dishka_provider("worker" if worker_pool else "job"))
        return (lambda: trees.dishka_job(container, 1)), container.close

    return make


def fastapi_candidate() -> Any:
    async def make() -> tuple[JobFn, Any]:
        from fastapi import Depends
        from fastapi.dependencies.utils import get_dependant, solve_dependencies
        from starlette.requests import Request

        handle = trees.make_tree(Depends)
        dependant = get_dependant(path="/", call=handle)

        async def job() -> Any:
            scope = {"type": "http", "method": "GET", "path": "/", "query_string": b"user_id=1", "headers": []}
            async with AsyncExitStack() as stack:
                scope["fastapi_astack"] = stack
                scope["fastapi_inner_astack"] = stack
                scope["fastapi_function_astack"] = stack
                solved = await solve_dependencies(
                    request=Request(scope), dependant=dependant, async_exit_stack=stack, embed_body_fields=False
                )
                if solved.errors:
                    raise RuntimeError(f"FastAPI could not solve: {solved.errors}")
                return await handle(**solved.values)

        return job, None

    return make


def candidates(worker_pool: bool) -> list[Candidate]:
    if worker_pool:
        return [
            ("hand-written AsyncExitStack (floor)", floor_candidate(True)),
            ("lifecycle (sync inline)", lifecycle_candidate(False, True)),
            ("lifecycle (sync threaded, default)", lifecycle_candidate(True, True)),
            ("dishka (pool in APP scope)", dishka_candidate(True)),
        ]
    return [
        ("hand-written AsyncExitStack (floor)", floor_candidate()),
        ("lifecycle (sync inline)", lifecycle_candidate(False)),
        ("lifecycle (sync threaded, default)", lifecycle_candidate(True)),
        ("hand-written, sync steps in threads (fewest hops)", threaded_floor_candidate()),
        ("FastDepends (cast=False)", fast_depends_candidate()),
        ("taskiq-dependencies", taskiq_candidate()),
        ("dishka", dishka_candidate()),
        ("FastAPI solve_dependencies (sync in threadpool)", fastapi_candidate()),
    ]


# -- checking and timing ------------------------------------------------------------------


async def check(job: JobFn, worker_pool: bool) -> str | None:
    """None when the library ran the tree correctly, else what went wrong."""
    EVENTS.clear()
    try:
        result = await job()
    except Exception as exc:
        return f"raised {type(exc).__name__}: {exc}"
    # With a worker-scoped pool, its one setup may land in this first job; it is not
    # torn down per job, so it takes no part in the order check.
    setups = [e[1:] for e in EVENTS if e.startswith("+") and not (worker_pool and e == "+pool")]
    teardowns = [e[1:].removesuffix("(commit)").removesuffix("(rollback)") for e in EVENTS if e.startswith("-")]
    expected = ["conn", "tx", "cache", "sync_gen"] if worker_pool else ["pool", "conn", "tx", "cache", "sync_gen"]
    problems = []
    if result != 1:
        problems.append(f"result {result!r}")
    if EVENTS.count("config") != 1:
        problems.append(f"config ran {EVENTS.count('config')} times")
    if sorted(setups) != sorted(expected):
        problems.append(f"set up {setups}")
    if teardowns != list(reversed(setups)):
        problems.append(f"teardown {teardowns} is not the reverse of setup {setups}")
    return "; ".join(problems) or None


async def measure(
    entries: list[Candidate], backend: str, rounds: int, jobs: int, worker_pool: bool = False
) -> list[dict[str, Any]]:
    report: list[dict[str, Any]] = []
    async with AsyncExitStack() as closers:  # runtimes own task groups: close in reverse
        ready: list[tuple[str, JobFn]] = []
        for name, make in entries:
            try:
                job, close = await make()
                if close is not None:
                    closers.push_async_callback(close)
                problem = await check(job, worker_pool)
            except Exception as exc:
                problem = f"could not start: {type(exc).__name__}: {exc}"
            if problem:
                report.append({"name": name, "error": problem})
            else:
                ready.append((name, job))
        samples: dict[str, list[float]] = {name: [] for name, _ in ready}
        for _ in range(rounds):
            order = ready[:]
            random.shuffle(order)
            for name, job in order:
                gc.collect()
                started = time.perf_counter()
                for _ in range(jobs):
                    await job()
                samples[name].append((time.perf_counter() - started) / jobs * 1e6)
                EVENTS.clear()
    report += [{"name": name, "us": statistics.median(samples[name])} for name, _ in ready]
    floor = next((name for name, _ in ready if "floor" in name), None)
    for row in report:
        if "us" in row and floor is not None:
            row["ratio"] = paired_ratio(samples[row["name"]], samples[floor])
    return sorted(report, key=lambda row: row.get("us", float("inf")))


def paired_ratio(samples: list[float], floor: list[float]) -> float:
    """Median over rounds of (library / floor) within the same round: on a shared
    machine whose speed drifts between rounds, this is steadier than a ratio of medians."""
    return statistics.median(value / base for value, base in zip(samples, floor, strict=True))


# -- the failure path and the one-dependency job ---------------------------------------------


class Failed(Exception):
    """What the failing job's body raises."""


async def _failing_floor() -> int:
    async with AsyncExitStack() as stack:
        cfg = trees._config()
        p = await stack.enter_async_context(trees._pool())
        c = await stack.enter_async_context(trees._conn(p))
        t = await stack.enter_async_context(trees._tx(c))
        ca = await stack.enter_async_context(trees._cache(cfg))
        ck = await trees._clock()
        s = stack.enter_context(trees._sync_gen())
        await trees._handle(1, (t, ca), "logger", ck, s)
        raise Failed


def failing_candidates() -> list[Candidate]:
    """The mixed tree whose body raises after its dependencies are set up: every
    generator gets the exception thrown in at its ``yield`` and re-raises it. lifecycle
    runs it with ``run_attempt`` (one attempt, as a queue worker does: ``run`` adds the
    retry decision and the ``job.failed`` event with its traceback, which is logging
    cost, not the engine's)."""

    async def floor() -> tuple[JobFn, Any]:
        return _failing_floor, None

    def lifecycle_failing(threaded: bool) -> Any:
        async def make() -> tuple[JobFn, Any]:
            import inspect

            inline = (lambda f: f) if threaded else lifecycle.dependency(threaded=False)
            handle = trees.make_tree(lifecycle.Depends, inline)

            async def body(**arguments: Any) -> int:
                raise Failed

            body.__signature__ = inspect.signature(handle)  # type: ignore[attr-defined]
            job = lifecycle.job(name="failing")(body)
            rt = lifecycle.Runtime()
            await rt.__aenter__()
            return (lambda: rt.run_attempt(job, {"user_id": 1})), (lambda: rt.__aexit__(None, None, None))

        return make

    async def dishka() -> tuple[JobFn, Any]:
        from dishka import make_async_container

        container = make_async_container(trees.make_dishka_provider("job"))

        async def job() -> int:
            async with container() as request:
                await trees._handle(
                    1,
                    await request.get(trees.Repo),
                    await request.get(trees.Logger),
                    await request.get(trees.Clock),
                    await request.get(trees.SyncGen),
                )
                raise Failed

        return job, container.close

    return [
        ("hand-written AsyncExitStack (floor)", floor),
        ("lifecycle (sync inline)", lifecycle_failing(False)),
        ("lifecycle (sync threaded, default)", lifecycle_failing(True)),
        ("dishka", dishka),
    ]


async def measure_failing(backend: str, rounds: int, jobs: int) -> list[dict[str, Any]]:
    """Like ``measure``, for jobs that must raise ``Failed`` (checked before timing)."""

    async def expect_failure(job: JobFn) -> Any:
        try:
            await job()
        except Failed:
            return 1
        raise AssertionError("the failing job did not raise Failed")

    async def wrapped(make: Any) -> tuple[JobFn, Any]:
        job, close = await make()
        return (lambda: expect_failure(job)), close

    entries: list[Candidate] = [(name, functools.partial(wrapped, make)) for name, make in failing_candidates()]
    return await measure(entries, backend, rounds, jobs)


async def measure_one_dependency(rounds: int, jobs: int) -> list[dict[str, Any]]:
    """A job with exactly one dependency, against the same by hand: an async
    generator awaiting in its teardown, an async function, and a sync function
    (lifecycle: inline and, the default, threaded). The fixed per-job cost shows here."""

    async def agen() -> Any:
        yield 1
        await _release()

    async def afunc() -> int:
        return 1

    def sfunc() -> int:
        return 1

    managed = asynccontextmanager(agen)

    async def floor_agen() -> int:
        async with AsyncExitStack() as stack:
            return int(await stack.enter_async_context(managed()))

    async def floor_agen_guarded() -> int:
        # What README "Semantics" rule 6 asks of lifecycle, by hand: one cancel scope
        # around the job, shielding its teardown (lifecycle also bounds it).
        with anyio.CancelScope() as guard:
            async with AsyncExitStack() as stack:
                value = int(await stack.enter_async_context(managed()))
                guard.shield = True
        return value

    async def floor_afunc() -> int:
        return await afunc()

    async def floor_sfunc() -> int:
        return sfunc()

    async def floor_threaded() -> int:
        return int(await anyio.to_thread.run_sync(sfunc))

    shapes = [
        ("async generator (awaits in teardown)", agen, floor_agen),
        ("the same; floor: its teardown shielded by hand (one cancel scope)", agen, floor_agen_guarded),
        ("async function", afunc, floor_afunc),
        ("sync function, threaded=False", lifecycle.dependency(threaded=False)(lambda: sfunc()), floor_sfunc),
        ("sync function, threaded (default; floor: one to_thread.run_sync)", lambda: sfunc(), floor_threaded),
    ]
    rows = []
    for label, provider, by_hand in shapes:

        async def body(x: int = lifecycle.Depends(provider)) -> int:
            return x

        handle = lifecycle.job(name="one")(body)

        async def make_lc(handle: Any = handle) -> tuple[JobFn, Any]:
            rt = lifecycle.Runtime()
            await rt.__aenter__()
            return (lambda: rt.run(handle)), (lambda: rt.__aexit__(None, None, None))

        async def make_floor(by_hand: Any = by_hand) -> tuple[JobFn, Any]:
            return by_hand, None

        results = await _time_plain([("floor", make_floor), ("lifecycle", make_lc)], rounds, jobs)
        rows.append({"shape": label, **results})
    return rows


# -- scaling: width and depth -------------------------------------------------------------


def generated(depends: Callable[..., Any], shape: str, size: int) -> Callable[..., Any]:
    """A tree of ``size`` async generators: side by side (width) or chained (depth);
    each awaits in its teardown."""
    lines = []
    for i in range(size):
        arg = f"x=depends(n{i - 1})" if shape == "depth" and i else ""
        lines.append(f"async def n{i}({arg}):\n    yield {i}\n    await release()\n")
    if shape == "width":
        params = ", ".join(f"a{i}=depends(n{i})" for i in range(size))
    else:
        params = f"a=depends(n{size - 1})"
    lines.append(f"async def handle({params}):\n    return 1\n")
    namespace: dict[str, Any] = {"depends": depends, "release": _release}
    exec("\n".join(lines), namespace)
    return namespace["handle"]  # type: ignore[no-any-return]


async def _release() -> None:
    """Each generated generator awaits this in its teardown, as a real resource would
    (it returns at once; the await is what makes lifecycle guard the teardown)."""


def generated_floor(shape: str, size: int) -> JobFn:
    async def node(x: int = 0) -> Any:
        yield x
        await _release()

    managers = asynccontextmanager(node)

    async def job() -> int:
        async with AsyncExitStack() as stack:
            value = 0
            for _ in range(size):
                got = await stack.enter_async_context(managers(value if shape == "depth" else 0))
                value = got
            return 1

    return job


async def measure_scaling(backend: str, rounds: int, jobs: int) -> list[dict[str, Any]]:
    rows = []
    for shape, sizes in (("width", (1, 10, 100)), ("depth", (1, 10, 50))):
        for size in sizes:
            per_job = max(jobs // max(size // 4, 1), 20)
            handle = lifecycle.job(generated(lifecycle.Depends, shape, size))

            async def make_lc(handle: Any = handle) -> tuple[JobFn, Any]:
                rt = lifecycle.Runtime()
                await rt.__aenter__()
                return (lambda: rt.run(handle)), (lambda: rt.__aexit__(None, None, None))

            async def make_floor(shape: str = shape, size: int = size) -> tuple[JobFn, Any]:
                return generated_floor(shape, size), None

            entries: list[Candidate] = [("floor", make_floor), ("lifecycle", make_lc)]
            results = await _time_plain(entries, rounds, per_job)
            rows.append({"shape": shape, "size": size, **results})
    return rows


async def _time_plain(entries: list[Candidate], rounds: int, jobs: int) -> dict[str, float]:
    async with AsyncExitStack() as closers:
        made = []
        for name, make in entries:
            job, close = await make()
            if close is not None:
                closers.push_async_callback(close)
            made.append((name, job))
        samples: dict[str, list[float]] = {name: [] for name, _ in made}
        for _ in range(rounds):
            for name, job in made:
                started = time.perf_counter()
                for _ in range(jobs):
                    await job()
                samples[name].append((time.perf_counter() - started) / jobs * 1e6)
    medians = {name: statistics.median(values) for name, values in samples.items()}
    medians["ratio"] = paired_ratio(samples["lifecycle"], samples["floor"])
    return medians


# -- memory per in-flight job ---------------------------------------------------------------


async def memory_per_job(count: int) -> dict[str, float]:
    """Bytes held per job while ``count`` jobs wait inside their body at once."""
    return {name: await _memory_for(name, count) for name in ("floor", "lifecycle")}


async def _memory_for(name: str, count: int) -> float:
    release = anyio.Event()
    all_in = anyio.Event()
    arrived = 0

    async def wait_in_body() -> None:
        nonlocal arrived
        arrived += 1
        if arrived == count:
            all_in.set()
        await release.wait()

    handle = trees.make_tree(lifecycle.Depends, lifecycle.dependency(threaded=False))

    async def body(user_id: int, r: Any = lifecycle.Depends(handle), **_: Any) -> int:
        await wait_in_body()
        return user_id

    job = lifecycle.job(body)

    async def floor_one() -> None:
        async with AsyncExitStack() as stack:
            cfg = trees._config()
            p = await stack.enter_async_context(trees._pool())
            c = await stack.enter_async_context(trees._conn(p))
            await stack.enter_async_context(trees._tx(c))
            await stack.enter_async_context(trees._cache(cfg))
            stack.enter_context(trees._sync_gen())
            await wait_in_body()

    async with lifecycle.Runtime() as rt:

        async def lifecycle_one() -> None:
            await rt.run(job, 1)

        one = floor_one if name == "floor" else lifecycle_one
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        async with anyio.create_task_group() as tg:
            for _ in range(count):
                tg.start_soon(one)
            await all_in.wait()
            during = tracemalloc.get_traced_memory()[0]
            release.set()
        tracemalloc.stop()
    EVENTS.clear()
    return (during - before) / count


# -- worker throughput ---------------------------------------------------------------------


async def throughput(queue: Any, concurrency: int, messages: int, tree: bool = False) -> float:
    """Jobs per second through a Worker, enqueueing excluded: no-op jobs, or (``tree``)
    the mixed tree's job with inline sync dependencies."""
    if tree:
        job = lifecycle.job(name="work")(trees.make_tree(lifecycle.Depends, lifecycle.dependency(threaded=False)))
    else:

        @lifecycle.job(name="work")
        async def job(user_id: int) -> None:
            return None

    for i in range(messages):
        await queue.enqueue("work", {"user_id": i})
    worker = lifecycle.Worker(queue, [job], concurrency=concurrency, poll_interval=0.05)
    started = time.perf_counter()
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker.run)
        while worker.stats["succeeded"] < messages:
            await anyio.sleep(0.001)
        elapsed = time.perf_counter() - started
        worker.stop()
    EVENTS.clear()
    return messages / elapsed


async def throughput_rows(backend: str, messages: int) -> list[str]:
    from lifecycle.queues import MemoryQueue

    rows = []
    for tree in (False, True):
        for concurrency in (1, 16, 256):
            rate = await throughput(MemoryQueue(), concurrency, messages, tree)
            rows.append(f"| MemoryQueue | {'mixed tree' if tree else 'no-op'} | {concurrency} | {rate:,.0f} |")
    if backend == "asyncio":
        try:
            from redis.asyncio import Redis

            from lifecycle.queues import RedisStreamQueue

            url = "redis://127.0.0.1:6379/0"
            probe = Redis.from_url(url)
            await probe.ping()
            await probe.aclose()
        except Exception as exc:
            rows.append(f"| RedisStreamQueue | no-op | - | not measured: {type(exc).__name__}: {exc} |")
            return rows
        for concurrency in (1, 16, 256):
            stream = f"lifecycle-bench-{time.time_ns()}"
            queue = RedisStreamQueue(url, stream=stream, group="bench")
            try:
                rate = await throughput(queue, concurrency, messages)
            finally:
                await queue.close()
                cleanup = Redis.from_url(url)
                await cleanup.delete(stream, f"{stream}:dead", f"{stream}:delayed")
                await cleanup.aclose()
            rows.append(f"| RedisStreamQueue (local server) | no-op | {concurrency} | {rate:,.0f} |")
    return rows


# -- payload validation ----------------------------------------------------------------------


def payload_job(params: list[tuple[str, Any]]) -> Any:
    """The mixed tree's job (inline sync dependencies) with ``params`` as its payload:
    ``(name, annotation)``; ``inspect.Parameter.empty`` leaves a parameter unannotated,
    which is the same job without validation."""
    import inspect

    handle = trees.make_tree(lifecycle.Depends, lifecycle.dependency(threaded=False))
    dependencies = [p for p in inspect.signature(handle).parameters.values() if p.name != "user_id"]

    async def body(**arguments: Any) -> int:
        return 1

    payload = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=ann) for name, ann in params]
    keyword = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in dependencies]
    body.__signature__ = inspect.Signature([*payload, *keyword])  # type: ignore[attr-defined]
    return lifecycle.job(name="payload")(body)


async def payload_rows(rounds: int, jobs: int) -> list[str]:
    """Per-job cost of validating the payload, as a ratio to the same job and payload
    with the parameters unannotated (no validation), interleaved round by round."""
    import inspect

    from pydantic import BaseModel

    class Item(BaseModel):
        sku: str
        qty: int

    class Order(BaseModel):
        id: int
        items: list[Item]

    empty = inspect.Parameter.empty
    order = {"id": 7, "items": [{"sku": f"sku-{i}", "qty": i} for i in range(3)]}
    cases = [
        ("3 fields (int, str, float), no conversion needed", [("user_id", int), ("name", str), ("score", float)],
         {"user_id": 1, "name": "ada", "score": 0.5}),
        ("3 fields, every value converted (str → int, float)", [("user_id", int), ("name", str), ("score", float)],
         {"user_id": "1", "name": "ada", "score": "0.5"}),
        ("nested model (dict → Order with 3 Items)", [("order", Order)], {"order": order}),
    ]  # fmt: skip
    rows = []
    async with lifecycle.Runtime() as rt:
        for label, params, payload in cases:
            plain = payload_job([(name, empty) for name, _ in params])
            typed = payload_job(params)
            made = [("plain", plain), ("typed", typed)]
            samples: dict[str, list[float]] = {"plain": [], "typed": []}
            for _ in range(rounds):
                random.shuffle(made)
                for name, job in made:
                    gc.collect()
                    started = time.perf_counter()
                    for _ in range(jobs):
                        await rt.run(job, **payload)
                    samples[name].append((time.perf_counter() - started) / jobs * 1e6)
                    EVENTS.clear()
            ratio = paired_ratio(samples["typed"], samples["plain"])
            plain_us, typed_us = statistics.median(samples["plain"]), statistics.median(samples["typed"])
            rows.append(f"| {label} | {plain_us:.1f} | {typed_us:.1f} | {typed_us - plain_us:+.1f} | {ratio:.2f} |")
    return rows


# -- report ---------------------------------------------------------------------------------


def versions() -> str:
    names = ["lifecycle", "anyio", "trio", "structlog", "pydantic", "fast-depends", "taskiq-dependencies", "dishka", "fastapi"]
    found = []
    for name in names:
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            found.append(f"{name} (not installed)")
    return ", ".join(found)


def table(rows: list[dict[str, Any]]) -> list[str]:
    out = ["| library | µs/job (median) | × floor (median of per-round ratios) |", "|---|---:|---:|"]
    for row in rows:
        if "error" in row:
            out.append(f"| {row['name']} | not timed: {row['error']} | |")
        else:
            out.append(f"| {row['name']} | {row['us']:.1f} | {row.get('ratio', float('nan')):.2f} |")
    return out


async def main_async(args: argparse.Namespace, backend: str, lines: list[str]) -> None:
    lines.append(f"### Mixed tree, {backend}")
    lines.append("")
    lines += table(await measure(candidates(False), backend, args.rounds, args.jobs))
    lines.append("")
    lines.append(f"### Mixed tree with `pool` worker-scoped, {backend}")
    lines.append("")
    lines += table(await measure(candidates(True), backend, args.rounds, args.jobs, worker_pool=True))
    lines.append("")
    lines.append(f"### Failing job: the mixed tree whose body raises, {backend}")
    lines.append("")
    lines += table(await measure_failing(backend, args.rounds, args.jobs))
    lines.append("")
    lines.append(f"### One-dependency job, {backend}")
    lines.append("")
    lines.append("| the one dependency | floor µs/job | lifecycle µs/job | × floor |")
    lines.append("|---|---:|---:|---:|")
    for row in await measure_one_dependency(args.rounds, args.jobs):
        lines.append(f"| {row['shape']} | {row['floor']:.1f} | {row['lifecycle']:.1f} | {row['ratio']:.2f} |")
    lines.append("")
    lines.append(f"### Scaling with tree shape (async generators awaiting in teardown), {backend}")
    lines.append("")
    lines.append("| shape | size | floor µs/job | lifecycle µs/job | × floor |")
    lines.append("|---|---:|---:|---:|---:|")
    for row in await measure_scaling(backend, args.rounds, args.jobs):
        lines.append(
            f"| {row['shape']} | {row['size']} | {row['floor']:.1f} | {row['lifecycle']:.1f} | {row['ratio']:.2f} |"
        )
    lines.append("")
    lines.append(f"### Worker throughput ({args.messages} messages), {backend}")
    lines.append("")
    lines.append("| queue | job | concurrency | jobs/s |")
    lines.append("|---|---|---:|---:|")
    lines += await throughput_rows(backend, args.messages)
    lines.append("")
    lines.append(f"### Payload validation on the mixed tree (sync inline), {backend}")
    lines.append("")
    lines.append("| payload | unvalidated µs/job | validated µs/job | difference µs | × unvalidated |")
    lines.append("|---|---:|---:|---:|---:|")
    lines += await payload_rows(args.rounds, args.jobs)
    lines.append("")
    if backend == "asyncio":
        memory = await memory_per_job(args.memory_jobs)
        lines.append(f"### Memory per in-flight job ({args.memory_jobs} jobs waiting in their body, {backend})")
        lines.append("")
        lines.append("| | bytes/job |")
        lines.append("|---|---:|")
        for name, value in memory.items():
            lines.append(f"| {name} | {value:,.0f} |")
        lines.append("")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few rounds, for a smoke run")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--jobs", type=int, default=2000, help="jobs per round and library")
    parser.add_argument("--memory-jobs", type=int, default=2000)
    parser.add_argument("--messages", type=int, default=5000, help="messages per throughput measurement")
    parser.add_argument("--backend", choices=["asyncio", "trio", "both"], default="both")
    parser.add_argument("--output", type=Path, help="write the markdown report here")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.jobs, args.memory_jobs, args.messages = 3, 200, 200, 300
    # Logging would dominate the numbers; the peers log nothing either.
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING), cache_logger_on_first_use=True
    )
    lines = [
        "# Benchmark results",
        "",
        f"Produced by `python benchmarks/run.py` on {date.today().isoformat()}: {platform.python_implementation()} "
        f"{platform.python_version()}, {platform.machine()}, {platform.system()} "
        f"({len(__import__('os').sched_getaffinity(0))} cores). Rounds: {args.rounds} × {args.jobs} jobs per library.",
        "",
        f"Versions: {versions()}.",
        "",
    ]
    backends = ["asyncio", "trio"] if args.backend == "both" else [args.backend]
    for backend in backends:
        anyio.run(main_async, args, backend, lines, backend=backend)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.output:
        args.output.write_text(text)


if __name__ == "__main__":
    main()
