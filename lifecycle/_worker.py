"""The Worker: reads messages from a queue and runs each as one job through a Runtime it
owns, so worker-scoped dependencies live as long as the worker.

In-flight jobs run in a task group hosted by a shielded task of their own. Cancelling
``run()`` (or calling ``stop()``) therefore stops the reading only; the jobs get
``shutdown_grace`` seconds to finish, then are cancelled (their teardown still runs),
then the worker scope is torn down."""

from __future__ import annotations

import random
import time
import traceback
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import anyio
from anyio import CancelScope
from anyio.abc import TaskGroup, TaskStatus

from ._errors import DependencyError, LifecycleError, PayloadError, Reject, Retry
from ._job import Job, as_job
from ._markers import Depends
from ._runtime import Runtime, logger
from .queues._base import Delivery, Queue


class StartupError(LifecycleError):
    """A worker could not start: a worker-scoped dependency failed to set up."""


class Worker:
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
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency!r}")
        if shutdown_grace < 0:
            raise ValueError(f"shutdown_grace must be >= 0, got {shutdown_grace!r}")
        self.queue = queue
        self.jobs: dict[str, Job[..., Any]] = {}
        for fn in jobs:
            job = as_job(fn)
            if job.name in self.jobs and self.jobs[job.name] is not job:
                raise LifecycleError(f"two jobs are named {job.name!r}; give one @job(name=...)")
            self.jobs[job.name] = job
        if not self.jobs:
            raise LifecycleError("a Worker needs at least one job")
        self.concurrency = concurrency
        self.shutdown_grace = shutdown_grace
        self.retry_backoff = retry_backoff
        self.retry_backoff_max = retry_backoff_max
        self.max_deliveries = max_deliveries
        self.poll_interval = poll_interval
        self.heartbeat_interval = heartbeat_interval
        self.runtime = Runtime(
            dependency_overrides=dependency_overrides, teardown_timeout=teardown_timeout, dependencies=dependencies
        )
        self.stats = {"succeeded": 0, "retried": 0, "dead_lettered": 0, "released": 0, "settle_failed": 0}
        self._in_flight: dict[str, Delivery] = {}
        self._stopping = False
        self._read_scope: CancelScope | None = None
        self._slot_free: anyio.Event | None = None
        self._idle: anyio.Event | None = None
        self._close_jobs: anyio.Event | None = None

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def stop(self) -> None:
        """Stop reading; in-flight jobs get ``shutdown_grace`` to finish. Safe to call
        from a signal handler task or another task of the same event loop."""
        self._stopping = True
        if self._read_scope is not None:
            self._read_scope.cancel()
        self._wake_slot()

    async def run(self) -> None:
        """Consume until cancelled or ``stop()``; then shut down gracefully."""
        self._stopping = False
        self._close_jobs = anyio.Event()
        log = logger()
        async with self.runtime as rt:
            await self._warm_up(rt)
            log.info("worker.started", jobs=sorted(self.jobs), concurrency=self.concurrency)
            async with anyio.create_task_group() as supervisor:
                jobs: TaskGroup = await supervisor.start(self._host_jobs)
                if self.heartbeat_interval:
                    supervisor.start_soon(self._heartbeat)
                try:
                    await self._read(jobs)
                finally:
                    with CancelScope(shield=True):
                        await self._drain(jobs)
                    supervisor.cancel_scope.cancel()  # the heartbeat; the job host is shielded
            log.info("worker.stopped", **self.stats)

    async def _warm_up(self, rt: Runtime) -> None:
        """Create every worker-scoped dependency now, so a broken one fails the worker at
        start instead of failing every job."""
        for job in self.jobs.values():
            plan = rt.plan(job)
            for step in plan.steps:
                if step.worker is None:
                    continue
                try:
                    await rt.worker_value(step.worker, logger())
                except Exception as exc:
                    raise StartupError(
                        f"worker could not start: worker-scoped dependency {step.provider.label} of job "
                        f"{job.name!r} failed: {type(exc).__name__}: {exc}"
                    ) from exc

    async def _host_jobs(self, *, task_status: TaskStatus[TaskGroup]) -> None:
        assert self._close_jobs is not None
        with CancelScope(shield=True):  # only _drain decides when jobs are cancelled
            async with anyio.create_task_group() as jobs:
                task_status.started(jobs)
                await self._close_jobs.wait()

    async def _read(self, jobs: TaskGroup) -> None:
        while not self._stopping:
            free = self.concurrency - len(self._in_flight)
            if free <= 0:
                self._slot_free = event = anyio.Event()
                await event.wait()
                continue
            deliveries: list[Delivery] = []
            with CancelScope() as self._read_scope:  # stop() cancels a waiting receive
                deliveries = await self.queue.receive(free, self.poll_interval)
            self._read_scope = None
            for delivery in deliveries:
                self._in_flight[delivery.id] = delivery
                jobs.start_soon(self._handle, delivery)
            if self._stopping:
                break

    def _wake_slot(self) -> None:
        if self._slot_free is not None:
            self._slot_free.set()
            self._slot_free = None

    async def _drain(self, jobs: TaskGroup) -> None:
        log = logger()
        if self._in_flight:
            log.info("worker.draining", in_flight=len(self._in_flight), grace=self.shutdown_grace)
            with anyio.move_on_after(self.shutdown_grace):
                while self._in_flight:
                    self._idle = idle = anyio.Event()
                    await idle.wait()
            if self._in_flight:
                log.warning("worker.cancelling", in_flight=len(self._in_flight))
                jobs.cancel_scope.cancel()
        assert self._close_jobs is not None
        self._close_jobs.set()

    async def _heartbeat(self) -> None:
        assert self.heartbeat_interval
        while True:
            await anyio.sleep(self.heartbeat_interval)
            if self._in_flight:
                await self.queue.heartbeat(list(self._in_flight.values()))

    async def _handle(self, delivery: Delivery) -> None:
        try:
            await self._process(delivery)
        except Exception as exc:
            # Settling failed (the broker went away, say). The message was not acked, so
            # the queue delivers it again; one failure must not take the other jobs down.
            self.stats["settle_failed"] += 1
            logger().error(
                "worker.settle_failed", job=delivery.job, job_id=delivery.id, error=f"{type(exc).__name__}: {exc}"
            )
        finally:
            self._in_flight.pop(delivery.id, None)
            self._wake_slot()
            if not self._in_flight and self._idle is not None:
                self._idle.set()

    async def _process(self, delivery: Delivery) -> None:
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
                    f"job {job.name!r}: the payload must be a JSON object, got {type(delivery.payload).__name__}"
                )
            payload, extras = job.bind_payload((), delivery.payload)
        except PayloadError as exc:
            await self._dead(delivery, "invalid_payload", exc)
            return
        try:
            await self.runtime.run_attempt(job, payload, extras, job_id=delivery.id, attempt=delivery.attempt)
        except anyio.get_cancelled_exc_class():
            with CancelScope(shield=True):
                await self.queue.release(delivery)
                self.stats["released"] += 1
            raise
        except Reject as exc:
            await self._dead(delivery, "rejected", exc)
        except (DependencyError, PayloadError) as exc:
            await self._dead(delivery, "error", exc)
        except Exception as exc:
            if delivery.attempt > job.retries:
                await self._dead(delivery, "failed", exc)
                return
            delay: float = (
                exc.delay if isinstance(exc, Retry) and exc.delay is not None else self.backoff(delivery.attempt)
            )
            logger().warning(
                "job.retrying",
                job=job.name,
                job_id=delivery.id,
                attempt=delivery.attempt,
                delay=round(delay, 3),
                error=f"{type(exc).__name__}: {exc}",
            )
            await self.queue.retry(delivery, delay, f"{type(exc).__name__}: {exc}")
            self.stats["retried"] += 1
        else:
            await self.queue.ack(delivery)
            self.stats["succeeded"] += 1

    def backoff(self, attempt: int) -> float:
        """Exponential backoff with jitter: between half and all of base * 2**(attempt-1)."""
        ceiling = min(self.retry_backoff_max, self.retry_backoff * 2.0 ** (attempt - 1))
        return ceiling * random.uniform(0.5, 1.0)

    async def _dead(self, delivery: Delivery, reason: str, error: BaseException | str) -> None:
        if isinstance(error, BaseException):
            text = f"{type(error).__name__}: {error}"
            kind = f"{type(error).__module__}.{type(error).__qualname__}"
            trace = "".join(traceback.format_exception(error))[-8000:]
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
        logger().error(
            "job.dead_lettered",
            job=delivery.job,
            job_id=delivery.id,
            attempt=delivery.attempt,
            reason=reason,
            error=text,
        )
        await self.queue.dead_letter(delivery, record)
        self.stats["dead_lettered"] += 1
