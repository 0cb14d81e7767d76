"""The reactor: the scheduling core, readiness I/O and the poller, assembled.

`EventLoop` is the class ``reactor.new_event_loop()`` returns. It is made of
parts that each explain themselves, and `reactor.loop_part.LoopPart` names
what the parts rely on from each other and from this class:

* `reactor.loop.LoopCore`: the ready queue, timers, run loop, signals and
  executor. This class fills in the core's I/O seam: ``_poll`` *is* the
  poller's own ``poll`` method, bound once at construction, so an iteration
  pays one call to wait and dispatch.
* `reactor.readiness.ReadinessOperations`: ``add_reader`` and friends and the
  ``sock_*`` coroutines.
* `reactor.networking.Networking`: ``create_connection``, ``create_server``,
  Unix sockets and TLS, which call back into this class for transports
  (`_make_socket_transport`) and for listening (`_start_listening`,
  `_stop_listening`).
* `reactor.datagrams.Datagrams`: ``create_datagram_endpoint``.
* `reactor.subprocesses.Subprocesses`: child processes and pipes; their pipes
  and each child's pidfd are just more fds on the same poller.

Also here: ``loop.sendfile`` over the reactor's own socket transports. It
waits until the transport's write buffer is empty, then sends with
``os.sendfile`` straight on the socket (or by reads, for a file object without
an fd). On any other transport it raises `asyncio.SendfileNotAvailableError`.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import IO, Any

from .datagrams import Datagrams
from .networking import Networking
from .poller import WaitingPoller, new_poller
from .readiness import ReadinessOperations, check_sendfile_params, sendfile_transport
from .servers import Acceptor, Server
from .subprocesses import Subprocesses
from .transports import SocketTransport


class EventLoop(ReadinessOperations, Subprocesses, Networking, Datagrams):
    """forkloop's readiness event loop: epoll (or `selectors`) under the asyncio API."""

    _poller: WaitingPoller

    def __init__(self) -> None:
        self._poller = new_poller(self._report_io_error)
        # The poller's own method, bound once: the core's poll reaches epoll with no
        # frame of this class in between (the method below is what mypy sees).
        self._poll = self._poller.poll  # type: ignore[method-assign]
        self._transports = {}
        self._acceptors: dict[int, Acceptor] = {}
        super().__init__()

    # the core's seam -----------------------------------------------------------

    def _poll(self, timeout: float | None) -> None:  # replaced by the poller's bound method
        self._poller.poll(timeout)

    def _watch_readable(self, fd: int, callback: Callable[[], object]) -> None:
        self._poller.set_reader(fd, callback)

    def _unwatch_readable(self, fd: int) -> None:
        self._poller.clear_reader(fd)

    def _close_io(self) -> None:
        for acceptor in self._acceptors.values():
            acceptor.stop()
        self._acceptors.clear()
        self._close_child_watchers()
        self._poller.close()

    def _report_io_error(self, exc: BaseException, fd: int, callback: Callable[[], object]) -> None:
        self.call_exception_handler(
            {"message": f"Exception in I/O callback {callback!r} for fd {fd}", "exception": exc}
        )

    async def sendfile(
        self,
        transport: asyncio.WriteTransport,
        file: IO[bytes],
        offset: int = 0,
        count: int | None = None,
        *,
        fallback: bool = True,
    ) -> int:
        """Send a file over a stream transport: os.sendfile when it is a plain socket."""
        stream = sendfile_transport(
            transport,
            SocketTransport,
            "the reactor sends files only over its own socket transports",
        )
        sock = stream._sock  # the socket itself, not the TransportSocket users see
        check_sendfile_params(sock, file, offset, count)
        await stream._wait_until_drained()
        try:
            return await self._sendfile_native(sock, file, offset, count)
        except asyncio.SendfileNotAvailableError:
            if not fallback:
                raise
        return await self._sendfile_by_reads(sock, file, offset, count)

    # transports and listeners (used by reactor.networking) --------------------------------

    def _make_socket_transport(
        self,
        sock: socket.socket,
        protocol: asyncio.BaseProtocol,
        waiter: asyncio.Future[None] | None = None,
        extra: dict[str, Any] | None = None,
        server: Server | None = None,
    ) -> SocketTransport:
        return SocketTransport(self, sock, protocol, waiter, extra, server)

    def _start_listening(self, server: Server, sock: socket.socket, backlog: int) -> None:
        sock.listen(backlog)
        acceptor = Acceptor(self, server, sock, backlog)
        self._acceptors[sock.fileno()] = acceptor
        acceptor.start()

    def _stop_listening(self, sock: socket.socket) -> None:
        acceptor = self._acceptors.pop(sock.fileno(), None)
        if acceptor is not None:
            acceptor.stop()
        sock.close()
