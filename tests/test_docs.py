"""The documentation site (mkdocs.yml, docs/): it builds strictly, its examples run, and
its list of log events matches the events the code emits.

The build needs the ``docs`` extra (mkdocs-material, mkdocstrings[python]); without it
the build test is skipped with a reason, except under ``CI=true``, where it fails. The
other tests need nothing beyond the test extra."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"

# A fenced Python block preceded by this marker is run by these tests: "run" blocks as a
# script each, "pytest" blocks of one page joined into one test module.
_MARKED = re.compile(r"<!-- docs-test: (?P<kind>\w+) -->\n(?P<fence>[^\n]*)\n")
_BLOCK = re.compile(r"```python\n(?P<code>.*?)^```", re.DOTALL | re.MULTILINE)
_KINDS = ("run", "pytest")
# What the runnable example of a page prints first, as the page's text says.
_PRINTS = {
    "index.md": ["conn opened", "conn closed", "pool closed", "sent to user-3 (attempt 1)"],
    "payloads.md": ["42 on 2026-11-23: 2 item(s), normal"],
}

# Event names as the code spells them: LOG.info("worker.started", ...), or an
# {"event": "cli.batch_summary"} object. The docs' event table spells them as `noun.verb`.
_EVENT_IN_CODE = re.compile(
    r"""["'](?P<name>(?:job|dependency|worker|queue|celery|dramatiq|cli|schedule)\.[a-z_]+)["']"""
)
_EVENT_IN_TABLE = re.compile(r"^\| `(?P<name>[a-z]+\.[a-z_]+)` \|", re.MULTILINE)


def require_mkdocs() -> None:
    """Skip the calling test when mkdocs with its plugins is not installed; under
    ``CI=true`` fail instead, so that CI never passes without building the site."""
    missing = [name for name in ("mkdocs", "material", "mkdocstrings_handlers.python") if not _installed(name)]
    if not missing:
        return
    reason = f"the docs extra is not installed (missing: {', '.join(missing)}); pip install -e '.[docs]'"
    if os.environ.get("CI"):
        pytest.fail(f"CI=true: {reason}")
    pytest.skip(reason)


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a missing parent package
        return False


def marked_blocks(text: str, where: str) -> list[tuple[str, str]]:
    """``(kind, code)`` for every Python block marked with ``<!-- docs-test: kind -->``.

    Args:
        text: a Markdown page.
        where: the page's name, for error messages.

    Raises:
        ValueError: a marker with an unknown kind, or not directly followed by a
            fenced Python block.
    """
    blocks = []
    for marker in _MARKED.finditer(text):
        kind = marker["kind"]
        if kind not in _KINDS:
            raise ValueError(f"{where}: unknown docs-test kind {kind!r}; use one of {', '.join(_KINDS)}")
        block = _BLOCK.match(text, marker.start("fence"))
        if block is None:
            line = text.count("\n", 0, marker.start()) + 1
            raise ValueError(f"{where}, line {line}: docs-test marker not followed by a ```python block")
        blocks.append((kind, block["code"]))
    return blocks


def _pages() -> list[Path]:
    return sorted(DOCS.rglob("*.md"))


def _public_names(module: str) -> list[str]:
    return list(importlib.import_module(module).__all__)


def _documented(html: str, module: str, name: str) -> bool:
    """Whether the reference page ``html`` documents ``module.name``: under its own id,
    or (an object imported lazily, documented from its private module) with its public
    path as the heading."""
    if f'id="{module}.{name}"' in html:
        return True
    return re.search(rf'class="doc doc-heading">\s*{re.escape(module)}\.{name}\s*<a', html) is not None


def _env() -> dict[str, str]:
    # Mkdocs-material prints a banner about its successor unless told not to.
    return {**os.environ, "NO_MKDOCS_2_WARNING": "1", "PYTHONDONTWRITEBYTECODE": "1"}


# -- the build --------------------------------------------------------------------------


def test_the_site_builds_strictly_with_the_api_reference(tmp_path: Path) -> None:
    require_mkdocs()
    site = tmp_path / "site"
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "WARNING" not in output, output
    reference = (site / "reference" / "lifecycle" / "index.html").read_text()
    for name in ("lifecycle.Runtime", "lifecycle.Worker", "lifecycle.Depends", "lifecycle.JobTimeout"):
        assert f'id="{name}"' in reference, f"{name} is missing from the API reference"
    queues = (site / "reference" / "queues" / "index.html").read_text()
    missing = [name for name in _public_names("lifecycle.queues") if not _documented(queues, "lifecycle.queues", name)]
    assert not missing, f"lifecycle.queues names missing from the API reference: {missing}"
    missing = [name for name in _public_names("lifecycle") if not _documented(reference, "lifecycle", name)]
    assert not missing, f"lifecycle names missing from the API reference: {missing}"
    assert 'id="lifecycle.celery.CeleryLifecycle"' in (site / "reference" / "celery" / "index.html").read_text()
    # The execution diagram is a Mermaid picture; the benchmark pages include the files.
    assert '<pre class="mermaid">' in (site / "concepts" / "index.html").read_text()
    assert "Reliability" in (site / "benchmarks" / "results" / "index.html").read_text()


def test_without_mkdocs_the_build_is_skipped_locally_and_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match=r"docs extra is not installed \(missing: mkdocs, material"):
        require_mkdocs()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true: the docs extra is not installed"):
        require_mkdocs()


# -- the examples -----------------------------------------------------------------------


def test_every_page_is_in_the_navigation() -> None:
    nav = (ROOT / "mkdocs.yml").read_text()
    missing = [str(page.relative_to(DOCS)) for page in _pages() if str(page.relative_to(DOCS)) not in nav]
    assert not missing, f"pages not in mkdocs.yml's nav: {missing}"


def test_the_runnable_examples_run(tmp_path: Path) -> None:
    runs = [
        (page, code) for page in _pages() for kind, code in marked_blocks(page.read_text(), page.name) if kind == "run"
    ]
    assert runs, "no page has a <!-- docs-test: run --> example (docs/index.md should)"
    for page, code in runs:
        done = subprocess.run(
            [sys.executable, "-c", code], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120
        )
        where = f"docs/{page.relative_to(DOCS)}"
        assert done.returncode == 0, f"an example of {where} failed:\n{done.stderr}"
        assert "Traceback" not in done.stderr, f"an example of {where} logged a traceback:\n{done.stderr}"
        expected = _PRINTS.get(page.name)
        if expected is not None:  # the page says what it prints, in this order
            assert done.stdout.splitlines()[: len(expected)] == expected, done.stdout


def test_the_testing_page_examples_pass_on_both_backends(tmp_path: Path) -> None:
    page = DOCS / "testing.md"
    code = "\n\n".join(block for kind, block in marked_blocks(page.read_text(), page.name) if kind == "pytest")
    assert "def test_" in code, "docs/testing.md lost its <!-- docs-test: pytest --> examples"
    (tmp_path / "test_docs_examples.py").write_text(code)
    (tmp_path / "pytest.ini").write_text("[pytest]\n")  # keep the project's options out
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_docs_examples.py"],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    tests = code.count("\nasync def test_") + code.count("\ndef test_")
    # Each test runs once per backend (the page's anyio_backend fixture).
    assert f"{2 * tests} passed" in done.stdout, done.stdout


def test_marked_blocks_reports_a_marker_without_a_block_and_an_unknown_kind() -> None:
    assert marked_blocks("<!-- docs-test: run -->\n```python\nprint(1)\n```\n", "a.md") == [("run", "print(1)\n")]
    with pytest.raises(ValueError, match=r"a\.md, line 3: docs-test marker not followed by a ```python block"):
        marked_blocks("text\n\n<!-- docs-test: run -->\n```sh\nls\n```\n", "a.md")
    with pytest.raises(ValueError, match="a.md: unknown docs-test kind 'doctest'; use one of run, pytest"):
        marked_blocks("<!-- docs-test: doctest -->\n```python\n1\n```\n", "a.md")


# -- facts the pages list ---------------------------------------------------------------


def _events_in_code() -> set[str]:
    names: set[str] = set()
    for path in (ROOT / "lifecycle").rglob("*.py"):
        names.update(match["name"] for match in _EVENT_IN_CODE.finditer(path.read_text()))
    return names


def test_the_operations_page_lists_exactly_the_log_events_the_code_emits() -> None:
    page = (DOCS / "operations.md").read_text()
    documented = {match["name"] for match in _EVENT_IN_TABLE.finditer(page)}
    in_code = _events_in_code()
    # cli.batch_summary is the JSON summary of a batch, described under the table.
    assert in_code - documented == {"cli.batch_summary"}, "events missing from docs/operations.md"
    assert "`cli.batch_summary`" in page
    assert documented - in_code == set(), "docs/operations.md lists events the code no longer emits"


def test_every_queue_backend_has_a_page_and_every_cli_command_is_on_the_cli_page() -> None:
    import click

    from lifecycle._cli import cli

    titles = {page.read_text().partition("\n")[0] for page in (DOCS / "queues").glob("*.md")}
    backends = [name for name in _public_names("lifecycle.queues") if name.endswith("Queue") and name != "Queue"]
    assert len(backends) >= 6, backends
    missing = [name for name in backends if f"# {name}" not in titles]
    assert not missing, f"queue backends without a page in docs/queues/ (titled '# Name'): {missing}"

    def commands(group: click.Group, prefix: str = "") -> list[str]:
        found = []
        for name, command in group.commands.items():
            if isinstance(command, click.Group):
                found += commands(command, f"{prefix}{name} ")
            else:
                found.append(prefix + name)
        return found

    page = (DOCS / "cli.md").read_text()
    missing = [name for name in commands(cli) if f"| `{name} " not in page and f"| `{name}`" not in page]
    assert not missing, f"CLI commands missing from the table of docs/cli.md: {missing}"


# A Markdown file a page names: `README.md`, `benchmarks/README.md`, `queues/redis.md`.
_CITED_FILE = re.compile(r"[\w./-]*\w\.md\b")


def test_the_pages_cite_the_readme_never_documents_outside_the_repository() -> None:
    # Every Markdown file a page names is one a reader of the repository has: next to
    # the page, in docs/, or from the repository's root.
    outside = [
        (f"docs/{page.relative_to(DOCS)}", name)
        for page in _pages()
        for name in _CITED_FILE.findall(page.read_text())
        if not any((base / name).is_file() for base in (page.parent, DOCS, ROOT))
    ]
    assert not outside, f"pages cite documents that are not in the repository: {outside}"
