"""``examples/mqtt_consumer.py`` end to end on the real Mosquitto broker: a consumer
process runs messages with ``Runtime.attempt`` and maps each outcome onto MQTT (result,
republished retry, dead letter). aiomqtt is asyncio only, so is this test."""

import json
import os
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import anyio
import pytest
from support import require_service

pytestmark = pytest.mark.mqtt

EXAMPLE = Path(__file__).parent.parent / "examples" / "mqtt_consumer.py"
HOST = os.environ.get("LIFECYCLE_TEST_MQTT_HOST", "127.0.0.1")
PORT = int(os.environ.get("LIFECYCLE_TEST_MQTT_PORT", "1883"))


@pytest.fixture
def consumer() -> Iterator[tuple[subprocess.Popen[str], str]]:
    require_service("Mosquitto", lambda: socket.create_connection((HOST, PORT), timeout=2).close())
    prefix = f"lifecycle-test-{uuid.uuid4().hex}"
    proc = subprocess.Popen(
        [sys.executable, str(EXAMPLE), "--host", HOST, "--port", str(PORT), "--prefix", prefix],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:  # blocks until the consumer subscribed (or died)
            lines.append(line.strip())
            if line.strip() == "ready":
                break
        else:
            pytest.fail(f"the consumer exited before subscribing: {lines} {proc.stderr.read() if proc.stderr else ''}")
        yield proc, prefix
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)


def test_the_mqtt_consumer_maps_every_outcome_onto_the_broker(consumer: tuple[subprocess.Popen[str], str]) -> None:
    proc, prefix = consumer
    messages = [
        {"id": "ok", "job": "shout", "payload": {"text": "hello"}},
        {"id": "retried", "job": "flaky", "payload": {"key": "k"}},
        {"id": "exhausted", "job": "broken", "payload": {}},
        {"id": "rejected", "job": "moderate", "payload": {"text": "buy spam"}},
        {"id": "invalid", "job": "shout", "payload": {"txt": "typo"}},
        {"id": "unknown", "job": "nope", "payload": {}},
    ]

    async def exchange() -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]]:
        results: dict[str, Any] = {}
        dead: dict[str, Any] = {}
        retries: list[dict[str, Any]] = []
        async with aiomqtt.Client(HOST, PORT, identifier=f"test-{uuid.uuid4().hex[:8]}") as client:
            await client.subscribe(f"{prefix}/#", qos=1)
            for message in messages:
                await client.publish(f"{prefix}/jobs", json.dumps(message), qos=1)
            await client.publish(f"{prefix}/jobs", b"{not json", qos=1)
            with anyio.fail_after(90):  # generous: the machine is shared
                async for message in client.messages:
                    leaf = str(message.topic).rsplit("/", 1)[-1]
                    if message.payload == b"{not json":
                        continue  # our own malformed message, echoed on PREFIX/jobs
                    body = json.loads(message.payload)
                    if leaf == "results":
                        results[body["id"]] = body
                    elif leaf == "dead":
                        dead[body.get("id", "malformed")] = body
                    elif leaf == "jobs" and body.get("attempt", 1) > 1:
                        retries.append(body)
                    if len(results) == 2 and len(dead) == 5:
                        return results, dead, retries
        raise AssertionError("unreachable")

    results, dead, retries = anyio.run(exchange, backend="asyncio")

    assert results["ok"]["result"] == "HELLO" and results["ok"]["attempt"] == 1
    assert results["retried"] == {"id": "retried", "job": "flaky", "attempt": 2, "result": "k done on attempt 2"}
    # broken has retries=2: attempts 1 and 2 come back as retries, attempt 3 is dead.
    assert sorted(r["attempt"] for r in retries if r["id"] == "exhausted") == [2, 3]
    assert [r["attempt"] for r in retries if r["id"] == "retried"] == [2]
    assert dead["exhausted"]["reason"] == "failed" and dead["exhausted"]["attempt"] == 3
    assert dead["exhausted"]["error"] == "RuntimeError: the downstream service is gone"
    assert dead["rejected"]["reason"] == "rejected" and dead["rejected"]["error"] == "spam is not accepted"
    assert dead["invalid"]["reason"] == "rejected"
    assert {tuple(e["loc"]) for e in dead["invalid"]["errors"]} == {("text",), ("txt",)}
    assert dead["unknown"]["reason"] == "unknown_job"
    assert dead["malformed"]["reason"] == "malformed" and dead["malformed"]["raw"] == "{not json"

    # A graceful stop tears down the worker-scoped dependency, which counted every
    # attempt that reached a job: shout 1, flaky 2, broken 3, moderate 1.
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    closed = [line for line in out.splitlines() if line.startswith("counters closed: ")]
    assert [json.loads(line.split(": ", 1)[1]) for line in closed] == [
        {"broken": 3, "flaky": 2, "moderate": 1, "shout": 1}
    ]
