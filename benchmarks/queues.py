"""Drain rates of every queue backend in one run, next to each broker's own floor.

    python benchmarks/queues.py                  # every backend, default sizes
    python benchmarks/queues.py --jobs 2000      # fewer messages per measurement

Each backend's own script (``benchmarks/<backend>_throughput.py``) measures a Worker
draining no-op jobs at concurrency 1 and 64 and, for the brokers, the client library
alone claiming and acknowledging the same messages (the floor). This runs them one
after the other on the same machine, so the figures can be compared, and adds
MemoryQueue and RedisStreamQueue from ``benchmarks/run.py``. A backend whose server is
unreachable is reported as such; its figures are left out."""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import anyio

HERE = Path(__file__).parent
SCRIPTS = [
    ("SqliteQueue", "sqlite_throughput.py"),
    ("PostgresQueue", "postgres_throughput.py"),
    ("RabbitQueue", "rabbit_throughput.py"),
    ("NatsQueue", "nats_throughput.py"),
]


def run_script(script: str, jobs: int) -> str:
    done = subprocess.run(
        [sys.executable, str(HERE / script), "--jobs", str(jobs)],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:]
        return f"not measured (exit {done.returncode}): {' '.join(tail)}"
    return done.stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=3000, help="messages per measurement")
    options = parser.parse_args()
    sys.path.insert(0, str(HERE))
    import run  # benchmarks/run.py: MemoryQueue and RedisStreamQueue throughput

    started = time.strftime("%Y-%m-%d %H:%M")
    print(f"# Queue drain rates, one run ({started}, {options.jobs} messages per measurement)\n")
    print("## MemoryQueue and RedisStreamQueue (benchmarks/run.py, asyncio)\n")
    print("| queue | jobs | concurrency | jobs/s |\n|---|---|---:|---:|")
    for row in anyio.run(run.throughput_rows, "asyncio", options.jobs):
        print(row)
    for name, script in SCRIPTS:
        print(f"\n## {name} ({script})\n")
        print(run_script(script, options.jobs))


if __name__ == "__main__":
    main()
