"""``@job``: a function plus its options, its analysed, validated graph and its payload
model.

The payload model is the job's non-dependency parameters, with the by-name parameters
of its dependencies, as one pydantic ``TypedDict`` validator compiled here, once per
job. Every door goes through it: ``Runtime.run`` and ``bind``, queue messages (the
worker), Celery and the CLI call ``Job.bind_payload``; producers call
``Job.dump_payload``. So they all accept, reject and convert the same payloads.

Why a ``TypedDict`` with every key optional rather than a model: missing, unexpected
and doubled arguments are found here, worded as a Python call's errors, and only the
arguments actually given reach pydantic. Defaults are filled in afterwards, as given
(neither Python nor pydantic validates a default), and the validator returns a plain
dict, which is what the generated runner reads the arguments from."""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import math
import re
import weakref
from collections.abc import Callable, Iterable, Mapping
from datetime import timedelta
from typing import Annotated, Any, Generic, ParamSpec, TypeVar, get_args, get_origin, overload

from pydantic import ConfigDict, TypeAdapter, ValidationError
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaValue
from pydantic_core import CoreSchema, PydanticSerializationError, core_schema, to_jsonable_python
from typing_extensions import TypedDict

from ._analysis import EMPTY, Kind, Param, Provider, Source, analyse, label
from ._codegen import Runners, compile_binder, compile_runners
from ._errors import DependencyError, PayloadError
from ._markers import DEFAULT_OPTIONS, Depends
from ._plan import Plan, compile_plan
from ._schedule import CatchUp, Schedule

P = ParamSpec("P")
R = TypeVar("R")

# When set (by ``lifecycle check``), graph errors at decoration are collected here
# instead of raised, so one run can report every broken job in a module.
collected_errors: contextvars.ContextVar[list[tuple[Job[..., Any], DependencyError]] | None] = contextvars.ContextVar(
    "lifecycle_collected_errors", default=None
)


class Job(Generic[P, R]):
    """A job function with its options. Calling it calls the function itself, with no
    injection, so unit tests can pass fakes directly.

    Its payload (the non-dependency parameters) is validated with pydantic v2 at every
    door: see ``bind_payload``, ``dump_payload`` and ``payload_schema``."""

    # No class-level annotations: the class reports ``lifecycle.Job`` (see __init__.py),
    # where typing.get_type_hints could not resolve this module's names.

    def __init__(
        self,
        fn: Callable[P, R],
        *,
        name: str | None = None,
        retries: int = 0,
        timeout: float | None = None,
        dependencies: Iterable[Depends] = (),
        cron: str | None = None,
        every: timedelta | float | None = None,
        timezone: str = "UTC",
        catch_up: CatchUp = "none",
    ) -> None:
        if isinstance(fn, Job):
            fn = fn.fn
        if not callable(fn):
            raise TypeError(f"@job decorates a callable, got {fn!r}")
        if not isinstance(retries, int) or isinstance(retries, bool) or retries < 0:
            raise ValueError(f"@job retries must be an int >= 0, got {retries!r}")
        if timeout is not None and (not isinstance(timeout, (int, float)) or timeout <= 0):
            raise ValueError(f"@job timeout must be a positive number of seconds, got {timeout!r}")
        self.fn: Callable[P, R] = fn
        self.name: str = name or getattr(fn, "__name__", None) or label(fn)
        self.retries: int = retries
        self.timeout: float | None = float(timeout) if timeout is not None else None
        self.dependencies: tuple[Depends, ...] = tuple(dependencies)
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
        # The binder leaves keyword-only defaults out: defaults are filled in after validation.
        keyword_only = [p for p in self.params if p.kind is inspect.Parameter.KEYWORD_ONLY]
        self._bind_positional: Callable[[tuple[Any, ...]], dict[str, Any]] | None = None
        if all(p.default is not EMPTY for p in keyword_only):
            self._bind_positional = compile_binder(self._positional, ())
        self._required_set = frozenset(self._required)
        self.accepts_extra = self.body.var_keyword
        self._fields: dict[str, Any] = {p.name: Any for p in self.params}
        self._adapter: TypeAdapter[Any] | None = None
        # None when no field constrains its value (all unannotated or Any): nothing to check.
        self._validate: Callable[[dict[str, Any]], dict[str, Any]] | None = None
        # Fields whose given value is handed on as itself when validation did not change
        # it (see _keep_identity); scalars are immutable, so their identity never matters.
        self._keep: tuple[str, ...] = ()
        # Validate now: a broken graph is reported where the job is declared.
        try:
            self.runners: Runners = self.compile((), {})
            self.plan: Plan = self.runners.plan
            self._fields = _payload_fields(self.name, label(fn), self.params, self.plan)
            if any(annotation is not Any for annotation in self._fields.values()):
                self._adapter = _compile_model(self.name, fn, self._fields)
                self._validate = self._adapter.validator.validate_python
                self._keep = tuple(
                    name for name, annotation in self._fields.items() if annotation not in _IMMUTABLE_SCALARS
                )
        except DependencyError as exc:
            sink = collected_errors.get()
            if sink is None:
                raise
            if self.error is None:
                self.error = exc
                sink.append((self, exc))
        # @job(cron=...) / @job(every=...): one schedule without a payload, which a Worker
        # running this job drives (see _schedule). Checked here, where it is declared.
        self.schedule: Schedule | None = None
        if cron is not None or every is not None or timezone != "UTC" or catch_up != "none":
            self.schedule = Schedule(self, cron=cron, every=every, timezone=timezone, catch_up=catch_up)

    def compile(self, runtime_dependencies: Iterable[Depends], overrides: Mapping[Any, Any]) -> Runners:
        """The job's plan, then the code that runs it: the pipeline runs one way.

        Args:
            runtime_dependencies: ``Runtime(dependencies=...)``, run before the job's own.
            overrides: ``{original: replacement}`` (a runtime's ``dependency_overrides``).

        Raises:
            DependencyError: the graph is invalid (or the job's declaration was).
        """
        if self.error is not None:
            raise self.error
        plan = compile_plan(
            self.name, self.body, self.payload_names, (*runtime_dependencies, *self.dependencies), overrides
        )
        return compile_runners(plan)

    @property
    def source(self) -> str:
        """The Python source generated to run this job (no overrides), for debugging:
        a traceback through it shows these lines."""
        return self.runners.source

    # -- the payload ----------------------------------------------------------------------
    def bind_payload(
        self, args: tuple[Any, ...], kwargs: Mapping[str, Any]
    ) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """Match call arguments to the job's parameters, validate and convert them with
        the payload model, and fill in the defaults of those not given.

        Args:
            args: positional arguments (``rt.run(job, 1, 2)``); ``()`` for a message.
            kwargs: arguments by name: keyword arguments, or a message's JSON payload.

        Returns:
            ``(payload, extras)``: the validated arguments by name (what the job and its
            dependencies receive, and ``JobContext.args``), and the arguments only a
            ``**kwargs`` parameter takes (None when there are none), passed unchecked.

        Raises:
            PayloadError: listing every problem at once (missing, unexpected or doubled
                arguments, and each value pydantic rejects, with its location); ``errors``
                holds them as data.
        """
        bound, extras = self._check(args, kwargs)
        for name, default in self._defaults:
            if name not in bound:
                bound[name] = default
        return bound, extras

    def dump_payload(self, payload: Mapping[str, Any]) -> dict[str, Any]:
        """The payload as a queue message carries it: validated like ``bind_payload``
        (by name only), then serialised by the same model in pydantic's JSON mode, so
        models, dataclasses, dates, UUIDs, decimals and enums cross the broker and come
        back converted. Arguments not given stay out (the consumer fills in defaults).

        Args:
            payload: the job's arguments by name (never keyword arguments: they could
                clash with a queue's ``delay``/``at``).

        Raises:
            PayloadError: the payload does not fit the job (see ``bind_payload``).
            TypeError: a value JSON cannot carry (an arbitrary object in an ``Any``
                field, a field of a type pydantic can only check with ``isinstance``).
            ValueError: a NaN or infinite float in an ``Any`` field (JSON has neither).
        """
        if not isinstance(payload, Mapping):
            raise PayloadError(
                f"job {self.name!r} ({label(self.fn)}): the payload must be a mapping of argument names "
                f"to values, got {type(payload).__name__}"
            )
        given, extras = self._check((), payload)
        for name, value in given.items():
            if self._fields.get(name) is Any and not _finite(value):
                raise ValueError(
                    f"job {self.name!r} ({label(self.fn)}), parameter {name!r}: NaN and infinite floats "
                    "cannot cross a queue (JSON has neither)"
                )
        adapter = self.payload_model()
        try:
            body: dict[str, Any] = adapter.dump_python(given, mode="json")
        except PydanticSerializationError as exc:
            raise TypeError(
                f"job {self.name!r} ({label(self.fn)}): the payload cannot be sent as JSON: {exc}"
            ) from None
        if self._validate is not None:
            # What the worker will see must pass too: a NaN in a nested model's float
            # became null here, and that fails now, at the producer, not as a dead letter.
            self._validated(dict(body))
        if extras:
            body.update(extras)
        return body

    def payload_schema(self) -> dict[str, Any]:
        """The JSON Schema (draft 2020-12, as pydantic writes it) of the job's payload: an
        object with one property per payload parameter, ``required`` for those without
        a default, each default, and ``additionalProperties`` false unless the job takes
        ``**kwargs``. Its title is the job's name, its description the docstring's first
        paragraph. A type only checkable with ``isinstance`` is described, not typed.
        This is what ``lifecycle schema TARGET`` prints."""
        schema = self.payload_model().json_schema(schema_generator=_PayloadJsonSchema)
        properties = schema.setdefault("properties", {})
        for name, default in self._defaults:
            # A default JSON cannot show (an object) is left out of the schema.
            with contextlib.suppress(PydanticSerializationError):
                properties[name]["default"] = to_jsonable_python(default)
        if self._required:
            schema["required"] = list(self._required)
        schema["additionalProperties"] = self.accepts_extra
        summary = (inspect.getdoc(self.fn) or "").split("\n\n", 1)[0].strip()
        if summary:
            schema["description"] = summary
        return schema

    def payload_model(self) -> TypeAdapter[Any]:
        """The pydantic ``TypeAdapter`` of the payload (a ``TypedDict`` whose keys are all
        optional: required arguments are checked by ``bind_payload`` itself)."""
        if self._adapter is None:  # all fields are Any: built only when asked for
            self._adapter = _compile_model(self.name, self.fn, self._fields)
        return self._adapter

    def _check(
        self, args: tuple[Any, ...], kwargs: Mapping[str, Any]
    ) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """The arguments given, by name, validated and converted; defaults not filled in."""
        if not kwargs:
            if len(args) == len(self._positional) and self._bind_positional is not None:
                return self._validated(self._bind_positional(args)), None
        elif not args and self._required_set <= kwargs.keys() <= self.payload_names:
            return self._validated(dict(kwargs)), None
        problems: list[str] = []
        errors: list[dict[str, Any]] = []
        bound: dict[str, Any] = {}
        extras: dict[str, Any] | None = None
        if len(args) > len(self._positional):
            problems.append(
                f"takes {len(self._positional)} positional argument(s) "
                f"({', '.join(self._positional) or 'none'}) but {len(args)} were given"
            )
            errors += [
                _error("unexpected_positional_argument", (index,), "Unexpected positional argument")
                for index in range(len(self._positional), len(args))
            ]
        for name, value in zip(self._positional, args, strict=False):
            bound[name] = value
        unexpected = []
        for key, value in kwargs.items():
            if key in self.payload_names:
                if key in bound:
                    problems.append(f"got multiple values for argument {key!r}")
                    errors.append(_error("multiple_argument_values", (key,), "Got multiple values for argument"))
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
                + ", ".join(_shorten(repr(key)) for key in unexpected)
                + f" (the job takes: {', '.join(sorted(self.payload_names)) or 'no arguments'})"
            )
            errors += [_error("extra_forbidden", (key,), "Extra inputs are not permitted") for key in unexpected]
        missing = [name for name in self._required if name not in bound]
        if missing:
            problems.append("missing argument(s) " + ", ".join(map(repr, missing)))
            errors += [_error("missing", (name,), "Field required") for name in missing]
        if self._validate is not None:
            try:
                validated = self._validate(bound)
            except ValidationError as exc:
                texts, details = _describe(exc)
                problems += texts
                errors += details
            else:
                bound = self._keep_identity(bound, validated) if self._keep else validated
        if problems:
            raise self._payload_error(problems, errors)
        return bound, extras

    def _validated(self, bound: dict[str, Any]) -> dict[str, Any]:
        validate = self._validate
        if validate is None:
            return bound
        try:
            validated = validate(bound)
        except ValidationError as exc:
            texts, details = _describe(exc)
        else:
            return self._keep_identity(bound, validated) if self._keep else validated
        # Raised outside the except block: pydantic's own message, which would otherwise
        # ride along as the context, prints every input value.
        raise self._payload_error(texts, details)

    def _keep_identity(self, given: dict[str, Any], validated: dict[str, Any]) -> dict[str, Any]:
        """Hand on the caller's own object where validation only rebuilt it equal (pydantic
        copies every list and dict it checks): a collector list passed to ``rt.run`` is
        still the one the job and its dependencies append to. Exact: only when the copy
        is the same types all the way down, so nothing converted is undone."""
        for name in self._keep:
            if name in validated:
                old, new = given[name], validated[name]
                if new is not old and _unchanged(old, new):
                    validated[name] = old
        return validated

    def _payload_error(self, problems: list[str], errors: list[dict[str, Any]]) -> PayloadError:
        # The data rides along for callers that should not parse the text.
        message = f"job {self.name!r} ({label(self.fn)}): " + "; ".join(problems)
        return PayloadError(message, job=self.name, errors=errors)

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return self.fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<Job {self.name!r} {label(self.fn)}>"


# -- the payload model ----------------------------------------------------------------------

# JSON has no NaN or Infinity, so a float a queue could not carry is refused at every
# door alike. A class pydantic has no schema for (a client object passed to ``rt.run``)
# is checked with isinstance, as before pydantic, instead of failing the declaration.
_CONFIG = ConfigDict(allow_inf_nan=False, arbitrary_types_allowed=True)

# An input value is echoed in an error only when it is a short scalar in a field whose
# name does not look like it holds a secret: messages end up in logs and dead letters.
_ECHO_LIMIT = 40
_SECRET_NAME = re.compile(r"pass(w|$)|pwd|secret|token|api_?key|credential|auth|cookie|private|(^|_)key($|_)", re.I)


def _constraint(param: Param) -> Any:
    """A by-name parameter's payload type: its annotation as written, ``Any`` when it
    has none, or when it is a string that could not be resolved at decoration (a
    ``TYPE_CHECKING`` import): such a value is passed on unchecked, as before."""
    declared = param.declared
    if declared is EMPTY or isinstance(declared, str):
        return Any
    return declared


def _same(a: Any, b: Any) -> bool:
    # ``Field(...)`` metadata has no __eq__: equal spellings compare by their repr.
    return bool(a == b) or repr(a) == repr(b)


def _merge(a: Any, b: Any) -> Any | None:
    """The one type two annotations of the same argument agree on, or None. ``T`` and
    ``Annotated[T, Field(gt=0)]`` agree (on the constrained one); other pairs must be
    the same type."""
    if _same(a, b):
        return a
    base_a = get_args(a)[0] if get_origin(a) is Annotated else a
    base_b = get_args(b)[0] if get_origin(b) is Annotated else b
    if _same(base_a, b):
        return a
    if _same(a, base_b):
        return b
    return None


def _type_name(annotation: Any) -> str:
    if isinstance(annotation, type):
        return annotation.__qualname__
    return repr(annotation).replace("typing.", "")


def _payload_fields(job_name: str, job_label: str, params: tuple[Param, ...], plan: Plan) -> dict[str, Any]:
    """One type per payload name: the job's annotation, or that of a job-scoped
    dependency's by-name parameter of the same name (docs/concepts.md).
    Two that disagree are a ``DependencyError``; ``Any``/unannotated agrees with all."""
    fields = {p.name: _constraint(p) for p in params}
    owners = {p.name: "the job" for p in params}
    seen: set[int] = set()
    for step in plan.steps:
        provider = step.provider
        if step.worker is not None or id(provider) in seen:
            continue  # worker-scoped providers never take job arguments (checked in _plan)
        seen.add(id(provider))
        for p in provider.params:
            if p.source is not Source.NAMED or p.name not in fields:
                continue
            annotation = _constraint(p)
            if annotation is Any:
                continue
            if fields[p.name] is Any:
                fields[p.name], owners[p.name] = annotation, f"dependency {provider.label}"
                continue
            merged = _merge(fields[p.name], annotation)
            if merged is None:
                raise DependencyError(
                    f"job {job_name!r} ({job_label}), parameter {p.name!r}: annotated "
                    f"{_type_name(fields[p.name])} by {owners[p.name]} but {_type_name(annotation)} by "
                    f"dependency {provider.label}; the job receives one value, so annotate both alike "
                    "(or leave the dependency's parameter unannotated)"
                )
            if merged is not fields[p.name]:
                fields[p.name], owners[p.name] = merged, f"dependency {provider.label}"
    return fields


def _compile_model(job_name: str, fn: Callable[..., Any], fields: dict[str, Any]) -> TypeAdapter[Any]:
    """The pydantic validator and serialiser of a payload; a type pydantic cannot handle
    is a ``DependencyError`` naming the parameter."""
    module = getattr(fn, "__module__", None) or __name__
    try:
        return _typed_dict_adapter(job_name, module, fields)
    except Exception as exc:
        culprits = []
        for name, annotation in fields.items():
            try:
                _typed_dict_adapter(job_name, module, {name: annotation})
            except Exception as field_exc:
                reason = str(field_exc).split("\n", 1)[0]
                culprits.append(f"parameter {name!r}: pydantic cannot validate {_type_name(annotation)} ({reason})")
        where = "; ".join(culprits) or f"pydantic cannot build the payload model ({exc})"
        raise DependencyError(
            f"job {job_name!r} ({label(fn)}), {where}; annotate it with a type pydantic supports, or Any"
        ) from exc


def _typed_dict_adapter(title: str, module: str, fields: dict[str, Any]) -> TypeAdapter[Any]:
    make: Any = TypedDict  # called with a dict built at run time, which type checkers reject
    model = make(title, fields, total=False)
    model.__module__ = module  # where pydantic resolves forward references in nested types
    model.__pydantic_config__ = _CONFIG
    adapter: TypeAdapter[Any] = TypeAdapter(model)
    # A type that is not fully defined (an unresolvable forward reference) makes pydantic
    # defer the build to the first validation; build it now, at decoration.
    # (pydantic < 2.10 builds at construction and has no ``rebuild``.)
    rebuild = getattr(adapter, "rebuild", None)
    if rebuild is not None:
        rebuild(raise_errors=True)
    return adapter


class _PayloadJsonSchema(GenerateJsonSchema):
    """Describes what JSON cannot express instead of failing the whole schema."""

    def is_instance_schema(self, schema: core_schema.IsInstanceSchema) -> JsonSchemaValue:
        cls = schema["cls"]
        name = f"{cls.__module__}.{cls.__qualname__}" if isinstance(cls, type) else repr(cls)
        return {"description": f"a {name} instance (checked with isinstance; cannot come from JSON)"}

    def handle_invalid_for_json_schema(self, schema: CoreSchema, error_info: str) -> JsonSchemaValue:
        return {"description": f"not expressible in JSON Schema: {error_info}"}


def _error(kind: str, loc: tuple[str | int, ...], msg: str) -> dict[str, Any]:
    return {"type": kind, "loc": loc, "msg": msg}


def _location(loc: tuple[str | int, ...]) -> str:
    return ".".join(str(part) for part in loc) or "payload"


def _describe(exc: ValidationError) -> tuple[list[str], list[dict[str, Any]]]:
    """pydantic's errors as message parts and as data, with the input value kept (in
    both, alike) only when it is safe to show: see ``_ECHO_LIMIT``."""
    texts: list[str] = []
    details: list[dict[str, Any]] = []
    for error in exc.errors(include_url=False):
        loc = tuple(error["loc"])
        detail = _error(error["type"], loc, error["msg"])
        ctx = {k: v for k, v in (error.get("ctx") or {}).items() if isinstance(v, str | int | float | bool | None)}
        if ctx:
            detail["ctx"] = ctx
        text = f"{_location(loc)}: {error['msg']}"
        value = error.get("input")
        shown = repr(value)
        if (
            isinstance(value, str | int | float | bool | None)
            and len(shown) <= _ECHO_LIMIT
            and not any(isinstance(part, str) and _SECRET_NAME.search(part) for part in loc)
        ):
            detail["input"] = value
            text += f", got {shown}"
        texts.append(text)
        details.append(detail)
    return texts, details


_IMMUTABLE_SCALARS = (int, str, float, bool, bytes)


def _unchanged(old: Any, new: Any, depth: int = 0) -> bool:
    """``new`` equals ``old`` with the same types throughout (lists, tuples and dicts of
    scalars or of the same objects), so handing on ``old`` instead changes nothing."""
    if old is new:
        return True
    kind = type(old)
    if kind is not type(new) or depth > 64:
        return False
    if kind is list or kind is tuple:
        return len(old) == len(new) and all(_unchanged(a, b, depth + 1) for a, b in zip(old, new, strict=True))
    if kind is dict:
        return old.keys() == new.keys() and all(
            type(key) is type(next_key) and _unchanged(old[key], new[key], depth + 1)
            for key, next_key in zip(old, new, strict=True)
        )
    return kind in _IMMUTABLE_SCALARS or old is None


def _shorten(text: str) -> str:
    return text if len(text) <= _ECHO_LIMIT else text[: _ECHO_LIMIT - 3] + "..."


def _finite(value: Any, depth: int = 0) -> bool:
    """No NaN or infinity in ``value`` or in the plain containers it holds."""
    if type(value) is float:
        return math.isfinite(value)
    if depth < 64:
        if isinstance(value, dict):
            return all(_finite(item, depth + 1) for item in value.values())
        if isinstance(value, list | tuple | set | frozenset):
            return all(_finite(item, depth + 1) for item in value)
    return True


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
    cron: str | None = None,
    every: timedelta | float | None = None,
    timezone: str = "UTC",
    catch_up: CatchUp = "none",
) -> Callable[[Callable[P, R]], Job[P, R]]: ...


def job(
    fn: Callable[P, R] | None = None,
    /,
    *,
    name: str | None = None,
    retries: int = 0,
    timeout: float | None = None,
    dependencies: Iterable[Depends] = (),
    cron: str | None = None,
    every: timedelta | float | None = None,
    timezone: str = "UTC",
    catch_up: CatchUp = "none",
) -> Job[P, R] | Callable[[Callable[P, R]], Job[P, R]]:
    """Declare a job; its dependency graph is built and validated right here.

    Args:
        fn: the function (when used as ``@job`` without parentheses).
        name: the name messages use for it; None: the function's name.
        retries: attempts after the first one when it fails (>= 0).
        timeout: seconds one attempt may take, teardown excluded; None: no limit.
        dependencies: ``Depends(...)`` run for it whose values are not injected.
        cron: run it on this cron expression (five fields, or six with seconds first)
            in every ``Worker`` that runs it; see ``lifecycle.Schedule``. Not with
            ``every``.
        every: run it every interval (a ``timedelta`` or seconds); not with ``cron``.
        timezone: the IANA zone ``cron`` reads wall-clock times in (default UTC).
        catch_up: ``"none"`` (default) or ``"latest"``: whether a tick missed while
            no worker was up runs once when one starts.
    """

    def decorate(target: Callable[P, R]) -> Job[P, R]:
        return Job(
            target,
            name=name,
            retries=retries,
            timeout=timeout,
            dependencies=dependencies,
            cron=cron,
            every=every,
            timezone=timezone,
            catch_up=catch_up,
        )

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
