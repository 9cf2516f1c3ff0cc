"""``@job``: a function plus its options and its analysed, validated graph."""

from __future__ import annotations

import contextvars
import functools
import inspect
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Generic, ParamSpec, TypeVar, overload

from ._analysis import EMPTY, Kind, Param, Provider, Source, analyse, label
from ._codegen import compile_binder
from ._errors import DependencyError, PayloadError
from ._markers import DEFAULT_OPTIONS, Depends
from ._plan import Plan, compile_plan

P = ParamSpec("P")
R = TypeVar("R")

# When set (by ``lifecycle check``), graph errors at decoration are collected here
# instead of raised, so one run can report every broken job in a module.
collected_errors: contextvars.ContextVar[list[tuple[Job[..., Any], DependencyError]] | None] = contextvars.ContextVar(
    "lifecycle_collected_errors", default=None
)


class Job(Generic[P, R]):
    """A job function with its options. Calling it calls the function itself, with no
    injection, so unit tests can pass fakes directly."""

    fn: Callable[P, R]
    name: str
    retries: int
    timeout: float | None
    dependencies: tuple[Depends, ...]

    def __init__(
        self,
        fn: Callable[P, R],
        *,
        name: str | None = None,
        retries: int = 0,
        timeout: float | None = None,
        dependencies: Iterable[Depends] = (),
    ) -> None:
        if isinstance(fn, Job):
            fn = fn.fn
        if not callable(fn):
            raise TypeError(f"@job decorates a callable, got {fn!r}")
        if not isinstance(retries, int) or isinstance(retries, bool) or retries < 0:
            raise ValueError(f"@job retries must be an int >= 0, got {retries!r}")
        if timeout is not None and (not isinstance(timeout, (int, float)) or timeout <= 0):
            raise ValueError(f"@job timeout must be a positive number of seconds, got {timeout!r}")
        self.fn = fn
        self.name = name or getattr(fn, "__name__", None) or label(fn)
        self.retries = retries
        self.timeout = float(timeout) if timeout is not None else None
        self.dependencies = tuple(dependencies)
        functools.update_wrapper(self, fn)
        self.error: DependencyError | None = None
        try:
            self.body: Provider = _body(fn, self.name)
        except DependencyError as exc:
            sink = collected_errors.get()
            if sink is None:
                raise
            sink.append((self, exc))
            self.error = exc
            self.body = _unusable(fn)
        self.params: tuple[Param, ...] = tuple(p for p in self.body.params if p.source is Source.NAMED)
        self.payload_names = frozenset(p.name for p in self.params)
        self._positional = tuple(p.name for p in self.params if p.kind is not inspect.Parameter.KEYWORD_ONLY)
        self._required = tuple(p.name for p in self.params if p.default is EMPTY)
        self._defaults = tuple((p.name, p.default) for p in self.params if p.default is not EMPTY)
        # For the common calls (all positional, or all by name), a shortcut that checks less.
        keyword_only = [p for p in self.params if p.kind is inspect.Parameter.KEYWORD_ONLY]
        self._bind_positional: Callable[[tuple[Any, ...]], dict[str, Any]] | None = None
        if all(p.default is not EMPTY for p in keyword_only):
            defaults = [(p.name, p.default) for p in keyword_only]
            self._bind_positional = compile_binder(self._positional, defaults)
        self._required_set = frozenset(self._required)
        self.accepts_extra = self.body.var_keyword
        # Validate now: a broken graph is reported where the job is declared.
        try:
            self.plan: Plan = self.compile((), {})
        except DependencyError as exc:
            sink = collected_errors.get()
            if sink is None:
                raise
            if self.error is None:
                self.error = exc
                sink.append((self, exc))

    def compile(self, runtime_dependencies: Iterable[Depends], overrides: Mapping[Any, Any]) -> Plan:
        if self.error is not None:
            raise self.error
        return compile_plan(
            self.name, self.body, self.payload_names, (*runtime_dependencies, *self.dependencies), overrides
        )

    def bind_payload(
        self, args: tuple[Any, ...], kwargs: Mapping[str, Any]
    ) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """Match call arguments to the job's parameters; every problem in one error."""
        if not kwargs:
            if len(args) == len(self._positional) and self._bind_positional is not None:
                return self._bind_positional(args), None
        elif not args and self._required_set <= kwargs.keys() <= self.payload_names:
            named = dict(kwargs)
            for name, default in self._defaults:
                if name not in named:
                    named[name] = default
            return named, None
        problems: list[str] = []
        bound: dict[str, Any] = {}
        extras: dict[str, Any] | None = None
        if len(args) > len(self._positional):
            problems.append(
                f"takes {len(self._positional)} positional argument(s) "
                f"({', '.join(self._positional) or 'none'}) but {len(args)} were given"
            )
        for name, value in zip(self._positional, args, strict=False):
            bound[name] = value
        unexpected = []
        for key, value in kwargs.items():
            if key in self.payload_names:
                if key in bound:
                    problems.append(f"got multiple values for argument {key!r}")
                bound[key] = value
            elif self.accepts_extra:
                if extras is None:
                    extras = {}
                extras[key] = value
            else:
                unexpected.append(key)
        if unexpected:
            problems.append(
                "unexpected argument(s) "
                + ", ".join(map(repr, unexpected))
                + f" (the job takes: {', '.join(sorted(self.payload_names)) or 'no arguments'})"
            )
        missing = [name for name in self._required if name not in bound]
        if missing:
            problems.append("missing argument(s) " + ", ".join(map(repr, missing)))
        if problems:
            raise PayloadError(f"job {self.name!r} ({label(self.fn)}): " + "; ".join(problems))
        for name, default in self._defaults:
            if name not in bound:
                bound[name] = default
        return bound, extras

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return self.fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<Job {self.name!r} {label(self.fn)}>"


def _body(fn: Callable[..., Any], name: str) -> Provider:
    try:
        body = analyse(fn)
    except DependencyError as exc:
        raise DependencyError(f"job {name!r}: {exc}") from exc
    if body.is_generator:
        raise DependencyError(
            f"job {name!r} ({body.label}) is a generator function; a job returns its result, "
            "resources with teardown belong in a dependency"
        )
    if body.var_positional is not None:
        raise DependencyError(
            f"job {name!r} ({body.label}), parameter {'*' + body.var_positional!r}: jobs take named "
            "arguments (a payload), *args is not supported"
        )
    return body


def _unusable(fn: Callable[..., Any]) -> Provider:
    """A stand-in body for a job whose declaration failed while errors are collected."""
    return Provider(fn, Kind.FUNCTION, DEFAULT_OPTIONS, (), label(fn))


@overload
def job(fn: Callable[P, R], /) -> Job[P, R]: ...
@overload
def job(
    *,
    name: str | None = None,
    retries: int = 0,
    timeout: float | None = None,
    dependencies: Iterable[Depends] = (),
) -> Callable[[Callable[P, R]], Job[P, R]]: ...


def job(
    fn: Callable[P, R] | None = None,
    /,
    *,
    name: str | None = None,
    retries: int = 0,
    timeout: float | None = None,
    dependencies: Iterable[Depends] = (),
) -> Job[P, R] | Callable[[Callable[P, R]], Job[P, R]]:
    """Declare a job; its dependency graph is built and validated right here."""

    def decorate(target: Callable[P, R]) -> Job[P, R]:
        return Job(target, name=name, retries=retries, timeout=timeout, dependencies=dependencies)

    return decorate(fn) if fn is not None else decorate


_adhoc: weakref.WeakKeyDictionary[Any, Job[..., Any]] = weakref.WeakKeyDictionary()


def as_job(fn: Callable[..., Any]) -> Job[..., Any]:
    """A plain callable handed to ``Runtime.run`` becomes a ``Job`` once, then cached."""
    if isinstance(fn, Job):
        return fn
    try:
        found = _adhoc.get(fn)
    except TypeError:
        return Job(fn)
    if found is None:
        found = Job(fn)
        _adhoc[fn] = found
    return found
