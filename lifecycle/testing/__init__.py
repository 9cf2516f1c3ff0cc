"""lifecycle.testing: prove that your own jobs clean up, under every fault.

``explore`` runs a real job once per fault point and checks each run against the
contract; the pytest plugin (loaded automatically once lifecycle is installed) gives
fixtures for a runtime, a worker that drains a ``MemoryQueue``, a frozen ``JobContext``
and a leak check. See the documentation page "Testing your jobs"."""

from ._explore import Exploration, ExplorationFailed, FaultRun, Outcome, explore
from ._trace import Fault, FaultKind, InjectedFault

__all__ = [
    "Exploration",
    "ExplorationFailed",
    "Fault",
    "FaultKind",
    "FaultRun",
    "InjectedFault",
    "Outcome",
    "explore",
]
