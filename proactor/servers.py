"""Accepting on completions: one standing accept per listening socket.

The user-facing `Server` object is the reactor's (`reactor.servers.Server`):
it holds the listening sockets and counts the connections, and calls the
loop's ``_start_listening`` and ``_stop_listening``. Behind each listening
socket the proactor keeps an `Acceptor`, whose accept is a *standing*
operation: armed while the server serves, each completion carrying a new fd,
already non-blocking and close-on-exec. No task, future or ``accept()`` call
is made per connection.

Multishot or single-shot
------------------------
A multishot ACCEPT (5.19) stays armed and posts one completion per
connection. But io_uring waits on a listening socket as an *exclusive*
waiter (``EPOLLEXCLUSIVE``): a new connection wakes only the first waiter in
the socket's queue, and a multishot accept never leaves that queue. When the
workers of a pre-forking server share one listening socket, the first worker
to arm its accept would get every connection. A single-shot accept leaves the
queue when it fires and joins its end again when re-armed, so connections go
round the workers, and a worker busy in Python code (not yet back in its
``io_uring_enter`` to re-arm) is passed over. So on io_uring an acceptor uses
multishot only on a ``SO_REUSEPORT`` socket, which each worker binds for
itself; elsewhere it re-arms a single-shot accept from each completion (which
the kernel first tries at once, so a backlog drains at one connection per
iteration). The emulated engine accepts in bursts on level-triggered epoll and
always uses its multishot form.

What a completion means
-----------------------
* an fd: wrap it in a socket of the listener's family and make a transport.
  The peer address is not part of the completion; a transport looks it up
  (``getpeername``) the first time someone asks for it.
* ``-EMFILE``, ``-ENFILE``, ``-ENOBUFS``, ``-ENOMEM``: out of descriptors or
  memory. The error is reported and accepting resumes after
  `ACCEPT_RETRY_DELAY` seconds; the kernel keeps the backlog meanwhile.
* ``-ECONNABORTED`` and other per-connection errors: that connection is gone,
  accepting goes on.
* ``-ECANCELED``: `stop` cancelled it.

Stopping
--------
``server.close()`` must not leave an accept armed: closing the fd would not
cancel it (the operation holds the open file, so the socket would go on
accepting), and the fd number could be reused under it. `stop` therefore
detaches the Python socket (it reads as closed from then on), cancels the
accept and closes the fd only after the accept's last completion. Connections
the accept took before the cancel reached the kernel are served: they were
accepted, and closing them would reset clients the server had let in.
A listening socket shared with other processes (a pre-forking master's) is
never shut down, only closed here, so the others keep accepting.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
from typing import TYPE_CHECKING

from . import abi
from .transports import ignore_completion

if TYPE_CHECKING:
    from ..reactor.servers import Server
    from .loop import EventLoop

ACCEPT_RETRY_DELAY = 1.0
_RESOURCE_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_MORE = abi.CQE_F_MORE


def _private_to_this_process(sock: socket.socket) -> bool:
    """A SO_REUSEPORT listener: each process binds its own, so no one else waits on it."""
    try:
        return bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT))
    except (AttributeError, OSError):
        return False


class Acceptor:
    """The standing accept on one listening socket."""

    def __init__(self, loop: EventLoop, server: Server, sock: socket.socket) -> None:
        self._loop = loop
        self._server = server
        self._sock = sock
        self._fd = sock.fileno()
        self._family, self._type, self._proto = sock.family, sock.type, sock.proto
        self._multishot = loop._ring.capabilities.multishot_accept and (
            not loop._accept_wakes_one or _private_to_this_process(sock)
        )
        self._user_data = 0
        self._cancelled = False
        self._stopping = False
        self._closed = False
        self._retry: asyncio.TimerHandle | None = None

    def __repr__(self) -> str:
        state = "stopping" if self._stopping else "accepting"
        return f"<{type(self).__name__} fd={self._fd} {state}>"

    def start(self) -> None:
        if not self._user_data and not self._stopping:
            self._arm()

    def _arm(self) -> None:
        loop = self._loop
        user_data = loop._new_user_data()
        loop._ring.prepare_accept(user_data, self._fd, multishot=self._multishot)
        loop._handlers[user_data] = self._on_accepted
        self._user_data = user_data

    def _on_accepted(self, result: int, flags: int) -> None:
        if not flags & _MORE:
            self._user_data = 0
        if result >= 0:
            self._connect(result)
        elif -result in _RESOURCE_ERRORS and not self._stopping:
            self._loop.call_exception_handler(
                {
                    "message": "accept ran out of resources; "
                    f"accepting again in {ACCEPT_RETRY_DELAY} seconds",
                    "exception": OSError(-result, os.strerror(-result)),
                    "socket": self._sock,
                }
            )
            if self._user_data:  # a multishot accept the error did not end
                self._cancel()
            self._retry = self._loop.call_later(ACCEPT_RETRY_DELAY, self._resume)
            return
        if self._user_data:
            return
        if self._stopping:
            self._close_listener()
        elif self._retry is None:
            self._arm()

    def _connect(self, fd: int) -> None:
        try:
            conn = socket.socket(self._family, self._type, self._proto, fileno=fd)
        except OSError:
            os.close(fd)  # not a socket we can use after all: the connection is gone
            return
        self._loop._accept_connection(self._server, conn, None)

    def _resume(self) -> None:
        self._retry = None
        if not self._stopping and not self._user_data:
            self._arm()

    def _cancel(self) -> None:
        if self._user_data and not self._cancelled:
            self._cancelled = True
            self._loop._cancel_operation(self._user_data)

    def stop(self) -> None:
        """Stop accepting and close the listening fd once the accept has ended."""
        if self._stopping:
            return
        self._stopping = True
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        self._sock.detach()  # from now on the fd is this acceptor's to close
        if self._user_data:
            self._cancel()
        else:
            self._close_listener()

    def _close_listener(self) -> None:
        if self._closed:
            return
        self._closed = True
        loop = self._loop
        user_data = loop._new_user_data()
        loop._ring.prepare_close(user_data, self._fd)
        loop._handlers[user_data] = ignore_completion

    def close_at_loop_close(self) -> None:
        """The loop is closing and its engine ended every operation: close the fd if it is ours."""
        if self._stopping and not self._closed:
            self._closed = True
            try:
                os.close(self._fd)
            except OSError:
                pass
