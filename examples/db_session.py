"""A DB-session-like dependency tree, runnable as is: ``python examples/db_session.py``,
or ``python examples/db_session.py trio`` on trio (a core dependency of lifecycle).

- ``database`` is worker-scoped: opened once, shared by every job, closed at shutdown.
- ``transaction`` is job-scoped: commits when the job succeeds, rolls back when the
  job's exception is thrown in at its ``yield``.
- ``current_user`` receives the job's own ``user_id`` argument by name.
"""

from __future__ import annotations

import sqlite3
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import anyio
import structlog

from lifecycle import Depends, JobContext, Runtime, dependency, job

DB_PATH = Path(tempfile.gettempdir()) / "lifecycle-example.sqlite3"


@dependency(scope="worker")
def database() -> Iterator[Path]:
    """Create the schema once per worker; sync, so it runs in a worker thread."""
    with sqlite3.connect(DB_PATH) as db:
        db.execute("DROP TABLE IF EXISTS users")
        db.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, email TEXT, sent INTEGER DEFAULT 0)")
        db.executemany("INSERT INTO users (id, email) VALUES (?, ?)", [(1, "ada@example.com"), (2, "bob@example.com")])
    print(f"[worker] database ready at {DB_PATH}")
    yield DB_PATH
    print("[worker] database closed")


def transaction(path: Annotated[Path, Depends(database)], ctx: JobContext) -> Iterator[sqlite3.Connection]:
    # Sync providers run in worker threads (threaded=True by default), so the
    # connection is shared across threads; this job uses it from one at a time.
    conn = sqlite3.connect(path, check_same_thread=False)
    try:
        yield conn
    except BaseException as exc:
        conn.rollback()
        print(f"[job {ctx.name}#{ctx.attempt}] rolled back because of {type(exc).__name__}: {exc}")
        raise
    else:
        conn.commit()
        print(f"[job {ctx.name}#{ctx.attempt}] committed")
    finally:
        conn.close()


def current_user(user_id: int, tx: Annotated[sqlite3.Connection, Depends(transaction)]) -> tuple[int, str]:
    row = tx.execute("SELECT id, email FROM users WHERE id = ?", (user_id,)).fetchone()
    if row is None:
        raise LookupError(f"no user {user_id}")
    return row


@job(retries=1)
async def send_welcome(
    user_id: int,
    user: Annotated[tuple[int, str], Depends(current_user)],
    tx: Annotated[sqlite3.Connection, Depends(transaction)],
) -> str:
    tx.execute("UPDATE users SET sent = sent + 1 WHERE id = ?", (user_id,))
    return f"welcome mail sent to {user[1]}"


async def main() -> int:
    async with Runtime(teardown_timeout=10) as rt:
        print(await rt.run(send_welcome, user_id=1))
        try:
            await rt.run(send_welcome, user_id=99)
        except LookupError as exc:
            print(f"failed as expected: {exc}")
        with sqlite3.connect(DB_PATH) as db:
            sent = dict(db.execute("SELECT id, sent FROM users").fetchall())
    print(f"sent counters: {sent}")
    return 0 if sent == {1: 1, 2: 0} else 1


if __name__ == "__main__":
    # The library never configures logging; an application does. Show job events only.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(20))
    sys.exit(anyio.run(main, backend=sys.argv[1] if len(sys.argv) > 1 else "asyncio"))
