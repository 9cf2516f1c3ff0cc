"""lifecycle.testing: prove that your own jobs clean up, under every fault.

``explore`` runs a real job once per fault point and checks each run against the
contract (README, "Semantics"); ``no_leaks`` fails a block that left threads, tasks,
generators or runtimes behind; ``TestWorker`` drains a ``MemoryQueue``. The pytest
plugin (loaded automatically once lifecycle is installed) wraps them in fixtures:
``lifecycle_runtime``, ``lifecycle_worker``, ``job_context``, ``lifecycle_leaks``,
``lifecycle_exploration`` (with ``@explore_faults``)."""

from ._explore import Exploration, ExplorationFailed, FaultRun, RunOutcome, explore
from ._leaks import LeakError, no_leaks
from ._marker import explore_faults
from ._trace import Fault, FaultKind, InjectedFault
from ._worker import Drained, TestWorker, frozen_context

__all__ = [
    "Drained",
    "Exploration",
    "ExplorationFailed",
    "Fault",
    "FaultKind",
    "FaultRun",
    "InjectedFault",
    "LeakError",
    "RunOutcome",
    "TestWorker",
    "explore",
    "explore_faults",
    "frozen_context",
    "no_leaks",
]

# Public objects report their public path (lifecycle.testing.InjectedFault in a traceback).
for _public in (
    Drained,
    Exploration,
    ExplorationFailed,
    Fault,
    FaultKind,
    FaultRun,
    InjectedFault,
    LeakError,
    RunOutcome,
    TestWorker,
    explore,
    explore_faults,
    frozen_context,
    no_leaks,
):
    _public.__module__ = __name__
del _public
