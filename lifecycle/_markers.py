"""The two declarations users write: ``Depends(...)`` on a parameter and
``@dependency(...)`` on a provider. They only record intent; ``_analysis`` reads them.

FastAPI's own ``Depends`` is read here too (``marker_of``), so one ``get_db`` written for
routes serves jobs unchanged, and FastAPI's request-only parameters are recognised
(``request_only``) so that a job using one fails with a clear error. Both look FastAPI
up in ``sys.modules`` and never import it: a marker from FastAPI can only exist once
FastAPI has been imported, and the core must not pay for, or need, an optional
library."""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, overload

Scope = Literal["job", "worker"]
SCOPES: tuple[Scope, ...] = ("job", "worker")

_OPTIONS_ATTR = "__lifecycle_dependency__"

F = TypeVar("F", bound=Callable[..., Any])


class Depends:
    """Marks a parameter as filled by calling ``dependency`` (or the annotated type).

    Used as ``x: Annotated[T, Depends(f)]`` or as a default value ``x: T = Depends(f)``.

    Args:
        dependency: the provider to call: any callable (function, coroutine function,
            sync or async generator function, class, callable instance, bound method,
            ``functools.partial``). None (the default) calls the annotated type ``T``
            itself.
        use_cache: True (the default) shares one value per job between every place
            that asks for the same dependency; False calls it afresh for this parameter
            (and does not share that value either).
    """

    __slots__ = ("dependency", "use_cache")

    def __init__(self, dependency: Callable[..., Any] | None = None, *, use_cache: bool = True) -> None:
        if dependency is not None and not callable(dependency):
            raise TypeError(f"Depends() takes a callable, got {dependency!r}")
        self.dependency = dependency
        self.use_cache = use_cache

    def __repr__(self) -> str:
        name = getattr(self.dependency, "__qualname__", repr(self.dependency))
        cache = "" if self.use_cache else ", use_cache=False"
        return f"Depends({name if self.dependency is not None else ''}{cache})"


@dataclass(frozen=True, slots=True)
class DependencyOptions:
    scope: Scope = "job"
    threaded: bool = True


DEFAULT_OPTIONS = DependencyOptions()


@overload
def dependency(fn: F, /) -> F: ...
@overload
def dependency(*, scope: Scope = "job", threaded: bool = True) -> Callable[[F], F]: ...


def dependency(fn: F | None = None, /, *, scope: Scope = "job", threaded: bool = True) -> F | Callable[[F], F]:
    """Declare a provider's scope and threading. Usable bare (``@dependency``) or with
    arguments (``@dependency(scope="worker")``); undecorated providers behave as
    ``scope="job", threaded=True``.

    The options are stored on the callable itself so that the same function used from
    many jobs always behaves the same way.

    Args:
        fn: the provider, when used bare.
        scope: ``"job"`` (the default): created for each job and torn down at its end;
            ``"worker"``: created once per runtime (a worker creates it at start-up),
            shared by every job, torn down when the runtime closes.
        threaded: for a sync function or sync generator, True (the default) runs its
            setup and teardown in a worker thread so it cannot block the event loop;
            False runs it inline on the loop (faster for cheap code). Ignored for async
            providers.
    """
    if scope not in SCOPES:
        raise ValueError(f"@dependency scope must be one of {SCOPES}, got {scope!r}")
    options = DependencyOptions(scope=scope, threaded=bool(threaded))

    def mark(target: F) -> F:
        if not callable(target):
            raise TypeError(f"@dependency decorates a callable, got {target!r}")
        try:
            setattr(target, _OPTIONS_ATTR, options)
        except (AttributeError, TypeError) as exc:  # bound methods, builtins, slotted objects
            raise TypeError(
                f"@dependency cannot store options on {target!r}; decorate the underlying function or class instead"
            ) from exc
        return target

    return mark(fn) if fn is not None else mark


def options_of(call: Callable[..., Any]) -> DependencyOptions:
    """Find ``@dependency`` options, looking through partials and ``functools.wraps``."""
    seen: set[int] = set()
    obj: Any = call
    while obj is not None and id(obj) not in seen:
        seen.add(id(obj))
        found = getattr(obj, _OPTIONS_ATTR, None)
        if isinstance(found, DependencyOptions):
            return found
        obj = obj.func if isinstance(obj, functools.partial) else getattr(obj, "__wrapped__", None)
    return DEFAULT_OPTIONS


def marker_of(obj: Any) -> Depends | None:
    """``obj`` as a ``Depends`` marker: itself if it is lifecycle's, the same
    declaration if it is FastAPI's ``fastapi.params.Depends`` (or ``Security``, whose
    scopes mean nothing to a job), else None."""
    if isinstance(obj, Depends):
        return obj
    params = sys.modules.get("fastapi.params")
    if params is not None and isinstance(obj, params.Depends):
        return Depends(obj.dependency, use_cache=obj.use_cache)
    return None


# Types FastAPI fills from the HTTP request or response, by module:qualname (checked on
# the annotation's MRO, so subclasses count), so that none of them is imported here.
_REQUEST_TYPES = frozenset(
    {
        "starlette.requests:HTTPConnection",  # Request's and WebSocket's base
        "starlette.responses:Response",
        "starlette.background:BackgroundTasks",
        "fastapi.security.oauth2:SecurityScopes",
    }
)


def request_only(annotation: Any, markers: tuple[Any, ...]) -> str | None:
    """What makes a parameter FastAPI request data (``Request``, ``Header()``, ...), in
    words, or None. A job has no HTTP request, so such a parameter cannot be filled.

    Args:
        annotation: the parameter's type, ``Annotated`` metadata removed.
        markers: its default value and its ``Annotated`` metadata.
    """
    if "starlette" not in sys.modules:
        return None
    if inspect.isclass(annotation):
        for cls in annotation.__mro__:
            if f"{cls.__module__}:{cls.__qualname__}" in _REQUEST_TYPES:
                return f"{annotation.__module__}.{annotation.__qualname__}"
    params = sys.modules.get("fastapi.params")
    if params is not None:
        for marker in markers:
            if isinstance(marker, params.Param | params.Body):
                return f"fastapi.{type(marker).__name__}()"
    return None
