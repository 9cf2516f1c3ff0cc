"""The README's plain ``pip install -e .`` gives a user everything it promises: a package
that ``mypy --strict`` sees (an editable install that is a plain path entry, not an
import hook), the ``lifecycle`` console script working from the directory of the
user's module, and the trio backend of ``python examples/db_session.py trio``.

One fresh virtualenv (no pip of its own: the running pip installs into it with
``--python``; wheels come from pip's cache), shared by the checks below."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

USER_APP = '''
"""A user's program: typed use of the public API."""
from collections.abc import AsyncIterator
from typing import Annotated

import lifecycle
from lifecycle import Depends, JobContext, Runtime, job


async def conn() -> AsyncIterator[str]:
    yield "conn"


@job(retries=1)
async def hello(name: str, c: Annotated[str, Depends(conn)], ctx: JobContext) -> str:
    """Say hello."""
    return f"hello {name} via {c} (attempt {ctx.attempt})"


async def twice() -> list[str]:
    async with Runtime(teardown_timeout=5) as rt:
        return [await rt.run(hello, name="Ada"), await rt.run(hello, name="Bob")]


def main() -> str:
    result: str = lifecycle.run(hello, name="Cy", backend="trio")
    return result
'''


def run(*args: str | Path, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new virtualenv with the repository installed editable, as the README says."""
    root = tmp_path_factory.mktemp("packaging")
    venv = root / "venv"
    made = run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=root)
    assert made.returncode == 0, made.stderr
    python = venv / "bin" / "python"
    installed = run(sys.executable, "-m", "pip", "--python", python, "install", "--quiet", "-e", REPO, cwd=root)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    return python


def test_mypy_strict_sees_the_editable_install(fresh_venv: Path, tmp_path: Path) -> None:
    app = tmp_path / "app"
    app.mkdir()
    (app / "user_app.py").write_text(USER_APP)
    # A deliberate error proves mypy read lifecycle's real types rather than Any.
    (app / "wrong.py").write_text("import lifecycle\n\nversion: int = lifecycle.__version__\n")
    # Run outside the repository, so `lifecycle` can only come from the installed venv.
    checked = run(
        sys.executable, "-m", "mypy", "--strict", "--python-executable", fresh_venv,
        "--cache-dir", tmp_path / "mypy-cache", "user_app.py", "wrong.py", cwd=app,
    )  # fmt: skip
    output = checked.stdout + checked.stderr
    assert "Cannot find implementation or library stub" not in output, output
    assert "user_app.py" not in output, output  # the user's typed program passes --strict
    assert 'wrong.py:3: error: Incompatible types in assignment (expression has type "str"' in output, output
    assert checked.returncode == 1


def test_console_script_finds_a_module_in_the_current_directory(fresh_venv: Path, tmp_path: Path) -> None:
    (tmp_path / "user_app.py").write_text(USER_APP)
    script = fresh_venv.parent / "lifecycle"
    listed = run(script, "list", "user_app", cwd=tmp_path, timeout=60)
    assert listed.returncode == 0, listed.stderr
    assert "hello  (user_app:hello; retries=1" in listed.stdout
    ran = run(script, "--backend", "trio", "run", "user_app:hello", "--name", "Ada", cwd=tmp_path, timeout=60)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout == "hello Ada via conn (attempt 1)\n"


def test_the_readme_example_runs_on_trio_after_the_plain_install(fresh_venv: Path, tmp_path: Path) -> None:
    example = run(fresh_venv, REPO / "examples" / "db_session.py", "trio", cwd=tmp_path, timeout=60)
    assert example.returncode == 0, example.stderr
    assert "welcome mail sent to ada@example.com" in example.stdout
    assert "sent counters: {1: 1, 2: 0}" in example.stdout
