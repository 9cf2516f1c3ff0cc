"""Leak checks: what a block of code (a test) left behind that outlives it.

Four kinds, each compared with what existed when the block began:
- threads still alive; the reusable worker threads of anyio's, trio's and asyncio's
  pools count only while they run code outside the standard library and those
  libraries (an idle pool thread is not a leak, a thread still running a job is);
- tasks still running in the event loop (asyncio: ``asyncio.all_tasks``; trio: the
  task tree under the root task), other than the checking task and its ancestors;
- generators and async generators suspended in code outside the standard library,
  pytest, anyio, trio and lifecycle (a dependency left at its ``yield``, a
  ``@contextmanager`` never exited);
- ``lifecycle.Runtime`` objects still open (their worker-scoped dependencies alive).

Leaks are polled for a while before they count, so a thread that is just finishing on
a loaded machine is not reported."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import inspect
import os
import sys
import sysconfig
import threading
import types
import weakref
from collections.abc import AsyncIterator
from typing import Any

import anyio
import trio

from .._runtime import Runtime


class LeakError(AssertionError):
    """Code under a leak check left something running or open; the message lists it."""


def _library_dirs() -> tuple[str, ...]:
    paths = {sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["platstdlib"]}
    for name in ("anyio", "trio", "_pytest", "pluggy", "pytest", "outcome", "sniffio", "lifecycle"):
        module = sys.modules.get(name)
        file = getattr(module, "__file__", None)
        if file:
            paths.add(os.path.dirname(file))
    return tuple(os.path.realpath(path) + os.sep for path in paths)


def _is_library(filename: str, libraries: tuple[str, ...]) -> bool:
    return os.path.realpath(filename).startswith(libraries) or filename.startswith("<")


def _is_pool_thread(thread: threading.Thread) -> bool:
    name = thread.name
    if name.startswith(("Trio thread", "asyncio_", "AnyIO worker thread")):
        return True
    return type(thread).__name__ == "WorkerThread" and type(thread).__module__.startswith("anyio.")


def _busy_with_user_code(thread: threading.Thread, libraries: tuple[str, ...]) -> bool:
    frame = sys._current_frames().get(thread.ident or -1)
    while frame is not None:
        if not _is_library(frame.f_code.co_filename, libraries):
            return True
        frame = frame.f_back
    return False


def _suspended_generators(libraries: tuple[str, ...]) -> list[Any]:
    found = []
    for obj in gc.get_objects():
        if isinstance(obj, types.GeneratorType):
            if inspect.getgeneratorstate(obj) != inspect.GEN_SUSPENDED:
                continue
        elif isinstance(obj, types.AsyncGeneratorType):
            # Suspended: started (past its first instruction), not running, not finished.
            if obj.ag_frame is None or obj.ag_running or obj.ag_frame.f_lasti <= 0:
                continue
        else:
            continue
        code = obj.gi_code if isinstance(obj, types.GeneratorType) else obj.ag_code
        if not _is_library(code.co_filename, libraries):
            found.append(obj)
    return found


def _tasks() -> tuple[set[Any], set[Any]]:
    """The running tasks, and the current task with its ancestors (exempt)."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        loop = None
    if loop is not None:
        current = asyncio.current_task()
        return set(asyncio.all_tasks(loop)), {current} if current is not None else set()
    tasks: set[Any] = set()
    stack: list[Any] = [trio.lowlevel.current_root_task()]
    while stack:
        node = stack.pop()
        if node is None:
            continue
        tasks.add(node)
        for child in node.child_nurseries:
            stack.extend(child.child_tasks)
    exempt: set[Any] = set()
    task: Any = trio.lowlevel.current_task()
    while task is not None:
        exempt.add(task)
        parent: Any = task.parent_nursery
        task = parent.parent_task if parent is not None else None
    return tasks, exempt


def pytest_module() -> Any:
    """pytest's own package, when it is loaded (the checks work without it)."""
    return sys.modules.get("_pytest")


class _Snapshot:
    def __init__(self) -> None:
        self.libraries = _library_dirs()
        self.runner_dirs = tuple(
            os.path.realpath(os.path.dirname(module.__file__)) + os.sep
            for module in (anyio, trio, pytest_module())
            if module is not None and module.__file__
        )
        self.threads = set(threading.enumerate())
        self.tasks: weakref.WeakSet[Any] = weakref.WeakSet(_tasks()[0])
        self.generators: weakref.WeakSet[Any] = weakref.WeakSet(_suspended_generators(self.libraries))
        self.runtimes: weakref.WeakSet[Any] = weakref.WeakSet(
            obj for obj in gc.get_objects() if isinstance(obj, Runtime) and obj._open
        )

    def leaks(self) -> list[str]:
        found: list[str] = []
        for thread in threading.enumerate():
            if thread in self.threads or not thread.is_alive():
                continue
            if _is_pool_thread(thread) and not _busy_with_user_code(thread, self.libraries):
                continue
            found.append(f"thread {thread.name!r} is still running")
        tasks, exempt = _tasks()
        for task in tasks - exempt:
            if task not in self.tasks and not _done(task) and not self._runner_task(task):
                found.append(f"task {_task_name(task)} is still running")
        gc.collect()
        for gen in _suspended_generators(self.libraries):
            if gen not in self.generators:
                found.append(f"generator {_where(gen)} is suspended at a yield and was never closed")
        for obj in gc.get_objects():
            if isinstance(obj, Runtime) and obj._open and obj not in self.runtimes:
                found.append("a lifecycle.Runtime is still open (its worker-scoped dependencies are alive)")
        return found

    def _runner_task(self, task: Any) -> bool:
        """A task of the test runner itself (anyio's pytest plugin runs each fixture and
        test in a task of its own), not of the code under test."""
        coro = task.get_coro() if isinstance(task, asyncio.Task) else getattr(task, "coro", None)
        code = getattr(coro, "cr_code", None)
        if code is None:
            return False
        filename = os.path.realpath(code.co_filename)
        return bool(filename.startswith(self.runner_dirs))


def _done(task: Any) -> bool:
    done = getattr(task, "done", None)
    return bool(done()) if callable(done) else False


def _task_name(task: Any) -> str:
    if isinstance(task, asyncio.Task):
        coro = task.get_coro()
        return f"{task.get_name()!r} ({getattr(coro, '__qualname__', coro)!r})"
    return repr(getattr(task, "name", task))


def _where(gen: Any) -> str:
    code = gen.gi_code if isinstance(gen, types.GeneratorType) else gen.ag_code
    frame = gen.gi_frame if isinstance(gen, types.GeneratorType) else gen.ag_frame
    line = frame.f_lineno if frame is not None else code.co_firstlineno
    return f"{code.co_qualname} ({code.co_filename}:{line})"


@contextlib.asynccontextmanager
async def no_leaks(grace: float = 2.0) -> AsyncIterator[None]:
    """Fail with ``LeakError`` if the block left threads, tasks, suspended generators
    or open runtimes behind (see this module's docstring for what counts).

    Args:
        grace: seconds to wait for leftovers to finish on their own before they count
            (polled; a clean block pays nothing).

    Raises:
        LeakError: listing every leftover.
    """
    snapshot = _Snapshot()
    yield
    found = snapshot.leaks()
    with anyio.move_on_after(grace):
        while found:
            await anyio.sleep(0.02)
            found = snapshot.leaks()
    if found:
        raise LeakError("the code under test left behind:\n" + "\n".join(f"  - {item}" for item in found))
