"""Prometheus metrics: a worker's ``/metrics`` endpoint scraped over HTTP while jobs run,
values checked against what the jobs did; the CLI option; and the Grafana dashboard in
``examples/`` queries only metric families a worker exports."""

import json
import re
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Annotated, Any

import anyio
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from lifecycle import Depends, JobTimeout, Reject, Retry, Worker, dependency, job
from lifecycle.prometheus import Metrics
from lifecycle.queues import MemoryQueue

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of ``/metrics``: ``{(name, sorted labels): value}``."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def wait_for(condition: Any, what: str, limit: float = 60) -> None:
    """Poll ``condition`` with a generous deadline (the test machine is loaded)."""
    with anyio.fail_after(limit):
        while not condition():
            await anyio.sleep(0.02)


opened: list[str] = []


@dependency(scope="worker")
def client() -> Any:
    opened.append("client")
    yield "client"
    opened.remove("client")


async def session(c: Annotated[str, Depends(client)]) -> Any:
    yield f"session({c})"


gate: dict[str, anyio.Event] = {}


@job(name="blocks")
async def blocks(s: Annotated[str, Depends(session)]) -> None:
    await gate["open"].wait()


@job(name="outcomes", retries=1)
async def outcomes(kind: str) -> None:
    if kind == "retry":
        raise Retry(delay=0)
    if kind == "reject":
        raise Reject("bad input")
    if kind == "timeout":
        raise JobTimeout("too slow")
    if kind == "fail":
        raise RuntimeError("broken")


async def test_the_metrics_endpoint_counts_jobs_dependencies_lag_and_in_flight_while_jobs_run() -> None:
    gate["open"] = anyio.Event()
    metrics = Metrics(CollectorRegistry())
    queue = MemoryQueue()
    worker = Worker(
        queue,
        [blocks, outcomes],
        metrics=metrics,
        metrics_port=0,
        metrics_address="127.0.0.1",
        poll_interval=0.05,
        retry_backoff=0.01,
        retry_backoff_max=0.01,
    )
    for _ in range(3):
        await queue.enqueue(blocks, {})
    for kind in ("ok", "retry", "reject", "timeout", "fail"):
        await queue.enqueue(outcomes, {"kind": kind})
    await queue.enqueue("nobody_runs_this", {})
    async with anyio.create_task_group() as group:
        group.start_soon(worker.run)
        await wait_for(lambda: worker.metrics_server is not None, "the metrics server")
        port = worker.metrics_server.server_port
        await wait_for(lambda: worker.stats["dead_lettered"] >= 5 and worker.in_flight == 3, "the outcomes")
        # Scraped while three jobs are blocked in flight.
        during = await anyio.to_thread.run_sync(scrape, port)
        assert value(during, "lifecycle_jobs_in_flight", job="blocks") == 3
        assert value(during, "lifecycle_worker_resources", dependency=f"{__name__}:client") == 1
        gate["open"].set()
        await wait_for(lambda: worker.stats["succeeded"] >= 4, "the blocked jobs")
        after = await anyio.to_thread.run_sync(scrape, port)
        worker.stop()
    assert worker.metrics_server is None  # stopped with the worker
    jobs = "lifecycle_jobs_total"
    assert value(after, jobs, job="blocks", outcome="succeeded") == 3
    assert value(after, jobs, job="outcomes", outcome="succeeded") == 1
    # "retry" asks twice (retries=1): retried once, then failed for good.
    assert value(after, jobs, job="outcomes", outcome="retried") == 3  # retry, timeout, fail each retried once
    assert value(after, jobs, job="outcomes", outcome="rejected") == 1
    assert value(after, jobs, job="outcomes", outcome="timed_out") == 1
    assert value(after, jobs, job="outcomes", outcome="failed") == 2  # fail, and retry out of attempts
    assert value(after, jobs, job="nobody_runs_this", outcome="dead_lettered") == 1
    assert value(after, "lifecycle_dead_letters_total", job="nobody_runs_this", reason="unknown_job") == 1
    assert value(after, "lifecycle_dead_letters_total", job="outcomes", reason="rejected") == 1
    assert value(after, "lifecycle_jobs_in_flight", job="blocks") == 0
    duration = "lifecycle_job_duration_seconds_count"
    assert value(after, duration, job="blocks", outcome="succeeded") == 3
    assert value(after, duration, job="outcomes", outcome="retry") == 2
    assert value(after, duration, job="outcomes", outcome="rejected") == 1
    assert value(after, duration, job="outcomes", outcome="timed_out") == 2
    assert value(after, duration, job="outcomes", outcome="failed") == 2
    setup = "lifecycle_dependency_setup_seconds_count"
    assert value(after, setup, dependency=f"{__name__}:session", scope="job") == 3
    assert value(after, setup, dependency=f"{__name__}:client", scope="worker") == 1
    teardown = "lifecycle_dependency_teardown_seconds_count"
    assert value(after, teardown, dependency=f"{__name__}:session", scope="job") == 3
    # Every message received was timed from its enqueue: 3 + 5 first attempts + 3 retries.
    assert value(after, "lifecycle_queue_lag_seconds_count", job="blocks") == 3
    assert value(after, "lifecycle_queue_lag_seconds_count", job="outcomes") == 8
    assert value(after, "lifecycle_queue_lag_seconds_sum", job="blocks") >= 0
    # The worker scope is gone once the worker stopped.
    assert metrics.resources.labels(f"{__name__}:client")._value.get() == 0


async def test_a_dependency_error_is_counted_by_phase() -> None:
    metrics = Metrics(CollectorRegistry())

    def broken() -> str:
        raise OSError("down")

    @job(name="needs_broken")
    async def needs_broken(b: Annotated[str, Depends(broken)]) -> None:
        pass

    queue = MemoryQueue()
    worker = Worker(queue, [needs_broken], metrics=metrics, poll_interval=0.05)
    await queue.enqueue(needs_broken, {})
    async with anyio.create_task_group() as group:
        group.start_soon(worker.run)
        await wait_for(lambda: worker.stats["dead_lettered"] == 1, "the dead letter")
        worker.stop()
    (family,) = metrics.dependency_errors.collect()
    counted = {
        (sample.labels["dependency"], sample.labels["phase"]): sample.value
        for sample in family.samples
        if sample.name.endswith("_total")
    }
    assert counted == {(f"{__name__}:test_a_dependency_error_is_counted_by_phase.<locals>.broken", "setup"): 1}


def test_the_default_metrics_are_one_per_registry() -> None:
    registry = CollectorRegistry()
    assert Metrics.default(registry) is Metrics.default(registry)
    with pytest.raises(ValueError, match="Duplicated"):
        Metrics(registry)  # a second set of the same families on one registry


@pytest.mark.parametrize("port", [-1, 70000, "9000", True])
def test_a_bad_metrics_or_health_port_is_refused_naming_the_option(port: Any) -> None:
    with pytest.raises(ValueError, match="metrics_port must be a TCP port"):
        Worker(MemoryQueue(), [blocks], metrics_port=port)
    with pytest.raises(ValueError, match="health_port must be a TCP port"):
        Worker(MemoryQueue(), [blocks], health_port=port)


def test_the_cli_refuses_a_bad_metrics_port_as_a_usage_error() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "lifecycle", "worker", "tests/cli_jobs.py", "--queue", "memory://", "--metrics-port", "x"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "--metrics-port" in done.stderr


# -- the Grafana dashboard -------------------------------------------------------------------


def _dashboard_metrics() -> set[str]:
    dashboard = json.loads((ROOT / "examples" / "grafana-dashboard.json").read_text())
    expressions = [
        target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", []) if "expr" in target
    ]
    assert expressions, "the dashboard has no Prometheus queries"
    expressions += [variable["definition"] for variable in dashboard["templating"]["list"] if "definition" in variable]
    return set(re.findall(r"\blifecycle_[a-z_]+\b", " ".join(expressions)))


def unreachable() -> str:
    raise ConnectionError("unreachable")


@job(name="needs_unreachable")
async def needs_unreachable(u: Annotated[str, Depends(unreachable)]) -> None:
    pass


async def test_the_grafana_dashboard_queries_only_metrics_a_worker_exports() -> None:
    gate["open"] = anyio.Event()
    gate["open"].set()
    metrics = Metrics(CollectorRegistry())
    queue = MemoryQueue()
    worker = Worker(
        queue, [blocks, outcomes, needs_unreachable], metrics=metrics, metrics_port=0, metrics_address="127.0.0.1"
    )
    await queue.enqueue(blocks, {})
    await queue.enqueue(outcomes, {"kind": "reject"})
    await queue.enqueue(needs_unreachable, {})  # retries=0: dead-lettered at once
    async with anyio.create_task_group() as group:
        group.start_soon(worker.run)
        await wait_for(lambda: worker.stats["succeeded"] == 1 and worker.stats["dead_lettered"] == 2, "the jobs")
        scraped = {name for name, _ in await anyio.to_thread.run_sync(scrape, worker.metrics_server.server_port)}
        worker.stop()
    queried = _dashboard_metrics()
    assert queried - scraped == set(), f"the dashboard queries metrics no worker exports: {queried - scraped}"
    # ...and it shows every family.
    families = {
        re.sub(r"_(bucket|count|sum|total)$", "", name)
        for name in scraped
        if name.startswith("lifecycle_") and not name.endswith("_created")
    }
    shown = {re.sub(r"_(bucket|count|sum|total)$", "", name) for name in queried}
    assert families - shown == set(), f"metric families the dashboard does not show: {families - shown}"


def test_without_prometheus_client_a_metrics_port_names_the_extra_to_install() -> None:
    code = (
        "import sys; sys.modules['prometheus_client'] = None\n"
        "from lifecycle import Worker, job\n"
        "from lifecycle.queues import MemoryQueue\n"
        "try:\n"
        "    Worker(MemoryQueue(), [job(lambda: None)], metrics_port=0)\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "pip install 'lifecycle[prometheus]'" in done.stdout, done.stderr
    # ...and the core imports without it.
    core = subprocess.run(
        [sys.executable, "-c", "import sys; sys.modules['prometheus_client'] = None; sys.modules['opentelemetry'] = None; "
         "import lifecycle, lifecycle.queues, lifecycle._worker; print('ok')"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert core.stdout.strip() == "ok", core.stderr
