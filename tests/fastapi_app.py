"""A FastAPI app and a lifecycle worker sharing one ``get_db``, for
``tests/test_fastapi.py``: uvicorn serves ``fastapi_app:app``, and
``lifecycle run tests/fastapi_app.py:worker`` consumes what its routes enqueue.

Configured by the environment: ``FASTAPI_APP_REDIS`` (URL), ``FASTAPI_APP_STREAM`` (a
unique stream) and ``FASTAPI_APP_EVIDENCE`` (a file: one JSON line per event, with the
process id, so the test can tell which process created, used and closed what)."""

import json
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI

from lifecycle import Worker, dependency, job
from lifecycle.fastapi import FastAPILifecycle
from lifecycle.queues import RedisStreamQueue

EVIDENCE = Path(os.environ["FASTAPI_APP_EVIDENCE"])


def record(event: str, **fields: Any) -> None:
    with EVIDENCE.open("a") as file:  # one short write per line: appends do not interleave
        file.write(json.dumps({"event": event, "pid": os.getpid(), **fields}) + "\n")


@dependency(scope="worker")
async def get_pool() -> AsyncIterator[dict[str, str]]:
    pool = {"id": uuid.uuid4().hex}
    record("pool.created", pool=pool["id"])
    try:
        yield pool
    finally:
        record("pool.closed", pool=pool["id"])


async def get_db(pool: Annotated[dict[str, str], Depends(get_pool)]) -> AsyncIterator[dict[str, str]]:
    """The one dependency routes and jobs share, written with FastAPI's Depends."""
    session = {"pool": pool["id"], "session": uuid.uuid4().hex}
    record("db.opened", **session)
    try:
        yield session
    finally:
        record("db.closed", **session)


@job(name="greet", retries=1)
async def greet(user_id: int, db: Annotated[dict[str, str], Depends(get_db)]) -> str:
    record("greet.ran", user_id=user_id, **db)
    return f"hello {user_id}"


queue = RedisStreamQueue(
    os.environ.get("FASTAPI_APP_REDIS", "redis://127.0.0.1:6379/0"),
    stream=os.environ["FASTAPI_APP_STREAM"],
    group="workers",
)
lc = FastAPILifecycle(queue=queue)
app = FastAPI(lifespan=lc.lifespan)
worker = Worker(queue, jobs=[greet], concurrency=4, poll_interval=0.2)


@app.get("/users/{user_id}")
async def read_user(user_id: int, db: Annotated[dict[str, str], Depends(get_db)]) -> dict[str, Any]:
    record("route.ran", user_id=user_id, **db)
    return {"user_id": user_id, **db}


@app.post("/greet")
async def enqueue_greet(payload: dict[str, Any]) -> dict[str, str]:
    return {"id": await lc.enqueue(greet, payload)}


@app.post("/greet/now")
async def greet_now(user_id: int) -> dict[str, str]:
    return {"result": await lc.run(greet, user_id=user_id)}
