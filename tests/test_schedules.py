"""Schedules (``lifecycle.Schedule``, ``@job(cron=...)``, ``Worker(schedules=...)``):
tick arithmetic and DST against known calendars, catch-up and fleets with an injected
clock (no waiting), a hypothesis property against an oracle of which ticks a fleet must
enqueue, and short real-time runs of workers on MemoryQueue, on asyncio and trio."""

from __future__ import annotations

import itertools
import math
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from lifecycle import PayloadError, Schedule, ScheduleError, Worker, job
from lifecycle.queues import BrokerUnavailable, MemoryQueue

BERLIN = ZoneInfo("Europe/Berlin")


@job
async def report(region: str = "eu", tick: datetime | None = None) -> None:
    pass


@job(cron="0 3 * * *", timezone="Europe/Berlin")
async def nightly() -> None:
    pass


def berlin(*args: int, fold: int = 0) -> float:
    return datetime(*args, tzinfo=BERLIN, fold=fold).timestamp()  # type: ignore[misc]


def local(schedule: Schedule, ticks: list[float]) -> list[str]:
    return [schedule.local_time(t).isoformat() for t in ticks]


# -- declaring ---------------------------------------------------------------------------
def test_job_options_make_a_schedule_and_plain_jobs_have_none() -> None:
    assert nightly.schedule is not None
    assert (nightly.schedule.cron, nightly.schedule.timezone, nightly.schedule.catch_up) == (
        "0 3 * * *",
        "Europe/Berlin",
        "none",
    )
    assert nightly.schedule.name == "nightly[0 3 * * *]"
    assert report.schedule is None
    every = job(every=timedelta(minutes=5), catch_up="latest")(report.fn)
    assert every.schedule is not None and every.schedule.every == 300.0
    assert every.schedule.description == "every 300s"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({}, "give cron or every, exactly one"),
        ({"cron": "* * * * *", "every": 5}, "give cron or every, exactly one"),
        ({"cron": "61 * * * *"}, r"parameter 'cron': invalid expression '61 \* \* \* \*': Bad minute"),
        ({"cron": "* * *"}, "parameter 'cron': invalid expression"),
        ({"cron": "* * * * *", "timezone": "Mars/Olympus"}, "parameter 'timezone': unknown time zone 'Mars/Olympus'"),
        ({"every": 0}, "parameter 'every': must be positive"),
        ({"every": timedelta(seconds=-1)}, "parameter 'every': must be positive"),
        ({"every": "5m"}, "parameter 'every': a timedelta or seconds"),
        ({"every": float("inf")}, "parameter 'every': a timedelta or seconds"),
        ({"every": 5, "timezone": "Europe/Berlin"}, "an interval does not depend on a time zone"),
        ({"every": 5, "catch_up": "all"}, "parameter 'catch_up': 'latest' or 'none', got 'all'"),
        (
            {"every": 5, "tick_param": "when"},
            "no argument 'when' to receive the tick \\(its arguments: region, tick\\)",
        ),
        ({"every": 5, "tick_param": "tick", "payload": {"tick": 1}}, "'tick' is the tick_param"),
        ({"every": 5, "name": ""}, "parameter 'name': a non-empty string"),
    ],
)
def test_bad_schedules_are_refused_where_declared_naming_job_and_parameter(
    options: dict[str, Any], message: str
) -> None:
    with pytest.raises(ScheduleError, match=message) as caught:
        Schedule(report, **options)
    assert "job 'report' (" in str(caught.value) and "test_schedules:report" in str(caught.value)
    assert isinstance(caught.value, ValueError)


def test_job_decorator_refuses_a_bad_cron_at_decoration() -> None:
    with pytest.raises(ScheduleError, match="job 'broken' .*invalid expression '0 25 \\* \\* \\*': Bad hour"):

        @job(cron="0 25 * * *")
        async def broken() -> None:
            pass


def test_a_bad_payload_is_a_payload_error_at_declaration_and_a_non_job_is_refused() -> None:
    with pytest.raises(PayloadError, match="region"):
        Schedule(report, every=5, payload={"region": ["not", "a", "string"]})
    with pytest.raises(PayloadError, match="nope"):
        Schedule(report, every=5, payload={"nope": 1})
    with pytest.raises(ScheduleError, match="takes a @job"):
        Schedule(lambda: None, every=5)  # type: ignore[arg-type]


def test_worker_refuses_two_schedules_with_one_name_and_adds_schedule_jobs() -> None:
    first = Schedule(report, every=5, name="same")
    with pytest.raises(ScheduleError, match="two schedules are named 'same'"):
        Worker(MemoryQueue(), [], schedules=[first, Schedule(report, every=6, name="same")])
    with pytest.raises(ScheduleError, match="takes Schedule objects"):
        Worker(MemoryQueue(), [report], schedules=["* * * * *"])  # type: ignore[list-item]
    worker = Worker(MemoryQueue(), [nightly], schedules=[first])
    assert sorted(worker.jobs) == ["nightly", "report"]
    assert [s.name for s in worker.schedules] == ["nightly[0 3 * * *]", "same"]


def test_default_names_tell_schedules_of_one_job_apart_and_are_stable() -> None:
    eu = Schedule(report, cron="*/5 * * * *", payload={"region": "eu"})
    us = Schedule(report, cron="*/5 * * * *", payload={"region": "us"})
    again = Schedule(report, cron="*/5 * * * *", payload={"region": "eu"})
    assert eu.name != us.name and eu.name == again.name
    assert eu.name.startswith("report[*/5 * * * *]#")
    tick = eu.next_tick(1_800_000_000)
    assert eu.key(tick) == again.key(tick) == f"lifecycle:schedule:{eu.name}@2027-01-15T08:05:00.000+00:00"
    assert eu.key(tick) != us.key(tick)


# -- tick arithmetic and DST ---------------------------------------------------------------
def test_cron_in_a_time_zone_across_the_spring_change() -> None:
    daily = Schedule(report, cron="30 2 * * *", timezone="Europe/Berlin")
    # 2026-03-29 02:30 does not exist in Berlin: it runs right after the change, once.
    ticks = daily.ticks(berlin(2026, 3, 27, 12), 3)
    assert local(daily, ticks) == [
        "2026-03-28T02:30:00+01:00",
        "2026-03-29T03:00:00+02:00",
        "2026-03-30T02:30:00+02:00",
    ]
    assert ticks[1] - ticks[0] == 23.5 * 3600


def test_cron_in_a_time_zone_across_the_autumn_change() -> None:
    daily = Schedule(report, cron="30 2 * * *", timezone="Europe/Berlin")
    # 2026-10-25 02:30 happens twice in Berlin: a fixed-hour job runs once, the first time.
    assert local(daily, daily.ticks(berlin(2026, 10, 24, 12), 2)) == [
        "2026-10-25T02:30:00+02:00",
        "2026-10-26T02:30:00+01:00",
    ]
    # A job every half hour runs in both repeated hours: four ticks, four distinct keys.
    half = Schedule(report, cron="*/30 * * * *", timezone="Europe/Berlin")
    ticks = half.ticks(berlin(2026, 10, 25, 1, 45), 5)
    assert local(half, ticks) == [
        "2026-10-25T02:00:00+02:00",
        "2026-10-25T02:30:00+02:00",
        "2026-10-25T02:00:00+01:00",
        "2026-10-25T02:30:00+01:00",
        "2026-10-25T03:00:00+01:00",
    ]
    assert all(b - a == 1800 for a, b in itertools.pairwise(ticks))
    assert len({half.key(t) for t in ticks}) == 5


def test_previous_tick_is_at_or_before_and_a_six_field_cron_counts_seconds() -> None:
    daily = Schedule(report, cron="30 2 * * *", timezone="Europe/Berlin")
    tick = berlin(2026, 3, 29, 3, 0)
    assert daily.previous_tick(tick) == tick
    assert daily.previous_tick(tick - 1) == berlin(2026, 3, 28, 2, 30)
    seconds = Schedule(report, cron="*/2 * * * * *")
    assert seconds.ticks(1_800_000_000.5, 3) == [1_800_000_002.0, 1_800_000_004.0, 1_800_000_006.0]


def test_interval_ticks_fall_on_multiples_of_the_interval_since_the_epoch() -> None:
    five = Schedule(report, every=timedelta(minutes=5))
    assert five.ticks(1_800_000_001, 2) == [1_800_000_300.0, 1_800_000_600.0]
    assert five.previous_tick(1_800_000_001) == 1_800_000_000.0
    assert five.next_tick(1_800_000_000) == 1_800_000_300.0  # strictly after


@given(
    every=st.one_of(st.sampled_from([1.0, 0.25, 60.0, 86400.0]), st.floats(0.01, 10_000)),
    at=st.floats(1e9, 2e9),
)
def test_interval_ticks_bracket_any_time(every: float, at: float) -> None:
    schedule = Schedule(report, every=every)
    before, after = schedule.previous_tick(at), schedule.next_tick(at)
    assert before is not None and before <= at < after
    assert after - before == pytest.approx(every, rel=1e-9, abs=1e-6)


@given(
    cron=st.sampled_from(["*/7 * * * *", "0 3 * * *", "30 2 * * *", "15 */3 * * 1-5", "0 0 1 * *", "*/20 * * * * *"]),
    zone=st.sampled_from(["UTC", "Europe/Berlin", "America/New_York", "Australia/Lord_Howe", "Asia/Kolkata"]),
    at=st.integers(1_700_000_000, 1_900_000_000),
)
def test_cron_ticks_bracket_any_time_and_never_repeat(cron: str, zone: str, at: int) -> None:
    schedule = Schedule(report, cron=cron, timezone=zone)
    before, after = schedule.previous_tick(at), schedule.next_tick(at)
    assert before is not None and before <= at < after
    ticks = schedule.ticks(at, 6)
    assert ticks == sorted(set(ticks))  # strictly increasing: a DST change never repeats a tick
    assert all(schedule.previous_tick(t) == t for t in ticks)


# -- the scheduler, with an injected clock -----------------------------------------------------
class FakeClock:
    """A clock the test moves by hand; sleepers wake when it passes their time."""

    def __init__(self, start: float) -> None:
        self.time = start
        self.moved = anyio.Event()

    def now(self) -> float:
        return self.time

    async def sleep_until(self, when: float) -> None:
        while self.time < when:
            await self.moved.wait()

    async def set(self, when: float) -> None:
        self.time = when
        self.moved.set()
        self.moved = anyio.Event()
        await anyio.wait_all_tasks_blocked()


class Recording(MemoryQueue):
    """A MemoryQueue that records every enqueue the scheduler made and what it returned."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[dict[str, Any]] = []
        self.failures = 0

    async def enqueue(self, job: Any, payload: Mapping[str, Any] | None = None, **options: Any) -> str:
        if self.failures:
            self.failures -= 1
            raise BrokerUnavailable("broker away (test)")
        message_id = await super().enqueue(job, payload, **options)
        self.calls.append({**options, "payload": payload, "id": message_id})
        return message_id

    def messages(self) -> dict[str, dict[str, Any]]:
        """Distinct messages made: id -> the first call that made it."""
        made: dict[str, dict[str, Any]] = {}
        for call in self.calls:
            made.setdefault(call["id"], call)
        return made


def fleet(queue: Recording, schedule: Schedule, clock: FakeClock, workers: int) -> list[Any]:
    from lifecycle._schedule import Scheduler

    return [Scheduler(queue, [schedule], clock=clock, backoff=0.001, backoff_max=0.001) for _ in range(workers)]


@pytest.mark.anyio
async def test_a_fleet_of_schedulers_enqueues_each_tick_once() -> None:
    schedule = Schedule(report, every=60, tick_param="tick")
    queue, clock = Recording(), FakeClock(1_800_000_010)
    async with anyio.create_task_group() as group:
        for scheduler in fleet(queue, schedule, clock, 3):
            group.start_soon(scheduler.run)
        await anyio.wait_all_tasks_blocked()
        for step in range(1, 41):
            await clock.set(1_800_000_010 + 30 * step)  # two steps per tick
        group.cancel_scope.cancel()
    made = queue.messages()
    ticks = sorted(call["payload"]["tick"] for call in made.values())
    # 1_800_000_060 .. the tick after the last clock time, each once, scheduled at the tick.
    expected = [datetime.fromtimestamp(1_800_000_000 + 60 * n, UTC) for n in range(1, 22)]
    assert ticks == expected
    assert len(queue.calls) == 3 * len(made)  # every scheduler enqueued every tick
    assert all(call["at"] == call["payload"]["tick"].timestamp() for call in made.values())


@pytest.mark.anyio
@pytest.mark.parametrize("catch_up", ["latest", "none"])
async def test_catch_up_after_downtime_runs_the_latest_missed_tick_once_or_none(catch_up: str) -> None:
    schedule = Schedule(report, cron="0 * * * *", catch_up=catch_up, tick_param="tick")  # type: ignore[arg-type]
    queue = Recording()
    start = datetime(2027, 3, 1, 9, 0, tzinfo=UTC).timestamp()
    clock = FakeClock(start - 1)
    async with anyio.create_task_group() as group:  # the fleet is up for the 09:00 tick...
        group.start_soon(fleet(queue, schedule, clock, 1)[0].run)
        await anyio.wait_all_tasks_blocked()
        await clock.set(start + 10)
        group.cancel_scope.cancel()
    before = set(queue.messages())
    clock.time = start + 5 * 3600 + 1200  # ... down from 09:00:10 to 14:20: ticks 10..14 missed
    async with anyio.create_task_group() as group:
        for scheduler in fleet(queue, schedule, clock, 3):  # three workers start at once
            group.start_soon(scheduler.run)
        await anyio.wait_all_tasks_blocked()
        group.cancel_scope.cancel()
    new = [call for key, call in queue.messages().items() if key not in before]
    hours = sorted((call["payload"]["tick"].hour, call["at"]) for call in new)
    if catch_up == "latest":  # 14:00 at once, 15:00 when due: never 11, 12, 13
        assert hours == [(14, None), (15, start + 6 * 3600)]
    else:
        assert hours == [(15, start + 6 * 3600)]


@pytest.mark.anyio
async def test_catch_up_on_a_restart_within_a_period_finds_the_tick_taken() -> None:
    schedule = Schedule(report, every=60, catch_up="latest", tick_param="tick")
    queue, clock = Recording(), FakeClock(1_800_000_050)
    for _restart in range(3):  # a worker restarted three times between two ticks
        async with anyio.create_task_group() as group:
            group.start_soon(fleet(queue, schedule, clock, 1)[0].run)
            await anyio.wait_all_tasks_blocked()
            group.cancel_scope.cancel()
        clock.time += 3
    ticks = sorted(call["payload"]["tick"].timestamp() for call in queue.messages().values())
    assert ticks == [1_800_000_000.0, 1_800_000_060.0]  # the latest once, the next once


@pytest.mark.anyio
@pytest.mark.parametrize("catch_up", ["latest", "none"])
async def test_a_stalled_scheduler_never_bursts(catch_up: str) -> None:
    schedule = Schedule(report, every=60, catch_up=catch_up, tick_param="tick")  # type: ignore[arg-type]
    queue, clock = Recording(), FakeClock(1_800_000_010)
    with capture_logs() as logs:
        async with anyio.create_task_group() as group:
            group.start_soon(fleet(queue, schedule, clock, 1)[0].run)
            await anyio.wait_all_tasks_blocked()
            await clock.set(1_800_000_000 + 60 * 7 + 5)  # the process stalled through ticks 2..7
            group.cancel_scope.cancel()
    minutes = sorted(
        int(call["payload"]["tick"].timestamp() - 1_800_000_000) // 60 for call in queue.messages().values()
    )
    assert minutes == ([0, 1, 7, 8] if catch_up == "latest" else [1, 8])  # 0: the start-up catch-up
    [missed] = [e for e in logs if e["event"] == "schedule.ticks_missed"]
    assert missed["catch_up"] == catch_up and missed["since"] == "2027-01-15T08:02:00+00:00"


@pytest.mark.anyio
async def test_a_scheduler_driven_through_both_dst_changes_enqueues_each_local_run_once() -> None:
    schedule = Schedule(report, cron="30 2 * * *", timezone="Europe/Berlin", tick_param="tick")
    queue, clock = Recording(), FakeClock(berlin(2026, 3, 27, 12))
    async with anyio.create_task_group() as group:
        for scheduler in fleet(queue, schedule, clock, 2):
            group.start_soon(scheduler.run)
        await anyio.wait_all_tasks_blocked()
        while clock.time < berlin(2026, 10, 27, 12):  # every tick, as it falls due, for seven months
            await clock.set(min(call["at"] for call in queue.calls if call["at"] > clock.time))
        group.cancel_scope.cancel()
    runs = sorted(call["payload"]["tick"] for call in queue.messages().values())
    local_runs = [tick.astimezone(BERLIN) for tick in runs]
    assert len(local_runs) == len({t.date() for t in local_runs})  # one a day, never two
    by_day = {t.date().isoformat(): t.strftime("%H:%M%z") for t in local_runs}
    assert by_day["2026-03-28"] == "02:30+0100"
    assert by_day["2026-03-29"] == "03:00+0200"  # 02:30 does not exist: right after the change
    assert by_day["2026-03-30"] == "02:30+0200"
    assert by_day["2026-10-25"] == "02:30+0200"  # 02:30 happens twice: the first one only
    assert by_day["2026-10-26"] == "02:30+0100"
    first, last = local_runs[0].date(), local_runs[-1].date()
    assert first.isoformat() == "2026-03-28" and last.isoformat() >= "2026-10-27"
    assert len(local_runs) == (last - first).days + 1  # no day missed


@pytest.mark.anyio
async def test_a_tick_whose_enqueue_failed_is_tried_again_and_logged() -> None:
    schedule = Schedule(report, every=60, tick_param="tick")
    queue, clock = Recording(), FakeClock(1_800_000_010)
    queue.failures = 2
    with capture_logs() as logs, anyio.fail_after(10):
        async with anyio.create_task_group() as group:
            group.start_soon(fleet(queue, schedule, clock, 1)[0].run)
            while not queue.calls:
                await anyio.sleep(0.01)
            group.cancel_scope.cancel()
    assert [call["payload"]["tick"].timestamp() for call in queue.calls] == [1_800_000_060.0]
    failed = [e for e in logs if e["event"] == "schedule.enqueue_failed"]
    assert len(failed) == 2 and failed[0]["error"] == "BrokerUnavailable: broker away (test)"
    assert failed[0]["tick"] == "2027-01-15T08:01:00+00:00" and failed[0]["job"] == "report"


@settings(max_examples=40)  # each example steps a fleet through some 30 ticks
@given(
    ups=st.lists(st.tuples(st.integers(0, 250), st.integers(1, 150)), min_size=1, max_size=5),
    every=st.sampled_from([10, 20, 60]),
    catch_up=st.sampled_from(["latest", "none"]),
)
def test_fleet_up_and_down_property(ups: list[tuple[int, int, int]], every: int, catch_up: str) -> None:
    """Workers come and go (each: when it starts, how long it is up); oracle: each tick
    is enqueued at most once, and every tick that some worker was up for, from the tick
    before it to the tick itself, is enqueued. The clock steps through every tick."""
    base = 1_800_000_000 - 1_800_000_000 % every + every * 1000
    HORIZON = 400
    schedule = Schedule(report, every=every, catch_up=catch_up, tick_param="tick")  # type: ignore[arg-type]
    queue = Recording()

    async def main() -> None:
        clock = FakeClock(base)
        moments = sorted(
            {base + s for s, _ in ups} | {base + s + d for s, d in ups} | set(range(base, base + HORIZON + 1, every))
        )
        running: dict[int, anyio.CancelScope] = {}
        async with anyio.create_task_group() as group:
            for moment in moments:
                await clock.set(moment)  # sleepers due by now wake and enqueue first
                for worker, (start, length) in enumerate(ups):
                    if base + start + length == moment:
                        running.pop(worker).cancel()
                for worker, (start, _length) in enumerate(ups):
                    if base + start == moment:
                        running[worker] = scope = anyio.CancelScope()

                        async def one(scope: anyio.CancelScope = scope) -> None:
                            with scope:
                                await fleet(queue, schedule, clock, 1)[0].run()

                        group.start_soon(one)
                await anyio.wait_all_tasks_blocked()
            group.cancel_scope.cancel()

    anyio.run(main, backend="trio")  # trio waits for blocked tasks without polling
    ticks = [call["payload"]["tick"].timestamp() for call in queue.messages().values()]
    assert len(ticks) == len(set(ticks))  # never twice
    for tick in range(base + every, base + HORIZON, every):
        covered = any(base + s <= tick - every and tick <= base + s + d for s, d in ups)
        if covered:
            assert tick in ticks, (tick - base, ups)


# -- workers, in real time ----------------------------------------------------------------------
@pytest.mark.anyio
async def test_workers_sharing_a_queue_run_each_tick_once() -> None:
    ran: list[tuple[int, float]] = []

    @job
    async def beat(tick: datetime, worker: int = 0) -> None:
        ran.append((worker, tick.timestamp()))

    queue = MemoryQueue()
    every = 0.2
    schedule = Schedule(beat, every=every, tick_param="tick")
    workers = [Worker(queue, [beat], schedules=[schedule], poll_interval=0.05) for _ in range(3)]
    start = time.time()
    with anyio.fail_after(30):
        async with anyio.create_task_group() as group:
            for worker in workers:
                group.start_soon(worker.run)
            while len({t for _, t in ran}) < 8:
                await anyio.sleep(0.02)
            for worker in workers:
                worker.stop()
    ticks = [t for _, t in ran]
    assert len(ticks) == len(set(ticks))  # once each
    ordered = sorted(ticks)
    assert all(math.isclose(b - a, every, abs_tol=1e-6) for a, b in itertools.pairwise(ordered))
    assert ordered[0] >= start - every  # no catch-up: none before the start


@pytest.mark.anyio
async def test_a_job_declared_with_every_runs_in_a_worker_without_schedules() -> None:
    ran: list[float] = []

    @job(every=0.1)
    async def heartbeat() -> None:
        ran.append(time.time())

    queue = MemoryQueue()
    worker = Worker(queue, [heartbeat], poll_interval=0.05)
    with anyio.fail_after(30):
        async with anyio.create_task_group() as group:
            group.start_soon(worker.run)
            while len(ran) < 3:
                await anyio.sleep(0.02)
            worker.stop()
    assert worker.stats["succeeded"] >= 3


# -- the command line --------------------------------------------------------------------------
APP = Path(__file__).with_name("schedule_app.py")


def lifecycle_cli(
    evidence: Path, *args: str, timeout: float = 60, **env: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lifecycle", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "EVIDENCE": str(evidence), **env},
        timeout=timeout,
    )


def test_list_shows_each_schedule_with_its_next_three_runs(tmp_path: Path) -> None:
    listed = lifecycle_cli(tmp_path / "evidence", "list", str(APP), EVERY="300")
    assert listed.returncode == 0, listed.stderr
    out = listed.stdout
    assert re.search(
        r"    schedule nightly\[0 3 \* \* \*\]: cron '0 3 \* \* \*' \(Europe/Berlin\); catch_up=none\n"
        r"        next: (\d{4}-\d\d-\d\dT03:00:00\+0[12]:00(, )?){3}\n",
        out,
    ), out
    beats = re.search(r"    schedule (beat\[every 300s\]#\w+): every 300s; catch_up=latest; payload: region\n", out)
    assert beats, out
    assert out.count(f"schedule {beats.group(1)}") == 2  # under the worker, and as the module's Schedule
    assert "beats  (Schedule of job 'beat')" in out
    [nexts] = re.findall(r"beat\[every 300s\].*\n        next: (.*)\n", out)[:1]
    ticks = [datetime.fromisoformat(t).timestamp() for t in nexts.split(", ")]
    assert len(ticks) == 3 and all(t % 300 == 0 for t in ticks) and ticks[2] - ticks[0] == 600


def test_run_a_worker_target_drives_its_schedules_and_stops_gracefully(tmp_path: Path) -> None:
    evidence = tmp_path / "evidence"
    proc = subprocess.Popen(
        [sys.executable, "-m", "lifecycle", "run", f"{APP}:worker"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "EVIDENCE": str(evidence), "EVERY": "0.25"},
    )
    try:
        deadline = time.monotonic() + 60
        while len(evidence.read_text().splitlines() if evidence.exists() else []) < 4:
            assert time.monotonic() < deadline and proc.poll() is None, proc.stderr and proc.stderr.read()
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
        proc.communicate()
    ticks = [float(line.split()[0]) for line in evidence.read_text().splitlines()]
    assert len(ticks) == len(set(ticks)) and all(round(t / 0.25, 6).is_integer() for t in ticks)


def test_worker_command_runs_module_schedules_unless_told_not_to(tmp_path: Path) -> None:
    evidence = tmp_path / "evidence"
    for extra, expect_runs in (([], True), (["--no-schedules"], False)):
        proc = subprocess.Popen(
            [sys.executable, "-m", "lifecycle", "worker", str(APP), "--queue", "memory://", *extra],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "EVIDENCE": str(evidence), "EVERY": "0.25"},
        )
        try:
            deadline = time.monotonic() + (60 if expect_runs else 4)
            while not evidence.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=60) == 0
        finally:
            proc.kill()
            proc.communicate()
        assert evidence.exists() is expect_runs
        evidence.unlink(missing_ok=True)


@pytest.mark.anyio
async def test_a_test_worker_runs_scheduled_jobs_without_ticking() -> None:
    from lifecycle.testing import TestWorker

    ran: list[int] = []

    @job(every=0.05)
    async def often(n: int = 0) -> None:
        ran.append(n)

    worker = TestWorker([often])
    assert worker.scheduler is None
    await worker.enqueue(often, {"n": 1})
    await worker.drain(timeout=30)
    assert ran == [1]
