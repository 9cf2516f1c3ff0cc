"""Schedules: a job run on a cron expression or a fixed interval, and the scheduler task
a ``Worker`` runs to put each tick on its queue exactly once, however many workers run.

Why every worker enqueues and none leads: there is no leader to elect, lose or fail
over. Each tick is enqueued with a de-duplication key derived from the schedule's name
and the tick's time (never from the enqueuing worker's clock), so the N enqueues of one
tick by N workers make one message, and a worker restarted in the middle computes the
same key again. The queue makes the key atomic with the enqueue (see each backend).

- A tick is enqueued as a delayed message (``at=`` the tick) as soon as the tick before
  it is due, so it is on the broker while any worker is up; it runs when it is due.
- Each key is remembered until one period after the tick that follows it: long enough
  for a worker starting late, or one catching up, to find it taken.
- ``catch_up="latest"``: a worker starting (or waking from a stall) after ticks went by
  with no worker up enqueues the latest of them once, under its own key, never a burst;
  ``"none"`` skips them.
- Cron uses cronsim (Debian cron's rules, DST included: a time skipped by a spring
  change runs right after it, a wall-clock time repeated by an autumn change runs once,
  a ``*``-hour expression runs in both repeated hours). Ticks are whole seconds.
- An interval (``every``) ticks at the multiples of its length since the Unix epoch, so
  every worker, and every restart, finds the same ticks."""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal, Protocol
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import anyio

from ._errors import ScheduleError
from ._log import LOG, describe, enabled_levels
from ._retry import RetryPolicy

if TYPE_CHECKING:
    from ._job import Job
    from .queues._base import Queue

CatchUp = Literal["latest", "none"]
_CATCH_UP = ("latest", "none")
_MIN_REMEMBER = 60.0  # seconds a tick's key outlives the next tick at least (clock skew)


def _cron_iterator(expression: str, start: datetime, reverse: bool) -> Any:
    # Imported here: cronsim is a core dependency, but only cron schedules pay for it.
    from cronsim import CronSim

    return CronSim(expression, start, reverse=reverse)


class Schedule:
    """A job run on a cron expression or every fixed interval; hand it to
    ``Worker(schedules=[...])``, or declare it with ``@job(cron=...)`` / ``@job(every=...)``.

    Args:
        job: the ``@job`` to run.
        cron: a cron expression: five fields (minute hour day month weekday), or six
            with seconds first. Not with ``every``.
        every: the interval, a ``timedelta`` or seconds (> 0). Ticks fall on the
            multiples of it since the Unix epoch (UTC). Not with ``cron``.
        timezone: the IANA zone the cron expression reads its wall-clock times in
            (default ``"UTC"``); cron only.
        payload: the job's arguments for each run, validated now against the job (a
            bad one raises ``PayloadError``). None: no arguments.
        catch_up: ``"none"`` (the default): ticks that went by while no worker was up
            are skipped. ``"latest"``: the latest of them runs once when a worker
            starts (the first start of a new schedule runs its latest past tick too).
        name: the schedule's name, the stem of its ticks' de-duplication keys; keep it
            stable across deployments. None: the job's name, the cron expression or
            interval, and a digest of the payload when there is one.
        tick_param: the name of a job parameter that receives the tick's time (an
            aware UTC ``datetime``, the time the run is for, not the time it started).
            None: the job does not get it.
    """

    __slots__ = ("_zone", "catch_up", "cron", "every", "job", "name", "payload", "tick_param", "timezone")

    def __init__(
        self,
        job: Job[..., Any],
        *,
        cron: str | None = None,
        every: timedelta | float | None = None,
        timezone: str = "UTC",
        payload: Mapping[str, Any] | None = None,
        catch_up: CatchUp = "none",
        name: str | None = None,
        tick_param: str | None = None,
    ) -> None:
        if not hasattr(job, "dump_payload"):
            raise ScheduleError(f"Schedule(...) takes a @job, got {job!r}; decorate it with @job")
        target: Job[..., Any] = job
        where = f"job {target.name!r} ({target.body.label}), schedule"
        if (cron is None) == (every is None):
            raise ScheduleError(f"{where}: give cron or every, exactly one (cron={cron!r}, every={every!r})")
        seconds: float | None = None
        zone = ZoneInfo("UTC")
        if every is not None:
            seconds = every.total_seconds() if isinstance(every, timedelta) else every
            if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not math.isfinite(seconds):
                raise ScheduleError(f"{where}, parameter 'every': a timedelta or seconds, got {every!r}")
            if seconds <= 0:
                raise ScheduleError(f"{where}, parameter 'every': must be positive, got {every!r}")
            if timezone != "UTC":
                raise ScheduleError(
                    f"{where}, parameter 'timezone': an interval does not depend on a time zone "
                    f"(got {timezone!r}); use cron for wall-clock times"
                )
            seconds = float(seconds)
        else:
            try:
                zone = ZoneInfo(timezone)
            except (ZoneInfoNotFoundError, ValueError) as exc:
                raise ScheduleError(
                    f"{where}, parameter 'timezone': unknown time zone {timezone!r} ({describe(exc)}); "
                    "use an IANA name such as 'Europe/Berlin'"
                ) from None
            if not isinstance(cron, str):
                raise ScheduleError(f"{where}, parameter 'cron': a string, got {cron!r}")
            try:
                _cron_iterator(cron, datetime(2000, 1, 1, tzinfo=zone), False)
            except Exception as exc:  # cronsim.CronSimError; raised at parse time
                raise ScheduleError(f"{where}, parameter 'cron': invalid expression {cron!r}: {exc}") from None
        if catch_up not in _CATCH_UP:
            raise ScheduleError(f"{where}, parameter 'catch_up': 'latest' or 'none', got {catch_up!r}")
        if tick_param is not None and tick_param not in target.payload_names:
            known = ", ".join(sorted(target.payload_names)) or "none"
            raise ScheduleError(
                f"{where}, parameter 'tick_param': the job has no argument {tick_param!r} to receive the "
                f"tick (its arguments: {known})"
            )
        given = dict(payload or {})
        if tick_param is not None and tick_param in given:
            raise ScheduleError(f"{where}, parameter 'payload': {tick_param!r} is the tick_param, filled per tick")
        # Validated now, against the job, with the tick as a stand-in: a bad payload is
        # an error where the schedule is declared, not a dead letter every tick.
        probe = {**given, tick_param: datetime(2000, 1, 1, tzinfo=UTC)} if tick_param else given
        target.dump_payload(probe)
        if name is None:
            name = f"{target.name}[{cron if cron is not None else f'every {seconds:g}s'}]"
            if given:
                canonical = json.dumps(target.dump_payload(probe), sort_keys=True, separators=(",", ":"))
                name += "#" + hashlib.sha256(canonical.encode()).hexdigest()[:12]
        elif not isinstance(name, str) or not name:
            raise ScheduleError(f"{where}, parameter 'name': a non-empty string, got {name!r}")
        self.job: Job[..., Any] = target
        self.cron: str | None = cron
        self.every: float | None = seconds
        self.timezone: str = timezone
        self.payload: dict[str, Any] = given
        self.catch_up: CatchUp = catch_up
        self.name: str = name
        self.tick_param: str | None = tick_param
        self._zone = zone

    def __repr__(self) -> str:
        return f"Schedule({self.name!r}, {self.description}, catch_up={self.catch_up!r})"

    @property
    def description(self) -> str:
        """When it runs, in words: ``cron '0 3 * * *' (Europe/Berlin)`` or ``every 300s``."""
        if self.cron is not None:
            return f"cron {self.cron!r} ({self.timezone})"
        return f"every {self.every:g}s"

    def next_tick(self, after: float) -> float:
        """The first tick strictly after ``after`` (seconds since the epoch)."""
        if self.every is not None:
            return (math.floor(after / self.every) + 1) * self.every
        # cronsim counts whole seconds, strictly after its start.
        start = datetime.fromtimestamp(math.floor(after), self._zone)
        return float(next(_cron_iterator(self.cron or "", start, False)).timestamp())

    def previous_tick(self, at_or_before: float) -> float | None:
        """The last tick at or before ``at_or_before``; None if there is none (a cron
        expression whose last match is more than cronsim's 50-year horizon away)."""
        if self.every is not None:
            return math.floor(at_or_before / self.every) * self.every
        start = datetime.fromtimestamp(math.floor(at_or_before) + 1, self._zone)
        try:
            return float(next(_cron_iterator(self.cron or "", start, True)).timestamp())
        except StopIteration:
            return None

    def ticks(self, after: float, count: int) -> list[float]:
        """The next ``count`` ticks strictly after ``after`` (seconds since the epoch)."""
        found: list[float] = []
        for _ in range(count):
            after = self.next_tick(after)
            found.append(after)
        return found

    def local_time(self, tick: float) -> datetime:
        """A tick as an aware datetime in the schedule's time zone."""
        return datetime.fromtimestamp(tick, self._zone)

    def key(self, tick: float) -> str:
        """The de-duplication key of one tick: the schedule's name and the tick's UTC time
        to the millisecond. The same on every worker and after every restart."""
        stamp = datetime.fromtimestamp(tick, UTC).isoformat(timespec="milliseconds")
        return f"lifecycle:schedule:{self.name}@{stamp}"

    def remember_for(self, tick: float) -> float:
        """Seconds the queue keeps the key of ``tick`` from its enqueue: the period
        before the tick (the earliest a worker enqueues it), the period after it, and
        that again (at least a minute) as a margin, so a worker starting before the
        following tick finds the key. It depends on the tick alone, so every worker
        asks for the same (RabbitMQ declares the key with it: equal or refused)."""
        before = self.previous_tick(tick - 0.001)
        following = self.next_tick(tick)
        ahead = tick - before if before is not None else following - tick
        return ahead + (following - tick) + max(following - tick, _MIN_REMEMBER)

    def message_payload(self, tick: float) -> dict[str, Any]:
        """The payload of the run for ``tick``: the schedule's, plus the tick's time in
        ``tick_param`` if it has one."""
        if self.tick_param is None:
            return dict(self.payload)
        return {**self.payload, self.tick_param: datetime.fromtimestamp(tick, UTC)}


def schedules_of(jobs: Iterable[Job[..., Any]], extra: Iterable[Schedule]) -> list[Schedule]:
    """The schedules a worker drives: each job's own (``@job(cron=...)``), then ``extra``;
    two with one name are an error (their ticks would share keys)."""
    found: dict[str, Schedule] = {}
    for schedule in [*(job.schedule for job in jobs if job.schedule is not None), *extra]:
        if not isinstance(schedule, Schedule):
            raise ScheduleError(f"Worker(schedules=...) takes Schedule objects, got {schedule!r}")
        if schedule.name in found and found[schedule.name] is not schedule:
            raise ScheduleError(
                f"two schedules are named {schedule.name!r} (job {schedule.job.name!r}); give one a name=..."
            )
        found[schedule.name] = schedule
    return list(found.values())


class Clock(Protocol):
    """What the scheduler reads the time from and waits with; tests inject their own."""

    def now(self) -> float:
        """Seconds since the epoch."""
        ...

    async def sleep_until(self, when: float) -> None:
        """Return at ``when`` (seconds since the epoch) or soon after."""
        ...


class SystemClock:
    """The wall clock. Sleeps in slices of at most a minute and reads the clock again,
    so a wall-clock step (NTP) moves the wake-up with it."""

    def now(self) -> float:
        """``time.time()``."""
        return time.time()

    async def sleep_until(self, when: float) -> None:
        """Sleep until the wall clock reads ``when``."""
        while (remaining := when - time.time()) > 0:  # noqa: ASYNC110 (a clock, not an event)
            await anyio.sleep(min(remaining, 60.0))


@dataclass(slots=True)
class Scheduler:
    """Enqueues every schedule's ticks on ``queue``, each under its key (one task per
    schedule). A ``Worker`` with schedules runs one; several workers running one each
    still make one message per tick.

    Args:
        queue: the queue the ticks go to (it must support ``dedup_key``).
        schedules: what to drive.
        clock: the time source; None: the wall clock.
        backoff: seconds before retrying an enqueue the broker refused; doubles per
            failure, with jitter, up to ``backoff_max``.
        backoff_max: the cap on that delay, in seconds.
    """

    queue: Queue
    schedules: list[Schedule]
    clock: Clock = field(default_factory=SystemClock)
    backoff: float = 0.5
    backoff_max: float = 30.0
    enqueued: dict[str, int] = field(default_factory=dict)

    async def run(self) -> None:
        """Drive every schedule until cancelled."""
        async with anyio.create_task_group() as group:
            for schedule in self.schedules:
                group.start_soon(self._drive, schedule)

    async def _drive(self, schedule: Schedule) -> None:
        clock = self.clock
        now = clock.now()
        if schedule.catch_up == "latest":
            latest = schedule.previous_tick(now)
            if latest is not None:
                await self._enqueue(schedule, latest, due_now=True)
        tick = schedule.next_tick(now)
        while True:
            await self._enqueue(schedule, tick, due_now=False)
            await clock.sleep_until(tick)
            now = clock.now()
            following = schedule.next_tick(tick)
            if following <= now:
                # This worker overslept past ticks (a stalled process, a suspended host,
                # a long broker outage): the same rule as at start-up, never a burst.
                skipped_to = schedule.previous_tick(now)
                LOG.warning(
                    "schedule.ticks_missed",
                    schedule=schedule.name,
                    job=schedule.job.name,
                    since=datetime.fromtimestamp(following, UTC).isoformat(),
                    catch_up=schedule.catch_up,
                )
                if schedule.catch_up == "latest" and skipped_to is not None:
                    await self._enqueue(schedule, skipped_to, due_now=True)
                following = schedule.next_tick(now)
            tick = following

    async def _enqueue(self, schedule: Schedule, tick: float, *, due_now: bool) -> None:
        """Put one tick on the queue under its key, trying again while the broker is
        away, until the tick after it is due (then the caller's catch-up rule decides)."""
        policy = RetryPolicy(self.backoff, self.backoff_max)
        give_up = schedule.next_tick(tick)
        failures = 0
        while True:
            try:
                message_id = await self.queue.enqueue(
                    schedule.job,
                    schedule.message_payload(tick),
                    at=None if due_now else tick,
                    dedup_key=schedule.key(tick),
                    dedup_ttl=schedule.remember_for(tick),
                )
            except Exception as exc:
                failures += 1
                LOG.warning(
                    "schedule.enqueue_failed",
                    schedule=schedule.name,
                    job=schedule.job.name,
                    tick=datetime.fromtimestamp(tick, UTC).isoformat(),
                    error=describe(exc),
                )
                if self.clock.now() >= give_up:
                    return
                await anyio.sleep(policy.delay(failures))
                continue
            self.enqueued[schedule.name] = self.enqueued.get(schedule.name, 0) + 1
            if enabled_levels()[0]:
                LOG.debug(
                    "schedule.tick_enqueued",
                    schedule=schedule.name,
                    job=schedule.job.name,
                    tick=datetime.fromtimestamp(tick, UTC).isoformat(),
                    message_id=message_id,
                )
            return
