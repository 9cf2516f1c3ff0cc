"""Resolving ``TARGET`` (``jobs.py``, ``jobs.py:send_email``, ``pkg.jobs:worker``) to the
objects it names, with an error that says exactly what is wrong.

A dotted target is imported with the current directory first on ``sys.path``, as
``python -m`` does: the ``lifecycle`` console script would otherwise not find a module
in the directory it runs from. Celery tasks registered through ``CeleryLifecycle`` are
found through its ``jobs`` registry (the task objects themselves are Celery's, often
lazy proxies that this module never evaluates)."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import click

from .._errors import DependencyError
from .._job import Job
from .._schedule import Schedule
from .._worker import Worker
from ._signals import log


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

    @property
    def schedules(self) -> dict[str, Schedule]:
        """The module's ``Schedule`` objects (``lifecycle worker`` drives them)."""
        return {name: value for name, value in vars(self.module).items() if isinstance(value, Schedule)}

    @property
    def celery_tasks(self) -> dict[str, Job[..., Any]]:
        """The module's ``@lc.task`` functions, by attribute name, as their jobs.

        Read from each ``CeleryLifecycle`` in the module (its ``jobs``: task name -> Job),
        keeping the jobs whose function was defined in this module under its own name.
        ``lifecycle.celery`` is only looked up, never imported: a module with Celery
        tasks has imported it already, and Celery stays an optional dependency."""
        celery = sys.modules.get("lifecycle.celery")
        if celery is None:
            return {}
        found: dict[str, Job[..., Any]] = {}
        for value in list(vars(self.module).values()):
            if isinstance(value, celery.CeleryLifecycle):
                for job in value.jobs.values():
                    name = getattr(job.fn, "__name__", "")
                    if job.fn.__module__ == self.module.__name__ and hasattr(self.module, name):
                        found.setdefault(name, job)
        return found

    def everything(self) -> dict[str, Job[..., Any] | Worker]:
        return {**self.jobs, **self.celery_tasks, **self.workers}

    def listing(self) -> str:
        names = [f"{self.source}:{name}" for name in self.everything()]
        return ", ".join(names) or "none"

    def resolve(self) -> Job[..., Any] | Worker:
        """The named job, Celery task (as its job) or worker, or the only one in the module."""
        found = self.everything()
        if self.attribute is None:
            if len(found) == 1:
                return next(iter(found.values()))
            hint = "; decorate a function with @job"
            if hasattr(self.module, "__path__"):  # a package: its jobs are in its modules
                hint = f"; it is a package: name one of its modules, as {self.source}.jobs or {self.source}/jobs.py"
            raise click.UsageError(
                f"{self.source} defines {len(found) or 'no'} jobs/workers"
                + (f"; name one: {self.listing()}" if found else hint)
            )
        if self.attribute in found:
            return found[self.attribute]
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
    dotted = all(part.isidentifier() for part in source.split("."))
    if path.is_dir() and not (dotted and _is_package(path)):
        raise click.UsageError(_directory_message(source, path))
    looks_like_file = not path.is_dir() and (source.endswith(".py") or "/" in source or path.exists())
    try:
        if looks_like_file:
            return _import_file(path)
        _current_directory_first()
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
        # The message says what failed; the traceback (where) is there at --log-level debug.
        log().debug("cli.import_failed", target=source, error=f"{type(exc).__name__}: {exc}", exc_info=exc)
        raise GraphError(f"importing {source} raised {type(exc).__name__}: {exc}") from exc


def _current_directory_first() -> None:
    """Put the current directory first on ``sys.path``, as ``python -m`` does (a console
    script starts with its own directory there instead)."""
    cwd = os.getcwd()
    if sys.path[:1] not in ([cwd], [""]):
        sys.path.insert(0, cwd)


def _is_package(path: Path) -> bool:
    return (path / "__init__.py").is_file()


def _directory_message(source: str, path: Path) -> str:
    """What to type instead of a directory: one of its modules, as a file or dotted."""
    kind = "a package directory" if _is_package(path) else "a directory"
    modules = sorted(p for p in path.glob("*.py") if p.name != "__init__.py")[:5]
    example = modules[0].stem if modules else "jobs"
    base = source.rstrip("/")
    dotted = f"{base.replace('/', '.')}.{example}" if base not in ("", ".") else example
    message = (
        f"{source} is {kind}, not a Python file; name a module in it, as a file "
        f"({base}/{example}.py) or, from the directory that holds it, dotted ({dotted})"
    )
    if modules:
        message += "; it holds: " + ", ".join(f"{base}/{p.name}" for p in modules)
    return message


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
