"""Traces and metrics through a real `celery worker` (prefork, two children) on the real
RabbitMQ broker with Redis results: the trace a producer starts around ``.delay()`` is
continued by the task's attempt span in the worker, and the main process serves the
children's metrics summed (prometheus-client's multiprocess mode), scraped while tasks
run."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import SpanKind
from prometheus_client.parser import text_string_to_metric_families
from support import REDIS_URL, require_service

BROKER = os.environ.get("LIFECYCLE_TEST_BROKER", "amqp://guest:guest@127.0.0.1:5672//")
TESTS = Path(__file__).parent


@pytest.fixture
def services() -> None:
    def broker() -> None:
        from kombu import Connection

        with Connection(BROKER, connect_timeout=3) as conn:
            conn.ensure_connection(max_retries=1)

    def results() -> None:
        import redis

        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()

    require_service("RabbitMQ", broker)
    require_service("Redis", results)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def poll(check: Any, what: str, limit: float = 120) -> Any:
    deadline = time.monotonic() + limit
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except OSError as exc:  # the server is not up yet
            last = exc
        else:
            if last:
                return last
        time.sleep(0.1)
    raise AssertionError(f"{what}: not within {limit}s (last: {last!r})")


@pytest.mark.rabbitmq
@pytest.mark.redis
@pytest.mark.usefixtures("services")
def test_a_trace_continues_into_a_prefork_worker_whose_metrics_are_summed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spans_file = tmp_path / "spans.jsonl"
    multiproc = tmp_path / "prometheus"
    multiproc.mkdir()
    port = free_port()
    queue = f"lifecycle-obs-{uuid.uuid4().hex[:8]}"
    env = {
        **os.environ,
        "OBS_WORKER": "1",
        "SPANS": str(spans_file),
        "METRICS_PORT": str(port),
        "PROMETHEUS_MULTIPROC_DIR": str(multiproc),
        "LIFECYCLE_CELERY_QUEUE": queue,
        "LIFECYCLE_TEST_BROKER": BROKER,
        "PYTHONPATH": str(TESTS),
    }
    # The client side: the same app module, without a metrics server and with spans of its own.
    monkeypatch.setenv("LIFECYCLE_CELERY_QUEUE", queue)
    monkeypatch.delenv("METRICS_PORT", raising=False)
    sys.modules.pop("celery_obs_app", None)
    import celery_obs_app as app
    from opentelemetry import trace

    assert isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)  # untouched here

    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "celery_obs_app", "worker", "--pool", "prefork", "-c", "2",
         "--loglevel", "WARNING", "--without-gossip", "--without-mingle", "--without-heartbeat"],
        cwd=TESTS, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        tracer = TracerProvider().get_tracer("client")
        with tracer.start_as_current_span("web request", kind=SpanKind.PRODUCER) as producer:
            result = app.obs_traced.delay(n=5)
            retried = app.obs_retries.delay()
        assert result.get(timeout=120) == "5:conn"
        assert retried.get(timeout=120) == 2
        # Two tasks in flight, one per child, scraped from the main process.
        release = tmp_path / "release"
        waiting = [app.obs_waits.delay(path=str(release)) for _ in range(2)]
        poll(lambda: scrape(port).get(("lifecycle_jobs_in_flight", (("job", "obs_waits"),))) == 2, "two in flight")
        release.touch()
        assert [r.get(timeout=120) for r in waiting] == ["done", "done"]
        samples = poll(
            lambda: (found := scrape(port)).get(("lifecycle_jobs_total", (("job", "obs_waits"), ("outcome", "succeeded"))))
            == 2
            and found,
            "the settled count",
        )
        assert samples[("lifecycle_jobs_total", (("job", "obs_traced"), ("outcome", "succeeded")))] == 1
        assert samples[("lifecycle_jobs_in_flight", (("job", "obs_waits"),))] == 0
        assert (
            samples[("lifecycle_dependency_setup_seconds_count", (("dependency", "celery_obs_app:connection"), ("scope", "job")))]
            == 1
        )
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            code = worker.wait(60)
        except subprocess.TimeoutExpired:
            worker.kill()
            raise
        app.app.close()
    assert code == 0, worker.stderr.read() if worker.stderr else ""
    spans = [json.loads(line) for line in spans_file.read_text().splitlines()]
    (attempt,) = [span for span in spans if span["name"] == "job obs_traced"]
    context = producer.get_span_context()
    assert attempt["trace_id"] == f"{context.trace_id:032x}"
    assert attempt["parent_id"] == f"{context.span_id:016x}"
    assert attempt["kind"] == "CONSUMER"
    assert attempt["attributes"]["messaging.system"] == "rabbitmq"
    assert attempt["attributes"]["messaging.destination.name"] == queue
    assert attempt["attributes"]["lifecycle.job.outcome"] == "succeeded"
    children = {span["name"] for span in spans if span["parent_id"] == attempt["span_id"]}
    assert children == {"setup connection", "teardown connection"}
    # A Celery retry is republished by Celery; both attempts continue the producer's trace.
    attempts = sorted(
        (span for span in spans if span["name"] == "job obs_retries"),
        key=lambda span: span["attributes"]["lifecycle.job.attempt"],
    )
    assert [span["attributes"]["lifecycle.job.outcome"] for span in attempts] == ["retry", "succeeded"]
    assert {span["trace_id"] for span in attempts} == {f"{context.trace_id:032x}"}
    assert {span["parent_id"] for span in attempts} == {f"{context.span_id:016x}"}
