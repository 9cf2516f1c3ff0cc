"""Command-line options made from a job's own parameters: ``user_id: int`` becomes
``--user-id INT``, converted by annotation, with help taken from the docstring."""

from __future__ import annotations

import enum
import inspect
import json
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import click

from .._analysis import EMPTY, Param
from .._job import Job


def option_name(name: str) -> str:
    return "--" + name.replace("_", "-")


class JSONType(click.ParamType):  # type: ignore[type-arg]
    """For annotations click has no type for (dict, custom classes): a JSON value."""

    name = "JSON"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if not isinstance(value, str):
            return value
        try:
            return json.loads(value)
        except ValueError:
            return value  # a bare string is fine too


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


def click_type(annotation: Any) -> tuple[click.ParamType | None, bool]:  # type: ignore[type-arg]
    """(type, multiple) for an annotation; type None means a boolean flag."""
    annotation, _ = _unoptional(annotation)
    origin = get_origin(annotation)
    if origin in (list, tuple, set, frozenset) or annotation in (list, tuple, set):
        args = [a for a in get_args(annotation) if a is not Ellipsis]
        inner, _ = click_type(args[0]) if args else (click.STRING, False)
        return inner or click.BOOL, True
    if origin is Literal:
        return LiteralType(get_args(annotation)), False
    if annotation is bool:
        return None, False
    if annotation is int:
        return click.INT, False
    if annotation is float:
        return click.FLOAT, False
    if annotation is str or annotation is EMPTY or annotation is Any:
        return click.STRING, False
    if inspect.isclass(annotation) and issubclass(annotation, Path):
        return click.Path(path_type=Path), False
    if inspect.isclass(annotation) and issubclass(annotation, enum.Enum):
        return EnumType(annotation), False
    return JSONType(), False


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
    kind, multiple = click_type(param.annotation)
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
