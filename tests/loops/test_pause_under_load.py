"""pause_reading under load: nothing lost, duplicated or reordered, and the loop stays awake.

A client thread uploads a large body as fast as the kernel takes it. The
server's protocol pauses its transport every `PAUSE_EVERY` bytes, as an HTTP
server does when a handler stops reading its body; a second thread, the
"application", waits until the paused connection has bytes waiting in the
kernel, pings the loop with ``call_soon_threadsafe`` (the loop is asleep in its
poll then, with receives cancelled or racing their cancels), and resumes the
transport through ``call_soon_threadsafe`` too. Every byte must arrive once,
in order, never while paused, and every ping must be answered promptly.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from typing import Any

import pytest

from tests.loop_under_test import LoopUnderTest
from tests.loops.loop_support import bytes_waiting, port_of
from tests.waiting import until

PAYLOAD = bytes(range(251)) * (8 * 1024 * 1024 // 251)  # a prime period shows any misplaced byte
PAUSE_EVERY = 256 * 1024
PINGS_PER_PAUSE = 3
ANSWER_WITHIN = 5.0  # seconds a thread waits for the loop to act on its call


class PausingReader(asyncio.BufferedProtocol):
    """Pauses its transport after `PAUSE_EVERY` bytes; `resume` (called from the loop) undoes it.

    ``buffered`` picks the interface: BufferedProtocol with a small buffer (so a
    pause lands in the middle of a received chunk), or plain ``data_received``.
    """

    def __init__(self, buffered: bool, paused: threading.Event, done: asyncio.Future[None]) -> None:
        self.buffered = buffered
        self.paused_event = paused
        self.done = done
        self.transport: Any = None
        self.data = bytearray()
        self.since_resume = 0
        self.paused = False
        self.pauses = 0
        self.delivered_while_paused = 0
        self.buffer = bytearray(4096)
        if not buffered:  # asyncio tells the two kinds apart by the presence of get_buffer
            self.data_received = self._data_received  # type: ignore[method-assign]

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def get_buffer(self, sizehint: int) -> memoryview:
        return memoryview(self.buffer)

    def buffer_updated(self, nbytes: int) -> None:
        self._arrived(self.buffer[:nbytes])

    def _data_received(self, data: bytes) -> None:
        self._arrived(data)

    def _arrived(self, data: bytes | bytearray) -> None:
        if self.paused:
            self.delivered_while_paused += len(data)
        self.data += data
        self.since_resume += len(data)
        if len(self.data) >= len(PAYLOAD):
            if not self.done.done():
                self.done.set_result(None)
        elif self.since_resume >= PAUSE_EVERY and not self.paused:
            self.paused = True
            self.pauses += 1
            self.transport.pause_reading()
            self.paused_event.set()

    def resume(self) -> None:
        self.paused = False
        self.since_resume = 0
        self.transport.resume_reading()

    def connection_lost(self, exc: BaseException | None) -> None:
        if not self.done.done():
            self.done.set_exception(ConnectionError(f"lost after {len(self.data)} bytes: {exc}"))


def _upload(port: int, failures: list[BaseException], sent: threading.Event) -> None:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
            sock.sendall(PAYLOAD)
            sent.set()
            sock.recv(1)  # until the server closes
    except BaseException as exc:
        failures.append(exc)
        sent.set()


def _application(
    loop: asyncio.AbstractEventLoop,
    reader: list[PausingReader],
    paused: threading.Event,
    sent: threading.Event,
    finished: threading.Event,
    failures: list[BaseException],
    ping_answers: list[int],
) -> None:
    """Wait for each pause, ping the sleeping loop, then resume the transport from here."""
    try:
        while not finished.is_set():
            if not paused.wait(0.05):
                continue
            paused.clear()
            protocol = reader[0]
            sock = protocol.transport.get_extra_info("socket")
            for _ in range(int(ANSWER_WITHIN / 0.001)):  # bytes wait in the kernel, or none come
                if sent.is_set() or finished.is_set() or bytes_waiting(sock) > 0:
                    break
                finished.wait(0.001)
            for _ in range(PINGS_PER_PAUSE):
                answered = threading.Event()
                loop.call_soon_threadsafe(answered.set)
                if not answered.wait(ANSWER_WITHIN):
                    raise AssertionError(
                        f"the loop did not run a call_soon_threadsafe callback within "
                        f"{ANSWER_WITHIN} s while the transport was paused "
                        f"({len(protocol.data)} of {len(PAYLOAD)} bytes in)"
                    )
                ping_answers.append(1)
            loop.call_soon_threadsafe(protocol.resume)
    except BaseException as exc:
        failures.append(exc)


@pytest.mark.parametrize("buffered", [False, True], ids=["protocol", "buffered_protocol"])
def test_pausing_a_loaded_connection_loses_nothing_and_the_loop_answers_threads(
    backend: LoopUnderTest, buffered: bool
):
    async def main():
        loop = asyncio.get_running_loop()
        paused, sent, finished = threading.Event(), threading.Event(), threading.Event()
        done: asyncio.Future[None] = loop.create_future()
        reader: list[PausingReader] = []
        failures: list[BaseException] = []
        ping_answers: list[int] = []

        def make() -> PausingReader:
            reader.append(PausingReader(buffered, paused, done))
            return reader[0]

        server = await loop.create_server(make, "127.0.0.1", 0)
        uploader = threading.Thread(target=_upload, args=(port_of(server), failures, sent))
        application = threading.Thread(
            target=_application,
            args=(loop, reader, paused, sent, finished, failures, ping_answers),
        )
        uploader.start()
        await until(lambda: failures or (reader and reader[0].transport is not None))
        assert not failures, failures
        application.start()
        try:
            await done
        finally:
            finished.set()
            if reader and reader[0].transport is not None:
                reader[0].transport.close()
            server.close()
            await loop.run_in_executor(None, application.join, 10)
            await loop.run_in_executor(None, uploader.join, 10)
        protocol = reader[0]
        return (
            failures,
            bytes(protocol.data) == PAYLOAD,
            protocol.delivered_while_paused,
            protocol.pauses,
            len(ping_answers),
        )

    failures, intact, delivered_while_paused, pauses, pings = backend.run(main, timeout=30)
    assert failures == []
    assert intact, "bytes were lost, duplicated or reordered across pause_reading/resume_reading"
    assert delivered_while_paused == 0
    assert pauses >= len(PAYLOAD) // PAUSE_EVERY - 1
    assert pings == pauses * PINGS_PER_PAUSE
