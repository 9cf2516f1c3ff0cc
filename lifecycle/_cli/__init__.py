"""``lifecycle``: run jobs from the command line, list them, show and check their graphs.

Built on click: commands and options are made at run time from each job's signature,
which click supports directly, and its usage errors already exit with code 2."""

from __future__ import annotations

import contextlib
import inspect
import io
import json
import re
import sys
import time
from collections.abc import Iterator
from typing import Any, BinaryIO

import anyio
import click

from .. import __version__
from .._errors import DependencyError, PayloadError
from .._job import Job, collected_errors
from .._schedule import Schedule
from .._worker import Worker
from ._execute import EXIT_FAILED, EXIT_OK, run_batch, run_job, run_worker
from ._globals import global_params, settings, with_globals
from ._graph import build_tree, render_dot, render_mermaid, render_tree, summary
from ._logs import LEVELS, configure, redact
from ._options import job_options, to_payload
from ._queues import dead_command, queue_command, worker_command
from ._signals import EXIT_INTERRUPTED, SIGNALS
from ._target import GraphError, Target, load


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lifecycle")
@with_globals
@click.pass_context
def cli(ctx: click.Context, backend: str | None, log_format: str | None, log_level: str | None) -> None:
    """Run @job functions with their dependencies set up and torn down per job."""
    given = {"backend": backend, "log_format": log_format, "log_level": log_level}
    ctx.meta["lifecycle.settings"] = {key: value for key, value in given.items() if value is not None}


RUN_HELP = """Run a job (its options come from its parameters), a JSONL batch, or a Worker.

\b
  lifecycle run jobs.py                      the only job in the file
  lifecycle run jobs.py:send_email --user-id 3
  lifecycle run jobs.py:send_email --jsonl payloads.jsonl --concurrency 8
  lifecycle run jobs.py:worker               consume until SIGINT/SIGTERM

`lifecycle run TARGET --help` lists the job's own options.
Exit codes: 0 success, 1 job failed, 2 usage or graph error, 130 interrupted."""


@cli.command(
    help=RUN_HELP,
    add_help_option=False,
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
)
@click.argument("target", required=False)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def run(ctx: click.Context, target: str | None, args: tuple[str, ...]) -> None:
    if target in ("-h", "--help"):
        click.echo(ctx.get_help())
        ctx.exit(EXIT_OK)
    if target is None:
        raise click.UsageError(
            "missing TARGET: a file (jobs.py) or a dotted module (pkg.jobs), with ':name' to pick "
            "a job or Worker; 'lifecycle run -h' shows examples",
            ctx,
        )
    # Logs are configured before the target's module is imported, with the global
    # options given after the target too (an import error's traceback shows at debug).
    config = settings(ctx, **_early_globals(args))
    loaded = load(target)
    chosen = loaded.resolve()
    if isinstance(chosen, Job) and any(chosen is task for task in loaded.celery_tasks.values()):
        raise click.UsageError(
            f"{target} is a Celery task: start a Celery worker for it (celery -A {loaded.module.__name__} "
            "worker) and send it with .delay(); 'lifecycle list', 'graph' and 'check' show it",
            ctx,
        )
    params: list[click.Parameter] = list(global_params())
    batch = any(arg == "--jsonl" or arg.startswith("--jsonl=") for arg in args)
    if isinstance(chosen, Job):
        params += [
            click.Option(
                ["--jsonl"],
                metavar="FILE|-",
                help="Run one job per JSON line ('-' reads stdin); job options given too apply to every line.",
            ),
            click.Option(["--concurrency"], type=click.IntRange(min=1), default=1, show_default=True),
            *job_options(chosen, batch=batch),
        ]
    doc = _summary(chosen.fn) if isinstance(chosen, Job) else "Consume the worker's queue until SIGINT/SIGTERM."
    command = click.Command(
        f"run {target}",
        params=params,
        help=doc,
        add_help_option=True,
        context_settings={"help_option_names": ["-h", "--help"]},
    )
    sub = command.make_context(f"lifecycle run {target}", list(args))
    values = dict(sub.params)
    config = settings(ctx, **{key: values.pop(key) for key in ("backend", "log_format", "log_level")})
    backend = config["backend"]
    if isinstance(chosen, Worker):
        code = anyio.run(run_worker, chosen, backend=backend)
    else:
        jsonl, concurrency = values.pop("jsonl"), values.pop("concurrency")
        if jsonl is not None:
            base = to_payload(chosen, values, sub)
            with _open_jsonl(jsonl, sub) as source:
                code = anyio.run(
                    run_batch, chosen, source, concurrency, config["log_format"], base, backend=backend
                )
        else:
            payload = to_payload(chosen, values)
            try:  # checked before the runtime starts: a bad option is the caller's error (exit 2)
                chosen.bind_payload((), payload)
            except PayloadError as exc:
                raise click.UsageError(redact(str(exc)), sub) from exc
            code = anyio.run(run_job, chosen, payload, backend=backend)
    ctx.exit(code)


def _early_globals(args: tuple[str, ...]) -> dict[str, str]:
    """``--log-level`` and ``--log-format`` given after the target, read before the
    target is imported (click parses the job's command only after importing it)."""
    found: dict[str, str] = {}
    for index, arg in enumerate(args):
        for name in ("--log-level", "--log-format"):
            key = name[2:].replace("-", "_")
            if arg == name and index + 1 < len(args):
                found[key] = args[index + 1]
            elif arg.startswith(name + "="):
                found[key] = arg.partition("=")[2]
    levels = {"log_format": ("console", "json"), "log_level": tuple(LEVELS)}
    # Invalid values are left for click to report, with the option named.
    return {key: value.lower() for key, value in found.items() if value.lower() in levels[key]}


@contextlib.contextmanager
def _open_jsonl(source: str, ctx: click.Context) -> Iterator[BinaryIO]:
    """The ``--jsonl`` input as bytes (``-``: stdin); one that cannot be opened is a
    usage error naming the option."""
    if source == "-":
        yield sys.stdin.buffer
        return
    try:
        stream = open(source, "rb")  # noqa: SIM115 - closed below, after the batch
    except OSError as exc:
        raise click.BadParameter(f"cannot read {source}: {exc.strerror or exc}", ctx, param_hint="'--jsonl'") from exc
    with stream:
        yield stream


def _summary(fn: Any) -> str | None:
    """The docstring without its Args/Parameters section (each option shows its own)."""
    doc = inspect.getdoc(fn) or ""
    kept = re.split(r"^(?:Args|Arguments|Parameters|Returns|Raises):\s*$", doc, maxsplit=1, flags=re.MULTILINE)[0]
    return kept.strip() or None


@cli.command("list")
@click.argument("target")
@with_globals
@click.pass_context
def list_command(ctx: click.Context, /, target: str, **given: Any) -> None:
    """List the jobs and workers in TARGET with their arguments and dependencies."""
    SIGNALS.interrupt_now()
    settings(ctx, **given)
    loaded = load(target)
    selected: dict[str, Any] = (
        {loaded.attribute: loaded.resolve()} if loaded.attribute else loaded.everything()
    )
    if not selected:
        click.echo(f"{target}: no jobs or workers")
    celery = {id(job) for job in loaded.celery_tasks.values()}
    now = time.time()
    for name, value in selected.items():
        if isinstance(value, Job):
            text = summary(f"{loaded.source}:{name}", value, value.plan)
            if id(value) in celery:  # the Celery task name is what .delay() and workers use
                text = text.replace("; retries=", f"; Celery task {value.name!r}; retries=", 1)
            click.echo(text)
            if value.schedule is not None:
                click.echo(_schedule_text(value.schedule, now))
        else:
            click.echo(f"{name}  (Worker over {_queue_label(value.queue)}; concurrency={value.concurrency})")
            click.echo(f"    jobs: {', '.join(sorted(value.jobs))}")
            for schedule in value.schedules:
                click.echo(_schedule_text(schedule, now))
    if loaded.attribute is None:
        for name, schedule in loaded.schedules.items():
            click.echo(f"{name}  (Schedule of job {schedule.job.name!r})")
            click.echo(_schedule_text(schedule, now))


def _schedule_text(schedule: Schedule, now: float) -> str:
    """A schedule for ``list``: its name, when it runs, and its next three runs in its
    own time zone."""
    upcoming = ", ".join(schedule.local_time(tick).isoformat() for tick in schedule.ticks(now, 3))
    # Argument names only: a value may be a secret, and list output ends up in logs.
    payload = f"; payload: {', '.join(sorted(schedule.payload))}" if schedule.payload else ""
    return (
        f"    schedule {schedule.name}: {schedule.description}; catch_up={schedule.catch_up}{payload}\n"
        f"        next: {upcoming}"
    )


def _queue_label(queue: Any) -> str:
    """The queue's class and, if it has one, its URL without the password."""
    label = type(queue).__name__
    url = getattr(queue, "url", None)
    return f"{label} at {redact(url)}" if isinstance(url, str) else label


@cli.command()
@click.argument("target")
@click.option("--indent", type=click.IntRange(min=0), default=2, show_default=True, help="JSON indentation.")
@with_globals
@click.pass_context
def schema(ctx: click.Context, /, target: str, indent: int, **given: Any) -> None:
    """Print the JSON Schema of a job's payload (a Worker: of each of its jobs).

    The schema comes from the same model every door validates with, for producers
    written in another language.

    \b
      lifecycle schema jobs.py:send_email
      lifecycle schema jobs.py:worker          {"job name": schema, ...}
    """
    SIGNALS.interrupt_now()
    settings(ctx, **given)
    chosen = load(target).resolve()
    document: dict[str, Any]
    if isinstance(chosen, Job):
        document = chosen.payload_schema()
    else:
        document = {name: job.payload_schema() for name, job in sorted(chosen.jobs.items())}
    click.echo(json.dumps(document, indent=indent or None, ensure_ascii=False))


@cli.command()
@click.argument("target")
@click.option("--format", "fmt", type=click.Choice(["tree", "mermaid", "dot"]), default="tree", show_default=True)
@with_globals
@click.pass_context
def graph(ctx: click.Context, /, target: str, fmt: str, **given: Any) -> None:
    """Show a job's dependency graph as a tree, Mermaid or Graphviz DOT."""
    SIGNALS.interrupt_now()
    settings(ctx, **given)
    chosen = load(target).resolve()
    if not isinstance(chosen, Job):
        raise click.UsageError(f"{target} is a Worker; graph takes a job")
    render = {"tree": render_tree, "mermaid": render_mermaid, "dot": render_dot}[fmt]
    click.echo(render(build_tree(chosen.plan)))


@cli.command()
@click.argument("target")
@with_globals
@click.pass_context
def check(ctx: click.Context, /, target: str, **given: Any) -> None:
    """Build every job's graph in TARGET and report every problem (exit 1 if any)."""
    SIGNALS.interrupt_now()
    settings(ctx, **given)
    errors: list[tuple[Job[..., Any], DependencyError]] = []
    token = collected_errors.set(errors)
    try:
        loaded: Target = load(target)
    finally:
        collected_errors.reset(token)
    problems = [f"{job.name}: {error}" for job, error in errors]
    jobs, tasks, workers = loaded.jobs, loaded.celery_tasks, loaded.workers
    for name, worker in workers.items():
        for job in worker.jobs.values():
            try:
                worker.runtime.plan(job)
            except DependencyError as exc:
                if job.error is None:
                    problems.append(f"{name} (worker) / {job.name}: {exc}")
    for problem in problems:
        click.echo(f"error: {redact(problem)}", err=True)
    if problems:
        click.echo(f"{_count(len(problems), 'problem')} in {target}", err=True)
        ctx.exit(EXIT_FAILED)
    found = [_count(len(jobs), "job"), _count(len(tasks), "Celery task"), _count(len(workers), "worker")]
    kept = [text for text in found if not text.startswith("0 ")]
    if not kept:
        click.echo(f"ok: {target} defines no jobs or workers; nothing to check")
        return
    listed = ", ".join(kept[:-1]) + (" and " if len(kept) > 1 else "") + kept[-1]
    graphs = len(jobs) + len(tasks) + sum(len(w.jobs) for w in workers.values())
    verb = "is" if len(kept) == 1 and kept[0].startswith("1 ") else "are"
    click.echo(f"ok: {listed} in {target} {verb} valid ({_count(graphs, 'dependency graph')} checked)")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


cli.add_command(worker_command)
cli.add_command(dead_command)
cli.add_command(queue_command)


def main(argv: list[str] | None = None) -> int:
    """Run the command line and return its exit code (``lifecycle`` and ``python -m
    lifecycle`` both call this).

    It takes over SIGINT and SIGTERM first, before click parses anything or the target
    is imported, so that no signal meets Python's defaults (``_signals``).

    Args:
        argv: the arguments; ``None`` reads ``sys.argv``.
    """
    SIGNALS.install()
    configure(None, "info")  # so that an early cli.forced_exit goes to stderr, never stdout
    try:
        result = cli.main(args=argv, prog_name="lifecycle", standalone_mode=False)
    except click.exceptions.Abort:  # click's own prompts turn Ctrl-C into Abort
        return EXIT_INTERRUPTED
    except click.ClickException as exc:
        shown = io.StringIO()
        exc.show(file=shown)
        sys.stderr.write(redact(shown.getvalue()))  # an import error may quote a URL
        return exc.exit_code
    except click.exceptions.Exit as exc:
        code = exc.exit_code
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    else:
        code = result if isinstance(result, int) else EXIT_OK
    if SIGNALS.received and not SIGNALS.acted and code == EXIT_OK:
        return EXIT_INTERRUPTED  # a signal nothing acted on (during --help, say) still interrupts
    return code


__all__ = ["GraphError", "cli", "main", "schema"]

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
