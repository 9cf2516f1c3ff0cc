"""Reading a callable once: what kind of provider it is and where each of its parameters
comes from. Everything here runs at decoration or plan-compile time, never per job."""

from __future__ import annotations

import dis
import enum
import functools
import inspect
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, get_args, get_origin

from ._context import JobContext
from ._errors import DependencyError
from ._markers import DependencyOptions, Depends, marker_of, options_of, request_only

EMPTY: Any = inspect.Parameter.empty


class Kind(enum.IntEnum):
    FUNCTION = 0
    COROUTINE = 1
    GENERATOR = 2
    ASYNC_GENERATOR = 3


class Setup(enum.IntEnum):
    """How a provider is set up: the one place that decides it from its kind and options."""

    CALL = 0  # a sync function, called on the event loop (threaded=False)
    AWAIT = 1  # an async function
    THREAD = 2  # a sync function, called in a worker thread
    ENTER = 3  # a sync generator, started on the event loop (threaded=False)
    ENTER_THREAD = 4  # a sync generator, started (and finished) in worker threads
    ENTER_ASYNC = 5  # an async generator


class Teardown(enum.IntEnum):
    """How a provider is torn down. The engine keeps these in a job's ``exits``."""

    NONE = 0  # not a generator: nothing to do
    INLINE = 1  # a sync generator finished on the event loop: cannot suspend
    ASYNC = 2  # an async generator, awaited
    THREADED = 3  # a sync generator finished in a worker thread


_SETUPS = {
    (Kind.FUNCTION, False): Setup.CALL,
    (Kind.FUNCTION, True): Setup.THREAD,
    (Kind.COROUTINE, False): Setup.AWAIT,
    (Kind.COROUTINE, True): Setup.AWAIT,  # ``threaded`` means nothing to async code
    (Kind.GENERATOR, False): Setup.ENTER,
    (Kind.GENERATOR, True): Setup.ENTER_THREAD,
    (Kind.ASYNC_GENERATOR, False): Setup.ENTER_ASYNC,
    (Kind.ASYNC_GENERATOR, True): Setup.ENTER_ASYNC,
}
_TEARDOWNS = {
    Setup.CALL: Teardown.NONE,
    Setup.AWAIT: Teardown.NONE,
    Setup.THREAD: Teardown.NONE,
    Setup.ENTER: Teardown.INLINE,
    Setup.ENTER_THREAD: Teardown.THREADED,
    Setup.ENTER_ASYNC: Teardown.ASYNC,
}


class Source(enum.IntEnum):
    DEPENDS = 0  # filled by another provider
    CONTEXT = 1  # the JobContext
    NAMED = 2  # by name from the job's arguments (or the parameter's default)


@dataclass(frozen=True, slots=True)
class Param:
    name: str
    kind: inspect._ParameterKind
    source: Source
    default: Any
    annotation: Any  # the type, without ``Annotated[...]`` metadata
    depends: Depends | None = None
    # The annotation as written, ``Annotated`` constraints kept (``Annotated[int,
    # Field(gt=0)]``): a by-name parameter's payload type. EMPTY when unannotated.
    declared: Any = EMPTY

    @property
    def positional_only(self) -> bool:
        return self.kind is inspect.Parameter.POSITIONAL_ONLY


@dataclass(frozen=True, slots=True, eq=False)
class Provider:
    """A callable as the engine sees it: how to call it and what it needs.

    The facts derived from the kind and the options (``setup``, ``teardown``,
    ``threaded``, ``teardown_suspends``) are computed here, once, and read by the plan,
    the code generator, the engine, the worker scope and the CLI alike."""

    call: Callable[..., Any]
    kind: Kind
    options: DependencyOptions
    params: tuple[Param, ...]
    label: str
    var_positional: str | None = None  # the name of a ``*args`` parameter, if any
    var_keyword: bool = False  # takes ``**kwargs``
    never_awaits: bool = False  # an async generator whose code cannot suspend
    setup: Setup = field(init=False)
    teardown: Teardown = field(init=False)
    threaded: bool = field(init=False)  # its setup (and teardown) run in a worker thread
    # Its teardown can suspend, so a job's guard must shield and bound it: an async
    # generator that may await, or a sync one finished in a thread.
    teardown_suspends: bool = field(init=False)

    def __post_init__(self) -> None:
        setup = _SETUPS[self.kind, bool(self.options.threaded)]
        teardown = _TEARDOWNS[setup]
        object.__setattr__(self, "setup", setup)
        object.__setattr__(self, "teardown", teardown)
        object.__setattr__(self, "threaded", setup in (Setup.THREAD, Setup.ENTER_THREAD))
        object.__setattr__(
            self,
            "teardown_suspends",
            teardown == Teardown.THREADED or (teardown == Teardown.ASYNC and not self.never_awaits),
        )

    @property
    def scope(self) -> str:
        return self.options.scope

    @property
    def is_generator(self) -> bool:
        return self.kind >= Kind.GENERATOR


def label(call: Any) -> str:
    """``module:qualname`` for error messages, readable for partials and instances."""
    if isinstance(call, functools.partial):
        return f"partial({label(call.func)})"
    qualname = getattr(call, "__qualname__", None)
    if not isinstance(qualname, str):  # a callable instance
        cls = type(call)
        return f"{cls.__module__}:{cls.__qualname__}() instance"
    return f"{getattr(call, '__module__', None) or '?'}:{qualname}"


def _code_kind(obj: Any) -> Kind | None:
    if inspect.isasyncgenfunction(obj):
        return Kind.ASYNC_GENERATOR
    if inspect.iscoroutinefunction(obj):
        return Kind.COROUTINE
    if inspect.isgeneratorfunction(obj):
        return Kind.GENERATOR
    return None


def detect_kind(call: Any) -> Kind:
    """Classify a callable, looking through partials, ``__wrapped__`` chains and
    ``__call__``. The outermost level that declares itself async or generator wins, so
    an ``async def`` wrapper around a sync function is still a coroutine."""
    obj = call
    seen: set[int] = set()
    while id(obj) not in seen:
        seen.add(id(obj))
        found = _code_kind(obj)
        if found is not None:
            return found
        if inspect.isclass(obj):
            return Kind.FUNCTION  # calling a class constructs an instance
        if isinstance(obj, functools.partial):
            obj = obj.func
            continue
        wrapped = getattr(obj, "__wrapped__", None)
        if wrapped is not None:
            obj = wrapped
            continue
        if inspect.isfunction(obj) or inspect.ismethod(obj) or inspect.isbuiltin(obj):
            return Kind.FUNCTION
        dunder = getattr(type(obj), "__call__", None)  # noqa: B004 - the class attribute, not callable()
        if dunder is None:
            break
        obj = dunder
    return Kind.FUNCTION


# Every way Python code can suspend: ``await`` (also inside ``async with``) needs
# GET_AWAITABLE/SEND, ``async for`` GET_AITER/GET_ANEXT.
_SUSPENDING_OPS = frozenset({"GET_AWAITABLE", "SEND", "GET_AITER", "GET_ANEXT", "BEFORE_ASYNC_WITH", "END_ASYNC_FOR"})


def never_awaits(call: Any) -> bool:
    """True when ``call`` runs an ``async def ... yield`` function whose code contains no
    ``await``, ``async for`` or ``async with``. Its teardown then cannot suspend, so
    cancellation cannot reach it and it cannot overrun a deadline: it needs neither a
    shield nor a bound. Anything less certain (a ``__wrapped__`` chain, a builtin)
    counts as possibly suspending."""
    obj = call
    while isinstance(obj, functools.partial):
        obj = obj.func
    if inspect.ismethod(obj):
        obj = obj.__func__
    elif not inspect.isfunction(obj):
        dunder = getattr(type(obj), "__call__", None)  # noqa: B004 - the class attribute
        obj = getattr(dunder, "__func__", dunder)
    if not (inspect.isfunction(obj) and inspect.isasyncgenfunction(obj)):
        return False
    return not any(ins.opname in _SUSPENDING_OPS for ins in dis.get_instructions(obj.__code__))


def _signature(call: Callable[..., Any], owner: str) -> inspect.Signature:
    try:
        return inspect.signature(call, eval_str=True)
    except NameError:
        # A forward reference that cannot be resolved (e.g. a TYPE_CHECKING import):
        # fall back to raw annotations and resolve each parameter on its own.
        sig = inspect.signature(call)
    except (TypeError, ValueError) as exc:
        raise DependencyError(f"cannot read the signature of {owner}: {exc}") from exc
    globalns = getattr(inspect.unwrap(_unpartial(call)), "__globals__", {})
    params = []
    for p in sig.parameters.values():
        ann = p.annotation
        if isinstance(ann, str):
            try:
                ann = eval(ann, globalns)
            except Exception as exc:
                if "Depends" in ann or "JobContext" in ann:
                    raise DependencyError(
                        f"{owner}, parameter {p.name!r}: cannot resolve annotation {ann!r} ({exc})"
                    ) from exc
        params.append(p.replace(annotation=ann))
    return sig.replace(parameters=params)


def _unpartial(call: Any) -> Any:
    while isinstance(call, functools.partial):
        call = call.func
    if not (inspect.isfunction(call) or inspect.ismethod(call) or inspect.isclass(call)):
        dunder = getattr(type(call), "__call__", None)  # noqa: B004 - the class attribute
        if dunder is not None and not isinstance(call, type):
            return dunder
    return call


def _depends_in(annotation: Any) -> tuple[Any, Depends | None]:
    """Split ``Annotated[T, Depends(f)]`` into ``(T, Depends)``; the last marker wins."""
    if get_origin(annotation) is Annotated:
        base, *extras = get_args(annotation)
        marks = [m for e in extras if (m := marker_of(e)) is not None]
        return base, (marks[-1] if marks else None)
    return annotation, None


def _is_context(annotation: Any) -> bool:
    return annotation is JobContext or (inspect.isclass(annotation) and issubclass(annotation, JobContext))


def classify(name: str, p: inspect.Parameter, owner: str) -> Param | None:
    """Decide where one parameter's value comes from; ``None`` for ``*args``/``**kwargs``."""
    if p.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
        return None
    base, marker = _depends_in(p.annotation)
    default = p.default
    as_default = marker_of(default)
    if as_default is not None:
        if marker is not None:
            raise DependencyError(
                f"{owner}, parameter {name!r}: Depends given both in Annotated[...] and as the default value; use one"
            )
        marker, default = as_default, EMPTY
    if marker is not None:
        if marker.dependency is None:
            if base is EMPTY or not callable(base) or base is Any:
                raise DependencyError(
                    f"{owner}, parameter {name!r}: Depends() without an argument needs a "
                    f"callable type annotation, got {base!r}"
                )
            marker = Depends(base, use_cache=marker.use_cache)
        return Param(name, p.kind, Source.DEPENDS, default, base, marker)
    if _is_context(base):
        return Param(name, p.kind, Source.CONTEXT, default, base)
    extras = get_args(p.annotation)[1:] if get_origin(p.annotation) is Annotated else ()
    web = request_only(base, (default, *extras))
    if web is not None:
        raise DependencyError(
            f"{owner}, parameter {name!r}: {web} is FastAPI request data, and a job has no HTTP request; "
            "take the value as a plain parameter (filled by name from the job's arguments), "
            "or keep this dependency for routes only"
        )
    return Param(name, p.kind, Source.NAMED, default, base, declared=p.annotation)


_cache: weakref.WeakKeyDictionary[Any, Provider] = weakref.WeakKeyDictionary()
_strong_cache: dict[Any, Provider] = {}


def analyse(call: Callable[..., Any]) -> Provider:
    """Analyse a provider once; results are cached per callable."""
    try:
        hit = _cache.get(call)
    except TypeError:  # unhashable or not weak-referenceable
        hit = _cached_strong(call)
    if hit is not None:
        return hit
    owner = label(call)
    if not callable(call):
        raise DependencyError(f"{owner} is not callable")
    sig = _signature(call, owner)
    params = tuple(
        param for name, p in sig.parameters.items() if (param := classify(name, p, f"dependency {owner}")) is not None
    )
    kinds = {p.kind: name for name, p in sig.parameters.items()}
    kind = detect_kind(call)
    provider = Provider(
        call,
        kind,
        options_of(call),
        params,
        owner,
        var_positional=kinds.get(inspect.Parameter.VAR_POSITIONAL),
        var_keyword=inspect.Parameter.VAR_KEYWORD in kinds,
        never_awaits=kind == Kind.ASYNC_GENERATOR and never_awaits(call),
    )
    try:
        _cache[call] = provider
    except TypeError:
        try:
            if len(_strong_cache) < 4096:
                _strong_cache[call] = provider
        except TypeError:
            pass
    return provider


def _cached_strong(call: Any) -> Provider | None:
    try:
        return _strong_cache.get(call)
    except TypeError:
        return None
