"""The worker's health endpoints for orchestrators (Kubernetes probes): ``/livez`` and
``/readyz`` over HTTP, served by a task on the worker's own event loop.

Why on the event loop and not in a thread: a loop that is blocked (sync code that never
yields) or wedged must fail the liveness probe, and only a server that needs the loop
to answer does. HTTP is parsed by h11 (a request line and headers, no body), on anyio
sockets, so it runs on asyncio and trio alike.

- ``/livez``: 200 while the loop answers and the worker's read loop has turned
  recently (it turns at least every ``poll_interval``, or every backoff step during a
  broker outage; a worker whose every slot is busy is not reading and counts as alive).
  503 when the read loop is stuck.
- ``/readyz``: 200 once the worker scope is set up and the broker answered last time,
  and the worker is not draining; 503 otherwise, with the reason in the body."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import anyio
import h11
from anyio.abc import SocketStream, TaskStatus

from ._log import LOG

# A request larger than this (line and headers) is refused: probes send a few lines.
_MAX_REQUEST = 8192


class Probe:
    """The answers the health server gives: ``(healthy, reason)`` per endpoint."""

    def __init__(self, live: Callable[[], tuple[bool, str]], ready: Callable[[], tuple[bool, str]]) -> None:
        self.live = live
        self.ready = ready


async def serve_health(
    probe: Probe, port: int, address: str, *, task_status: TaskStatus[int] = anyio.TASK_STATUS_IGNORED
) -> None:
    """Serve ``/livez`` and ``/readyz`` until cancelled; reports the bound port."""
    listener = await anyio.create_tcp_listener(local_host=address, local_port=port, reuse_port=False)
    async with listener:
        bound = listener.extra(anyio.abc.SocketAttribute.local_port)
        LOG.info("worker.health_serving", address=address, port=bound)
        task_status.started(bound)
        await listener.serve(lambda stream: _answer(probe, stream))


async def _answer(probe: Probe, stream: SocketStream) -> None:
    async with stream:
        with anyio.move_on_after(10):  # a client that never finishes its request
            try:
                await _exchange(probe, stream)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.EndOfStream, OSError):
                pass  # the prober hung up
            except h11.RemoteProtocolError:
                pass  # not HTTP: nothing to answer


async def _exchange(probe: Probe, stream: SocketStream) -> None:
    connection = h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_REQUEST)
    while True:
        event = connection.next_event()
        if event is h11.NEED_DATA:
            try:
                data = await stream.receive(4096)
            except anyio.EndOfStream:
                data = b""
            connection.receive_data(data)
            continue
        if isinstance(event, h11.Request):
            break
        if isinstance(event, h11.ConnectionClosed):
            return
    target = event.target.decode("ascii", "replace").split("?", 1)[0]
    if event.method not in (b"GET", b"HEAD"):
        status, body = 405, {"status": "method not allowed", "reason": "use GET"}
    elif target == "/livez":
        status, body = _verdict(probe.live)
    elif target == "/readyz":
        status, body = _verdict(probe.ready)
    else:
        status, body = 404, {"status": "not found", "reason": "try /livez or /readyz"}
    payload = json.dumps(body).encode() + b"\n"
    headers = [
        ("content-type", "application/json"),
        ("content-length", str(len(payload))),
        ("connection", "close"),
        ("cache-control", "no-store"),
    ]
    reply = connection.send(h11.Response(status_code=status, headers=headers)) or b""
    if event.method != b"HEAD":
        reply += connection.send(h11.Data(data=payload)) or b""
    reply += connection.send(h11.EndOfMessage()) or b""
    await stream.send(reply)


def _verdict(check: Callable[[], tuple[bool, str]]) -> tuple[int, dict[str, Any]]:
    ok, reason = check()
    return (200 if ok else 503), {"status": "ok" if ok else "unavailable", "reason": reason, "time": time.time()}
