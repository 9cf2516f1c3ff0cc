"""Command-line options made from a job's own parameters: ``user_id: int`` becomes
``--user-id INT``, converted by annotation, with help taken from the docstring.

Containers: ``list[T]``, ``set[T]`` and ``tuple[T, ...]`` repeat the option (``--tag a
--tag b``); a fixed ``tuple[A, B]`` takes that many values (``--pair 3 4``); ``dict[K,
V]`` and other containers take one JSON value whose shape is checked here, so that a
typo is a usage error naming the option rather than a string handed to the job. Types
this module does not know (classes, models) are left to the job's payload validation."""

from __future__ import annotations

import collections.abc
import enum
import inspect
import json
import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple, get_args, get_origin

import click

from .._analysis import EMPTY, Param
from .._job import Job


def option_name(name: str) -> str:
    return "--" + name.replace("_", "-")


_MAPPINGS = (dict, collections.abc.Mapping, collections.abc.MutableMapping)
_SEQUENCES = (
    list,
    set,
    frozenset,
    collections.abc.Sequence,
    collections.abc.MutableSequence,
    collections.abc.Set,
    collections.abc.MutableSet,
    collections.abc.Iterable,
    collections.abc.Collection,
)


def _is_container(annotation: Any) -> bool:
    origin = get_origin(annotation) or annotation
    return origin in _MAPPINGS or origin in _SEQUENCES or origin is tuple


def mismatch(value: Any, annotation: Any, where: str = "") -> str | None:
    """Why a decoded JSON ``value`` does not have the shape of ``annotation`` (``None``:
    it does). Checks containers, their items and JSON scalars; any other type is left
    to the job's payload validation.

    Args:
        value: a value decoded from JSON.
        annotation: the parameter's annotation.
        where: the path of ``value`` inside the option's value, for the message.
    """
    at = f" at {where}" if where else ""
    origin = get_origin(annotation)
    args = get_args(annotation)
    if origin is Annotated:
        return mismatch(value, args[0], where)
    if origin is typing.Union or origin is types.UnionType:
        reasons = [mismatch(value, arg, where) for arg in args]
        return None if any(reason is None for reason in reasons) else f"{value!r}{at} is none of {_name(annotation)}"
    if annotation is type(None) or annotation is None:
        return None if value is None else f"{value!r}{at} is not null"
    if annotation in (Any, EMPTY, object):
        return None
    if origin is Literal:
        return None if value in args else f"{value!r}{at} is not one of {', '.join(map(repr, args))}"
    scalar = {bool: (bool,), int: (int,), float: (int, float), str: (str,)}.get(annotation)
    if scalar is not None:
        ok = isinstance(value, scalar) and (annotation is bool or not isinstance(value, bool))
        return None if ok else f"{value!r}{at} is not {_a(annotation.__name__)}"
    container = origin or annotation
    if container in _MAPPINGS:
        if not isinstance(value, dict):
            return f"expected a JSON object{at}, got {_json_kind(value)}"
        key_type, value_type = (*args, Any, Any)[:2]
        for key, item in value.items():
            if key_type is int and not _int_like(key):
                return f"key {key!r}{at} is not an integer"
            problem = mismatch(item, value_type, f"{where}[{key!r}]")
            if problem:
                return problem
        return None
    if container in _SEQUENCES or container is tuple:
        if not isinstance(value, list):
            return f"expected a JSON array{at}, got {_json_kind(value)}"
        if container is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                return f"expected {len(args)} items{at}, got {len(value)}"
            items = list(zip(value, args, strict=True))
        else:
            items = [(item, args[0] if args else Any) for item in value]
        for index, (item, item_type) in enumerate(items):
            problem = mismatch(item, item_type, f"{where}[{index}]")
            if problem:
                return problem
    return None


def _int_like(key: str) -> bool:
    try:
        int(key)
    except ValueError:
        return False
    return True


def _a(noun: str) -> str:
    return f"an {noun}" if noun[:1] in "aeiou" else f"a {noun}"


def _json_kind(value: Any) -> str:
    kinds = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return kinds.get(type(value), "a number")


def _name(annotation: Any) -> str:
    return annotation.__name__ if isinstance(annotation, type) else str(annotation).replace("typing.", "")


class JSONType(click.ParamType):  # type: ignore[type-arg]
    """For annotations click has no type for: one JSON value.

    For containers (dict, list, tuple, set ...) the value must be JSON of that shape
    (checked with ``mismatch``); for any other type a value that is not JSON is passed on
    as a string, for the job's payload validation to convert (a UUID, say).

    Args:
        annotation: the parameter's annotation (``Any``: any JSON value).
    """

    name = "JSON"

    def __init__(self, annotation: Any = Any) -> None:
        self.annotation = annotation
        self.strict = _is_container(annotation)
        self.name = "JSON" if not self.strict else ("JSON-OBJECT" if _is_mapping(annotation) else "JSON-ARRAY")

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if not isinstance(value, str):
            return value
        try:
            decoded = json.loads(value)
        except ValueError as exc:
            if not self.strict:
                return value  # a bare string is fine for a scalar type
            self.fail(f"{value!r} is not JSON ({exc}); expected {_name(self.annotation)}", param, ctx)
        problem = mismatch(decoded, self.annotation)
        if problem is not None:
            self.fail(f"{value!r}: {problem}; expected {_name(self.annotation)}", param, ctx)
        return decoded


def _is_mapping(annotation: Any) -> bool:
    return (get_origin(annotation) or annotation) in _MAPPINGS


class EnumType(click.Choice):  # type: ignore[type-arg]
    """An Enum by member name (or value), converted to the member."""

    def __init__(self, enum_class: type[enum.Enum]) -> None:
        self.enum_class = enum_class
        super().__init__([member.name for member in enum_class], case_sensitive=False)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, self.enum_class):
            return value
        for member in self.enum_class:
            if str(value) == str(member.value):
                return member
        name = super().convert(value, param, ctx)
        return next(member for member in self.enum_class if member.name.lower() == str(name).lower())


class LiteralType(click.Choice):  # type: ignore[type-arg]
    """A Literal's values, converted back to the literal's own type."""

    def __init__(self, values: tuple[Any, ...]) -> None:
        self.values = values
        super().__init__([str(v) for v in values])

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        text = super().convert(str(value), param, ctx)
        return next(v for v in self.values if str(v) == text)


def _unoptional(annotation: Any) -> tuple[Any, bool]:
    origin = get_origin(annotation)
    if origin is typing.Union or origin is types.UnionType:
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) == 1 and len(args) < len(get_args(annotation)):
            return args[0], True
    return annotation, False


class OptionShape(NamedTuple):
    """How an annotation becomes a click option."""

    type: click.ParamType | None  # type: ignore[type-arg]  # None: a --flag/--no-flag pair
    multiple: bool = False  # repeat the option, one item each time
    nargs: int = 1  # values per occurrence (a fixed-length tuple)


def click_type(annotation: Any) -> OptionShape:
    """The option shape of an annotation."""
    annotation, _ = _unoptional(annotation)
    if get_origin(annotation) is Annotated:
        return click_type(get_args(annotation)[0])
    origin = get_origin(annotation)
    args = get_args(annotation)
    if origin in (list, set, frozenset) or annotation in (list, set, frozenset, tuple) or (
        origin is tuple and len(args) == 2 and args[1] is Ellipsis
    ):
        return OptionShape(_item_type(args[0]) if args else click.STRING, multiple=True)
    if origin is tuple and args and Ellipsis not in args and args != ((),):
        return OptionShape(click.Tuple([_item_type(arg) for arg in args]), nargs=len(args))
    if origin is Literal:
        return OptionShape(LiteralType(args))
    if annotation is bool:
        return OptionShape(None)
    if annotation is int:
        return OptionShape(click.INT)
    if annotation is float:
        return OptionShape(click.FLOAT)
    if annotation is str or annotation is EMPTY or annotation is Any:
        return OptionShape(click.STRING)
    if inspect.isclass(annotation) and issubclass(annotation, Path):
        return OptionShape(click.Path(path_type=Path))
    if inspect.isclass(annotation) and issubclass(annotation, enum.Enum):
        return OptionShape(EnumType(annotation))
    return OptionShape(JSONType(annotation))


def _item_type(annotation: Any) -> click.ParamType:  # type: ignore[type-arg]
    """The type of one item of a repeated option or one value of a fixed tuple: a
    container item (``list[list[int]]``) is one JSON value."""
    shape = click_type(annotation)
    if shape.type is None:
        return click.BOOL
    if shape.multiple or shape.nargs != 1:
        return JSONType(_unoptional(annotation)[0])
    return shape.type


def docstring_help(fn: Any) -> dict[str, str]:
    """Parameter descriptions from Google-style ``Args:`` sections or ``:param x:`` lines."""
    doc = inspect.getdoc(fn) or ""
    found: dict[str, str] = {}
    for match in re.finditer(r":param\s+(?:\w+\s+)?(\w+):\s*(.+)", doc):
        found[match.group(1)] = match.group(2).strip()
    section = re.search(r"^(?:Args|Arguments|Parameters):\s*\n((?:[ \t]+.*\n?|\s*\n)+)", doc, re.MULTILINE)
    if section:
        for match in re.finditer(r"^[ \t]+(\w+)(?:\s*\([^)]*\))?:\s*(.+)$", section.group(1), re.MULTILINE):
            found.setdefault(match.group(1), match.group(2).strip())
    return found


def job_options(job: Job[..., Any], batch: bool = False) -> list[click.Option]:
    """In batch mode nothing is required: each JSON line brings its own arguments, and
    options given on the command line act as defaults for every line."""
    helps = docstring_help(job.fn)
    return [_option(param, helps.get(param.name), batch) for param in job.params]


def _option(param: Param, help_text: str | None, batch: bool) -> click.Option:
    kind, multiple, nargs = click_type(param.annotation)
    _, optional = _unoptional(param.annotation)
    required = param.default is EMPTY and not batch
    default = None if required else param.default
    if kind is None:  # bool: a --flag/--no-flag pair
        flag = option_name(param.name)
        return click.Option(
            [f"{flag}/--no-{flag[2:]}", param.name],
            default=bool(default) if default is not None else False,
            required=False,
            show_default=True,
            help=help_text,
        )
    extra: dict[str, Any] = {}
    if not required and not batch:  # click >= 8.2 reads an explicit default=None as "has a value"
        extra["default"] = list(default) if multiple and default is not None else default
    return click.Option(
        [option_name(param.name), param.name],
        type=kind,
        multiple=multiple,
        nargs=nargs,
        required=required and not optional,
        show_default=not required,
        help=help_text,
        **extra,
    )


def to_payload(job: Job[..., Any], values: dict[str, Any], ctx: click.Context | None = None) -> dict[str, Any]:
    """Click's values back to the job's argument shapes (tuples of multiple → lists).
    With ``ctx``, only the options actually given on the command line are kept."""
    payload = {}
    for param in job.params:
        if param.name not in values:
            continue
        if ctx is not None and ctx.get_parameter_source(param.name) is not click.core.ParameterSource.COMMANDLINE:
            continue
        value = values[param.name]
        if isinstance(value, tuple):
            value = list(value)
            if get_origin(_unoptional(param.annotation)[0]) in (tuple, set, frozenset):
                value = get_origin(_unoptional(param.annotation)[0])(value)
        if value is None and param.default is EMPTY and not _unoptional(param.annotation)[1]:
            continue
        payload[param.name] = value
    return payload
