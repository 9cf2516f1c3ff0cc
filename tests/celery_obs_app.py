"""A Celery app for tests/test_observability_celery.py: traced with the OpenTelemetry SDK
when $OBS_WORKER is set (each finished span appended as a JSON line to the file named by
$SPANS) and serving
Prometheus metrics on $METRICS_PORT from the worker's main process (multiprocess mode
under prefork: $PROMETHEUS_MULTIPROC_DIR)."""

import json
import os
import time
from collections.abc import Iterator, Sequence
from typing import Annotated

from celery import Celery
from kombu import Queue
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

from lifecycle import Depends, JobContext, Retry
from lifecycle.celery import CeleryLifecycle

QUEUE = os.environ.get("LIFECYCLE_CELERY_QUEUE", "lifecycle-obs-tests")


class FileExporter(SpanExporter):
    """Appends each span as one JSON line (spans of every prefork child in one file)."""

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        with open(os.environ["SPANS"], "a") as fh:
            for span in spans:
                assert span.context is not None
                fh.write(
                    json.dumps(
                        {
                            "name": span.name,
                            "trace_id": f"{span.context.trace_id:032x}",
                            "span_id": f"{span.context.span_id:016x}",
                            "parent_id": f"{span.parent.span_id:016x}" if span.parent else None,
                            "kind": span.kind.name,
                            "attributes": dict(span.attributes or {}),
                            "pid": os.getpid(),
                        }
                    )
                    + "\n"
                )
        return SpanExportResult.SUCCESS


if os.environ.get("OBS_WORKER"):
    # Only in the worker: the test process imports this module too, and a global tracer
    # provider set there would trace every later test of the session.
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(FileExporter()))
    trace.set_tracer_provider(provider)

app = Celery(
    "lifecycle_obs_tests",
    broker=os.environ.get("LIFECYCLE_TEST_BROKER", "amqp://guest:guest@127.0.0.1:5672//"),
    backend=os.environ.get("LIFECYCLE_TEST_RESULTS", "redis://127.0.0.1:6379/1"),
)
app.conf.update(
    task_default_queue=QUEUE,
    task_queues=[Queue(QUEUE, auto_delete=True)],
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    result_expires=600,
)
port = os.environ.get("METRICS_PORT")
lc = CeleryLifecycle(app, metrics_port=int(port) if port else None, metrics_address="127.0.0.1")


def connection() -> Iterator[str]:
    yield "conn"


@lc.task(name="obs_traced", shared=False)
async def obs_traced(n: int, c: Annotated[str, Depends(connection)]) -> str:
    return f"{n}:{c}"


@lc.task(name="obs_waits", shared=False)
def obs_waits(path: str) -> str:
    """Runs until ``path`` exists (so a test can scrape while it is in flight)."""
    deadline = time.monotonic() + 120
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.05)
    return "done"


@lc.task(name="obs_retries", shared=False, retries=1)
async def obs_retries(ctx: JobContext) -> int:
    """Asks for one retry, then succeeds: its two attempts must share one trace."""
    if ctx.attempt == 1:
        raise Retry(delay=0)
    return ctx.attempt
