"""The WebSocket echo client of `forkloop bench --asgi`: one connection, timed.

`echo_for` opens one WebSocket connection (no compression, no keepalive
pings, so every frame on the wire is a message of the workload) and keeps
``in_flight`` messages outstanding for ``seconds``: each echo that comes back
is checked against what was sent, timed, and replaced by the next message.
With one in flight (the default) this is ping-pong: every message wakes the
server once, which is what a chat or a game connection costs it.

It answers in the shape `loadtest.bench.parse_wrk` gives for wrk, so the
bench adds WebSocket runs to its measurements the same way: ``requests`` are
messages echoed, ``rate`` messages per second, latencies per round trip.

The client is the ``websockets`` library's asyncio client on uvloop when it
is installed. It runs in the bench's process, so its CPU is never counted as
the server's.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import statistics
import time
from typing import Any


async def _echo_for(uri: str, seconds: float, message: str, in_flight: int) -> dict[str, float]:
    from websockets.asyncio.client import connect

    latencies: list[float] = []
    errors = 0
    async with connect(uri, compression=None, ping_interval=None, max_size=None) as websocket:
        sent_at: collections.deque[float] = collections.deque()
        start = time.perf_counter()
        deadline = start + seconds
        for _ in range(in_flight):
            sent_at.append(time.perf_counter())
            await websocket.send(message)
        while sent_at:
            reply = await websocket.recv()
            now = time.perf_counter()
            latencies.append(now - sent_at.popleft())
            if reply != message:
                errors += 1
            if now < deadline:
                sent_at.append(now)
                await websocket.send(message)
        elapsed = time.perf_counter() - start
    return _summary(latencies, elapsed, errors)


def _summary(latencies: list[float], elapsed: float, errors: int) -> dict[str, float]:
    if len(latencies) >= 2:
        cuts = statistics.quantiles(latencies, n=100, method="inclusive")
        p50, p99 = cuts[49] * 1000, cuts[98] * 1000
    else:
        p50 = p99 = latencies[0] * 1000 if latencies else float("nan")
    return {
        "requests": len(latencies),
        "seconds": elapsed,
        "rate": len(latencies) / elapsed if elapsed > 0 else 0.0,
        "p50_ms": p50,
        "p99_ms": p99,
        "errors": errors,
    }


def _loop_factory() -> Any:
    with contextlib.suppress(ImportError):
        import uvloop

        return uvloop.new_event_loop
    return asyncio.new_event_loop


def echo_for(port: int, seconds: float, message: str, in_flight: int = 1) -> dict[str, float]:
    """Echo ``message`` over one connection to ``ws://127.0.0.1:port/`` for ``seconds``."""
    uri = f"ws://127.0.0.1:{port}/"
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        return runner.run(_echo_for(uri, seconds, message, in_flight))


def check_echo(port: int, message: str, timeout: float = 10.0) -> str | None:
    """None if one message comes back as sent; else what went wrong, in a sentence."""

    async def once() -> str | None:
        from websockets.asyncio.client import connect

        uri = f"ws://127.0.0.1:{port}/"
        async with connect(uri, compression=None, ping_interval=None) as websocket:
            await websocket.send(message)
            reply = await websocket.recv()
        if reply != message:
            return f"the echo came back as {str(reply)[:40]!r}"
        return None

    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            return runner.run(asyncio.wait_for(once(), timeout))
    except Exception as exc:  # noqa: BLE001 - the reason becomes the table's cell
        return f"no WebSocket echo: {type(exc).__name__}: {str(exc)[:80]}"
