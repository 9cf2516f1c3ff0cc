"""Turning a plan into one generated Python function per job.

A plan is fixed once compiled, so instead of interpreting its steps per job (a loop
that looks up each step's kind and builds argument lists), the runtime runs a function
written for that plan: each dependency is a local variable, each call is spelled out
with its arguments, and generators are started inline. That took per-job overhead from
about 3x to about 1x a hand-written ``AsyncExitStack``. This is the job's hot path; the
teardown loop it hands over to is ``_engine.unwind``.

The code is meant to be read: locals are named after the parameter that receives them
(else after the dependency), each setup line ends with the dependency's
``module:qualname``, blocks are opened with ``_Writer.block``, and the source is kept in
``linecache`` (so tracebacks show the generated line) and on ``Runners.source``."""

from __future__ import annotations

import builtins
import contextlib
import itertools
import keyword
import linecache
import re
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from . import _engine
from ._analysis import Provider, Setup, Teardown
from ._plan import Arg, Arguments, Plan, Step

Runner = Callable[[dict[str, Any], "dict[str, Any] | None", Any, Any, Any], Awaitable[Any]]

_serial = itertools.count(1)

# What the generated code calls, under the names it calls them by.
_HELPERS: dict[str, Any] = {
    "unwind": _engine.unwind,
    "resume_unwind": _engine.resume_unwind,
    "resume_failure": _engine.resume_failure,
    "no_yield": _engine.no_yield_error,
    "setup_threaded": _engine.setup_threaded,
    "setup_batch": _engine.setup_batch,
    "call_body_threaded": _engine.call_body_threaded,
    "start_threaded_generator": _engine.start_threaded_generator,
    "RAISED": _engine.RAISED,
    "YIELDED": _engine.YIELDED,
    "FINISHED": _engine.FINISHED,
    "MISSING": _engine.MISSING,
    "perf_counter": time.perf_counter,
    "ms_since": _engine.ms_since,
}
# Names the generated code uses for itself: a dependency never gets one of these.
_LOCALS = {"run", "payload", "extras", "ctx", "host", "log", "trace", "wv", "stack", "push", "guard", "result"}
_LOCALS |= {"armed", "wd", "err", "exc", "t", "job", "exits", "depth"}
_RESERVED = frozenset(_HELPERS) | _LOCALS | frozenset(dir(builtins)) | frozenset(keyword.kwlist)


@dataclass(frozen=True, slots=True)
class Runners:
    """A plan with the functions that run one attempt of it.

    Args:
        plan: what the functions were generated from.
        run: ``run(payload, extras, ctx, host, log)`` runs one attempt.
        traced: the same, with a debug event and its duration per dependency.
        source: the generated source of ``run``, for reading and debugging.
        traced_source: that of ``traced``.
    """

    plan: Plan
    run: Runner
    traced: Runner
    source: str
    traced_source: str


class _Writer:
    """Lines of one function, with the names they bind and the objects behind them."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.depth = 0
        self.namespace: dict[str, Any] = dict(_HELPERS)
        self.taken: set[str] = set(_RESERVED)

    def line(self, text: str) -> None:
        self.lines.append("    " * self.depth + text)

    @contextlib.contextmanager
    def block(self, header: str) -> Iterator[None]:
        """A line ending in ``:`` and the indented lines written inside the ``with``."""
        self.line(header)
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1

    def name(self, wanted: str) -> str:
        """A fresh identifier like ``wanted`` (``wanted_2``... when it is taken)."""
        base = re.sub(r"\W", "_", wanted).strip("_") or "dep"
        if base[0].isdigit():
            base = "_" + base
        found, index = base, 1
        while found in self.taken:
            index += 1
            found = f"{base}_{index}"
        self.taken.add(found)
        return found

    def bind(self, wanted: str, value: Any) -> str:
        """A global of the generated function holding ``value``."""
        name = self.name(wanted)
        self.namespace[name] = value
        return name


def _callable_name(provider: Provider) -> str:
    call = provider.call
    while hasattr(call, "func") and not hasattr(call, "__name__"):  # functools.partial
        call = call.func
    name = getattr(call, "__name__", None)
    return name if isinstance(name, str) else type(call).__name__


class _Names:
    """The identifiers of one plan: callables, values and generators by slot."""

    def __init__(self, w: _Writer, plan: Plan) -> None:
        self.w = w
        self.body = w.bind(_callable_name(plan.body), plan.body.call)
        # Callables first, so a value named like its dependency's function gets the suffix.
        self.calls: dict[int, str] = {}
        for step in plan.steps:
            if step.worker is None:
                self.calls[step.slot] = w.bind(_callable_name(step.provider), step.provider.call)
        wanted = {slot: f"{name}_value" for slot, name in self.calls.items()}
        for step in plan.steps:
            if step.worker is not None:
                wanted[step.slot] = _callable_name(step.provider)
        # A value is named after the first keyword parameter that receives it.
        received: set[int] = set()
        for arguments in (*(step.arguments for step in plan.steps), plan.body_arguments):
            for param, (tag, ref) in arguments.keyword:
                if tag == Arg.SLOT and ref not in received:
                    received.add(ref)
                    wanted[ref] = param
        self.values = {slot: w.name(name) for slot, name in sorted(wanted.items())}
        self.providers: dict[int, str] = {}
        self.generators: dict[int, str] = {}  # by slot, for the clean teardown

    def provider(self, step: Step) -> str:
        name = self.providers.get(step.slot)
        if name is None:
            name = self.providers[step.slot] = self.w.bind(self.values[step.slot] + "_provider", step.provider)
        return name

    def source(self, tag: Arg, ref: Any) -> str:
        if tag == Arg.SLOT:
            return self.values[ref]
        if tag == Arg.PAYLOAD:
            return f"payload[{ref!r}]"
        if tag == Arg.CONTEXT:
            return "ctx"
        assert tag == Arg.CONST
        return self.w.bind("default", ref)

    def call_args(self, arguments: Arguments) -> str:
        # Parameter names are identifiers (inspect.Parameter enforces it, even through
        # __signature__), so they can be spelled as keywords.
        parts = [self.source(tag, ref) for tag, ref in arguments.positional]
        parts += [f"{name}={self.source(tag, ref)}" for name, (tag, ref) in arguments.keyword]
        return ", ".join(parts)

    def packed_args(self, arguments: Arguments) -> tuple[str, str]:
        """``(args tuple, kwargs dict)`` expressions, for calls made through a helper."""
        positional = "".join(self.source(tag, ref) + ", " for tag, ref in arguments.positional)
        keywords = ", ".join(f"{name!r}: {self.source(tag, ref)}" for name, (tag, ref) in arguments.keyword)
        return f"({positional})", f"{{{keywords}}}"


def _setup(w: _Writer, names: _Names, step: Step, traced: bool) -> None:
    provider = step.provider
    value = names.values[step.slot]
    where = f"  # {provider.label}"
    if step.worker is not None:
        node = w.bind(value + "_node", step.worker)
        key = w.bind(value + "_key", step.worker.key)
        w.line(f"{value} = wv.get({key}, MISSING){where}")
        with w.block(f"if {value} is MISSING:"):
            w.line(f"{value} = await host._worker_value({node}, log)")
        return
    call = names.calls[step.slot]
    if traced:
        w.line("t = perf_counter()")
    setup = provider.setup
    if setup == Setup.AWAIT:
        w.line(f"{value} = await {call}({names.call_args(step.arguments)}){where}")
    elif setup == Setup.CALL:
        w.line(f"{value} = {call}({names.call_args(step.arguments)}){where}")
    elif setup == Setup.THREAD:
        args, kwargs = names.packed_args(step.arguments)
        w.line(f"{value} = await setup_threaded({call}, {args}, {kwargs}){where}")
    elif setup == Setup.ENTER_THREAD:
        args, kwargs = names.packed_args(step.arguments)
        provider_name = names.provider(step)
        w.line(f"{value} = await start_threaded_generator({provider_name}, {args}, {kwargs}, stack, job){where}")
    else:
        is_async = setup == Setup.ENTER_ASYNC
        gen = w.name(value + "_gen")
        w.line(f"{gen} = {call}({names.call_args(step.arguments)}){where}")
        with w.block("try:"):
            w.line(f"{value} = await {gen}.__anext__()" if is_async else f"{value} = next({gen})")
        with w.block(f"except {'StopAsyncIteration' if is_async else 'StopIteration'}:"):
            w.line(f"raise no_yield({names.provider(step)}, job) from None")
        w.line(f"push({gen})")
        names.generators[step.slot] = gen
    if traced:
        w.line(f"trace.debug('dependency.setup', dependency={provider.label!r}, duration_ms=ms_since(t))")


def _batches(steps: Sequence[Step]) -> list[list[Step]]:
    """The steps in order, in runs: consecutive threaded sync setups form one run (one
    thread hop, ``_engine.setup_batch``); every other step is a run of its own."""
    runs: list[list[Step]] = []
    for step in steps:
        if _batchable(step) and runs and _batchable(runs[-1][-1]):
            runs[-1].append(step)
        else:
            runs.append([step])
    return runs


def _batchable(step: Step) -> bool:
    return step.worker is None and step.provider.threaded


def _setup_batch(w: _Writer, names: _Names, run: Sequence[Step], stack: str) -> None:
    """One thread hop for consecutive threaded setups: each argument is an input of the
    hop (computed on the loop) or the value of an earlier step of the same hop."""
    produced = {step.slot: index for index, step in enumerate(run)}
    inputs: list[str] = []
    where: dict[str, int] = {}

    def refer(tag: Arg, ref: Any) -> tuple[bool, int]:
        if tag == Arg.SLOT and ref in produced:
            return (True, produced[ref])
        expression = names.source(tag, ref)
        if expression not in where:
            where[expression] = len(inputs)
            inputs.append(expression)
        return (False, where[expression])

    items = tuple(
        _engine.BatchItem(
            step.provider,
            tuple(refer(*source) for source in step.arguments.positional),
            tuple((name, refer(*source)) for name, source in step.arguments.keyword),
        )
        for step in run
    )
    batch = w.bind(names.values[run[0].slot] + "_batch", items)
    values = ", ".join(names.values[step.slot] for step in run)  # a run has two steps or more
    given = ", ".join(inputs) + ("," if len(inputs) == 1 else "")
    labels = ", ".join(step.provider.label for step in run)
    w.line(f"{values} = await setup_batch({batch}, ({given}), {stack}, job)  # one thread hop: {labels}")


def _setups(w: _Writer, names: _Names, plan: Plan, traced: bool) -> None:
    # The traced runner keeps one hop per step, so each gets its own duration.
    if traced:
        for step in plan.steps:
            _setup(w, names, step, traced)
        return
    for run in _batches(plan.steps):
        if len(run) > 1:
            _setup_batch(w, names, run, "stack" if plan.exits else "None")
        else:
            _setup(w, names, run[0], traced)


def _body(w: _Writer, names: _Names, plan: Plan) -> None:
    body, arguments = plan.body, plan.body_arguments
    # ``extras`` (arguments only a ``**kwargs`` parameter takes) is None unless the job
    # has one, so only such a job's code looks at it.
    if body.setup == Setup.THREAD:
        args, kwargs = names.packed_args(arguments)
        if body.var_keyword:
            kwargs = f"{{**{kwargs}, **extras}} if extras else {kwargs}"
        w.line(f"result = await call_body_threaded({names.body}, {args}, {kwargs})")
        return
    call = f"await {names.body}" if body.setup == Setup.AWAIT else names.body
    if body.var_keyword:
        positional = "".join(names.source(tag, ref) + ", " for tag, ref in arguments.positional)
        _, kwargs = names.packed_args(arguments)
        with w.block("if extras:"):
            w.line(f"result = {call}({positional}**{{**{kwargs}, **extras}})")
        with w.block("else:"):
            w.line(f"result = {call}({names.call_args(arguments)})")
    else:
        w.line(f"result = {call}({names.call_args(arguments)})")


def _hand_over(index: int, happened: str, error: str, guard: str) -> str:
    # resume_unwind() raises, or returns when an outer dependency swallowed the error.
    return f"await resume_unwind(stack, exits, {index}, {happened}, {error}, job, {guard}, host, log, armed)"


def _clean_teardown(w: _Writer, names: _Names, plan: Plan, guard: str) -> None:
    """Teardown after a successful body, spelled out per generator. At the first thing
    that is not a clean exit (an error, a second yield, an overrun) the rest goes to
    the general ``unwind`` through ``resume_unwind``."""
    generators = [names.generators[slot] for slot in sorted(names.generators)]
    armed = False
    w.line("armed = False")
    for index in reversed(range(len(plan.exits))):
        gen = generators[index]
        if plan.exits[index].teardown == Teardown.ASYNC:
            if guard == "None":
                pass  # no generator here can suspend in teardown: nothing to bound
            elif not armed:
                w.line("wd = host._watchdog")
                with w.block("if wd is not None:"):
                    w.line(f"wd.arm({guard})")
                    w.line("armed = True")
                armed = True
            else:
                with w.block("if armed:"):
                    w.line(f"wd.restart({guard})")
            with w.block("try:"):
                w.line(f"await {gen}.__anext__()")
            with w.block("except StopAsyncIteration:"):
                if guard == "None":
                    w.line("pass")
                else:
                    with w.block(f"if armed and wd.fired({guard}):"):
                        w.line(_hand_over(index, "FINISHED", "None", guard))
                        w.line("return result")
        else:
            with w.block("try:"):
                w.line(f"next({gen})")
            with w.block("except StopIteration:"):
                w.line("pass")
        with w.block("except BaseException as err:"):
            w.line(_hand_over(index, "RAISED", "err", guard))
            w.line("return result")
        with w.block("else:"):
            w.line(_hand_over(index, "YIELDED", "None", guard))
            w.line("return result")
    if armed:
        with w.block("if armed:"):
            w.line(f"wd.disarm({guard})")


def _failure_teardown(w: _Writer, names: _Names, plan: Plan, guard: str) -> None:
    """Teardown after a failed setup or body, spelled out per generator: ``exc`` is
    thrown into each generator that was set up (``depth`` of them), innermost first.
    While each one re-raises ``exc`` itself, nothing else is needed; at the first that
    does anything else (raises another error, swallows ``exc``, yields again, overruns)
    the rest goes to the general ``unwind`` through ``resume_failure``, which raises."""
    generators = [names.generators[slot] for slot in sorted(names.generators)]
    watched = guard != "None" and any(provider.teardown == Teardown.ASYNC for provider in plan.exits)
    if watched:
        w.line("armed = False")
        w.line("wd = host._watchdog")
    w.line("depth = len(stack)")
    for index in reversed(range(len(plan.exits))):
        gen = generators[index]
        is_async = plan.exits[index].teardown == Teardown.ASYNC
        with w.block(f"if depth > {index}:"):
            if is_async and watched:
                with w.block("if wd is not None:"):
                    w.line(f"wd.arm({guard})")
                    w.line("armed = True")
            with w.block("try:"):
                w.line(f"await {gen}.athrow(exc)" if is_async else f"{gen}.throw(exc)")
            with w.block(f"except {'StopAsyncIteration' if is_async else 'StopIteration'}:"):
                w.line(_hand_over_failure(index, "FINISHED", "None", guard, watched))
            with w.block("except BaseException as err:"):
                # Only the watchdog can make a re-raised ``exc`` an overrun.
                overran = f" or (armed and wd.fired({guard}))" if is_async and watched else ""
                with w.block(f"if err is not exc{overran}:"):
                    w.line(_hand_over_failure(index, "RAISED", "err", guard, watched))
            with w.block("else:"):
                w.line(_hand_over_failure(index, "YIELDED", "None", guard, watched))
    if watched:
        with w.block("if armed:"):
            w.line(f"wd.disarm({guard})")


def _hand_over_failure(index: int, happened: str, error: str, guard: str, watched: bool) -> str:
    armed = "armed" if watched else "False"
    return f"await resume_failure(stack, exits, {index}, {happened}, {error}, exc, job, {guard}, host, log, {armed})"


def _function(w: _Writer, names: _Names, plan: Plan, traced: bool) -> None:
    with w.block("async def run(payload, extras, ctx, host, log):"):
        w.line(f"# job {plan.job_name!r} ({plan.job_label}){' with a debug event per dependency' if traced else ''}")
        if traced:
            w.line("trace = log")
        if any(step.worker is not None for step in plan.steps):
            w.line("wv = host._worker_values")
        if not plan.exits:
            _setups(w, names, plan, traced)
            _body(w, names, plan)
            w.line("return result")
            return
        trace = "trace" if traced else "None"
        guard = "guard" if plan.guarded else "None"
        w.line("stack = []")
        w.line("push = stack.append")
        with contextlib.ExitStack() as guarded:
            if plan.guarded:
                guarded.enter_context(w.block("with host._scope_class() as guard:"))
            with w.block("try:"):
                _setups(w, names, plan, traced)
                _body(w, names, plan)
            with w.block("except BaseException as exc:"):
                if plan.guarded:
                    w.line("guard.shield = True")
                if traced or any(provider.teardown == Teardown.THREADED for provider in plan.exits):
                    w.line(f"await unwind(stack, exits, exc, job, {guard}, host, log, {trace})")
                    w.line("raise  # unwind() re-raises; this line is not reached")
                else:
                    _failure_teardown(w, names, plan, guard)
                    w.line("raise")
            if plan.guarded:
                w.line("guard.shield = True")
            if traced or any(provider.teardown == Teardown.THREADED for provider in plan.exits):
                w.line(f"await unwind(stack, exits, None, job, {guard}, host, log, {trace})")
            else:
                _clean_teardown(w, names, plan, guard)
            w.line("return result")
        if plan.guarded:
            # Only the watchdog cancels the guard, and unwind() turns that into TeardownTimeout.
            w.line('raise AssertionError("unreachable: the guard scope swallowed an exception")')


def _compile(plan: Plan, traced: bool) -> tuple[Runner, str]:
    w = _Writer()
    w.namespace["job"] = plan.job_name
    w.namespace["exits"] = plan.exits
    names = _Names(w, plan)
    _function(w, names, plan, traced)
    source = "\n".join(w.lines) + "\n"
    filename = f"<lifecycle plan #{next(_serial)} for job {plan.job_name!r}{' (traced)' if traced else ''}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    exec(compile(source, filename, "exec"), w.namespace)
    runner: Runner = w.namespace["run"]
    return runner, source


def compile_runners(plan: Plan) -> Runners:
    """The functions that run one attempt of ``plan``: ``run(payload, extras, ctx, host,
    log)``, and the same with a debug event per dependency (``traced``).

    Args:
        plan: a compiled plan (``_plan.compile_plan``).
    """
    run, source = _compile(plan, traced=False)
    traced, traced_source = _compile(plan, traced=True)
    return Runners(plan, run, traced, source, traced_source)


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
