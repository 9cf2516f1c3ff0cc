"""``lifecycle worker`` and ``lifecycle dead``: consume a queue named by a URL, and look
after its dead letters, with no Python written for either.

The queue comes from ``--queue URL`` (``lifecycle.queues.queue_from_url``: ``sqlite:///``,
``redis://``, ``postgresql://``, ``amqp://``, ``nats://``, ``memory://``); a bad URL is a
usage error (exit 2) naming the option.
``worker`` runs through ``run_worker``, so its signals and exit codes are those of
``lifecycle run TARGET:worker``: 0 after a graceful stop on SIGINT/SIGTERM, 1 if the
worker could not start, 130 on a second signal. ``dead list`` writes one JSON object
per dead letter on stdout (newest first), so it pipes into ``jq`` or a file."""

from __future__ import annotations

import base64
import json
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import anyio
import click

from .._errors import LifecycleError
from .._job import Job
from .._log import describe, redact
from .._schedule import Schedule
from .._worker import Worker
from ..queues import Queue, queue_from_url
from ._execute import EXIT_FAILED, run_worker
from ._globals import settings, with_globals
from ._target import load

T = TypeVar("T")


def _queue(url: str) -> Queue:
    try:
        return queue_from_url(url)
    except (ValueError, TypeError, LifecycleError, ImportError) as exc:
        raise click.BadParameter(redact(str(exc)), param_hint="'--queue'") from None


_QUEUE_HELP = (
    "The queue: sqlite:///PATH, redis://HOST:PORT/DB?stream=jobs, postgresql://..., amqp://..., nats://..., memory://."
)


@click.command("worker")
@click.argument("target")
@click.option("--queue", "url", required=True, metavar="URL", help=_QUEUE_HELP)
@click.option("--concurrency", type=click.IntRange(min=1), default=16, show_default=True, help="Jobs at once.")
@click.option(
    "--shutdown-grace",
    type=click.FloatRange(min=0),
    default=30.0,
    show_default=True,
    help="Seconds in-flight jobs get to finish after SIGINT/SIGTERM.",
)
@click.option(
    "--poll-interval",
    type=click.FloatRange(min=0, min_open=True),
    default=1.0,
    show_default=True,
    help="Seconds one read waits for messages.",
)
@click.option(
    "--max-deliveries",
    type=click.IntRange(min=1),
    default=5,
    show_default=True,
    help="A message handed out more often (its workers died) is dead-lettered as poison.",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(min=0, max=65535),
    default=None,
    metavar="PORT",
    help="Serve Prometheus metrics at http://ADDRESS:PORT/metrics (needs the prometheus extra).",
)
@click.option(
    "--health-port",
    type=click.IntRange(min=0, max=65535),
    default=None,
    metavar="PORT",
    help="Serve /livez and /readyz health probes on this port.",
)
@click.option(
    "--listen-address",
    default="0.0.0.0",
    show_default=True,
    metavar="ADDRESS",
    help="The address the metrics and health servers listen on.",
)
@click.option(
    "--no-schedules",
    is_flag=True,
    help="Only consume: do not enqueue the ticks of the jobs' schedules and TARGET's Schedule objects.",
)
@with_globals
@click.pass_context
def worker_command(
    ctx: click.Context,
    /,
    target: str,
    url: str,
    concurrency: int,
    shutdown_grace: float,
    poll_interval: float,
    max_deliveries: int,
    no_schedules: bool,
    metrics_port: int | None,
    health_port: int | None,
    listen_address: str,
    **given: Any,
) -> None:
    """Consume the queue at URL, running every job in TARGET (or only TARGET:job),
    until SIGINT/SIGTERM. Schedules (``@job(cron=...)``, and TARGET's ``Schedule``
    objects when no job is named) are driven too: a fleet of workers enqueues each tick
    once.

    \b
      lifecycle worker jobs.py --queue sqlite:///jobs.db --concurrency 32
      lifecycle worker jobs.py:send_email --queue redis://127.0.0.1:6379/0?stream=emails
      lifecycle worker jobs.py --queue sqlite:///jobs.db --metrics-port 9000 --health-port 8080
    """
    config = settings(ctx, **given)
    queue = _queue(url)
    loaded = load(target)
    if loaded.attribute is not None:
        chosen = loaded.resolve()
        if not isinstance(chosen, Job):
            raise click.UsageError(
                f"{target} is a Worker, which has its own queue: run it with 'lifecycle run {target}'"
            )
        jobs: list[Job[..., Any]] = [chosen]
        schedules: list[Schedule] = []
    else:
        jobs = list(loaded.jobs.values())
        schedules = list(loaded.schedules.values())
    if no_schedules:
        # Jobs keep their @job(cron=...) schedule attribute; the worker is told to drive none.
        schedules = []
    if not jobs and not schedules:
        raise click.UsageError(f"{target} defines no @job functions for the worker to run")
    try:
        worker = Worker(
            queue,
            jobs,
            concurrency=concurrency,
            shutdown_grace=shutdown_grace,
            poll_interval=poll_interval,
            max_deliveries=max_deliveries,
            schedules=schedules,
            metrics_port=metrics_port,
            metrics_address=listen_address,
            health_port=health_port,
            health_address=listen_address,
        )
        if no_schedules:
            worker.schedules, worker.scheduler = [], None
    except (LifecycleError, ImportError) as exc:
        raise click.UsageError(redact(str(exc))) from None
    ctx.exit(anyio.run(_serve, worker, queue, backend=config["backend"]))


async def _serve(worker: Worker, queue: Queue) -> int:
    try:
        return await run_worker(worker)
    finally:
        with anyio.CancelScope(shield=True):
            await queue.close()


def _dead_run(ctx: click.Context, given: dict[str, Any], url: str, call: Callable[[Queue], Awaitable[T]]) -> T:
    """Open the queue (``open()`` creates its storage idempotently), run ``call`` on
    it, close it; a failure is exit 1 with its reason (the URL's password masked)."""
    config = settings(ctx, **given)
    queue = _queue(url)

    async def main() -> T:
        try:
            await queue.open()
            return await call(queue)
        finally:
            with anyio.CancelScope(shield=True):
                await queue.close()

    try:
        return anyio.run(main, backend=config["backend"])
    except (LifecycleError, ValueError, OSError) as exc:  # BrokerUnavailable included
        click.echo(f"error: {redact(describe(exc))}", err=True)
        ctx.exit(EXIT_FAILED)
        raise  # unreachable: ctx.exit raises


@click.group("dead")
def dead_command() -> None:
    """List, replay and purge a queue's dead letters."""


def _json_value(value: Any) -> Any:
    """For ``json.dumps``: a malformed message's raw column or field (bytes) as text if
    it is UTF-8, else as ``{"base64": ...}``; anything else as its ``repr()``."""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return {"base64": base64.b64encode(value).decode("ascii")}
    return repr(value)


@dead_command.command("list")
@click.option("--queue", "url", required=True, metavar="URL", help=_QUEUE_HELP)
@click.option("--count", type=click.IntRange(min=1), default=100, show_default=True, help="At most this many.")
@click.option("--before", metavar="ID", default=None, help="Only dead letters older than this dead_letter_id.")
@with_globals
@click.pass_context
def dead_list(ctx: click.Context, /, url: str, count: int, before: str | None, **given: Any) -> None:
    """One JSON object per dead letter on stdout, newest first (its dead_letter_id
    pages on with --before)."""
    records = _dead_run(ctx, given, url, lambda queue: queue.dead_letters(count, before))
    for record in records:
        click.echo(json.dumps(record, default=_json_value, ensure_ascii=False))


@dead_command.command("replay")
@click.option("--queue", "url", required=True, metavar="URL", help=_QUEUE_HELP)
@click.argument("ids", nargs=-1, required=True)
@with_globals
@click.pass_context
def dead_replay(ctx: click.Context, /, url: str, ids: tuple[str, ...], **given: Any) -> None:
    """Put the dead letters IDS back on the queue as new messages (attempt 1)."""
    replayed = _dead_run(ctx, given, url, lambda queue: queue.replay(list(ids)))
    click.echo(f"replayed {replayed} of {len(ids)}", err=True)
    if replayed < len(ids):
        click.echo("the others were missing, or malformed (nothing to run)", err=True)


@dead_command.command("purge")
@click.option("--queue", "url", required=True, metavar="URL", help=_QUEUE_HELP)
@click.option("--all", "everything", is_flag=True, help="Delete every dead letter of the queue.")
@click.argument("ids", nargs=-1)
@with_globals
@click.pass_context
def dead_purge(ctx: click.Context, /, url: str, everything: bool, ids: tuple[str, ...], **given: Any) -> None:
    """Delete the dead letters IDS (or all of them with --all)."""
    if bool(ids) == everything:
        raise click.UsageError("give the dead_letter_ids to delete, or --all (not both)")
    purged = _dead_run(ctx, given, url, lambda queue: queue.purge(None if everything else list(ids)))
    click.echo(f"purged {purged}", err=True)


__all__ = ["dead_command", "worker_command"]


@click.group("queue")
def queue_command() -> None:
    """Set up a queue's storage."""


@queue_command.command("init")
@click.option("--queue", "url", required=True, metavar="URL", help=_QUEUE_HELP)
@with_globals
@click.pass_context
def queue_init(ctx: click.Context, /, url: str, **given: Any) -> None:
    """Create what the queue at URL needs (tables, consumer group, ...), idempotently,
    and check that it can be reached with these credentials: what a worker's start-up
    does, without starting one (for a deployment step)."""

    async def nothing(queue: Queue) -> None:
        return None

    _dead_run(ctx, given, url, nothing)
    click.echo(f"ready: {redact(url)}", err=True)
