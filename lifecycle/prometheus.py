"""Prometheus metrics for workers (the ``prometheus`` extra: ``pip install
'lifecycle[prometheus]'``).

``Worker(metrics_port=9000)`` (``lifecycle worker ... --metrics-port 9000``) serves them;
``Metrics`` is the set of metric families, registered once per registry. In a Celery
prefork pool, set ``PROMETHEUS_MULTIPROC_DIR`` (prometheus-client's multiprocess mode):
every child process writes its numbers there and the server started by
``CeleryLifecycle(app, metrics_port=...)`` in the parent adds them up.

Metric families (all prefixed ``lifecycle_``):

- ``jobs_total{job, outcome}``: messages a worker settled, by how: ``succeeded``,
  ``retried``, ``rejected``, ``timed_out`` and ``failed`` (out of attempts, dead-lettered),
  ``dead_lettered`` (never ran: malformed, unknown job, invalid payload, poison) and
  ``released`` (cancelled by shutdown, handed back).
- ``job_duration_seconds{job, outcome}``: each attempt, teardown included (histogram);
  outcome ``succeeded``, ``failed``, ``retry``, ``rejected``, ``timed_out``, ``cancelled``.
- ``jobs_in_flight{job}``: attempts running now.
- ``dependency_setup_seconds{dependency, scope}``, ``dependency_teardown_seconds{dependency,
  scope}``: each dependency's setup and teardown (histograms).
- ``dependency_errors_total{dependency, phase}``: setups and teardowns that raised.
- ``queue_lag_seconds{job}``: when a worker received a message, the time since it was
  first enqueued (a delayed or retried message's wait included).
- ``broker_reconnects_total``: broker outages a worker saw end.
- ``worker_resources{dependency}``: worker-scoped values alive now.
- ``dead_letters_total{job, reason}``: messages a worker dead-lettered, by reason.
"""

from __future__ import annotations

import os
import threading
from typing import Any

try:
    from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, start_http_server
    from prometheus_client.multiprocess import MultiProcessCollector
except ImportError as exc:  # pragma: no cover - depends on the installation
    raise ImportError(
        "lifecycle's Prometheus metrics need prometheus-client: pip install 'lifecycle[prometheus]'"
    ) from exc

__all__ = ["Metrics", "serve_metrics"]

# Seconds: from a fast in-memory setup to a slow network handshake or a long job.
_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
_LAG_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 21600.0, 86400.0)

_defaults: dict[int, Metrics] = {}
_defaults_lock = threading.Lock()


class Metrics:
    """The lifecycle metric families, registered on one registry. A worker records into
    it (see the module docstring for the families).

    Args:
        registry: the prometheus-client registry to register on; None: the default
            ``REGISTRY`` (what ``start_http_server`` and most exporters serve). A
            registry can hold one ``Metrics``: use ``Metrics.default()`` to share it.
        namespace: the prefix of every metric name.
    """

    def __init__(self, registry: CollectorRegistry | None = None, *, namespace: str = "lifecycle") -> None:
        self.registry = registry if registry is not None else REGISTRY
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        options: dict[str, Any] = {"namespace": namespace, "registry": self.registry}
        self.jobs = Counter("jobs", "Messages a worker settled, by job and outcome.", ["job", "outcome"], **options)
        self.job_duration = Histogram(
            "job_duration_seconds",
            "Job attempts, teardown included, by job and outcome.",
            ["job", "outcome"],
            buckets=_BUCKETS,
            **options,
        )
        self.in_flight = Gauge(
            "jobs_in_flight", "Job attempts running now.", ["job"], multiprocess_mode="livesum", **options
        )
        self.setup = Histogram(
            "dependency_setup_seconds",
            "Dependency setups, by dependency (module:qualname) and scope.",
            ["dependency", "scope"],
            buckets=_BUCKETS,
            **options,
        )
        self.teardown = Histogram(
            "dependency_teardown_seconds",
            "Dependency teardowns, by dependency (module:qualname) and scope.",
            ["dependency", "scope"],
            buckets=_BUCKETS,
            **options,
        )
        self.dependency_errors = Counter(
            "dependency_errors",
            "Dependency setups and teardowns that raised.",
            ["dependency", "phase"],
            **options,
        )
        self.lag = Histogram(
            "queue_lag_seconds",
            "Seconds from a message's first enqueue to its receipt by a worker.",
            ["job"],
            buckets=_LAG_BUCKETS,
            **options,
        )
        self.reconnects = Counter("broker_reconnects", "Broker outages a worker saw end.", **options)
        self.resources = Gauge(
            "worker_resources",
            "Worker-scoped dependency values alive now.",
            ["dependency"],
            multiprocess_mode="livesum",
            **options,
        )
        self.dead_letters = Counter(
            "dead_letters", "Messages a worker dead-lettered, by job and reason.", ["job", "reason"], **options
        )

    @classmethod
    def default(cls, registry: CollectorRegistry | None = None) -> Metrics:
        """The one ``Metrics`` of ``registry`` (default: ``REGISTRY``), created on first
        use; what ``Worker(metrics_port=...)`` records into when given no ``metrics``.

        Args:
            registry: the registry; None: prometheus-client's default ``REGISTRY``.
        """
        target = registry if registry is not None else REGISTRY
        with _defaults_lock:
            found = _defaults.get(id(target))
            if found is None:
                found = _defaults[id(target)] = cls(target)
            return found

    def _child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, looked up once: prometheus-client checks and joins
        the label values on every call, which costs more than the observation itself."""
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    # -- the observer's sink (lifecycle._observe.MetricsSink) --------------------------------
    def attempt_started(self, job: str) -> None:
        """A job attempt started."""
        self._child(self.in_flight, job).inc()

    def attempt_finished(self, job: str, outcome: str, seconds: float) -> None:
        """A job attempt ended with ``outcome`` after ``seconds``."""
        self._child(self.in_flight, job).dec()
        self._child(self.job_duration, job, outcome).observe(seconds)

    def dependency_timed(self, dependency: str, scope: str, phase: str, seconds: float, ok: bool) -> None:
        """A dependency's ``setup`` or ``teardown`` took ``seconds`` (``ok``: it did not raise)."""
        self._child(self.setup if phase == "setup" else self.teardown, dependency, scope).observe(seconds)
        if not ok:
            self.dependency_errors.labels(dependency, phase).inc()

    def resource_changed(self, dependency: str, delta: int) -> None:
        """A worker-scoped value was created (+1) or torn down (-1)."""
        self.resources.labels(dependency).inc(delta)

    # -- the worker's ---------------------------------------------------------------------
    def job_settled(self, job: str, outcome: str) -> None:
        """A worker settled a message of ``job`` (see ``jobs_total``)."""
        self.jobs.labels(job, outcome).inc()

    def received(self, job: str, lag: float) -> None:
        """A worker received a message first enqueued ``lag`` seconds ago."""
        self.lag.labels(job).observe(max(lag, 0.0))

    def reconnected(self) -> None:
        """A broker outage ended."""
        self.reconnects.inc()

    def dead_lettered(self, job: str, reason: str) -> None:
        """A message went to the dead letter for ``reason``."""
        self.dead_letters.labels(job, reason).inc()


def serve_metrics(port: int, address: str = "0.0.0.0", registry: CollectorRegistry | None = None) -> Any:
    """Serve ``/metrics`` over HTTP from a daemon thread (prometheus-client's own server,
    so it answers whatever the event loop does); returns the server, whose
    ``shutdown()`` stops it. With ``PROMETHEUS_MULTIPROC_DIR`` set, it serves the sum of
    every process's numbers (prometheus-client's multiprocess mode).

    Args:
        port: the TCP port; 0 picks a free one (read it from ``server.server_port``).
        address: the address to listen on; ``0.0.0.0`` (the default) is every interface.
        registry: what to serve; None: the default ``REGISTRY``, or the multiprocess
            collector when ``PROMETHEUS_MULTIPROC_DIR`` is set.
    """
    if registry is None and os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    server, _thread = start_http_server(port, address, registry if registry is not None else REGISTRY)
    return server
