"""Resolving ``TARGET`` (``jobs.py``, ``jobs.py:send_email``, ``pkg.jobs:worker``) to the
objects it names, with an error that says exactly what is wrong."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import click

from .._errors import DependencyError
from .._job import Job
from .._worker import Worker


class GraphError(click.ClickException):
    """A dependency graph is invalid: reported with exit code 2, like a usage error."""

    exit_code = 2


@dataclass
class Target:
    module: ModuleType
    source: str  # what the user typed before ':'
    attribute: str | None

    @property
    def jobs(self) -> dict[str, Job[..., Any]]:
        return {name: value for name, value in vars(self.module).items() if isinstance(value, Job)}

    @property
    def workers(self) -> dict[str, Worker]:
        return {name: value for name, value in vars(self.module).items() if isinstance(value, Worker)}

    def listing(self) -> str:
        names = [f"{self.source}:{name}" for name in (*self.jobs, *self.workers)]
        return ", ".join(names) or "none"

    def resolve(self) -> Job[..., Any] | Worker:
        """The named job or worker, or the only one in the module."""
        if self.attribute is None:
            found: dict[str, Job[..., Any] | Worker] = {**self.jobs, **self.workers}
            if len(found) == 1:
                return next(iter(found.values()))
            raise click.UsageError(
                f"{self.source} defines {len(found) or 'no'} jobs/workers"
                + (f"; name one: {self.listing()}" if found else "; decorate a function with @job")
            )
        value = getattr(self.module, self.attribute, None)
        if value is None and not hasattr(self.module, self.attribute):
            raise click.UsageError(f"{self.source} has no attribute {self.attribute!r}; it defines: {self.listing()}")
        if not isinstance(value, Job | Worker):
            raise click.UsageError(
                f"{self.source}:{self.attribute} is a {type(value).__name__}, not a @job or a Worker; "
                f"it defines: {self.listing()}"
            )
        chosen: Job[..., Any] | Worker = value
        return chosen


def load(spec: str) -> Target:
    source, _, attribute = spec.partition(":") if not _is_windows_drive(spec) else (spec, "", "")
    module = _import(source)
    return Target(module, source, attribute or None)


def _is_windows_drive(spec: str) -> bool:
    return len(spec) > 1 and spec[1] == ":" and spec[0].isalpha() and spec.count(":") == 1 and "\\" in spec


def _import(source: str) -> ModuleType:
    path = Path(source)
    looks_like_file = source.endswith(".py") or "/" in source or path.exists()
    try:
        if looks_like_file:
            return _import_file(path)
        return importlib.import_module(source)
    except DependencyError as exc:
        raise GraphError(str(exc)) from exc
    except SyntaxError as exc:
        raise click.UsageError(f"syntax error in {exc.filename}, line {exc.lineno}: {exc.msg}") from exc
    except ModuleNotFoundError as exc:
        if exc.name == source or source.startswith(f"{exc.name}."):
            raise click.UsageError(f"no module named {source!r} (and no file of that name)") from exc
        raise click.UsageError(f"importing {source} failed: {exc}") from exc
    except click.ClickException:
        raise
    except Exception as exc:
        raise GraphError(f"importing {source} raised {type(exc).__name__}: {exc}") from exc


def _import_file(path: Path) -> ModuleType:
    if not path.is_file():
        raise click.UsageError(f"no such file: {path}")
    path = path.resolve()
    name = path.stem if path.stem not in sys.modules else f"lifecycle_target_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:  # pragma: no cover - a .py file always has one
        raise click.UsageError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent))  # so the file's own sibling imports work
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
