"""``lifecycle.fastapi``: FastAPI's ``Depends`` in jobs, request-only parameters as
graph errors, an app lifespan owning the runtime (worker scope shared by routes and
in-process jobs), and ``enqueue`` validating at the door.

In-process tests drive the app through httpx's ASGI transport on both anyio backends;
the end-to-end test serves ``tests/fastapi_app.py`` with uvicorn on a loopback port,
enqueues to Redis and has a real worker process run the jobs with the same ``get_db``."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import anyio
import httpx
import pytest
from fastapi import BackgroundTasks, Body, Depends, FastAPI, Header, Request, Response, Security, WebSocket
from fastapi.security import SecurityScopes
from support import REDIS_URL, require_service

import lifecycle
from lifecycle import DependencyError, LifecycleError, Runtime, dependency, job
from lifecycle.fastapi import FastAPILifecycle
from lifecycle.queues import MemoryQueue

pytestmark = pytest.mark.anyio

TESTS = Path(__file__).parent


# -- FastAPI's Depends in jobs --------------------------------------------------------------


async def test_a_job_declares_its_dependencies_with_fastapis_depends() -> None:
    events: list[str] = []

    async def get_settings() -> dict[str, str]:
        return {"dsn": "db://x"}

    async def get_db(settings: Annotated[dict[str, str], Depends(get_settings)]) -> AsyncIterator[str]:
        events.append("db.open")
        try:
            yield settings["dsn"]
        except ValueError as exc:
            events.append(f"db.saw {exc}")
            raise
        finally:
            events.append("db.close")

    class Repo:
        def __init__(self, db: Annotated[str, Depends(get_db)]) -> None:
            self.db = db

    @job
    async def handler(user_id: int, repo: Annotated[Repo, Depends()], same: str = Depends(get_db)) -> str:
        assert repo.db is same  # one value per job, as FastAPI caches per request
        if user_id < 0:
            raise ValueError("negative")
        return f"{repo.db}/{user_id}"

    async with Runtime() as rt:
        assert await rt.run(handler, user_id=3) == "db://x/3"
        with pytest.raises(ValueError, match="negative"):
            await rt.run(handler, user_id=-1)
    assert events == ["db.open", "db.close", "db.open", "db.saw negative", "db.close"]


async def test_fastapis_use_cache_false_gives_a_fresh_value() -> None:
    calls: list[int] = []

    def counter() -> int:
        calls.append(1)
        return len(calls)

    async def handler(
        a: Annotated[int, Depends(counter)], b: Annotated[int, Depends(counter, use_cache=False)]
    ) -> tuple[int, int]:
        return a, b

    async with Runtime() as rt:
        assert await rt.run(handler) == (1, 2)


async def test_security_is_read_as_depends_and_its_scopes_ignored() -> None:
    def api_key() -> str:
        return "k"

    async def handler(key: Annotated[str, Security(api_key, scopes=["admin"])]) -> str:
        return key

    async with Runtime() as rt:
        assert await rt.run(handler) == "k"


def _route_only_cases() -> list[tuple[str, Callable[..., Any], str]]:
    def with_request(request: Request) -> str:
        return "x"

    def with_websocket(ws: WebSocket) -> str:
        return "x"

    def with_response(response: Response) -> str:
        return "x"

    def with_tasks(tasks: BackgroundTasks) -> str:
        return "x"

    def with_scopes(scopes: SecurityScopes) -> str:
        return "x"

    def with_header(x_token: str = Header()) -> str:
        return x_token

    def with_annotated_header(x_token: Annotated[str, Header()]) -> str:
        return x_token

    def with_body(item: Annotated[dict[str, Any], Body()]) -> str:
        return "x"

    return [
        ("request", with_request, "starlette.requests.Request"),
        ("ws", with_websocket, "starlette.websockets.WebSocket"),
        ("response", with_response, "starlette.responses.Response"),
        ("tasks", with_tasks, "fastapi.background.BackgroundTasks"),
        ("scopes", with_scopes, "fastapi.security.oauth2.SecurityScopes"),
        ("x_token", with_header, "fastapi.Header()"),
        ("x_token", with_annotated_header, "fastapi.Header()"),
        ("item", with_body, "fastapi.Body()"),
    ]


@pytest.mark.parametrize(("param", "provider", "what"), _route_only_cases(), ids=lambda v: getattr(v, "__name__", None))
def test_request_only_parameters_are_a_dependency_error_naming_job_dependency_and_parameter(
    param: str, provider: Callable[..., Any], what: str
) -> None:
    async def outer(v: Annotated[str, Depends(provider)]) -> str:
        return v

    with pytest.raises(DependencyError) as raised:

        @job(name="uses_request")
        async def uses_request(v: Annotated[str, Depends(outer)]) -> str:
            return v

    message = str(raised.value)
    assert "job 'uses_request'" in message
    assert f"{provider.__module__}:{provider.__qualname__}" in message
    assert "outer" in message  # the dependency path
    assert f"parameter {param!r}" in message
    assert f"{what} is FastAPI request data" in message


def test_a_request_parameter_on_the_job_itself_is_an_error_too() -> None:
    with pytest.raises(
        DependencyError, match=r"job 'direct'.*parameter 'request': starlette.requests.Request is FastAPI"
    ):

        @job(name="direct")
        async def direct(request: Request) -> None:
            return None


# -- the lifespan: one runtime, worker scope shared by routes and jobs --------------------


def _app(lc: FastAPILifecycle, log: list[str]) -> tuple[FastAPI, Any, Any]:
    @dependency(scope="worker")
    async def get_pool() -> AsyncIterator[dict[str, int]]:
        log.append("pool.created")
        await anyio.sleep(0.01)  # concurrent first requests overlap here
        try:
            yield {"n": len(log)}
        finally:
            log.append("pool.closed")

    async def get_db(pool: Annotated[dict[str, int], Depends(get_pool)]) -> AsyncIterator[dict[str, int]]:
        log.append("db.open")
        try:
            yield pool
        finally:
            log.append("db.close")

    @job
    async def count(db: Annotated[dict[str, int], Depends(get_db)]) -> int:
        return id(db)

    app = FastAPI(lifespan=lc.lifespan)

    @app.get("/pool")
    async def pool_route(db: Annotated[dict[str, int], Depends(get_db)]) -> dict[str, int]:
        return {"pool": id(db)}

    @app.get("/job")
    async def job_route() -> dict[str, int]:
        return {"pool": await lc.run(count)}

    return app, get_pool, count


async def test_routes_and_in_process_jobs_share_one_worker_scoped_value() -> None:
    log: list[str] = []
    lc = FastAPILifecycle()
    app, get_pool, _ = _app(lc, log)
    async with lc.lifespan(app):
        assert app.state.lifecycle is lc
        assert get_pool in app.dependency_overrides
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            answers: list[int] = []

            async def ask(path: str) -> None:
                response = await client.get(path)
                assert response.status_code == 200, response.text
                answers.append(response.json()["pool"])

            async with anyio.create_task_group() as tg:
                for i in range(10):
                    tg.start_soon(ask, "/pool" if i % 2 else "/job")
        assert len(set(answers)) == 1  # the same object for routes and jobs
        assert log.count("pool.created") == 1 and log.count("db.open") == 10 == log.count("db.close")
        assert "pool.closed" not in log
    assert log[-1] == "pool.closed" and log.count("pool.closed") == 1
    assert get_pool not in app.dependency_overrides  # the lifespan's overrides are gone
    with pytest.raises(LifecycleError, match="only while the app runs"):
        _ = lc.runtime


async def test_the_runtimes_overrides_reach_shared_values_in_routes_and_the_apps_own_overrides_win() -> None:
    log: list[str] = []

    @dependency(scope="worker")
    async def fake_pool() -> AsyncIterator[dict[str, int]]:
        yield {"fake": 1}

    lc = FastAPILifecycle()
    app, get_pool, _ = _app(lc, log)
    async with lc.lifespan(app):
        lc.runtime.dependency_overrides[get_pool] = fake_pool
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app") as client:
            first = (await client.get("/pool")).json()["pool"]
            second = (await client.get("/job")).json()["pool"]
        assert first == second
        assert "pool.created" not in log

    def app_fake() -> dict[str, int]:
        return {"app": 1}

    app.dependency_overrides[get_pool] = app_fake
    async with lc.lifespan(app):
        assert app.dependency_overrides[get_pool] is app_fake
    assert app.dependency_overrides[get_pool] is app_fake


async def test_share_worker_scope_false_leaves_routes_alone_and_shared_wires_one_by_hand() -> None:
    log: list[str] = []
    lc = FastAPILifecycle(share_worker_scope=False)
    app, get_pool, _ = _app(lc, log)

    @app.get("/by-hand")
    async def by_hand(pool: Annotated[dict[str, int], Depends(lc.shared(get_pool))]) -> dict[str, int]:
        return {"pool": id(pool)}

    async with lc.lifespan(app):
        assert get_pool not in app.dependency_overrides
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app") as client:
            hand = {(await client.get("/by-hand")).json()["pool"] for _ in range(3)}
            await client.get("/pool")  # FastAPI alone: a pool per request
            await client.get("/pool")
    assert len(hand) == 1
    assert log.count("pool.created") == 3


def test_shared_refuses_a_job_scoped_dependency() -> None:
    async def per_request() -> int:
        return 1

    lc = FastAPILifecycle()
    with pytest.raises(
        ValueError, match=r"shared\(test_fastapi:.*per_request\): only a @dependency\(scope=\"worker\"\)"
    ):
        lc.shared(per_request)


async def test_a_second_lifespan_while_one_runs_is_an_error() -> None:
    lc = FastAPILifecycle()
    app = FastAPI()
    async with lc.lifespan(app):
        with pytest.raises(LifecycleError, match="already running"):
            async with lc.lifespan(app):
                pass


def test_bad_runtime_options_fail_at_construction() -> None:
    with pytest.raises(ValueError, match="teardown_timeout"):
        FastAPILifecycle(teardown_timeout=0)


# -- enqueue: validated at the door ---------------------------------------------------------


@job(name="signup")
async def signup(user_id: int, email: str) -> str:
    return email


async def test_enqueue_validates_at_the_door_and_answers_422_with_every_problem() -> None:
    queue = MemoryQueue()
    lc = FastAPILifecycle(queue=queue)
    app = FastAPI(lifespan=lc.lifespan)

    @app.post("/signup")
    async def route(payload: dict[str, Any]) -> dict[str, str]:
        return {"id": await lc.enqueue(signup, payload)}

    async with lc.lifespan(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app") as client:
            bad = await client.post("/signup", json={"user_id": "seven", "extra": 1})
            good = await client.post("/signup", json={"user_id": "7", "email": "a@b"})
        assert bad.status_code == 422
        locations = {tuple(problem["loc"]) for problem in bad.json()["detail"]}
        assert locations == {("user_id",), ("email",), ("extra",)}
        assert good.status_code == 200
        deliveries = await queue.receive(10, 0.1)
    assert [(d.id, d.job, d.payload) for d in deliveries] == [
        (good.json()["id"], "signup", {"user_id": 7, "email": "a@b"})
    ]


async def test_enqueue_needs_a_job_and_a_queue() -> None:
    lc = FastAPILifecycle()
    async with lc.lifespan(FastAPI()):
        with pytest.raises(TypeError, match="takes a @job"):
            await lc.enqueue("signup", {})  # type: ignore[arg-type]
        with pytest.raises(LifecycleError, match=r"enqueue\('signup'\): no queue"):
            await lc.enqueue(signup, {"user_id": 1, "email": "x"})
        other = MemoryQueue()
        sent = await lc.enqueue(signup, {"user_id": 1, "email": "x"}, queue=other, headers={"traceparent": "00-ab"})
        [delivery] = await other.receive(10, 0.1)
    assert delivery.id == sent and delivery.headers == {"traceparent": "00-ab"}


def test_the_module_is_public() -> None:
    assert lifecycle.fastapi.FastAPILifecycle is FastAPILifecycle
    assert FastAPILifecycle.__module__ == "lifecycle.fastapi"


# -- end to end: uvicorn + httpx + Redis + a worker process --------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait(condition: Callable[[], Any], what: str, timeout: float = 90.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[dict[str, Any]]:
    def ping() -> None:
        import redis

        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()

    require_service("Redis", ping)
    stream = f"lifecycle-fastapi-{uuid.uuid4().hex}"
    evidence = tmp_path / "evidence.jsonl"
    evidence.touch()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
        "FASTAPI_APP_REDIS": REDIS_URL,
        "FASTAPI_APP_STREAM": stream,
        "FASTAPI_APP_EVIDENCE": str(evidence),
    }
    port = _free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "fastapi_app:app",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        env=env,
        cwd=TESTS,
        stderr=subprocess.PIPE,
    )
    worker = subprocess.Popen(
        [sys.executable, "-m", "lifecycle", "--log-level", "warning", "run", str(TESTS / "fastapi_app.py") + ":worker"],
        env=env,
        stderr=subprocess.PIPE,
    )
    try:
        yield {
            "url": f"http://127.0.0.1:{port}",
            "evidence": evidence,
            "server": server,
            "worker": worker,
            "stream": stream,
        }
    finally:
        for proc in (server, worker):
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=30)
        import redis

        client = redis.Redis.from_url(REDIS_URL)
        keys = list(client.scan_iter(match=f"{stream}*"))
        if keys:
            client.delete(*keys)


def _events(evidence: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in evidence.read_text().splitlines() if line.strip()]


@pytest.mark.redis
def test_a_uvicorn_app_and_a_worker_process_share_get_db_through_redis(stack: dict[str, Any]) -> None:
    server, worker = stack["server"], stack["worker"]

    def up() -> bool:
        assert server.poll() is None, server.stderr.read().decode() if server.stderr else ""
        try:
            return httpx.get(stack["url"] + "/users/1", timeout=5).status_code == 200
        except httpx.TransportError:
            return False

    _wait(up, "uvicorn to serve")
    with httpx.Client(base_url=stack["url"], timeout=30) as client:
        routes = [client.get(f"/users/{i}").json() for i in (2, 3)]
        now = client.post("/greet/now", params={"user_id": 5}).json()
        refused = client.post("/greet", json={"user_id": "five", "surplus": True})
        queued = client.post("/greet", json={"user_id": "7"})
    assert refused.status_code == 422, refused.text
    assert {tuple(p["loc"]) for p in refused.json()["detail"]} == {("user_id",), ("surplus",)}
    assert queued.status_code == 200, queued.text
    assert now == {"result": "hello 5"}

    ran = _wait(
        lambda: [e for e in _events(stack["evidence"]) if e["event"] == "greet.ran" and e["pid"] == worker.pid],
        "the worker to run the enqueued job",
    )
    assert [e["user_id"] for e in ran] == [7]  # the refused payload never reached the broker

    # Stop both gracefully: the app's lifespan and the worker tear their pools down.
    server.send_signal(signal.SIGTERM)
    worker.send_signal(signal.SIGTERM)
    # uvicorn shuts down gracefully (lifespan included), then re-raises the signal.
    assert server.wait(timeout=60) in (0, -signal.SIGTERM)
    assert worker.wait(timeout=60) == 0
    events = _events(stack["evidence"])

    def of(pid: int, event: str) -> list[dict[str, Any]]:
        return [e for e in events if e["pid"] == pid and e["event"] == event]

    # In the app: one pool, shared by the routes and the in-process job, closed once.
    app_pools = of(server.pid, "pool.created")
    assert len(app_pools) == 1
    pool = app_pools[0]["pool"]
    assert {r["pool"] for r in routes} == {pool}
    assert [e["pool"] for e in of(server.pid, "greet.ran")] == [pool]
    assert [e["pool"] for e in of(server.pid, "pool.closed")] == [pool]
    # Every session the app opened (routes and job alike) was closed, on that pool.
    opened = {e["session"] for e in of(server.pid, "db.opened")}
    assert opened == {e["session"] for e in of(server.pid, "db.closed")} and len(opened) == 4
    # In the worker: its own pool, and the same get_db opened and closed a session on it.
    worker_pools = [e["pool"] for e in of(worker.pid, "pool.created")]
    assert len(worker_pools) == 1 and worker_pools != [pool]
    assert [e["pool"] for e in of(worker.pid, "db.opened")] == worker_pools
    assert [e["session"] for e in of(worker.pid, "db.closed")] == [e["session"] for e in of(worker.pid, "db.opened")]
    assert [e["pool"] for e in of(worker.pid, "pool.closed")] == worker_pools


def test_the_core_never_imports_fastapi_and_the_bridge_names_its_extra() -> None:
    script = (
        "import sys\n"
        "import lifecycle\n"
        "from lifecycle import Runtime, job\n"
        "@job\n"
        "async def plain(x: int) -> int:\n"
        "    return x\n"
        "assert lifecycle.run(plain, x=2) == 2\n"
        "assert not {'fastapi', 'starlette'} & set(sys.modules), sorted(sys.modules)\n"
        "sys.modules['fastapi'] = None  # as if the extra were not installed\n"
        "try:\n"
        "    import lifecycle.fastapi\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "pip install 'lifecycle[fastapi]'" in done.stdout
