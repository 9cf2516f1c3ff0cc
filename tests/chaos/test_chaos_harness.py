"""The chaos harness's own error paths: a missing broker binary (redis-server,
PostgreSQL, nats-server, rabbitmq-server), a restart that cannot get its port back, a
worker that exits on its own."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from chaos_harness import RedisServer, WorkerPool, require_redis_server, wait_until
from servers import NatsServer, require_nats, require_postgres, require_rabbit

pytestmark = pytest.mark.chaos


def test_missing_redis_server_skips_or_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("shutil.which", lambda _name: None)
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="redis-server is not installed"):
        require_redis_server()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true: a missing service is a failure"):
        require_redis_server()


@pytest.mark.parametrize(
    ("require", "named"),
    [(require_postgres, "PostgreSQL's server"), (require_nats, "nats-server"), (require_rabbit, "rabbitmq-server")],
)
def test_missing_broker_binaries_skip_or_fail_under_ci(
    monkeypatch: pytest.MonkeyPatch, require: object, named: str
) -> None:
    monkeypatch.setattr("shutil.which", lambda _name: None)
    monkeypatch.setattr("glob.glob", lambda _pattern: [])
    monkeypatch.setattr("os.access", lambda _path, _mode: False)
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match=f"{named}.* is not installed \\(apt-get install "):
        require()  # type: ignore[operator]
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true: a missing binary is a failure"):
        require()  # type: ignore[operator]


def test_a_private_server_restart_on_a_taken_port_is_a_clear_error(tmp_path: Path) -> None:
    server = NatsServer(tmp_path, require_nats())
    server.start()
    try:
        server.kill()
        with socket.socket() as squatter:
            squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            squatter.bind(("127.0.0.1", server.port))
            squatter.listen()
            with pytest.raises(RuntimeError, match=f"nats did not restart on {server.port}; its output:"):
                server.restart()
        server.restart()  # free again: same port, same store
        assert server.proc is not None and server.proc.poll() is None
    finally:
        server.stop()


@pytest.mark.parametrize("redis_server", ["volatile"], indirect=True)
def test_restart_on_a_taken_port_is_a_clear_error(redis_server: RedisServer) -> None:
    redis_server.kill()
    with socket.socket() as squatter:  # someone else took the port meanwhile
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", redis_server.port))
        squatter.listen()
        with pytest.raises(RuntimeError, match=f"did not restart on {redis_server.port}; its log:"):
            redis_server.restart()
    redis_server.restart()  # free again: same port, same directory
    assert redis_server.client().ping()


@pytest.mark.parametrize("redis_server", ["volatile"], indirect=True)
def test_a_worker_that_exits_fails_the_wait_with_its_log(redis_server: RedisServer, tmp_path: Path) -> None:
    # A URL that cannot work is a misconfiguration: the worker exits at start-up.
    pool = WorkerPool(redis_server, "chaos-harness", tmp_path, env={"CLAIM_IDLE": "nope"})
    pool.spawn()
    try:
        with pytest.raises(AssertionError, match=r"exited with 1 during the fault; its log:\n(.|\n)*nope"):
            wait_until(lambda: False, timeout=60, pool=pool, what="never")
    finally:
        pool.cleanup()
