"""Listening servers: the `Server` object users hold and the acceptor behind each socket.

A `Server` owns a list of listening sockets and counts the connections it has
accepted and not yet lost. Serving means one `Acceptor` per listening socket,
registered with the loop's poller for readability; the acceptor accepts in a
burst (up to the backlog) each time the socket is readable, makes a protocol
with the server's factory and wraps the connection in a transport. No task and
no future is created per connection.

Closing a server stops accepting and closes the listening sockets; it does not
touch accepted connections (``close_clients()`` and ``abort_clients()`` do).
``wait_closed()`` follows the running Python: from 3.12 on it waits until the
server is closed *and* its last connection is gone; on 3.11 it returns at once
if the server is already closed, as stdlib asyncio and uvloop do there.

Running out of file descriptors (EMFILE, ENFILE) or kernel memory while
accepting does not spin the loop: the acceptor reports the error, stops
watching its socket and looks again after `ACCEPT_RETRY_DELAY` seconds.
Connections waiting in the backlog meanwhile are kept by the kernel.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import ssl
import sys
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from .transport_base import SocketTransportBase

if TYPE_CHECKING:
    from .loop_part import LoopPart
    from .networking import Networking

ACCEPT_RETRY_DELAY = 1.0
_RESOURCE_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_WAIT_CLOSED_WAITS_FOR_CONNECTIONS = sys.version_info >= (3, 12)


class Server(asyncio.AbstractServer):
    """Listening sockets plus the connections accepted through them."""

    def __init__(
        self,
        loop: LoopPart,
        sockets: Iterable[socket.socket],
        protocol_factory: Callable[[], asyncio.BaseProtocol],
        ssl_context: ssl.SSLContext | None,
        backlog: int,
        ssl_handshake_timeout: float | None = None,
        ssl_shutdown_timeout: float | None = None,
    ) -> None:
        self._loop = loop
        self._sockets: list[socket.socket] | None = list(sockets)
        self._protocol_factory = protocol_factory
        self._ssl_context = ssl_context
        self._backlog = backlog
        self._ssl_handshake_timeout = ssl_handshake_timeout
        self._ssl_shutdown_timeout = ssl_shutdown_timeout
        self._connections: set[SocketTransportBase] = set()
        self._waiters: list[asyncio.Future[None]] | None = []
        self._serving = False
        self._serving_forever: asyncio.Future[None] | None = None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} sockets={self.sockets!r}>"

    # connection accounting (called by transports) -------------------------------

    def _attach(self, transport: SocketTransportBase) -> None:
        self._connections.add(transport)

    def _detach(self, transport: SocketTransportBase) -> None:
        self._connections.discard(transport)
        if not self._connections and self._sockets is None:
            self._wake_waiters()

    def _wake_waiters(self) -> None:
        waiters, self._waiters = self._waiters, None
        for waiter in waiters or ():
            if not waiter.done():
                waiter.set_result(None)

    # the asyncio.AbstractServer interface ----------------------------------------

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def is_serving(self) -> bool:
        return self._serving

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return () if self._sockets is None else tuple(self._sockets)

    def close(self) -> None:
        sockets, self._sockets = self._sockets, None
        if sockets is None:
            return
        for sock in sockets:
            self._loop._stop_listening(sock)
        self._serving = False
        if self._serving_forever is not None and not self._serving_forever.done():
            self._serving_forever.cancel()
            self._serving_forever = None
        if not self._connections:
            self._wake_waiters()

    def close_clients(self) -> None:
        for transport in list(self._connections):
            transport.close()

    def abort_clients(self) -> None:
        for transport in list(self._connections):
            transport.abort()

    def _start_serving(self) -> None:
        if self._serving or self._sockets is None:
            return
        self._serving = True
        for sock in self._sockets:
            self._loop._start_listening(self, sock, self._backlog)

    async def start_serving(self) -> None:
        self._start_serving()
        await asyncio.sleep(0)

    async def serve_forever(self) -> None:
        if self._serving_forever is not None:
            raise RuntimeError(f"server {self!r} is already being awaited on serve_forever()")
        if self._sockets is None:
            raise RuntimeError(f"server {self!r} is closed")
        self._start_serving()
        self._serving_forever = self._loop.create_future()
        try:
            await self._serving_forever
        except asyncio.CancelledError:
            try:
                self.close()
                await self.wait_closed()
            finally:
                raise
        finally:
            self._serving_forever = None

    async def wait_closed(self) -> None:
        if self._waiters is None:
            return
        if self._sockets is None and not _WAIT_CLOSED_WAITS_FOR_CONNECTIONS:
            return
        waiter = self._loop.create_future()
        self._waiters.append(waiter)
        await waiter


class Acceptor:
    """Accepts connections on one listening socket whenever the poller says it is readable."""

    def __init__(self, loop: Networking, server: Server, sock: socket.socket, backlog: int) -> None:
        self._loop = loop
        self._server = server
        self._sock = sock
        self._fd = sock.fileno()
        self._backlog = max(backlog, 1)
        self._retry: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self._loop._poller.set_reader(self._fd, self.accept_ready)

    def stop(self) -> None:
        self._loop._poller.clear_reader(self._fd, self.accept_ready)
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None

    def accept_ready(self) -> None:
        accept = self._sock.accept
        make_transport = self._loop._accept_connection
        server = self._server
        for _ in range(self._backlog):
            try:
                conn, address = accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as exc:
                if self._sock.fileno() < 0:
                    return  # the server was closed by a callback earlier in this burst
                if exc.errno not in _RESOURCE_ERRORS:
                    raise
                self._loop.call_exception_handler(
                    {
                        "message": "socket.accept() ran out of resources; "
                        f"accepting again in {ACCEPT_RETRY_DELAY} seconds",
                        "exception": exc,
                        "socket": self._sock,
                    }
                )
                self._loop._poller.clear_reader(self._fd, self.accept_ready)
                self._retry = self._loop.call_later(ACCEPT_RETRY_DELAY, self._resume)
                return
            conn.setblocking(False)
            make_transport(server, conn, address)

    def _resume(self) -> None:
        self._retry = None
        if self._server._sockets is not None:
            self.start()
