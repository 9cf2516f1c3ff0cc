"""What observing costs per job, on the mixed tree (sync providers inline), in one run:
a plain ``Runtime()``, one with metrics (``lifecycle.prometheus.Metrics`` on a registry of
its own), one traced with the OpenTelemetry SDK (spans recorded, no exporter), both, and
OpenTelemetry's own floor (the same number of bare SDK spans, nothing else).

    pip install -e ".[test]" && python benchmarks/observability.py [--rounds 15 --jobs 2000]

Rounds interleave the variants in a shuffled order; the figure is the median over rounds
of the mean µs per job, and the ratio the median of the per-round ratios to the plain
runtime (steadier than a ratio of medians on a shared machine). The plain runtime's
figure is the one to compare with benchmarks/RESULTS.md: with no tracer provider and no
metrics, a runtime runs the plans ``@job`` compiled (see docs/observability.md)."""

from __future__ import annotations

import argparse
import gc
import logging
import random
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import anyio
import sniffio
import structlog

sys.path.insert(0, str(Path(__file__).parent))

import trees
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import CollectorRegistry

import lifecycle
from lifecycle.prometheus import Metrics

structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))


async def variants(stack: AsyncExitStack) -> dict[str, Callable[[], Awaitable[Any]]]:
    job = lifecycle.job(trees.make_tree(lifecycle.Depends, lifecycle.dependency(threaded=False)))
    options: dict[str, dict[str, Any]] = {
        "plain Runtime()": {},
        "metrics": {"metrics": Metrics(CollectorRegistry())},
        "traced (SDK, no exporter)": {"tracer_provider": TracerProvider()},
        "traced + metrics": {"tracer_provider": TracerProvider(), "metrics": Metrics(CollectorRegistry())},
    }
    made: dict[str, Callable[[], Awaitable[Any]]] = {}
    for name, kwargs in options.items():
        rt = await stack.enter_async_context(lifecycle.Runtime(**kwargs))
        made[name] = lambda rt=rt: rt.run(job, 1)
    spans = 1 + 2 * 5 + 4  # a job span, setup+teardown per generator, setup per function
    tracer = TracerProvider().get_tracer("floor")

    async def bare_spans() -> None:
        for _ in range(spans):
            span = tracer.start_span("x", attributes={"a": "b", "c": "d", "e": "f"})
            with trace.use_span(span, end_on_exit=False):
                pass
            span.end()

    made[f"floor: {spans} bare SDK spans"] = bare_spans
    return made


async def main(rounds: int, jobs: int) -> None:
    async with AsyncExitStack() as stack:
        made = await variants(stack)
        samples: dict[str, list[float]] = {name: [] for name in made}
        for fn in made.values():  # warm up (compile plans, create worker scope)
            for _ in range(50):
                await fn()
        for _ in range(rounds):
            order = list(made.items())
            random.shuffle(order)
            for name, fn in order:
                gc.collect()
                started = time.perf_counter()
                for _ in range(jobs):
                    await fn()
                samples[name].append((time.perf_counter() - started) / jobs * 1e6)
                trees.EVENTS.clear()
    base = samples["plain Runtime()"]
    print(f"\n| variant ({sniffio.current_async_library()}) | µs/job | × plain |")
    print("|---|---:|---:|")
    for name, values in samples.items():
        ratio = statistics.median(v / b for v, b in zip(values, base, strict=True))
        print(f"| {name} | {statistics.median(values):.1f} | {ratio:.2f} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--jobs", type=int, default=2000)
    args = parser.parse_args()
    for backend in ("asyncio", "trio"):
        anyio.run(main, args.rounds, args.jobs, backend=backend)
