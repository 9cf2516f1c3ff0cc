"""The worker's health endpoints, polled over HTTP: ``/livez`` (the event loop answers,
the read loop turns) and ``/readyz`` (worker scope set up, broker reachable, not
draining), on both backends with a MemoryQueue, and through a real Redis outage (a
redis-server of the test's own, killed and restarted by pid)."""

import json
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Annotated, Any

import anyio
import pytest
from prometheus_client import CollectorRegistry

from lifecycle import Depends, Worker, dependency, job
from lifecycle.prometheus import Metrics
from lifecycle.queues import MemoryQueue

sys.path.insert(0, str(Path(__file__).with_name("chaos")))
from chaos_harness import RedisServer, require_redis_server

pytestmark = pytest.mark.anyio


def probe(port: int, path: str, *, method: str = "GET", timeout: float = 30) -> tuple[int, dict[str, Any]]:
    """``(status, body)`` of one request to the health server."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


async def aprobe(port: int, path: str, **options: Any) -> tuple[int, dict[str, Any]]:
    return await anyio.to_thread.run_sync(lambda: probe(port, path, **options))


async def poll_until(port: int, path: str, status: int, limit: float = 90) -> dict[str, Any]:
    """Poll ``path`` until it answers ``status`` (a generous deadline: the machine is loaded)."""
    seen: list[Any] = []
    with anyio.fail_after(limit):
        while True:
            try:
                code, body = await aprobe(port, path, timeout=10)
            except OSError as exc:
                seen.append(repr(exc))
            else:
                seen.append((code, body.get("reason")))
                if code == status:
                    return body
            await anyio.sleep(0.05)


async def wait_for(condition: Any, limit: float = 60) -> None:
    with anyio.fail_after(limit):
        while not condition():
            await anyio.sleep(0.02)


gates: dict[str, anyio.Event] = {}


@dependency(scope="worker")
async def slow_resource() -> Any:
    await gates["resource"].wait()
    yield "resource"


@job(name="uses_resource")
async def uses_resource(r: Annotated[str, Depends(slow_resource)]) -> None:
    await gates["job"].wait()


async def test_readyz_follows_the_worker_from_start_up_to_draining_and_livez_answers_throughout() -> None:
    gates["resource"], gates["job"] = anyio.Event(), anyio.Event()
    queue = MemoryQueue()
    worker = Worker(queue, [uses_resource], health_port=0, health_address="127.0.0.1", poll_interval=0.05)
    async with anyio.create_task_group() as group:
        group.start_soon(worker.run)
        await wait_for(lambda: worker.health_port_bound is not None)
        port = worker.health_port_bound
        assert port is not None
        # Worker scope not set up yet: alive, not ready.
        code, body = await aprobe(port, "/readyz")
        assert (code, body["status"]) == (503, "unavailable")
        assert "starting" in body["reason"]
        assert (await aprobe(port, "/livez"))[0] == 200
        gates["resource"].set()
        body = await poll_until(port, "/readyz", 200)
        assert body == {"status": "ok", "reason": "ready", "time": body["time"]}
        assert (await aprobe(port, "/livez"))[1]["reason"] == "consuming"
        # Other paths and methods.
        assert (await aprobe(port, "/metrics"))[0] == 404
        assert (await aprobe(port, "/livez", method="POST"))[0] == 405
        # Draining: one job holds the worker in its shutdown grace.
        await queue.enqueue(uses_resource, {})
        await wait_for(lambda: worker.in_flight == 1)
        worker.stop()
        body = await poll_until(port, "/readyz", 503)
        assert body["reason"] == "draining"
        assert (await aprobe(port, "/livez"))[1]["reason"] == "draining"
        gates["job"].set()
    assert worker.health_port_bound is None  # the server stopped with the worker
    with pytest.raises(OSError):
        probe(port, "/livez", timeout=5)


async def test_a_blocked_event_loop_fails_livez_and_a_stuck_read_loop_answers_503() -> None:
    unblock = anyio.Event()
    blocking.clear()

    class StuckQueue(MemoryQueue):
        stuck = False

        async def receive(self, limit: int, timeout: float) -> Any:
            if self.stuck:
                await unblock.wait()  # a read that never returns: the worker is wedged
            return await super().receive(limit, timeout)

    class QuickStallWorker(Worker):
        stall_after = 1.0  # seconds without a read-loop turn before /livez fails (a test value)

    queue = StuckQueue()
    worker = QuickStallWorker(queue, [on_loop], health_port=0, health_address="127.0.0.1", poll_interval=0.05)
    async with anyio.create_task_group() as group:
        group.start_soon(worker.run)
        port = await _port(worker)
        await poll_until(port, "/livez", 200)
        # A job that blocks the event loop: the health server cannot answer at all.
        answers: list[str] = []

        def probe_while_blocked() -> None:
            assert blocking.wait(60)
            try:
                probe(port, "/livez", timeout=2)
            except OSError:
                answers.append("no answer")
            else:
                answers.append("answered")

        # A thread of its own, started now: one from the loop's pool could only start
        # once the loop is free again.
        prober = threading.Thread(target=probe_while_blocked)
        prober.start()
        await queue.enqueue(on_loop, {"seconds": 8.0})
        await anyio.to_thread.run_sync(prober.join)
        assert answers == ["no answer"]
        await poll_until(port, "/livez", 200)  # the loop is back
        # A read that never returns: the loop answers, but the worker is stuck.
        queue.stuck = True
        body = await poll_until(port, "/livez", 503)
        assert "has not turned" in body["reason"]
        unblock.set()
        await poll_until(port, "/livez", 200)
        worker.stop()


async def _port(worker: Worker) -> int:
    await wait_for(lambda: worker.health_port_bound is not None)
    assert worker.health_port_bound is not None
    return worker.health_port_bound


blocking = threading.Event()


@dependency(threaded=False)
def loop_blocker(seconds: float) -> None:
    blocking.set()
    time.sleep(seconds)  # sync and not threaded: it runs on (and blocks) the event loop


@job(name="on_loop")
async def on_loop(seconds: float, _: Annotated[None, Depends(loop_blocker)]) -> None:
    pass


def test_a_health_port_in_use_fails_the_worker_at_start() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        worker = Worker(MemoryQueue(), [on_loop], health_port=port, health_address="127.0.0.1")

        async def main() -> None:
            await worker.run()

        with pytest.raises(OSError):
            anyio.run(main)


# -- a real Redis outage ---------------------------------------------------------------------


@job(name="noop")
async def noop() -> None:
    pass


@pytest.mark.redis
@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # redis-py needs asyncio
async def test_readyz_is_503_during_a_redis_outage_while_livez_stays_200(tmp_path: Path) -> None:
    from lifecycle.queues import RedisStreamQueue

    require_redis_server()
    directory = tmp_path / "redis"
    directory.mkdir()
    server = RedisServer(directory, appendonly=False)
    server.start()
    try:
        queue = RedisStreamQueue(server.url, stream=f"health-{uuid.uuid4().hex[:12]}", group="workers")
        metrics = Metrics(CollectorRegistry())
        worker = Worker(
            queue,
            [noop],
            metrics=metrics,
            health_port=0,
            health_address="127.0.0.1",
            poll_interval=0.1,
            broker_backoff=0.05,
            broker_backoff_max=0.5,
        )
        async with anyio.create_task_group() as group:
            group.start_soon(worker.run)
            port = await _port(worker)
            await poll_until(port, "/readyz", 200)
            await anyio.to_thread.run_sync(server.kill)
            body = await poll_until(port, "/readyz", 503)
            assert body["reason"].startswith("broker unavailable")
            # Alive all along the outage: the read loop keeps turning (backing off).
            for _ in range(5):
                assert (await aprobe(port, "/livez"))[0] == 200
                await anyio.sleep(0.2)
            assert (await aprobe(port, "/readyz"))[0] == 503
            await anyio.to_thread.run_sync(server.restart)
            await poll_until(port, "/readyz", 200)
            assert (await aprobe(port, "/livez"))[0] == 200
            assert metrics.reconnects._value.get() >= 1  # the outage's end, counted
            # ...and it works again.
            await queue.enqueue(noop, {})
            await wait_for(lambda: worker.stats["succeeded"] == 1, limit=90)
            worker.stop()
        await queue.close()
    finally:
        server.stop()


def test_the_cli_worker_serves_health_and_metrics_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    import os
    import signal
    import subprocess

    from chaos_harness import free_port

    health, metrics = free_port(), free_port()
    root = Path(__file__).resolve().parent.parent
    worker = subprocess.Popen(
        [sys.executable, "-m", "lifecycle", "worker", "tests/cli_jobs.py", "--queue", "memory://",
         "--health-port", str(health), "--metrics-port", str(metrics), "--listen-address", "127.0.0.1"],
        cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "EVIDENCE": str(tmp_path / "evidence.log")},
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 90
        answer: Any = None
        while time.monotonic() < deadline:
            try:
                answer = probe(health, "/readyz", timeout=10)
            except OSError as exc:
                answer = exc
            if isinstance(answer, tuple) and answer[0] == 200:
                break
            assert worker.poll() is None, worker.stderr.read() if worker.stderr else ""
            time.sleep(0.1)
        assert isinstance(answer, tuple) and answer[0] == 200, answer
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=30) as response:
            assert "lifecycle_broker_reconnects_total 0.0" in response.read().decode()
    finally:
        worker.send_signal(signal.SIGTERM)
        code = worker.wait(60)
    assert code == 0, worker.stderr.read() if worker.stderr else ""
