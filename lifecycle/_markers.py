"""The two declarations users write: ``Depends(...)`` on a parameter and
``@dependency(...)`` on a provider. They only record intent; ``_analysis`` reads them."""

from __future__ import annotations

import functools
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
