"""Turning a plan into one generated Python function per job.

A plan is fixed once compiled, so instead of interpreting its steps per job (a loop
that looks up each step's kind and builds argument lists), the runtime runs a function
written for that plan: each dependency is a local variable, each call is spelled out
with its arguments, and generators are started inline. This is the job's hot path; the
teardown loop it hands over to is ``_engine.unwind``.

The source is kept in ``linecache`` so tracebacks through it show the generated line."""

from __future__ import annotations

import itertools
import linecache
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from . import _engine
from ._analysis import Kind, Provider
from ._plan import CONST, CONTEXT, PAYLOAD, SLOT, Arguments, Step

Runner = Callable[[dict[str, Any], "dict[str, Any] | None", Any, Any, Any], Awaitable[Any]]

_serial = itertools.count(1)


class _Writer:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self.depth = 1
        self.namespace: dict[str, Any] = {
            "unwind": _engine.unwind,
            "no_yield": _engine.no_yield_error,
            "setup_threaded": _engine.setup_threaded,
            "call_body_threaded": _engine.call_body_threaded,
            "start_threaded_generator": _engine.start_threaded_generator,
            "resume_unwind": _engine.resume_unwind,
            "RAISED": _engine.RAISED,
            "YIELDED": _engine.YIELDED,
            "FINISHED": _engine.FINISHED,
            "perf_counter": time.perf_counter,
            "monotonic": time.monotonic,
            "ms_since": _engine._ms_since,
            "MISSING": _engine._MISSING,
        }
        self._constants = 0

    def line(self, text: str) -> None:
        self.lines.append("    " * self.depth + text)

    def bind(self, name: str, value: Any) -> str:
        self.namespace[name] = value
        return name

    def constant(self, value: Any) -> str:
        self._constants += 1
        return self.bind(f"x{self._constants}", value)

    def source(self, tag: int, ref: Any) -> str:
        if tag == SLOT:
            return f"v{ref}"
        if tag == PAYLOAD:
            return f"payload[{ref!r}]"
        if tag == CONTEXT:
            return "ctx"
        assert tag == CONST
        return self.constant(ref)

    def call_args(self, arguments: Arguments) -> str:
        # Parameter names are identifiers (inspect.Parameter enforces it, even through
        # __signature__), so they can be spelled as keywords.
        parts = [self.source(tag, ref) for tag, ref in arguments.positional]
        parts += [f"{name}={self.source(tag, ref)}" for name, (tag, ref) in arguments.keyword]
        return ", ".join(parts)

    def packed_args(self, arguments: Arguments) -> tuple[str, str]:
        """``(args tuple, kwargs dict)`` expressions, for calls made through a helper."""
        positional = "".join(self.source(tag, ref) + ", " for tag, ref in arguments.positional)
        keyword = ", ".join(f"{name!r}: {self.source(tag, ref)}" for name, (tag, ref) in arguments.keyword)
        return f"({positional})", f"{{{keyword}}}"


def _setup(w: _Writer, step: Step, traced: bool) -> None:
    slot = step.slot
    provider = step.provider
    v = f"v{slot}"
    if step.worker is not None:
        node = w.bind(f"n{slot}", step.worker)
        key = w.bind(f"k{slot}", step.worker.key)
        w.line(f"{v} = wv.get({key}, MISSING)")
        w.line(f"if {v} is MISSING:")
        w.line(f"    {v} = await host.worker_value({node}, log)")
        return
    call = w.bind(f"c{slot}", provider.call)
    w.bind(f"p{slot}", provider)
    if traced:
        w.line("t = perf_counter()")
    kind = provider.kind
    threaded = provider.options.threaded
    if kind == Kind.COROUTINE:
        w.line(f"{v} = await {call}({w.call_args(step.arguments)})")
    elif kind == Kind.FUNCTION and not threaded:
        w.line(f"{v} = {call}({w.call_args(step.arguments)})")
    elif kind == Kind.FUNCTION:
        args, kwargs = w.packed_args(step.arguments)
        w.line(f"{v} = await setup_threaded({call}, {args}, {kwargs})")
    elif kind == Kind.GENERATOR and threaded:
        args, kwargs = w.packed_args(step.arguments)
        w.line(f"{v} = await start_threaded_generator(p{slot}, {args}, {kwargs}, stack, job)")
    else:
        is_async = kind == Kind.ASYNC_GENERATOR
        w.line(f"g{slot} = {call}({w.call_args(step.arguments)})")
        w.line("try:")
        w.line(f"    {v} = await g{slot}.__anext__()" if is_async else f"    {v} = next(g{slot})")
        w.line(f"except {'StopAsyncIteration' if is_async else 'StopIteration'}:")
        w.line(f"    raise no_yield(p{slot}, job) from None")
        w.line(f"push(g{slot})")
    if traced:
        w.line(f'trace.debug("dependency.setup", dependency=p{slot}.label, duration_ms=ms_since(t))')


def _body(w: _Writer, body: Provider, arguments: Arguments) -> None:
    w.bind("body", body.call)
    if body.kind == Kind.FUNCTION and body.options.threaded:
        args, kwargs = w.packed_args(arguments)
        w.line(f"result = await call_body_threaded(body, {args}, {{**{kwargs}, **extras}} if extras else {kwargs})")
        return
    call = "await body" if body.kind == Kind.COROUTINE else "body"
    w.line("if extras:")
    positional = "".join(w.source(tag, ref) + ", " for tag, ref in arguments.positional)
    _, kwargs = w.packed_args(arguments)
    w.line(f"    result = {call}({positional}**{{**{kwargs}, **extras}})")
    w.line("else:")
    w.line(f"    result = {call}({w.call_args(arguments)})")


def _clean_teardown(w: _Writer, steps: Sequence[Step], modes: list[int], guard: str) -> None:
    """Teardown after a successful body, spelled out per generator. At the first thing
    that is not a clean exit (an error, a second yield, an overrun) the rest goes to
    the general ``unwind`` through ``resume_unwind``."""
    generators = [f"g{step.slot}" for step in steps if step.worker is None and step.provider.is_generator]
    armed = False
    w.line("armed = False")
    for index in reversed(range(len(modes))):
        gen = generators[index]
        # unwind() raises, or returns when an outer dependency swallowed the error.
        hand_over = f"await resume_unwind(stack, exits, {index}, {{}}, {{}}, job, {guard}, host, log, armed)"
        if modes[index] == _engine.ASYNC:
            if guard == "None":
                pass  # no generator here can suspend in teardown: nothing to bound
            elif not armed:
                w.line("wd = host.watchdog")
                w.line("if wd is not None:")
                w.line(f"    wd.arm({guard})")
                w.line("    deadlines = wd.deadlines")
                w.line("    armed = True")
                armed = True
            else:
                w.line("if armed:  # restart the clock: wd.arm() without the call")
                w.line(f"    deadlines[{guard}] = monotonic() + wd.timeout")
            w.line("try:")
            w.line(f"    await {gen}.__anext__()")
            w.line("except StopAsyncIteration:")
            if guard == "None":
                w.line("    pass")
            else:
                w.line(f"    if armed and {guard} not in deadlines:  # the watchdog fired")
                w.line("        " + hand_over.format("FINISHED", "None"))
                w.line("        return result")
        else:
            w.line("try:")
            w.line(f"    next({gen})")
            w.line("except StopIteration:")
            w.line("    pass")
        w.line("except BaseException as err:")
        w.line("    " + hand_over.format("RAISED", "err"))
        w.line("    return result")
        w.line("else:")
        w.line("    " + hand_over.format("YIELDED", "None"))
        w.line("    return result")
    if armed:
        w.line("if armed:")
        w.line(f"    wd.disarm({guard})")


def compile_runner(
    job_name: str,
    body: Provider,
    body_arguments: Arguments,
    steps: Sequence[Step],
    exits: tuple[Provider, ...],
    guarded: bool,
    traced: bool,
) -> Runner:
    """The function that runs one attempt of the plan: ``run(payload, extras, ctx,
    host, log)``. ``traced`` adds a debug event with its duration per dependency."""
    w = _Writer()
    w.bind("job", job_name)
    modes = [_engine.exit_mode(provider) for provider in exits]
    w.bind("exits", tuple(zip(exits, modes, strict=True)))
    header = ["async def run(payload, extras, ctx, host, log):"]
    if traced:
        w.line("trace = log")
    if any(step.worker is not None for step in steps):
        w.line("wv = host.worker_values")
    if not exits:
        for step in steps:
            _setup(w, step, traced)
        _body(w, body, body_arguments)
        w.line("return result")
    else:
        trace = "trace" if traced else "None"
        guard = "guard" if guarded else "None"
        w.line("stack = []")
        w.line("push = stack.append")
        if guarded:
            w.line("with host.scope_class() as guard:")
            w.depth += 1
        w.line("try:")
        w.depth += 1
        for step in steps:
            _setup(w, step, traced)
        _body(w, body, body_arguments)
        w.depth -= 1
        w.line("except BaseException as exc:")
        if guarded:
            w.line("    guard.shield = True")
        w.line(f"    await unwind(stack, exits, exc, job, {guard}, host, log, {trace})")
        w.line("    raise  # unwind() re-raises; this line is not reached")
        if guarded:
            w.line("guard.shield = True")
        if traced or _engine.THREADED in modes:
            w.line(f"await unwind(stack, exits, None, job, {guard}, host, log, {trace})")
        else:
            _clean_teardown(w, steps, modes, guard)
        w.line("return result")
        if guarded:
            w.depth -= 1
            # Only the watchdog cancels the guard, and unwind() turns that into TeardownTimeout.
            w.line('raise AssertionError("unreachable: the guard scope swallowed an exception")')
    source = "\n".join(header + w.lines) + "\n"
    filename = f"<lifecycle plan #{next(_serial)} for job {job_name!r}{' (traced)' if traced else ''}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    exec(compile(source, filename, "exec"), w.namespace)
    runner: Runner = w.namespace["run"]
    return runner


def compile_binder(names: Sequence[str], keyword_only_defaults: Sequence[tuple[str, Any]]) -> Callable[..., Any]:
    """``bind(args)`` for a job called with all its positional parameters given
    positionally (the usual ``rt.run(job, a, b)``): one dict display, no loop."""
    namespace: dict[str, Any] = {}
    items = [f"{name!r}: args[{index}]" for index, name in enumerate(names)]
    for index, (name, default) in enumerate(keyword_only_defaults):
        namespace[f"d{index}"] = default
        items.append(f"{name!r}: d{index}")
    source = f"def bind(args):\n    return {{{', '.join(items)}}}\n"
    exec(compile(source, "<lifecycle payload binder>", "exec"), namespace)
    binder: Callable[..., Any] = namespace["bind"]
    return binder
