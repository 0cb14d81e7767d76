"""The loop as each of its parts sees it: the scheduling core plus the I/O layer's seam, typed.

A forkloop event loop is one class assembled from parts. The scheduling core
(`reactor.loop.LoopCore`) is shared by both loops. Four parts are shared too:
`reactor.readiness.ReadinessOperations` (fd callbacks, ``sock_*``),
`reactor.networking.Networking` (``create_*`` for streams, TLS),
`reactor.datagrams.Datagrams` (datagram endpoints) and
`reactor.subprocesses.Subprocesses` (children and pipes). What differs is the
I/O layer, the concrete class that mixes them: `reactor.eventloop.EventLoop`
on epoll, `proactor.loop.EventLoop` on completions.

Each part subclasses `LoopPart`, which names everything a part may rely on:

* the scheduling core, all of it: the asyncio API that is not I/O
  (``call_soon``, ``create_future``, ``run_in_executor``, the exception
  handler, ``_check_closed``, name resolution with ``_resolve_address``);
* ``_poller``: a `reactor.poller.Poller`, through which every readiness watch
  goes (epoll in the reactor; one-shot polls on the engine in the proactor,
  `proactor.readiness.PollWatches`);
* ``_transports``: the open transport of each fd, so that ``add_reader`` can
  refuse an fd that a transport owns;
* three methods of the I/O layer: ``_make_socket_transport`` (a stream
  transport on a connected socket), and ``_start_listening`` and
  ``_stop_listening`` (the acceptor behind a listening socket of a `Server`).

Invariants
----------
* The I/O layer sets ``_poller`` and ``_transports`` before it calls
  ``LoopCore.__init__``, which already registers the wakeup socket.
* A part reaches another part only through the asyncio API
  (``sock_connect``, ``connect_read_pipe``); the acceptors of the I/O layer
  hand accepted sockets to ``Networking._accept_connection``.
* The declarations here cost nothing at run time: they are annotations and
  three methods that the I/O layer overrides, found by the usual attribute
  lookup, no indirection on a hot path.
"""

from __future__ import annotations

import asyncio
import socket
from typing import TYPE_CHECKING, Any

from .loop import LoopCore
from .poller import Poller
from .transport_base import TransportBase

if TYPE_CHECKING:
    from .servers import Server

# A socket address as the socket module hands one out: (host, port) or (host,
# port, flowinfo, scope_id) for IP, a path (str or bytes) for Unix. Its shape
# depends on the socket's family, so it is Any, as typeshed has it.
SocketAddress = Any


class LoopPart(LoopCore):
    """The loop a part is mixed into: `LoopCore`, a poller, transports by fd, listeners."""

    _poller: Poller
    _transports: dict[int, TransportBase]

    def _make_socket_transport(
        self,
        sock: socket.socket,
        protocol: asyncio.BaseProtocol,
        waiter: asyncio.Future[None] | None = None,
        extra: dict[str, Any] | None = None,
        server: Server | None = None,
    ) -> asyncio.Transport:
        """A stream transport on the connected ``sock``; it starts with ``connection_made``."""
        raise NotImplementedError

    def _start_listening(self, server: Server, sock: socket.socket, backlog: int) -> None:
        """Listen on ``sock`` and hand each connection to ``server`` (`_accept_connection`)."""
        raise NotImplementedError

    def _stop_listening(self, sock: socket.socket) -> None:
        """Stop accepting on ``sock`` and close it."""
        raise NotImplementedError
