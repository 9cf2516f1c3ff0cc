"""Queue backends for the contract suite (``tests/test_queue_contract.py``).

Each module here is one backend: ``CASES`` (pytest params ``(name, anyio backend)``,
with the marks they need) and ``harness(request, lease)``, an async context manager
giving a ``Harness``: the queue under test, and a way to make another consumer of the
same messages. A new backend is a new module here; the suite finds it by itself."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from lifecycle.queues import Queue


@dataclass
class Harness:
    queue: Queue
    other: Callable[[], Queue]  # a second consumer of the same messages
    opened: list[Queue] = field(default_factory=list)
    cancels_due: bool = True  # cancel() removes a due message not yet received (RabbitMQ cannot)

    def track(self, make: Callable[[], Queue]) -> Callable[[], Queue]:
        """``make``, remembering each queue it makes so the harness closes them."""

        def another() -> Queue:
            queue = make()
            self.opened.append(queue)
            return queue

        return another

    async def close(self) -> None:
        for queue in [self.queue, *self.opened]:
            await queue.close()


def backends() -> dict[str, ModuleType]:
    """Every backend module here, by the name its CASES use."""
    found: dict[str, ModuleType] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        for case in module.CASES:
            found[case.values[0][0]] = module
    return found


def cases() -> list[Any]:
    return [case for module in dict.fromkeys(backends().values()) for case in module.CASES]
