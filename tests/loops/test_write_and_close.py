"""What a protocol sees around its writes: the kernel took them, or flow control says not.

Two promises every loop keeps, checked with real sockets on an otherwise idle
loop, where nothing else would wake it: a transport written to and closed at
once (a server refusing a connection) delivers the bytes and closes the
connection; and writes the kernel takes at once never pause the protocol,
however many arrive in one callback. (The proactor's sends that post no
completion on success made both worth a test: the loop must neither sleep
while a close waits for them, nor count them as unsent.)
"""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any

from tests.loop_under_test import LoopUnderTest
from tests.loops.loop_support import Recorder, port_of

REFUSAL = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n"


class Refusing(asyncio.Protocol):
    def connection_made(self, transport: Any) -> None:
        transport.write(REFUSAL)
        transport.close()


def read_until_closed(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        received = b""
        while chunk := sock.recv(4096):
            received += chunk
        return received


def test_a_transport_closed_right_after_a_write_delivers_it_and_closes_on_an_idle_loop(
    backend: LoopUnderTest,
):
    async def main() -> list[bytes]:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(Refusing, "127.0.0.1", 0)
        answers = []
        for _ in range(20):  # the loop waits for nothing else meanwhile
            answers.append(await loop.run_in_executor(None, read_until_closed, port_of(server)))
        server.close()
        return answers

    assert backend.run(main, timeout=20) == [REFUSAL] * 20


def test_writes_the_kernel_takes_at_once_never_pause_the_protocol(backend: LoopUnderTest):
    block = b"b" * (48 * 1024)  # two of them pass the 64 KiB mark together, not alone

    async def main() -> tuple[list[str], bytes]:
        loop = asyncio.get_running_loop()
        accepted: asyncio.Future[Recorder] = loop.create_future()

        def factory() -> Recorder:
            protocol = Recorder()
            accepted.set_result(protocol)
            return protocol

        server = await loop.create_server(factory, "127.0.0.1", 0)
        _, client = await loop.create_connection(Recorder, "127.0.0.1", port_of(server))
        server_side = await accepted
        await server_side.made
        client_socket = client.transport.get_extra_info("socket")
        assert client_socket.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) > 2 * len(block)
        server_side.transport.write(block)
        server_side.transport.write(block)
        received = await client.received(2 * len(block))
        client.transport.close()
        server.close()
        return server_side.events, received

    events, received = backend.run(main, timeout=20)
    assert "pause" not in events
    assert received == block * 2


class Numbered(asyncio.Protocol):
    """Writes numbered 64 KiB messages as fast as flow control lets it, then closes."""

    SIZE = 64 * 1024

    def __init__(self, count: int) -> None:
        self.count = count
        self.sent = 0
        self.transport: Any = None
        self.paused = False

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:  # the kernel must not absorb what the test is about
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
        transport.set_write_buffer_limits(high=256 * 1024)
        self._write_some()

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self._write_some()

    def _write_some(self) -> None:
        """One message per loop iteration (as an app awaiting each send writes), so
        each goes out with a different enter than the one before it."""
        if self.paused or self.sent == self.count:
            return
        self.transport.write(self.sent.to_bytes(4, "big") * (self.SIZE // 4))
        self.sent += 1
        if self.sent == self.count:
            self.transport.close()
        else:
            asyncio.get_running_loop().call_soon(self._write_some)


def read_late(port: int) -> bytes:
    """A client with a small receive buffer that reads nothing at first, then all."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    received = bytearray()
    with sock:
        time.sleep(0.3)  # the server's buffers fill; its sends come back part-done
        while chunk := sock.recv(65536):
            received += chunk
    return bytes(received)


def test_every_byte_written_under_backpressure_arrives_in_order(backend: LoopUnderTest):
    count, size = 40, Numbered.SIZE

    async def main() -> bytes:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: Numbered(count), "127.0.0.1", 0)
        received = await loop.run_in_executor(None, read_late, port_of(server))
        server.close()
        return received

    received = backend.run(main, timeout=30)
    numbers = [int.from_bytes(received[i : i + 4], "big") for i in range(0, len(received), size)]
    assert len(received) == count * size and numbers == list(range(count))
