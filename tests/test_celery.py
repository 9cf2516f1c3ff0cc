"""A real `celery worker` subprocess per pool against the real RabbitMQ broker, with Redis
as the result backend. Skipped with a reason when either is missing; fails under CI=true."""

import os
import signal
import subprocess
import sys
import uuid
from collections import defaultdict
from pathlib import Path

import pytest
from conftest import REDIS_URL, require_service

BROKER = os.environ.get("LIFECYCLE_TEST_BROKER", "amqp://guest:guest@127.0.0.1:5672//")
TESTS = Path(__file__).parent

pytestmark = [pytest.mark.rabbitmq, pytest.mark.redis]


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


def read(evidence: Path) -> list[tuple[int, str]]:
    if not evidence.exists():
        return []
    return [(int(pid), text) for pid, _, text in (line.partition(" ") for line in evidence.read_text().splitlines())]


@pytest.mark.usefixtures("services")
@pytest.mark.parametrize("pool", ["prefork", "threads", "solo"])
def test_celery_worker(pool: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    evidence = tmp_path / "evidence.log"
    queue = f"lifecycle-test-{uuid.uuid4().hex[:8]}"
    env = {
        **os.environ,
        "EVIDENCE": str(evidence),
        "LIFECYCLE_CELERY_QUEUE": queue,
        "LIFECYCLE_TEST_BROKER": BROKER,
        "PYTHONPATH": str(TESTS),
    }
    monkeypatch.setenv("LIFECYCLE_CELERY_QUEUE", queue)
    monkeypatch.setenv("EVIDENCE", str(tmp_path / "client.log"))
    sys.modules.pop("celery_app", None)
    import celery_app as app

    concurrency = "1" if pool == "solo" else "2"
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "celery_app", "worker", "--pool", pool, "-c", concurrency,
         "--loglevel", "WARNING", "--without-gossip", "--without-mingle", "--without-heartbeat"],
        cwd=TESTS, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert app.add.delay(a=2, b=3).get(timeout=60) == 5  # also waits for the worker to be up
        assert [t for _, t in read(evidence)][-2:] == ["session up add attempt=1", "session down"]

        pids = {r.get(timeout=30) for r in [app.whoami.delay() for _ in range(12)]}
        assert app.flaky.delay().get(timeout=30) == 3  # Retry -> Celery retry with countdown, fresh deps
        flaky = [t for _, t in read(evidence) if "flaky" in t]
        assert flaky == [f"session up flaky attempt={n}" for n in (1, 2, 3)]

        rejected = app.rejected.delay()
        with pytest.raises(Exception, match="not for us"):
            rejected.get(timeout=30)
        assert [t for _, t in read(evidence)].count("session up rejected attempt=1") == 1  # never retried

        with pytest.raises(RuntimeError, match="commit failed"):
            app.fails_in_teardown.delay().get(timeout=30)

        if pool == "prefork":  # Celery's soft time limits need the prefork pool's signals
            from celery.exceptions import SoftTimeLimitExceeded

            with pytest.raises(SoftTimeLimitExceeded):
                app.slow.delay().get(timeout=30)
            texts = [t for _, t in read(evidence)]
            assert texts[texts.index("session up slow attempt=1") + 1 :][:2] == [
                "session saw CancelledError",
                "session down",
            ]
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            code = worker.wait(60)
        except subprocess.TimeoutExpired:
            worker.kill()
            raise
    assert code == 0, worker.stderr.read() if worker.stderr else ""

    by_pid: dict[int, list[str]] = defaultdict(list)
    for pid, text in read(evidence):
        by_pid[pid].append(text)
    assert pids <= set(by_pid)
    for pid, texts in by_pid.items():
        if "pool up" not in texts:
            continue
        assert texts.count("pool up") == 1, f"worker scope created more than once in process {pid}"
        assert texts[-1] == "pool down", f"process {pid} did not tear down its worker scope last: {texts}"
    if pool != "prefork":
        assert len(by_pid) == 1  # threads and solo: one process, one worker scope
    app.app.close()
