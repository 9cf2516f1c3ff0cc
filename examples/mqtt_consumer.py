"""Your own consumer loop, lifecycle's jobs: an MQTT consumer (aiomqtt) that runs each
message as one job attempt with ``Runtime.attempt`` and maps the outcome onto the
message, the way any hand-written loop (aiokafka, SQS, a websocket) would.

    python examples/mqtt_consumer.py                      # Mosquitto on 127.0.0.1:1883
    python examples/mqtt_consumer.py --prefix demo --host 127.0.0.1 --port 1883

Topics, under ``--prefix`` (default ``lifecycle-demo``):

- ``PREFIX/jobs``: what to run, JSON: ``{"job": "shout", "payload": {"text": "hi"},
  "id": "m-1", "attempt": 1}`` (``id`` and ``attempt`` are optional; the attempt
  number travels with the message, because MQTT keeps no delivery count).
- ``PREFIX/results``: ``{"id", "job", "attempt", "result"}`` for each job that succeeded.
- ``PREFIX/dead``: ``{"id", "job", "payload", "attempt", "reason", "error"}`` for each
  message given up on; ``reason`` is ``rejected`` (``Reject``, or a payload that does
  not fit: ``errors`` lists each problem), ``failed`` (out of attempts),
  ``unknown_job`` or ``malformed``.

A retry is the same message published again to ``PREFIX/jobs`` with ``attempt + 1``,
after the outcome's delay. Try it with Mosquitto's client:

    mosquitto_sub -t 'lifecycle-demo/#' -v &
    mosquitto_pub -t lifecycle-demo/jobs -m '{"job": "flaky", "payload": {"key": "a"}}'

Runs on asyncio only: aiomqtt drives paho-mqtt's socket with asyncio's reader and
writer callbacks, so it has no trio backend (the jobs themselves would run on either).

MQTT acknowledges a QoS 1 message when it is received, not when the job is done (paho
acks as soon as its callback returns; aiomqtt does not expose manual acks), so a
consumer killed mid-job loses that message. A broker with acknowledgements after the
fact (a lifecycle queue, Kafka offsets, SQS deletes) maps ``Succeeded`` to the ack
instead; the rest of this loop stays the same. SIGINT/SIGTERM stop the consumer: jobs in
flight are cancelled (their teardown runs) and published back with the same attempt, so
a restart runs them again."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import uuid
from collections.abc import AsyncIterator, Mapping
from typing import Annotated, Any

import aiomqtt
import anyio

from lifecycle import (
    Depends,
    Failed,
    Job,
    JobContext,
    Reject,
    Rejected,
    Retry,
    RetryLater,
    Runtime,
    Succeeded,
    dependency,
    job,
)

# -- the jobs (any lifecycle jobs; these only show each outcome) -------------------------


@dependency(scope="worker")
async def counters() -> AsyncIterator[dict[str, int]]:
    """One per consumer process (a connection pool in real life); closed at shutdown."""
    seen: dict[str, int] = {}
    print("counters opened", flush=True)
    try:
        yield seen
    finally:
        print(f"counters closed: {json.dumps(seen, sort_keys=True)}", flush=True)


async def counted(ctx: JobContext, seen: Annotated[dict[str, int], Depends(counters)]) -> AsyncIterator[None]:
    """Per job: count each attempt by job name, after it ended (success or not)."""
    try:
        yield
    finally:
        seen[ctx.name] = seen.get(ctx.name, 0) + 1


@job(name="shout")
async def shout(text: str, _: Annotated[None, Depends(counted)]) -> str:
    return text.upper()


@job(name="flaky", retries=3)
async def flaky(key: str, ctx: JobContext, _: Annotated[None, Depends(counted)]) -> str:
    if ctx.attempt < 2:
        raise Retry(delay=0.2)  # a transient failure: try again soon
    return f"{key} done on attempt {ctx.attempt}"


@job(name="broken", retries=2)
async def broken(_: Annotated[None, Depends(counted)]) -> None:
    raise RuntimeError("the downstream service is gone")


@job(name="moderate")
async def moderate(text: str, _: Annotated[None, Depends(counted)]) -> str:
    if "spam" in text:
        raise Reject("spam is not accepted")
    return text


JOBS: dict[str, Job[..., Any]] = {j.name: j for j in (shout, flaky, broken, moderate)}


# -- the consumer loop ----------------------------------------------------------------------


class Consumer:
    """Reads ``PREFIX/jobs``, runs one attempt per message, settles it by its outcome.

    Args:
        client: a connected aiomqtt client.
        runtime: an open lifecycle runtime.
        prefix: the topic prefix.
        concurrency: the most jobs running at once.
    """

    def __init__(self, client: aiomqtt.Client, runtime: Runtime, prefix: str, concurrency: int = 16) -> None:
        self.client = client
        self.runtime = runtime
        self.prefix = prefix
        self.limiter = anyio.CapacityLimiter(concurrency)

    async def publish(self, leaf: str, body: Mapping[str, Any]) -> None:
        await self.client.publish(f"{self.prefix}/{leaf}", json.dumps(body, default=str), qos=1)

    async def run(self, task_group: anyio.abc.TaskGroup) -> None:
        await self.client.subscribe(f"{self.prefix}/jobs", qos=1)
        print("ready", flush=True)
        async for message in self.client.messages:
            await self.limiter.acquire_on_behalf_of(message)  # stop reading while full
            task_group.start_soon(self.handle, message)

    async def handle(self, message: aiomqtt.Message) -> None:
        try:
            await self.settle(message.payload)
        finally:
            self.limiter.release_on_behalf_of(message)

    async def settle(self, raw: Any) -> None:
        try:
            envelope = json.loads(raw)
            name, payload = envelope["job"], envelope.get("payload", {})
            attempt = int(envelope.get("attempt", 1))
            message_id = str(envelope.get("id") or uuid.uuid4().hex)
            if attempt < 1:
                raise ValueError(f"attempt must be >= 1, got {attempt}")
        except (ValueError, TypeError, KeyError) as exc:
            text = raw.decode(errors="replace") if isinstance(raw, bytes | bytearray) else repr(raw)
            await self.publish("dead", {"reason": "malformed", "error": f"{type(exc).__name__}: {exc}", "raw": text})
            return
        about = {"id": message_id, "job": name, "attempt": attempt}
        target = JOBS.get(name)
        if target is None:
            await self.publish("dead", {**about, "payload": payload, "reason": "unknown_job", "error": name})
            return
        try:
            outcome = await self.runtime.attempt(target, payload, attempt=attempt, job_id=message_id)
        except anyio.get_cancelled_exc_class():
            # Shutting down: give the message back as it came, without using an attempt.
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                await self.publish("jobs", {**about, "payload": payload})
            raise
        match outcome:
            case Succeeded(result):
                await self.publish("results", {**about, "result": result})
            case RetryLater(delay, error):
                await anyio.sleep(delay)
                await self.publish("jobs", {**about, "payload": payload, "attempt": attempt + 1, "error": str(error)})
            case Rejected(reason, error):
                errors = getattr(error, "errors", None)  # a PayloadError lists each problem
                dead = {**about, "payload": payload, "reason": "rejected", "error": reason, "errors": errors}
                await self.publish("dead", dead)
            case Failed(error):
                dead = {**about, "payload": payload, "reason": "failed", "error": f"{type(error).__name__}: {error}"}
                await self.publish("dead", dead)


async def main(host: str, port: int, prefix: str) -> None:
    async with (
        Runtime() as runtime,
        aiomqtt.Client(host, port, identifier=f"lifecycle-{uuid.uuid4().hex[:8]}") as client,
        anyio.create_task_group() as tg,
    ):

        async def stop_on_signal() -> None:
            with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _ in signals:
                    tg.cancel_scope.cancel()
                    return

        tg.start_soon(stop_on_signal)
        await Consumer(client, runtime, prefix).run(tg)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=1883)
    parser.add_argument("--prefix", default="lifecycle-demo")
    args = parser.parse_args()
    anyio.run(main, args.host, args.port, args.prefix, backend="asyncio")
    sys.exit(0)
