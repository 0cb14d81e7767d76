"""Socket transports: stream sockets (TCP and Unix) and datagram sockets (UDP, Unix).

A transport owns one non-blocking socket and hands its events to one protocol.
The poller calls the transport's bound methods directly: ``_read_ready`` when
the socket is readable and ``_write_ready`` when it is writable and the
transport has something buffered.

Life of a stream transport
--------------------------
1. Construction registers the transport under its fd (so ``add_reader`` on the
   same fd is refused) and queues ``_start`` with ``call_soon``.
2. ``_start`` calls ``protocol.connection_made(transport)``, then starts
   reading unless the protocol paused reading or closed the transport in
   ``connection_made``, then resolves the creator's waiter. The protocol never
   sees data before ``connection_made``.
3. Reading: one read of the fd (or ``recv_into`` the protocol's buffer, for a
   `asyncio.BufferedProtocol`), then ``data_received`` / ``buffer_updated``
   inside the same poll dispatch. Reads start small and grow after a full one
   (see SMALL_READ_SIZE). An empty read means the peer finished
   sending: ``eof_received()`` is called, and unless it returns a true value
   the transport closes itself. If it does, reading stops and writing goes on
   (a half-closed connection).
4. Writing: ``write()`` sends at once when nothing is buffered; only what the
   kernel did not take is buffered, and only then is the fd registered for
   writability. ``_write_ready`` drains the buffer and unregisters when it is
   empty. When the buffer passes the high-water mark the protocol's
   ``pause_writing()`` is called; when it falls to the low-water mark,
   ``resume_writing()``.
5. Closing: ``close()`` stops reading at once and lets the buffer drain;
   ``abort()`` drops the buffer. Either way ``connection_lost(exc)`` is called
   exactly once, through ``call_soon`` (or directly from ``_write_ready`` when a
   graceful close finishes draining), with None for a local close or a clean
   EOF and the socket error otherwise. The socket is unregistered before it is
   closed, and it is closed only after ``connection_lost`` returned.

A stream transport reads and writes with ``os.read``/``os.write`` on the fd
number, not ``socket.recv``/``send``: those parse their arguments the old way,
into a tuple per call, which costs a noticeable share of a small request (the
README's "Where the reactor's time goes" has the count). An fd number is only
safe while its socket is open, so: the socket is closed only after the
transport unregistered its reader and writer and refuses further writes
(``_call_connection_lost``, which also sets ``_fd`` to -1: a closed transport
holds no fd number that could be reused under it), and
``get_extra_info("socket")`` is an `asyncio.trsock.TransportSocket`, as on
stock asyncio, which has no ``close()``.

Reading paused and resumed, closing, aborting and ``write_eof`` follow
`reactor.transport_base.SocketTransportBase` and `StreamTransportBase`, which
the proactor's stream transport shares; this module says what they mean on the
poller (`_ReadinessSocketTransport`).

Errors: an `OSError` on the socket ends the connection quietly (the protocol
learns it from ``connection_lost``); any other exception, typically raised by
the protocol's own callbacks, also goes to the loop's exception handler.
"""

from __future__ import annotations

import asyncio
import collections
import socket
import warnings
from asyncio.trsock import TransportSocket
from collections.abc import Callable
from os import read as read_fd
from os import write as write_fd
from typing import TYPE_CHECKING, Any

from .loop import logger
from .loop_part import LoopPart, SocketAddress
from .transport_base import (
    DEFAULT_HIGH_WATER,
    LOST_WRITE_LOG_THRESHOLD,
    SocketTransportBase,
    StreamTransportBase,
)

if TYPE_CHECKING:
    from .servers import Server

# Bytes asked of the kernel per stream read. A read of n bytes allocates n bytes
# and shrinks them to what arrived. Up to SMALL_READ_SIZE the bytes object comes
# from Python's small-object allocator; anything larger comes from malloc, which
# for a small request costs about as much as parsing it (the README has the
# instruction counts). So a stream transport reads small until a read comes back
# full, then reads MAX_READ_SIZE at a time until SHRINK_AFTER reads in a row
# would have fit in a small one (the way Netty's adaptive receive buffers size
# themselves). MAX_READ_SIZE stays below glibc's mmap threshold, so a large read
# costs no mmap/munmap pair.
SMALL_READ_SIZE = 512 - 33  # 512 bytes with the bytes object's own header
MAX_READ_SIZE = 64 * 1024
SHRINK_AFTER = 4
# The largest datagram received whole; read into a buffer kept per endpoint.
MAX_DATAGRAM_SIZE = 256 * 1024

_STREAM_NODELAY_FAMILIES = (socket.AF_INET, socket.AF_INET6)


def _as_byte_view(data: object) -> bytes | memoryview:
    """Check that ``data`` is bytes-like and view it as bytes, so len() counts bytes."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        view = memoryview(data)
        return view if view.format == "B" and view.ndim == 1 else view.cast("B")
    raise TypeError(f"data argument must be a bytes-like object, not {type(data).__name__!r}")


class _ReadinessSocketTransport(SocketTransportBase):
    """What stream and datagram transports share on the poller: the fd, its reader, its end."""

    _loop: LoopPart
    # The reader the poller calls: a bound method chosen for the protocol's kind.
    _read_ready: Callable[[], None]

    def _setup(
        self,
        loop: LoopPart,
        sock: socket.socket,
        protocol: asyncio.BaseProtocol,
        extra: dict[str, Any] | None,
        server: Server | None,
    ) -> None:
        self._loop = loop
        self._poller = loop._poller
        self._sock = sock
        self._fd = sock.fileno()  # -1 once the socket is closed (_call_connection_lost)
        # As in asyncio: the socket, minus close() and the other calls that would
        # pull it from under the transport (which reads and writes its fd number).
        shown = TransportSocket(sock)
        self._extra = {"socket": shown} if extra is None else {"socket": shown, **extra}
        self._protocol = protocol
        self._protocol_connected = False
        self._closing = False
        self._reading_paused = False
        self._conn_lost = 0
        self._protocol_paused = False
        self._high_water = DEFAULT_HIGH_WATER
        self._low_water = DEFAULT_HIGH_WATER // 4
        self._server = server
        if server is not None:
            server._attach(self)
        loop._transports[self._fd] = self

    def __repr__(self) -> str:
        if self._fd < 0:
            state = "closed"
        elif self._closing:
            state = "closing"
        else:
            state = f"fd={self._fd}"
        return f"<{type(self).__name__} {state} buffered={self.get_write_buffer_size()}>"

    def __del__(self, _warn: Callable[..., None] = warnings.warn) -> None:
        if getattr(self, "_fd", -1) >= 0:
            _warn(f"unclosed transport {self!r}", ResourceWarning, source=self)
            self._sock.close()

    def _wants_reading(self) -> bool:
        return True

    def _start_reading(self) -> None:
        if not self._closing and not self._reading_paused:
            self._poller.set_reader(self._fd, self._read_ready)

    # what reading and writing mean on the poller (see SocketTransportBase) ---------

    def _stop_receiving(self) -> None:
        self._poller.clear_reader(self._fd)

    def _restart_receiving(self) -> None:
        if self._wants_reading():
            self._poller.set_reader(self._fd, self._read_ready)

    def _writes_in_progress(self) -> bool:
        return self.get_write_buffer_size() > 0

    def _abandon_writes(self) -> None:
        if self.get_write_buffer_size():
            self._clear_write_buffer()
            self._poller.clear_writer(self._fd)

    def _clear_write_buffer(self) -> None:
        raise NotImplementedError  # stream and datagram buffers differ

    def _call_connection_lost(self, exc: BaseException | None) -> None:
        fd = self._fd
        if fd < 0:
            return
        self._conn_lost = self._conn_lost or 1  # later writes are dropped, not attempted
        try:
            if self._protocol_connected:
                self._protocol.connection_lost(exc)
        finally:
            self._poller.clear_reader(fd)
            self._poller.clear_writer(fd)
            if self._loop._transports.get(fd) is self:
                del self._loop._transports[fd]
            self._fd = -1
            self._sock.close()
            self._protocol = None
            server, self._server = self._server, None
            if server is not None:
                server._detach(self)


class SocketTransport(_ReadinessSocketTransport, StreamTransportBase, asyncio.Transport):
    """A connected stream socket (TCP or Unix) driving a Protocol or BufferedProtocol."""

    _start_tls_compatible = True  # loop.start_tls() may layer TLS over it

    def __init__(
        self,
        loop: LoopPart,
        sock: socket.socket,
        protocol: asyncio.BaseProtocol,
        waiter: asyncio.Future[None] | None = None,
        extra: dict[str, Any] | None = None,
        server: Server | None = None,
    ) -> None:
        self._setup(loop, sock, protocol, extra, server)
        self._buffer = bytearray()
        self._eof_written = False
        self._eof_received = False
        # Reading small, a read of _resize_from bytes (a full one) goes to
        # _resize_reads; reading large, every read does (_resize_from is 0).
        self._read_size = SMALL_READ_SIZE
        self._resize_from = SMALL_READ_SIZE
        self._small_reads = 0
        self._drain_waiters = []
        self._choose_reader(protocol)
        if sock.family in _STREAM_NODELAY_FAMILIES:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        loop.call_soon(self._start, waiter)

    def _choose_reader(self, protocol: asyncio.BaseProtocol) -> None:
        if isinstance(protocol, asyncio.BufferedProtocol):
            self._read_ready = self._read_into_protocol_buffer
        else:
            self._read_ready = self._read_bytes

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol
        self._protocol_connected = True
        self._choose_reader(protocol)
        if self._poller.reader_of(self._fd) is not None:
            self._poller.set_reader(self._fd, self._read_ready)

    def _wants_reading(self) -> bool:
        return not self._eof_received

    # reading -------------------------------------------------------------------

    def _read_bytes(self) -> None:
        try:
            data = read_fd(self._fd, self._read_size)
        except (BlockingIOError, InterruptedError):
            return
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._fatal_error(exc, "Fatal read error on socket transport")
            return
        if not data:
            self._read_eof()
            return
        if len(data) >= self._resize_from:
            self._resize_reads(len(data))
        try:
            self._protocol.data_received(data)
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._fatal_error(exc, "Fatal error: protocol.data_received() call failed.")

    def _resize_reads(self, received: int) -> None:
        """Read large after a full small read, small again after SHRINK_AFTER small reads in a row."""
        if received >= SMALL_READ_SIZE:
            self._read_size = MAX_READ_SIZE
            self._resize_from = 0
            self._small_reads = 0
            return
        self._small_reads += 1
        if self._small_reads == SHRINK_AFTER:
            self._read_size = self._resize_from = SMALL_READ_SIZE
            self._small_reads = 0

    def _read_into_protocol_buffer(self) -> None:
        protocol = self._protocol
        try:
            buffer = protocol.get_buffer(-1)
            if not len(buffer):
                raise RuntimeError("get_buffer() returned an empty buffer")
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._fatal_error(exc, "Fatal error: protocol.get_buffer() call failed.")
            return
        try:
            nbytes = self._sock.recv_into(buffer)
        except (BlockingIOError, InterruptedError):
            return
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._fatal_error(exc, "Fatal read error on socket transport")
            return
        if not nbytes:
            self._read_eof()
            return
        try:
            protocol.buffer_updated(nbytes)
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._fatal_error(exc, "Fatal error: protocol.buffer_updated() call failed.")

    def _read_eof(self) -> None:
        self._eof_received = True
        self._poller.clear_reader(self._fd)
        self._eof_to_protocol()

    # writing -------------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if type(data) is not bytes:
            data = _as_byte_view(data)
        if self._eof_written:
            raise RuntimeError("Cannot call write() after write_eof()")
        if self._conn_lost:
            if self._conn_lost >= LOST_WRITE_LOG_THRESHOLD:
                logger.warning("socket.send() raised exception.")
            self._conn_lost += 1
            return
        buffer = self._buffer
        if not buffer:
            try:
                sent = write_fd(self._fd, data)  # an empty write costs one cheap syscall
            except (BlockingIOError, InterruptedError):
                sent = 0
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as exc:
                self._fatal_error(exc, "Fatal write error on socket transport")
                return
            if sent == len(data):
                return
            if sent:
                data = memoryview(data)[sent:]
            self._poller.set_writer(self._fd, self._write_ready)
        buffer += data
        if len(buffer) > self._high_water:
            self._maybe_pause_protocol()

    def _write_ready(self) -> None:
        buffer = self._buffer
        if buffer:
            try:
                sent = write_fd(self._fd, buffer)
            except (BlockingIOError, InterruptedError):
                return
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as exc:
                self._poller.clear_writer(self._fd)
                buffer.clear()
                self._fatal_error(exc, "Fatal write error on socket transport")
                return
            del buffer[:sent]
            self._maybe_resume_protocol()  # the protocol may write more right here
            if buffer:
                return
        self._poller.clear_writer(self._fd)
        self._wake_drain_waiters()
        if self._closing:
            self._call_connection_lost(None)
        elif self._eof_written:
            self._shutdown_write()

    def get_write_buffer_size(self) -> int:
        return len(self._buffer)

    def _clear_write_buffer(self) -> None:
        self._buffer.clear()
        self._wake_drain_waiters()

    def _call_connection_lost(self, exc: BaseException | None) -> None:
        self._wake_drain_waiters()
        super()._call_connection_lost(exc)


class DatagramTransport(_ReadinessSocketTransport, asyncio.DatagramTransport):
    """A datagram socket, connected (``remote_addr``) or not, driving a DatagramProtocol."""

    def __init__(
        self,
        loop: LoopPart,
        sock: socket.socket,
        protocol: asyncio.BaseProtocol,
        address: SocketAddress = None,
        waiter: asyncio.Future[None] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        self._setup(loop, sock, protocol, extra, None)
        self._address = address
        self._buffer: collections.deque[tuple[bytes, SocketAddress]] = collections.deque()
        self._buffer_size = 0
        self._receive_buffer = memoryview(bytearray(MAX_DATAGRAM_SIZE))
        loop.call_soon(self._start, waiter)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol
        self._protocol_connected = True

    def get_write_buffer_size(self) -> int:
        return self._buffer_size

    def _clear_write_buffer(self) -> None:
        self._buffer.clear()
        self._buffer_size = 0

    def _read_ready(self) -> None:
        try:
            size, address = self._sock.recvfrom_into(self._receive_buffer)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._protocol.error_received(exc)
            return
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._fatal_error(exc, "Fatal read error on datagram transport")
            return
        self._protocol.datagram_received(self._receive_buffer[:size].tobytes(), address)

    def sendto(self, data: bytes | bytearray | memoryview, addr: SocketAddress = None) -> None:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(
                f"data argument must be a bytes-like object, not {type(data).__name__!r}"
            )
        if self._address is not None:
            if addr not in (None, self._address):
                raise ValueError(f"Invalid address: must be None or {self._address}")
            addr = self._address
        if self._conn_lost:
            if self._conn_lost >= LOST_WRITE_LOG_THRESHOLD:
                logger.warning("socket.sendto() raised exception.")
            self._conn_lost += 1
            return
        if not self._buffer:
            try:
                if self._address is not None:
                    self._sock.send(data)
                else:
                    self._sock.sendto(data, addr)
                return
            except (BlockingIOError, InterruptedError):
                self._poller.set_writer(self._fd, self._write_ready)
            except OSError as exc:
                self._protocol.error_received(exc)
                return
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as exc:
                self._fatal_error(exc, "Fatal write error on datagram transport")
                return
        self._buffer.append((bytes(data), addr))
        self._buffer_size += len(data)
        self._maybe_pause_protocol()

    def _write_ready(self) -> None:
        buffer = self._buffer
        while buffer:
            data, addr = buffer[0]
            try:
                if self._address is not None:
                    self._sock.send(data)
                else:
                    self._sock.sendto(data, addr)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._protocol.error_received(exc)
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as exc:
                self._fatal_error(exc, "Fatal write error on datagram transport")
                return
            buffer.popleft()
            self._buffer_size -= len(data)
        self._maybe_resume_protocol()
        self._poller.clear_writer(self._fd)
        if self._closing:
            self._call_connection_lost(None)
