"""``@explore_faults``: the decorator form of ``explore`` for pytest tests."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

# The marker's name; the plugin (``_plugin``) reads it.
MARKER = "lifecycle_explore_faults"


def explore_faults(job: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Callable[[F], F]:
    """Mark a test to explore ``job``'s fault points before it runs (see ``explore``,
    which takes the same arguments). The test fails with the exploration's report if
    any fault point broke the contract; it may take the ``lifecycle_exploration``
    fixture to look at the runs itself. The test becomes an anyio test (give it an
    ``anyio_backend`` fixture to choose the backends).

    Args:
        job: the job to explore.
        args: its positional payload arguments.
        kwargs: its payload arguments by name, and ``explore``'s options
            (``dependency_overrides``, ``checks``, ``cancellations``,
            ``max_await_points``).
    """
    import pytest  # only tests use this; lifecycle.testing itself needs no pytest

    def decorate(test: F) -> F:
        marked = getattr(pytest.mark, MARKER)(job, *args, **kwargs)(test)
        marked = pytest.mark.usefixtures("lifecycle_exploration")(marked)
        return pytest.mark.anyio(marked)  # type: ignore[no-any-return]

    return decorate
