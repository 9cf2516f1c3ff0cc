"""The code generated for a plan, shown exactly: any change to the generated text shows
up in review here (STYLE, "Generated code"). Two small plans, both runners each: one
with no teardown at all, one with a guarded teardown, a worker-scoped value, the
JobContext, a threaded body taking **kwargs and a dependency named like one of the
generated function's own locals. The jobs also run, on both backends, so the text
shown is code that works."""

from __future__ import annotations

import re
from typing import Annotated, Any

import pytest

from lifecycle import Depends, JobContext, Runtime, dependency, job


@dependency(threaded=False)
def settings() -> dict[str, str]:
    return {"dsn": "memory://"}


async def connect(config: Annotated[dict[str, str], Depends(settings)], user_id: int) -> str:
    return f"{config['dsn']}#{user_id}"


@job
async def plain(user_id: int, conn: Annotated[str, Depends(connect)]) -> str:
    return conn


@dependency(scope="worker")
async def pool() -> Any:
    yield "pool"
    await _checkpoint()


async def _checkpoint() -> None:
    pass


async def session(db: Annotated[str, Depends(pool)]) -> Any:
    yield f"session({db})"
    await _checkpoint()


@dependency(threaded=False)
def log(ctx: JobContext) -> Any:  # named like a local of the generated code
    yield ctx.name


@job(dependencies=[Depends(log)])
def scoped(order: str, tx: Annotated[str, Depends(session)], **extra: Any) -> str:
    return f"{order}:{tx}"


PLAIN = """\
async def run(payload, extras, ctx, host, log):
    # job 'plain' (test_generated_code:plain)
    config = settings()  # test_generated_code:settings
    conn = await connect(config=config, user_id=payload['user_id'])  # test_generated_code:connect
    result = await plain(user_id=payload['user_id'], conn=conn)
    return result
"""

PLAIN_TRACED = """\
async def run(payload, extras, ctx, host, log):
    # job 'plain' (test_generated_code:plain) with a debug event per dependency
    trace = log
    t = perf_counter()
    config = settings()  # test_generated_code:settings
    trace.debug('dependency.setup', dependency='test_generated_code:settings', duration_ms=ms_since(t))
    t = perf_counter()
    conn = await connect(config=config, user_id=payload['user_id'])  # test_generated_code:connect
    trace.debug('dependency.setup', dependency='test_generated_code:connect', duration_ms=ms_since(t))
    result = await plain(user_id=payload['user_id'], conn=conn)
    return result
"""

SCOPED = """\
async def run(payload, extras, ctx, host, log):
    # job 'scoped' (test_generated_code:scoped)
    wv = host._worker_values
    stack = []
    push = stack.append
    with host._scope_class() as guard:
        try:
            log_2_value_gen = log_2(ctx=ctx)  # test_generated_code:log
            try:
                log_2_value = next(log_2_value_gen)
            except StopIteration:
                raise no_yield(log_2_value_provider, job) from None
            push(log_2_value_gen)
            db = wv.get(db_key, MISSING)  # test_generated_code:pool
            if db is MISSING:
                db = await host._worker_value(db_node, log)
            tx_gen = session(db=db)  # test_generated_code:session
            try:
                tx = await tx_gen.__anext__()
            except StopAsyncIteration:
                raise no_yield(tx_provider, job) from None
            push(tx_gen)
            result = await call_body_threaded(scoped, (), {**{'order': payload['order'], 'tx': tx}, **extras} if extras else {'order': payload['order'], 'tx': tx})
        except BaseException as exc:
            guard.shield = True
            armed = False
            wd = host._watchdog
            depth = len(stack)
            if depth > 1:
                if wd is not None:
                    wd.arm(guard)
                    armed = True
                try:
                    await tx_gen.athrow(exc)
                except StopAsyncIteration:
                    await resume_failure(stack, exits, 1, FINISHED, None, exc, job, guard, host, log, armed)
                except BaseException as err:
                    if err is not exc or (armed and wd.fired(guard)):
                        await resume_failure(stack, exits, 1, RAISED, err, exc, job, guard, host, log, armed)
                else:
                    await resume_failure(stack, exits, 1, YIELDED, None, exc, job, guard, host, log, armed)
            if depth > 0:
                try:
                    log_2_value_gen.throw(exc)
                except StopIteration:
                    await resume_failure(stack, exits, 0, FINISHED, None, exc, job, guard, host, log, armed)
                except BaseException as err:
                    if err is not exc:
                        await resume_failure(stack, exits, 0, RAISED, err, exc, job, guard, host, log, armed)
                else:
                    await resume_failure(stack, exits, 0, YIELDED, None, exc, job, guard, host, log, armed)
            if armed:
                wd.disarm(guard)
            raise
        guard.shield = True
        armed = False
        wd = host._watchdog
        if wd is not None:
            wd.arm(guard)
            armed = True
        try:
            await tx_gen.__anext__()
        except StopAsyncIteration:
            if armed and wd.fired(guard):
                await resume_unwind(stack, exits, 1, FINISHED, None, job, guard, host, log, armed)
                return result
        except BaseException as err:
            await resume_unwind(stack, exits, 1, RAISED, err, job, guard, host, log, armed)
            return result
        else:
            await resume_unwind(stack, exits, 1, YIELDED, None, job, guard, host, log, armed)
            return result
        try:
            next(log_2_value_gen)
        except StopIteration:
            pass
        except BaseException as err:
            await resume_unwind(stack, exits, 0, RAISED, err, job, guard, host, log, armed)
            return result
        else:
            await resume_unwind(stack, exits, 0, YIELDED, None, job, guard, host, log, armed)
            return result
        if armed:
            wd.disarm(guard)
        return result
    raise AssertionError("unreachable: the guard scope swallowed an exception")
"""

SCOPED_TRACED = """\
async def run(payload, extras, ctx, host, log):
    # job 'scoped' (test_generated_code:scoped) with a debug event per dependency
    trace = log
    wv = host._worker_values
    stack = []
    push = stack.append
    with host._scope_class() as guard:
        try:
            t = perf_counter()
            log_2_value_gen = log_2(ctx=ctx)  # test_generated_code:log
            try:
                log_2_value = next(log_2_value_gen)
            except StopIteration:
                raise no_yield(log_2_value_provider, job) from None
            push(log_2_value_gen)
            trace.debug('dependency.setup', dependency='test_generated_code:log', duration_ms=ms_since(t))
            db = wv.get(db_key, MISSING)  # test_generated_code:pool
            if db is MISSING:
                db = await host._worker_value(db_node, log)
            t = perf_counter()
            tx_gen = session(db=db)  # test_generated_code:session
            try:
                tx = await tx_gen.__anext__()
            except StopAsyncIteration:
                raise no_yield(tx_provider, job) from None
            push(tx_gen)
            trace.debug('dependency.setup', dependency='test_generated_code:session', duration_ms=ms_since(t))
            result = await call_body_threaded(scoped, (), {**{'order': payload['order'], 'tx': tx}, **extras} if extras else {'order': payload['order'], 'tx': tx})
        except BaseException as exc:
            guard.shield = True
            await unwind(stack, exits, exc, job, guard, host, log, trace)
            raise  # unwind() re-raises; this line is not reached
        guard.shield = True
        await unwind(stack, exits, None, job, guard, host, log, trace)
        return result
    raise AssertionError("unreachable: the guard scope swallowed an exception")
"""


@pytest.mark.parametrize(
    ("which", "traced", "expected"),
    [
        (plain, False, PLAIN),
        (plain, True, PLAIN_TRACED),
        (scoped, False, SCOPED),
        (scoped, True, SCOPED_TRACED),
    ],
    ids=["plain", "plain-traced", "scoped", "scoped-traced"],
)
def test_generated_source_is_exactly_this(which: Any, traced: bool, expected: str) -> None:
    runners = which.runners
    assert (runners.traced_source if traced else runners.source) == expected
    assert which.source == runners.source


def test_names_never_clash_with_the_generated_functions_own() -> None:
    # ``log`` is also the runner's logger parameter: the dependency gets another name.
    assert "= log_2(ctx=ctx)" in SCOPED
    assert not re.search(r"^\s*log\s*=", SCOPED, re.MULTILINE)  # the runner's log is never rebound
    assert "host._worker_value(db_node, log)" in SCOPED


async def test_the_jobs_shown_run(anyio_backend: str) -> None:
    async with Runtime() as rt:
        assert await rt.run(plain, 7) == "memory://#7"
        assert await rt.run(scoped, "o1") == "o1:session(pool)"
        assert await rt.run(scoped, "o2", note="extra") == "o2:session(pool)"
