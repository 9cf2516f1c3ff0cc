"""The Worker: reads messages from a queue and runs each as one job through a Runtime it
owns, so worker-scoped dependencies live as long as the worker.

In-flight jobs run in a task group hosted by a shielded task of their own, beside the
lease renewal. Cancelling ``run()`` (or calling ``stop()``) therefore stops the reading
only; the jobs get ``shutdown_grace`` seconds to finish, then are cancelled (their
teardown still runs, and their messages are released for redelivery), then the worker
scope is torn down. Leases are renewed until the last job has settled, so a draining
job is never taken over by another consumer.

The broker may come and go: every call to the queue that fails with
``BrokerUnavailable`` is tried again after a capped, jittered, exponential backoff.
Reading waits; a job that finished keeps its outcome and settles it when the broker is
back (the queue's settles are idempotent, so a settle whose answer was lost is simply
repeated). Only a misconfigured queue (``open()`` fails) or a broken worker-scoped
dependency stops the worker, at start-up, with ``StartupError``."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

import anyio
from anyio import CancelScope
from anyio.abc import TaskGroup

from ._errors import CommitFailed, JobTimeout, LifecycleError, PayloadError, StartupError
from ._health import Probe, serve_health
from ._job import Job, as_job
from ._log import LOG, describe, redact, traceback_text
from ._markers import Depends
from ._observe import Carried, carried
from ._retry import RetryPolicy, Verdict
from ._runtime import Runtime
from ._schedule import Schedule, Scheduler, schedules_of
from .queues._base import BrokerUnavailable, Delivery, Queue

# A settle or release that cannot reach the broker during shutdown gives up after this
# long: the message then stays with the broker and is redelivered, never lost.
_SHUTDOWN_SETTLE_TIMEOUT = 10.0


class _Broker:
    """Whether the broker is reachable, as the worker last saw it; logs each outage
    once when it starts and once when it ends."""

    def __init__(self, backoff: float, backoff_max: float, on_recovered: Callable[[], None] | None = None) -> None:
        self._backoff = RetryPolicy(backoff, backoff_max)
        self.down_since: float | None = None
        self.outages = 0
        self._on_recovered = on_recovered

    def delay(self, failures: int) -> float:
        """Seconds to wait after ``failures`` failures in a row: exponential, capped,
        with jitter (half to all of it) so a fleet does not reconnect in lockstep."""
        return self._backoff.delay(failures + 1)

    def failed(self, operation: str, exc: BaseException) -> None:
        if self.down_since is None:
            self.down_since = time.monotonic()
            self.outages += 1
            LOG.warning("worker.broker_unavailable", operation=operation, error=describe(exc))

    def recovered(self) -> None:
        if self.down_since is not None:
            downtime = time.monotonic() - self.down_since
            self.down_since = None
            LOG.info("worker.broker_recovered", downtime_s=round(downtime, 3))
            if self._on_recovered is not None:
                self._on_recovered()


class Worker:
    """Consumes a queue, running each message as one job.

    Args:
        queue: where messages come from (``MemoryQueue``, ``RedisStreamQueue``, or any
            object that keeps the queue contract of ``lifecycle.queues.Queue``).
        jobs: the jobs this worker runs, ``@job`` functions or plain callables; a
            message names one of them.
        concurrency: at most this many jobs run at once; the worker reads no more
            messages than it has free slots for. A job that succeeded frees its slot
            while its acknowledgement is on the way, so the next read overlaps it; a
            worker therefore holds at most ``2 * concurrency`` messages (running, or
            done and being acknowledged).
        shutdown_grace: seconds in-flight jobs get to finish after ``stop()`` or
            cancellation before they are cancelled (their teardown still runs).
        teardown_timeout: seconds each dependency's teardown may take (None: no bound).
        dependency_overrides: ``{original: replacement}`` for the worker's Runtime.
        dependencies: ``Depends(...)`` run for every job, values not injected.
        retry_backoff: seconds before the first retry of a failed job; doubles per
            attempt, with jitter. ``Retry(delay)`` wins.
        retry_backoff_max: the cap on that delay, in seconds.
        max_deliveries: a message handed out more often than this (its consumers died
            while running it) goes to the dead letter as ``poison``.
        poll_interval: seconds one read waits for messages before it asks again.
        heartbeat_interval: seconds between lease renewals of in-flight messages. None
            (the default) derives it from the queue: a third of ``queue.lease``; a
            queue without leases needs none.
        broker_backoff: seconds before the first retry of a broker call that failed
            with ``BrokerUnavailable``; doubles per failure, with jitter.
        broker_backoff_max: the cap on that delay, in seconds.
        schedules: ``Schedule`` objects to drive besides the jobs' own
            (``@job(cron=...)``): this worker enqueues each tick under its
            de-duplication key, so a fleet makes one message per tick. Their jobs are
            added to ``jobs``.
        tracer_provider: an OpenTelemetry ``TracerProvider``: a span per job attempt
            (continuing the trace its message carries) with a child per dependency
            setup and teardown. None: the global one once an SDK configured it, else
            no tracing (and no cost).
        metrics: a ``lifecycle.prometheus.Metrics`` to record into; None: none, unless
            ``metrics_port`` is given (then ``Metrics.default()``).
        metrics_port: serve Prometheus metrics on this TCP port at ``/metrics`` while
            the worker runs (0: a free port, see ``metrics_server``); None: no server.
            Needs the ``prometheus`` extra.
        metrics_address: the address the metrics server listens on.
        health_port: serve ``/livez`` and ``/readyz`` on this TCP port while the worker
            runs (0: a free port, see ``health_port_bound``); None: no health server.
        health_address: the address the health server listens on.
    """

    def __init__(
        self,
        queue: Queue,
        jobs: Iterable[Job[..., Any] | Callable[..., Any]],
        *,
        concurrency: int = 16,
        shutdown_grace: float = 30.0,
        teardown_timeout: float | None = 30.0,
        dependency_overrides: Mapping[Any, Any] | None = None,
        dependencies: Iterable[Depends] = (),
        retry_backoff: float = 1.0,
        retry_backoff_max: float = 300.0,
        max_deliveries: int = 5,
        poll_interval: float = 1.0,
        heartbeat_interval: float | None = None,
        broker_backoff: float = 0.5,
        broker_backoff_max: float = 30.0,
        schedules: Iterable[Schedule] = (),
        tracer_provider: Any | None = None,
        metrics: Any | None = None,
        metrics_port: int | None = None,
        metrics_address: str = "0.0.0.0",
        health_port: int | None = None,
        health_address: str = "0.0.0.0",
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency!r}")
        if shutdown_grace < 0:
            raise ValueError(f"shutdown_grace must be >= 0, got {shutdown_grace!r}")
        if poll_interval <= 0:
            raise ValueError(f"poll_interval must be positive, got {poll_interval!r}")
        if heartbeat_interval is not None and heartbeat_interval <= 0:
            raise ValueError(f"heartbeat_interval must be positive or None, got {heartbeat_interval!r}")
        if broker_backoff <= 0 or broker_backoff_max < broker_backoff:
            raise ValueError(
                f"broker_backoff must be positive and at most broker_backoff_max, got {broker_backoff!r} "
                f"and {broker_backoff_max!r}"
            )
        self.queue = queue
        self.jobs: dict[str, Job[..., Any]] = {}
        schedules = list(schedules)
        everything: list[Job[..., Any] | Callable[..., Any]] = [*jobs]
        everything += [schedule.job for schedule in schedules if isinstance(schedule, Schedule)]
        for fn in everything:
            job = as_job(fn)
            if job.name in self.jobs and self.jobs[job.name] is not job:
                raise LifecycleError(f"two jobs are named {job.name!r}; give one @job(name=...)")
            self.jobs[job.name] = job
        if not self.jobs:
            raise LifecycleError("a Worker needs at least one job")
        self.schedules = schedules_of(self.jobs.values(), schedules)
        self.scheduler = Scheduler(queue, self.schedules) if self.schedules else None
        self.concurrency = concurrency
        self.shutdown_grace = shutdown_grace
        self.retry_backoff = retry_backoff
        self.retry_backoff_max = retry_backoff_max
        self._retry = RetryPolicy(retry_backoff, retry_backoff_max)
        self.max_deliveries = max_deliveries
        self.poll_interval = poll_interval
        self.heartbeat_interval = heartbeat_interval
        for option, port in (("metrics_port", metrics_port), ("health_port", health_port)):
            if port is not None and (not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535):
                raise ValueError(f"{option} must be a TCP port number (0-65535) or None, got {port!r}")
        if metrics_port is not None and metrics is None:
            from .prometheus import Metrics  # the optional extra, imported only when asked for

            metrics = Metrics.default()
        self.metrics = metrics
        self.metrics_port = metrics_port
        self.metrics_address = metrics_address
        self.metrics_server: Any = None  # the running metrics server (its server_port) while running
        self.health_port = health_port
        self.health_address = health_address
        self.health_port_bound: int | None = None  # the health server's port while running
        self.runtime = Runtime(
            dependency_overrides=dependency_overrides,
            teardown_timeout=teardown_timeout,
            dependencies=dependencies,
            tracer_provider=tracer_provider,
            metrics=metrics,
        )
        self._broker_backoff_max = broker_backoff_max
        self._broker = _Broker(broker_backoff, broker_backoff_max, metrics.reconnected if metrics is not None else None)
        self._carry = _carried_attributes(queue)
        self._ready = False  # worker scope set up and consuming (for /readyz)
        self._read_turn = 0.0  # time.monotonic() of the read loop's last turn (for /livez)
        self._reading_full = False  # every slot busy: not reading, and that is fine
        self.stats = {
            "succeeded": 0,
            "retried": 0,
            "dead_lettered": 0,
            "released": 0,
            "settle_failed": 0,
            "lease_lost": 0,
        }
        self._in_flight: dict[str, Delivery] = {}
        # Of those, how many ran their job to success and are being acknowledged: they
        # no longer hold a run slot (the next read overlaps their ack's round trip).
        self._acking = 0
        self._lost: set[str] = set()  # ids whose lease another consumer took over
        self._stopping = False
        self._interruptible: CancelScope | None = None  # what stop() cancels: start-up or a read
        self._slot_free: anyio.Event | None = None
        self._idle: anyio.Event | None = None

    @property
    def in_flight(self) -> int:
        """Messages being worked on now."""
        return len(self._in_flight)

    @property
    def lease_interval(self) -> float | None:
        """Seconds between lease renewals (None: the queue has no leases)."""
        if self.heartbeat_interval is not None:
            return self.heartbeat_interval
        lease = getattr(self.queue, "lease", None)
        return lease / 3 if lease else None

    def stop(self) -> None:
        """Stop reading; in-flight jobs get ``shutdown_grace`` to finish. Safe to call
        from a signal handler task or another task of the same event loop, and before
        ``run()`` starts (it then returns right after start-up)."""
        self._stopping = True
        if self._interruptible is not None:
            self._interruptible.cancel()
        self._wake_slot()

    async def run(self) -> None:
        """Consume until cancelled or ``stop()``; then shut down gracefully.

        Raises:
            StartupError: the queue is misconfigured (``open()`` failed other than with
                ``BrokerUnavailable``, which is waited out) or a worker-scoped
                dependency failed.
            BaseException: the caller's cancellation, re-raised once every teardown owed
                has run.
        """
        try:
            if self.metrics_port is None and self.health_port is None:
                await self._run()
            else:
                await self._run_served()
        except BaseExceptionGroup as group:
            # One failure inside the worker's task groups: raise it as itself, so the
            # log line says what broke rather than "unhandled errors in a TaskGroup".
            if len(group.exceptions) == 1:
                raise group.exceptions[0] from None
            raise
        finally:
            self._stopping = False
            self._ready = False
            self._lost.clear()

    async def _run_served(self) -> None:
        """``_run`` with the metrics and health servers up for as long as it runs."""
        if self.metrics_port is not None:
            from .prometheus import serve_metrics

            registry = getattr(self.metrics, "registry", None)
            self.metrics_server = serve_metrics(self.metrics_port, self.metrics_address, registry)
            LOG.info("worker.metrics_serving", address=self.metrics_address, port=self.metrics_server.server_port)
        try:
            async with anyio.create_task_group() as servers:
                if self.health_port is not None:
                    probe = Probe(self._live, self._ready_state)
                    self.health_port_bound = await servers.start(
                        serve_health, probe, self.health_port, self.health_address
                    )
                try:
                    await self._run()
                finally:
                    servers.cancel_scope.cancel()
        finally:
            self.health_port_bound = None
            if self.metrics_server is not None:
                server, self.metrics_server = self.metrics_server, None
                await anyio.to_thread.run_sync(server.shutdown)
                server.server_close()

    def _live(self) -> tuple[bool, str]:
        """For ``/livez``: the loop answered (it runs this); is the read loop turning?"""
        if not self._ready or self._reading_full or self._stopping:
            # Not reading, and rightly so: starting up, full, or draining after a stop.
            return True, "starting" if not self._ready else "draining" if self._stopping else "every slot busy"
        stale = time.monotonic() - self._read_turn
        limit = self.stall_after
        if stale > limit:
            return False, f"the read loop has not turned for {stale:.1f}s (limit {limit:.1f}s)"
        return True, "consuming"

    @property
    def stall_after(self) -> float:
        """Seconds without a turn of the read loop after which ``/livez`` fails: three
        times the longest a healthy turn takes (a read's wait plus the broker backoff)."""
        return 3 * (self.poll_interval + self._broker_backoff_max) + 10

    def _ready_state(self) -> tuple[bool, str]:
        """For ``/readyz``: worker scope set up, broker reachable, not draining."""
        if self._stopping:
            return False, "draining"
        if not self._ready:
            return False, "starting: the queue or the worker scope is not set up yet"
        if self._broker.down_since is not None:
            return False, f"broker unavailable for {time.monotonic() - self._broker.down_since:.1f}s"
        return True, "ready"

    async def _run(self) -> None:
        log = LOG
        async with self.runtime as rt:
            with CancelScope() as self._interruptible:
                if self._stopping:
                    self._interruptible.cancel()
                await self._open_queue()
                await self._warm_up(rt)
            self._interruptible = None
            if self._stopping:
                log.info("worker.stopped", **self.stats)
                return
            log.info("worker.started", jobs=sorted(self.jobs), concurrency=self.concurrency)
            self._read_turn = time.monotonic()
            self._ready = True
            await self._consume()
        log.info("worker.stopped", **self.stats)

    async def _open_queue(self) -> None:
        """Open the queue: a misconfiguration fails the start; an unreachable broker is
        waited for, as at any other time (a fleet restarted during an outage)."""
        failures = 0
        while True:
            try:
                await self.queue.open()
            except BrokerUnavailable as exc:
                self._broker.failed("open", exc)
                await anyio.sleep(self._broker.delay(failures))
                failures += 1
            except Exception as exc:
                raise StartupError(f"worker could not start: the queue could not be opened: {describe(exc)}") from exc
            else:
                self._broker.recovered()
                return

    async def _warm_up(self, rt: Runtime) -> None:
        """Create every worker-scoped dependency now, so a broken one fails the worker at
        start instead of failing every job."""
        for job in self.jobs.values():
            plan = rt.plan(job)
            for step in plan.steps:
                if step.worker is None:
                    continue
                try:
                    await rt._worker_value(step.worker, LOG)
                except Exception as exc:
                    raise StartupError(
                        f"worker could not start: worker-scoped dependency {step.provider.label} of job "
                        f"{job.name!r} failed: {describe(exc)}"
                    ) from exc

    async def _consume(self) -> None:
        """Read in this task; run jobs and renew leases in a shielded host task."""
        ready = anyio.Event()
        close = anyio.Event()
        host: list[TaskGroup] = []

        async def host_jobs() -> None:
            # Shielded before its first checkpoint: only _drain decides when jobs end.
            with CancelScope(shield=True):
                async with anyio.create_task_group() as background:
                    background.start_soon(self._renew_leases)
                    async with anyio.create_task_group() as jobs:
                        host.append(jobs)
                        ready.set()
                        await close.wait()
                    background.cancel_scope.cancel()

        async with anyio.create_task_group() as supervisor:
            supervisor.start_soon(host_jobs)
            try:
                await ready.wait()
                async with anyio.create_task_group() as ticking:  # the schedules tick while reading
                    if self.scheduler is not None:
                        ticking.start_soon(self.scheduler.run)
                    await self._read(host[0])
                    ticking.cancel_scope.cancel()
            finally:
                with CancelScope(shield=True):
                    await ready.wait()  # the host task always starts: it is shielded at once
                    await self._drain(host[0])
                    close.set()

    async def _read(self, jobs: TaskGroup) -> None:
        failures = 0
        while not self._stopping:
            self._read_turn = time.monotonic()
            held = len(self._in_flight)
            # Free run slots, and never more messages held than twice the concurrency,
            # however slowly acknowledgements go.
            free = min(self.concurrency - (held - self._acking), 2 * self.concurrency - held)
            if free <= 0:
                self._slot_free = event = anyio.Event()
                self._reading_full = True
                try:
                    await event.wait()
                finally:
                    self._reading_full = False
                continue
            deliveries: list[Delivery] = []
            with CancelScope() as self._interruptible:  # stop() cancels a waiting read
                if self._stopping:
                    self._interruptible.cancel()
                try:
                    deliveries = await self.queue.receive(free, self.poll_interval)
                except Exception as exc:
                    # BrokerUnavailable, or anything else the read raised: a worker never
                    # exits over the broker. Wait and read again.
                    self._broker.failed("receive", exc)
                    if not isinstance(exc, BrokerUnavailable):
                        LOG.error("worker.receive_failed", error=describe(exc))
                    await anyio.sleep(self._broker.delay(failures))
                    failures += 1
                else:
                    failures = 0
                    self._broker.recovered()
            self._interruptible = None
            for delivery in deliveries:
                self._in_flight[delivery.id] = delivery
                jobs.start_soon(self._handle, delivery)

    def _wake_slot(self) -> None:
        if self._slot_free is not None:
            self._slot_free.set()
            self._slot_free = None

    async def _drain(self, jobs: TaskGroup) -> None:
        log = LOG
        if self._in_flight:
            log.info("worker.draining", in_flight=len(self._in_flight), grace=self.shutdown_grace)
            with anyio.move_on_after(self.shutdown_grace):
                while self._in_flight:
                    self._idle = idle = anyio.Event()
                    await idle.wait()
            if self._in_flight:
                log.warning("worker.cancelling", in_flight=len(self._in_flight))
                jobs.cancel_scope.cancel()

    async def _renew_leases(self) -> None:
        interval = self.lease_interval
        if interval is None:
            return
        while True:
            await anyio.sleep(interval)
            held = [delivery for key, delivery in self._in_flight.items() if key not in self._lost]
            if not held:
                continue
            try:
                lost = await self.queue.renew(held)
            except Exception as exc:
                self._broker.failed("renew", exc)
                if not isinstance(exc, BrokerUnavailable):
                    LOG.error("worker.renew_failed", error=describe(exc))
                continue
            self._broker.recovered()
            for key in lost:
                delivery = self._in_flight.get(key)
                if delivery is not None:
                    self._lease_lost(delivery, "another consumer took it over; this worker will not settle it")

    async def _handle(self, delivery: Delivery) -> None:
        try:
            await self._process(delivery)
        except Exception as exc:
            # Settling failed for good (not a broker outage: those are waited out). The
            # message was not settled, so the queue delivers it again; one failure must
            # not take the other jobs down.
            self.stats["settle_failed"] += 1
            LOG.error("worker.settle_failed", job=delivery.job, job_id=delivery.id, error=describe(exc))
        finally:
            self._in_flight.pop(delivery.id, None)
            self._lost.discard(delivery.id)
            self._wake_slot()
            if not self._in_flight and self._idle is not None:
                self._idle.set()

    async def _settle(self, delivery: Delivery, operation: str, call: Callable[[], Awaitable[bool]]) -> bool:
        """Run a settling call until the broker takes it. False if this worker no longer
        owns the message (its lease was lost, to another consumer): nothing was settled."""
        failures = 0
        while delivery.id not in self._lost:
            try:
                settled = await call()
            except BrokerUnavailable as exc:
                self._broker.failed(operation, exc)
                await anyio.sleep(self._broker.delay(failures))
                failures += 1
                continue
            self._broker.recovered()
            if settled is False:  # None: a queue written before settles said so; it acted
                self._lease_lost(delivery, f"the {operation} found another consumer owns it")
                return False
            return True
        return False

    def _lease_lost(self, delivery: Delivery, hint: str) -> None:
        if delivery.id in self._lost:
            return
        self._lost.add(delivery.id)
        self.stats["lease_lost"] += 1
        LOG.warning("worker.lease_lost", job=delivery.job, job_id=delivery.id, hint=hint)

    async def _process(self, delivery: Delivery) -> None:
        if delivery.malformed is not None:
            await self._dead(delivery, "malformed", f"malformed message: {delivery.malformed}")
            return
        job = self.jobs.get(delivery.job)
        if job is None:
            known = ", ".join(sorted(self.jobs))
            await self._dead(delivery, "unknown_job", f"unknown job {delivery.job!r}; this worker runs: {known}")
            return
        if delivery.deliveries > self.max_deliveries:
            await self._dead(
                delivery,
                "poison",
                f"delivered {delivery.deliveries} times without being acknowledged (max_deliveries="
                f"{self.max_deliveries}); a worker probably died while running it",
            )
            return
        try:
            if not isinstance(delivery.payload, dict):
                raise PayloadError(
                    f"job {job.name!r}: the payload must be a JSON object, got {type(delivery.payload).__name__}",
                    job=job.name,
                )
            payload, extras = job.bind_payload((), delivery.payload)
        except PayloadError as exc:
            await self._dead(delivery, "invalid_payload", exc)
            return
        if self.runtime._observer is not None:
            self._observe_delivery(delivery)
        try:
            await self.runtime.run_attempt(job, payload, extras, job_id=delivery.id, attempt=delivery.attempt)
        except anyio.get_cancelled_exc_class():
            await self._release(delivery)
            raise
        except Exception as exc:
            await self._failed(job, delivery, exc)
        else:
            # The job and its teardown are done: its slot is free for the next read,
            # whose round trip then overlaps this acknowledgement's.
            self._acking += 1
            self._wake_slot()
            try:
                acked = await self._settle(delivery, "ack", lambda: self.queue.ack(delivery))
            except CommitFailed as exc:
                # The job's own transaction could not commit with the ack (see
                # PostgresQueue.transaction): its writes are gone, so the job failed.
                await self._failed(job, delivery, exc)
            else:
                if acked:
                    self.stats["succeeded"] += 1
                    if self.metrics is not None:
                        self.metrics.job_settled(job.name, "succeeded")
            finally:
                self._acking -= 1

    def _observe_delivery(self, delivery: Delivery) -> None:
        """Hand the attempt's span the message's trace context and attributes (this job's
        task has a context of its own), and record the queue lag."""
        carried.set(
            Carried(
                delivery.headers,
                {
                    **self._carry,
                    "messaging.message.id": delivery.id,
                    "messaging.message.delivery_count": delivery.deliveries,
                },
            )
        )
        if self.metrics is not None and delivery.enqueued_at > 0:
            self.metrics.received(delivery.job, time.time() - delivery.enqueued_at)

    async def _failed(self, job: Job[..., Any], delivery: Delivery, exc: Exception) -> None:
        """Retry the message with backoff, or dead-letter it, as the retry policy says."""
        verdict, given = self._retry.decide(exc, delivery.attempt, job.retries)
        if verdict != Verdict.RETRY:
            reason = {Verdict.REJECTED: "rejected", Verdict.BROKEN: "error"}.get(verdict, "failed")
            await self._dead(delivery, reason, exc)
            return
        delay = given if given is not None else 0.0  # the policy has a backoff: always given
        error = describe(exc)
        LOG.warning(
            "job.retrying",
            job=job.name,
            job_id=delivery.id,
            attempt=delivery.attempt,
            delay=round(delay, 3),
            error=error,
        )
        if await self._settle(delivery, "retry", lambda: self.queue.retry(delivery, delay, error)):
            self.stats["retried"] += 1
            if self.metrics is not None:
                self.metrics.job_settled(job.name, "retried")

    async def _release(self, delivery: Delivery) -> None:
        """The job was cancelled (shutdown): give the message back without using up an
        attempt. Bounded, because the broker may be gone; then it stays pending with
        the broker and is redelivered all the same."""
        with anyio.move_on_after(_SHUTDOWN_SETTLE_TIMEOUT, shield=True):
            try:
                released = await self._settle(delivery, "release", lambda: self.queue.release(delivery))
            except Exception as exc:
                LOG.error("worker.release_failed", job=delivery.job, job_id=delivery.id, error=describe(exc))
            else:
                if released:
                    self.stats["released"] += 1
                    if self.metrics is not None:
                        self.metrics.job_settled(delivery.job, "released")

    def backoff(self, attempt: int) -> float:
        """Exponential backoff with jitter: between half and all of base * 2**(attempt-1)."""
        return self._retry.delay(attempt)

    async def _dead(self, delivery: Delivery, reason: str, error: BaseException | str) -> None:
        if isinstance(error, BaseException):
            text = redact(describe(error))
            module = type(error).__module__
            # Dead letters name public paths: lifecycle.Reject, not lifecycle._errors.Reject.
            kind = f"{'lifecycle' if module.startswith('lifecycle._') else module}.{type(error).__qualname__}"
            trace = traceback_text(error)[-8000:]
        else:
            text, kind, trace = error, None, None
        record = {
            "job": delivery.job,
            "payload": delivery.payload,
            "message_id": delivery.id,
            "reason": reason,
            "error": text,
            "error_type": kind,
            "traceback": trace,
            "attempts": delivery.attempt,
            "deliveries": delivery.deliveries,
            "failed_at": time.time(),
        }
        if isinstance(error, PayloadError) and error.errors:
            record["errors"] = error.errors  # each problem with its location, as data
        if delivery.headers:
            record["headers"] = delivery.headers  # so a replay carries them (its trace context) again
        LOG.error(
            "job.dead_lettered",
            job=delivery.job,
            job_id=delivery.id,
            attempt=delivery.attempt,
            reason=reason,
            error=text,
        )
        if await self._settle(delivery, "dead_letter", lambda: self.queue.dead_letter(delivery, record)):
            self.stats["dead_lettered"] += 1
            if self.metrics is not None:
                self.metrics.dead_lettered(delivery.job, reason)
                self.metrics.job_settled(delivery.job, _settled_outcome(reason, error))


def _settled_outcome(reason: str, error: BaseException | str) -> str:
    """The ``jobs_total`` outcome of a dead-lettered message (see lifecycle.prometheus)."""
    if reason == "rejected":
        return "rejected"
    if reason in ("failed", "error"):
        return "timed_out" if isinstance(error, JobTimeout) else "failed"
    return "dead_lettered"  # it never ran: malformed, unknown job, invalid payload, poison


# messaging.system per queue class (OpenTelemetry's messaging semantic conventions).
_SYSTEMS = {
    "MemoryQueue": "memory",
    "RedisStreamQueue": "redis",
    "RabbitQueue": "rabbitmq",
    "RabbitMQQueue": "rabbitmq",
    "NatsQueue": "nats",
    "PostgresQueue": "postgresql",
    "SqliteQueue": "sqlite",
}


def _carried_attributes(queue: Any) -> dict[str, Any]:
    """The messaging attributes every attempt span of this worker carries."""
    attributes: dict[str, Any] = {
        "messaging.system": _SYSTEMS.get(type(queue).__name__, type(queue).__name__.lower()),
        "messaging.operation.type": "process",
        "messaging.operation.name": "process",
    }
    for name in ("stream", "queue", "subject", "table", "name"):
        value = getattr(queue, name, None)
        if isinstance(value, str) and value:
            attributes["messaging.destination.name"] = value
            break
    group = getattr(queue, "group", None)
    if isinstance(group, str) and group:
        attributes["messaging.consumer.group.name"] = group
    return attributes
