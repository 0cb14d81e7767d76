"""Protocols and helpers shared by the loop suites (conformance, reactor, proactor).

Every protocol here records what the loop did to it and exposes futures for
the events a test waits on, so tests synchronise on the loop's own callbacks
rather than on sleeps. Protocols are made inside the running loop (they are
built by protocol factories), so they take the running loop at construction.
"""

from __future__ import annotations

import asyncio
import fcntl
import socket
import struct
import termios
from typing import Any


class Recorder(asyncio.Protocol):
    """Records every callback; futures resolve on connection_made, eof, connection_lost
    and the first pause_writing and resume_writing; ``received(n)`` waits for n bytes.

    The one recording stream protocol of the loop suites (`tests/loops`,
    `tests/reactor`, `tests/proactor`).
    """

    def __init__(self, *, keep_open_on_eof: bool = False) -> None:
        loop = asyncio.get_running_loop()
        self.keep_open_on_eof = keep_open_on_eof
        self.transport: Any = None
        self.data = bytearray()
        self.reads = 0  # data_received calls: how finely the loop cut the stream
        self.events: list[str] = []
        self.made = loop.create_future()
        self.eof = loop.create_future()
        self.lost = loop.create_future()
        self.paused = loop.create_future()
        self.resumed = loop.create_future()
        self._byte_waiters: list[tuple[int, asyncio.Future]] = []

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.events.append("made")
        self.made.set_result(transport)

    def data_received(self, data: bytes) -> None:
        self.reads += 1
        if not self.events or self.events[-1] != "data":
            self.events.append("data")
        self.data += data
        self._wake_byte_waiters()

    def eof_received(self) -> bool:
        self.events.append("eof")
        self.eof.set_result(None)
        return self.keep_open_on_eof

    def connection_lost(self, exc: BaseException | None) -> None:
        self.events.append("lost")
        self.lost.set_result(exc)
        for _, waiter in self._byte_waiters:
            if not waiter.done():
                waiter.set_exception(ConnectionError(f"lost after {len(self.data)} bytes"))

    def pause_writing(self) -> None:
        self.events.append("pause")
        if not self.paused.done():
            self.paused.set_result(None)

    def resume_writing(self) -> None:
        self.events.append("resume")
        if not self.resumed.done():
            self.resumed.set_result(None)

    async def received(self, count: int) -> bytes:
        """Wait until at least ``count`` bytes arrived; return everything received."""
        if len(self.data) < count:
            waiter = asyncio.get_running_loop().create_future()
            self._byte_waiters.append((count, waiter))
            await waiter
        return bytes(self.data)

    def _wake_byte_waiters(self) -> None:
        still_waiting = []
        for count, waiter in self._byte_waiters:
            if len(self.data) >= count:
                if not waiter.done():
                    waiter.set_result(None)
            else:
                still_waiting.append((count, waiter))
        self._byte_waiters = still_waiting


class Echo(asyncio.Protocol):
    """Writes back whatever arrives; closes when the peer finishes sending."""

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


class BufferedEcho(asyncio.BufferedProtocol):
    """An echo server that receives into its own buffer (BufferedProtocol)."""

    def __init__(self) -> None:
        self.buffer = bytearray(1024)
        self.get_buffer_calls = 0

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def get_buffer(self, sizehint: int) -> memoryview:
        self.get_buffer_calls += 1
        return memoryview(self.buffer)

    def buffer_updated(self, nbytes: int) -> None:
        self.transport.write(bytes(self.buffer[:nbytes]))


class DatagramRecorder(asyncio.DatagramProtocol):
    """Records datagrams and errors; ``datagram(n)`` waits for the n-th datagram."""

    def __init__(self, *, echo: bool = False) -> None:
        loop = asyncio.get_running_loop()
        self.echo = echo
        self.transport: Any = None
        self.datagrams: list[tuple[bytes, Any]] = []
        self.errors: list[Exception] = []
        self.lost = loop.create_future()
        self.error = loop.create_future()
        self._waiters: list[tuple[int, asyncio.Future]] = []

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.datagrams.append((data, addr))
        if self.echo:
            self.transport.sendto(data, addr)
        for count, waiter in self._waiters:
            if len(self.datagrams) >= count and not waiter.done():
                waiter.set_result(None)

    def error_received(self, exc: Exception) -> None:
        self.errors.append(exc)
        if not self.error.done():
            self.error.set_result(exc)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.lost.set_result(exc)

    async def datagram(self, count: int) -> tuple[bytes, Any]:
        if len(self.datagrams) < count:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append((count, waiter))
            await waiter
        return self.datagrams[count - 1]


def bytes_waiting(sock: Any) -> int:
    """How many received bytes the kernel holds for ``sock`` (FIONREAD)."""
    raw = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
    return struct.unpack("i", raw)[0]


def port_of(server: asyncio.AbstractServer) -> int:
    return server.sockets[0].getsockname()[1]


def ipv6_loopback_works() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


def rst_close(sock: socket.socket) -> None:
    """Close ``sock`` so that the peer gets a TCP reset instead of an orderly FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
