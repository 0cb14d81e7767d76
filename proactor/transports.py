"""Stream transports on completions: a recv is outstanding while the connection reads.

A `StreamTransport` owns one connected stream socket (TCP or Unix) and keeps
at most one receive and at most one send in flight on it. It never asks
whether the socket is ready; it hands operations to the loop's engine and is
called with their completions, ``handler(result, flags)``, from the loop's
dispatch.

Reading
-------
While the transport reads, one receive is armed. With provided buffers (one
group per loop, sized in `proactor.engine`) it is a multishot recv: it stays
armed across completions, each carrying a buffer the kernel filled (or, with
bundles, several in a row), whose bytes are copied out (``consume``) and handed to
``data_received`` (or copied into ``get_buffer()`` for a BufferedProtocol).
The buffer goes back to the kernel in the same breath. The recv ends, and is
re-armed if the transport still reads, when a completion comes without
``IORING_CQE_F_MORE``: ``-ENOBUFS`` (the group ran dry), or a kernel that has
only single-shot recv. Without provided buffers (kernels before 5.19) a
single-shot recv into a 16 KiB buffer of the transport's own is re-armed
after each completion. ``0`` is the end of the stream: ``eof_received()``.

``pause_reading`` cancels the recv; ``resume_reading`` arms a new one once the
old one has ended. A cancel can lose the race: data may complete after it.
Such data is *held*, in arrival order, and delivered after ``resume_reading``
(from a ``call_soon``), before anything newer; nothing is delivered twice or
dropped. Held data also keeps order when a BufferedProtocol pauses in the
middle of a chunk.

Writing
-------
`proactor.sending` (the `Sending` half of this class): at most one send in
flight, short sends resubmitted, bytes in flight counted for flow control.

Closing, and who owns the fd
----------------------------
``close()`` stops reading at once (cancels the recv; data completing after it
is dropped, nobody reads any more) and lets the writes finish; ``abort()``
also cancels the send and drops what was queued. The bookkeeping of pausing,
resuming and closing is `reactor.transport_base.SocketTransportBase`'s, shared
with the reactor's transports; this class says what stopping and restarting
the receive mean on completions (`_stop_receiving`, `_restart_receiving`). ``connection_lost(exc)`` is
called exactly once, from ``call_soon`` (or from the last send's completion
after a graceful close), with None for a local close or a clean end of stream.

The kernel may still hold an operation on the fd after that. So the
transport keeps the fd until its recv and its send have posted their last
completions, and only then *releases* it: it ``detach()``es the Python socket
(so that ``socket.close()`` can never run while an operation is in flight, and
the fd number cannot be reused under one) and queues a CLOSE on the engine.
A loop closed meanwhile closes what is still owed (`release_at_loop_close`).
"""

from __future__ import annotations

import asyncio
import errno
import socket
import warnings
from asyncio.trsock import TransportSocket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..reactor.transport_base import DEFAULT_HIGH_WATER
from . import abi
from .buffers import Pinned
from .engine import BUNDLE_LIMIT
from .sending import NEVER, ZERO_COPY_SEND_FROM, Sending, result_error

if TYPE_CHECKING:
    from ..reactor.servers import Server
    from .loop import EventLoop

# Single-shot receive buffer of a transport, when the kernel has no provided buffers.
OWN_RECEIVE_BUFFER = 16 * 1024

_MORE = abi.CQE_F_MORE
_BUFFER = abi.CQE_F_BUFFER
_ENDED_RECEIVE = frozenset({-errno.ENOBUFS, -errno.ECANCELED, -errno.EINTR, -errno.EAGAIN})
_STREAM_NODELAY_FAMILIES = (socket.AF_INET, socket.AF_INET6)
_EOF = b""


def _no_provided_buffers(cqe_flags: int, length: int) -> bytes:
    """``consume`` of a loop without provided buffers: no completion ever names one."""
    raise RuntimeError(
        f"a completion names a provided buffer (flags {cqe_flags:#x}), but none exist"
    )


def _no_unconfirmed_sends(data: bytes) -> None:
    """``_send_unconfirmed`` of a transport whose engine makes no unconfirmed sends."""
    raise RuntimeError("this engine makes no unconfirmed sends")


class StreamTransport(Sending, asyncio.Transport):
    """A connected stream socket driving a Protocol or BufferedProtocol through completions."""

    _start_tls_compatible = True  # loop.start_tls() may layer TLS over it
    # Slots, not a dict: CPython 3.11 stops specialising attribute access on instances
    # with more than 30 attributes in their dict, and these are read on every completion.
    __slots__ = (
        *("_loop", "_ring", "_handlers", "_new_user_data", "_buffers", "_consume"),
        *("_multishot", "_bundles", "_sock", "_fd", "_protocol", "_protocol_connected"),
        *("_buffered_protocol", "_server", "_recv_user_data", "_recv_cancelled"),
        *("_own_buffer", "_reading_paused", "_eof", "_held", "_flush_scheduled"),
        *("_send_user_data", "_sent_handler", "_sending", "_send_remaining"),
        *("_unconfirmed", "_unconfirmed_at", "_unconfirmed_user_data", "_unconfirmed_handler"),
        "_send_unconfirmed",
        *("_awaiting_confirmation", "_zero_copy_from"),
        *("_pending", "_pending_size", "_write_abandoned", "_eof_written", "_drain_waiters"),
        *("_high_water", "_low_water", "_protocol_paused", "_closing", "_conn_lost"),
        *("_lost_called", "_released", "__weakref__"),
    )

    def __init__(
        self,
        loop: EventLoop,
        sock: socket.socket,
        protocol: asyncio.BaseProtocol,
        waiter: asyncio.Future[None] | None = None,
        extra: dict[str, Any] | None = None,
        server: Server | None = None,
    ) -> None:
        super().__init__(extra)
        self._loop = loop
        self._ring = loop._ring
        self._handlers = loop._handlers
        self._new_user_data = loop._new_user_data
        self._buffers = loop._receive_buffers
        self._consume: Callable[[int, int], bytes] = (
            _no_provided_buffers if self._buffers is None else self._buffers.consume
        )
        self._multishot = loop._multishot_recv
        self._bundles = loop._receive_bundles
        self._sock = sock
        self._fd = sock.fileno()
        shown = TransportSocket(sock)  # as in asyncio: no close() under the ring's feet
        self._extra = {"socket": shown} if extra is None else {"socket": shown, **extra}
        self._protocol = protocol
        self._protocol_connected = False
        self._buffered_protocol = isinstance(protocol, asyncio.BufferedProtocol)
        self._server = server
        # reading
        self._recv_user_data = 0
        self._recv_cancelled = False
        self._own_buffer: Pinned | None = None
        self._reading_paused = False
        self._eof = False  # the peer's end of stream arrived (it may still be held)
        self._held: list[bytes] = []
        self._flush_scheduled = False
        # writing
        self._send_user_data = 0
        self._sent_handler = self._on_sent  # bound once: one handler per send
        self._sending = b""
        self._send_remaining = 0  # bytes of _sending not yet sent
        self._unconfirmed = b""
        self._unconfirmed_at = -1
        self._unconfirmed_user_data = 0
        self._unconfirmed_handler = self._on_unconfirmed_failed
        self._awaiting_confirmation = False
        self._zero_copy_from = (
            ZERO_COPY_SEND_FROM if loop._ring.capabilities.zero_copy_send else NEVER
        )
        self._send_unconfirmed = _no_unconfirmed_sends
        if loop._unconfirmed_sends:
            self._unconfirmed_user_data = user_data = loop._new_unconfirmed_user_data()
            self._handlers[user_data] = self._unconfirmed_handler
            self._send_unconfirmed = loop._ring.unconfirmed_sender(user_data, self._fd)
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._write_abandoned = False
        self._eof_written = False
        self._drain_waiters = []
        self._high_water = DEFAULT_HIGH_WATER
        self._low_water = DEFAULT_HIGH_WATER // 4
        self._protocol_paused = False
        # closing
        self._closing = False
        self._conn_lost = 0
        self._lost_called = False
        self._released = False
        if server is not None:
            server._attach(self)
        loop._transports[self._fd] = self
        if sock.family in _STREAM_NODELAY_FAMILIES:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        loop.call_soon(self._start, waiter)

    def __repr__(self) -> str:
        if self._released:
            state = "closed"
        elif self._closing:
            state = "closing"
        else:
            state = f"fd={self._fd}"
        return f"<{type(self).__name__} {state} buffered={self.get_write_buffer_size()}>"

    def __del__(self, _warn: Callable[..., None] = warnings.warn) -> None:
        sock = getattr(self, "_sock", None)
        if sock is not None and not getattr(self, "_released", True) and sock.fileno() >= 0:
            _warn(f"unclosed transport {self!r}", ResourceWarning, source=self)
            sock.close()  # no operation is in flight: each would keep this object alive

    # the asyncio.BaseTransport interface ----------------------------------------

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol
        self._protocol_connected = True
        self._buffered_protocol = isinstance(protocol, asyncio.BufferedProtocol)

    def _start_reading(self) -> None:
        if self._wants_receive():
            self._arm_receive()

    # reading --------------------------------------------------------------------

    def _stop_receiving(self) -> None:
        """Paused: cancel the recv; what completes meanwhile is held. Closing: drop it too."""
        if self._closing:
            self._held.clear()  # nobody reads any more
        self._cancel_receive()

    def _restart_receiving(self) -> None:
        """Resumed: deliver what was held (from call_soon), else arm a recv."""
        if self._held:
            if not self._flush_scheduled:
                self._flush_scheduled = True
                self._loop.call_soon(self._flush_held)
        elif self._wants_receive():
            self._arm_receive()

    def _wants_receive(self) -> bool:
        return (
            not self._recv_user_data
            and not self._reading_paused
            and not self._closing
            and not self._eof
            and not self._held
            and self._protocol_connected
        )

    def _arm_receive(self) -> None:
        user_data = self._new_user_data()
        buffers = self._buffers
        if buffers is not None:
            self._ring.prepare_recv_provided(
                user_data,
                self._fd,
                buffers.group_id,
                multishot=self._multishot,
                bundle=self._bundles,
                length=BUNDLE_LIMIT if self._bundles else 0,
            )
        else:
            if self._own_buffer is None:
                self._own_buffer = Pinned(bytearray(OWN_RECEIVE_BUFFER))
            self._ring.prepare_recv(user_data, self._fd, self._own_buffer)
        self._handlers[user_data] = self._on_received
        self._recv_user_data = user_data

    def _cancel_receive(self) -> None:
        if self._recv_user_data and not self._recv_cancelled:
            self._recv_cancelled = True
            self._loop._cancel_operation(self._recv_user_data)

    def _on_received(self, result: int, flags: int) -> None:
        if flags & _MORE:
            # The common case: a chunk from a multishot recv that stays armed.
            data = self._consume(flags, result)
            if self._closing:
                return
            if self._reading_paused or self._held:
                self._held.append(data)
            elif self._buffered_protocol:
                self._deliver_into_buffer(data)
            else:
                try:
                    self._protocol.data_received(data)
                except (SystemExit, KeyboardInterrupt):
                    raise
                except BaseException as exc:
                    self._fatal_error(exc, "Fatal error: protocol.data_received() call failed.")
            return
        self._receive_ended(result, flags)

    def _receive_ended(self, result: int, flags: int) -> None:
        """The last completion of a recv: data or not, the recv is over."""
        self._recv_user_data = 0
        self._recv_cancelled = False
        data: bytes | bytearray | memoryview
        if flags & _BUFFER:
            data = self._consume(flags, result)
        elif result > 0:
            # A single-shot recv completed into the buffer _arm_receive pinned for it.
            data = self._own_buffer.buffer[:result]  # type: ignore[union-attr]
        elif result == 0:
            data = _EOF
        elif result in _ENDED_RECEIVE:
            if self._wants_receive():
                self._arm_receive()
            elif self._lost_called:
                self._release()
            return
        else:
            if not self._closing:
                self._fatal_error(result_error(result), "Fatal read error on socket transport")
            elif self._lost_called:
                self._release()
            return
        if self._closing:
            if self._lost_called and not self._recv_user_data:
                self._release()
            return  # nobody reads any more: close() or abort() was called
        if not data:
            self._eof = True
        if self._reading_paused or self._held:
            self._held.append(bytes(data))
            return
        if data:
            self._deliver(data)
        else:
            self._eof_to_protocol()
            return
        if self._wants_receive():
            self._arm_receive()

    def _deliver(self, data: bytes | bytearray | memoryview) -> None:
        if self._buffered_protocol:
            self._deliver_into_buffer(data)
            return
        try:
            self._protocol.data_received(data if type(data) is bytes else bytes(data))
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._fatal_error(exc, "Fatal error: protocol.data_received() call failed.")

    def _deliver_into_buffer(self, data: bytes | bytearray | memoryview) -> None:
        """Copy ``data`` into the BufferedProtocol's buffers, as many as it takes."""
        view = memoryview(data)
        offset, size = 0, len(view)
        while offset < size:
            protocol = self._protocol
            try:
                buffer = protocol.get_buffer(size - offset)
                count = min(len(buffer), size - offset)
                if not count:
                    raise RuntimeError("get_buffer() returned an empty buffer")
                buffer[:count] = view[offset : offset + count]
                offset += count
                protocol.buffer_updated(count)
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as exc:
                self._fatal_error(exc, "Fatal error: protocol.buffer_updated() call failed.")
                return
            if self._closing:
                return
            if self._reading_paused and offset < size:
                self._held.insert(0, bytes(view[offset:]))  # before anything held already
                return

    def _flush_held(self) -> None:
        """After resume_reading: deliver what completed while paused, then read on."""
        self._flush_scheduled = False
        held = self._held
        while held and not self._reading_paused and not self._closing:
            data = held.pop(0)
            if not data:
                self._eof_to_protocol()
                return
            self._deliver(data)
        if self._wants_receive():
            self._arm_receive()

    # closing (close() and abort() are SocketTransportBase's) ------------------------

    def _call_connection_lost(self, exc: BaseException | None) -> None:
        if self._lost_called:
            return
        self._lost_called = True
        try:
            if self._protocol_connected:
                self._protocol.connection_lost(exc)
        finally:
            self._protocol = None
            self._wake_drain_waiters()
            server, self._server = self._server, None
            if server is not None:
                server._detach(self)
            self._release()

    def _release(self) -> None:
        """Once no operation is in flight on the fd: detach the socket and close the fd."""
        if self._released or not self._lost_called:
            return
        if self._recv_user_data:
            self._cancel_receive()
            return
        if self._send_user_data:
            return  # abandoned and cancelled; its completion calls back here
        if self._unconfirmed_outstanding():
            self._await_confirmation()  # its completion may still come: _confirmed calls back
            return
        self._released = True
        if self._unconfirmed_user_data:
            self._handlers.pop(self._unconfirmed_user_data, None)
        self._own_buffer = None
        fd = self._sock.detach()
        loop = self._loop
        if loop._transports.get(fd) is self:
            del loop._transports[fd]
        user_data = self._new_user_data()
        self._ring.prepare_close(user_data, fd)
        self._handlers[user_data] = ignore_completion

    def release_at_loop_close(self) -> None:
        """The loop is closing and its engine has ended every operation: close what is owed."""
        if not self._released and self._conn_lost:
            self._released = True
            self._sock.close()


def ignore_completion(result: int, flags: int) -> None:
    """The completion of an operation nobody waits for (a close, a cancel)."""
