"""Helpers for the proactor loop tests: a loop on a chosen engine, a connected pair.

The protocols are the loop suites' own (`tests/loops/loop_support.py`).

The io_uring variant never skips quietly: `new_loop` fails when io_uring cannot
be used here, unless ``FORKLOOP_EXPECT_NO_IO_URING=1`` declares the machine
has none (`ring_support`).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from ring_support import EXPECT_NO_IO_URING

from forkloop import proactor
from forkloop.proactor import loop as loop_module
from forkloop.proactor.transports import StreamTransport
from tests.loops.loop_support import Recorder

ENGINES = ["uring", "emulated"]


def new_loop(engine_name: str) -> proactor.EventLoop:
    try:
        return proactor.EventLoop(engine_name)
    except proactor.EngineUnavailable as error:
        if EXPECT_NO_IO_URING:
            pytest.skip(f"FORKLOOP_EXPECT_NO_IO_URING=1 declares io_uring missing: {error}")
        pytest.fail(f"{error}. The io_uring loop tests must run.", pytrace=False)


def run_on(engine_name: str, main: Callable[[], Awaitable[Any]], timeout: float = 30.0) -> Any:
    async def bounded() -> Any:
        async with asyncio.timeout(timeout):
            return await main()

    with asyncio.Runner(loop_factory=lambda: new_loop(engine_name)) as runner:
        return runner.run(bounded())


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def connected_pair(**server_options: Any) -> tuple[Recorder, Recorder, Any]:
    """A (server side, client side) pair of recorders over TCP, and the server."""
    loop = asyncio.get_running_loop()
    accepted: asyncio.Future = loop.create_future()

    def factory() -> Recorder:
        protocol = Recorder()
        accepted.set_result(protocol)
        return protocol

    server = await loop.create_server(factory, "127.0.0.1", 0, **server_options)
    port = server.sockets[0].getsockname()[1]
    _, client = await loop.create_connection(Recorder, "127.0.0.1", port)
    server_side = await accepted
    await server_side.made
    return server_side, client, server


def record_results(monkeypatch: pytest.MonkeyPatch, method: str) -> list[tuple[Any, int, int]]:
    """Record ``(transport, result, flags)`` for every call of a StreamTransport handler."""
    calls: list[tuple[Any, int, int]] = []
    original = getattr(StreamTransport, method)

    def recording(self: StreamTransport, result: int, flags: int) -> None:
        calls.append((self, result, flags))
        original(self, result, flags)

    monkeypatch.setattr(StreamTransport, method, recording)
    return calls


RECEIVE_MODES = ["bundles", "multishot", "single-shot provided", "own buffer"]


def force_receive_mode(monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    """Make new loops receive as ``mode`` says (``bundles`` where the kernel has them)."""
    real = loop_module.EventLoop._choose_receive_mode

    def choose(self: proactor.EventLoop) -> None:
        if mode == "own buffer":
            return
        if mode != "bundles":
            monkeypatch.setattr(type(self._ring.capabilities), "receive_bundles", False)
        real(self)
        if mode == "single-shot provided":
            self._multishot_recv = False

    monkeypatch.setattr(loop_module.EventLoop, "_choose_receive_mode", choose)
