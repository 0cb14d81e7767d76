"""What every forkloop transport shows its protocol, whatever drives its I/O.

How a transport moves bytes is its loop's business: readiness callbacks in the
reactor, completions in the proactor, ``os.read``/``os.write`` on pipes. What
the protocol sees of it is the same everywhere, so it is written once here.

`TransportBase`, mixed into the reactor's socket and pipe transports and the
proactor's stream transport:

* write-buffer limits, and ``pause_writing()`` / ``resume_writing()`` called
  on the protocol when the buffer passes the high-water mark and when it falls
  back to the low-water mark (each call made once per crossing);
* errors: an `OSError` on the socket ends the connection quietly (the
  protocol learns of it from ``connection_lost``); any other exception, raised
  by the protocol's own callbacks, also goes to the loop's exception handler;
* ``_start``: ``connection_made``, then reading, then the creator's waiter;
* ``get_extra_info`` with ``socket`` and a lazily read ``sockname`` and
  ``peername``; the waiters of ``loop.sendfile`` for an empty buffer.

`SocketTransportBase`, for a transport on one socket (the reactor's stream and
datagram transports, the proactor's stream transport): reading paused and
resumed, closing and aborting. Its state is three fields, and each moves one
way only while the connection lives:

* ``_reading_paused``: the protocol asked for no data (``pause_reading``)
  and has not yet asked for it again;
* ``_closing``: ``close()`` or ``abort()`` was called; no reading from then
  on, ever, and reading can no longer be paused or resumed;
* ``_conn_lost``: ``connection_lost`` is on its way (it is called exactly
  once, through ``call_soon``, or straight from the completion of the last
  write of a graceful close); later writes are counted and dropped.

``close()`` lets what was written go out first; ``abort()`` drops it. What
"reading" and "writing" mean is the loop's, said in four methods:
``_stop_receiving`` (reading paused or closed), ``_restart_receiving``
(reading resumed), ``_writes_in_progress`` (written bytes not yet handed to
the kernel) and ``_abandon_writes`` (abort: drop them).

`StreamTransportBase` adds the stream half of the asyncio API on top:
``write_eof`` (a half close once everything written before it went out),
``can_write_eof``, ``writelines``, the peer's end of stream told to the
protocol, and the drain wait of ``loop.sendfile``.

`wait_until_started` is how the ``create_*`` and ``connect_*`` coroutines wait
for a new transport's ``connection_made``, and close it if that fails.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from .loop import logger

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

    from .loop_part import LoopPart

# A transport's protocol: of the kind the transport was built for (Protocol,
# BufferedProtocol, DatagramProtocol, SubprocessProtocol), and None once
# connection_lost was called. Any, because what makes each call safe (the kind
# was settled once, when the transport chose its reader; nothing calls the
# protocol after connection_lost) is an invariant of the transport that mypy
# cannot follow, and a check per call would sit on the hot path.
AttachedProtocol = Any

DEFAULT_HIGH_WATER = 64 * 1024
# Writes to a lost connection are dropped silently up to this count, then logged.
LOST_WRITE_LOG_THRESHOLD = 5


async def wait_until_started(
    transport: asyncio.BaseTransport, waiter: asyncio.Future[None]
) -> None:
    """Wait for a new transport's ``_start`` (its waiter); close it if that fails or is cancelled."""
    try:
        await waiter
    except BaseException:
        transport.close()
        raise


class TransportBase:
    """Flow control, error reporting and extra info; see the module's docstring."""

    # The proactor's transport has slots and the concrete class lists them. (Hidden
    # from mypy, which would hold this mixin's own assignments against the empty list.)
    if not TYPE_CHECKING:
        __slots__ = ()
    _loop: LoopPart
    _sock: socket.socket
    _extra: dict[str, Any]
    _protocol: AttachedProtocol
    _closing: bool
    _high_water: int
    _low_water: int
    _protocol_paused: bool
    _drain_waiters: list[asyncio.Future[None]]
    _protocol_connected: bool

    def get_write_buffer_size(self) -> int:
        raise NotImplementedError  # the concrete transport's

    def _force_close(self, exc: BaseException | None) -> None:
        raise NotImplementedError  # the concrete transport's: close at once, buffer dropped

    def _start_reading(self) -> None:
        raise NotImplementedError  # the concrete transport's: read unless paused or closed

    def _start(self, waiter: asyncio.Future[None] | None) -> None:
        """Queued by the constructor: connection_made, then reading, then the creator's waiter.

        The protocol never sees data before ``connection_made``; a protocol that
        paused reading or closed the transport in it gets no read started."""
        try:
            self._protocol.connection_made(self)
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._fatal_error(exc, "Fatal error: protocol.connection_made() call failed.")
            if waiter is not None and not waiter.done():
                waiter.set_exception(exc)
            return
        self._protocol_connected = True
        self._start_reading()
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        extra = self._extra
        if name in extra:
            return extra[name]
        if name in ("sockname", "peername"):
            try:  # a closed or detached socket raises: the default
                value = self._sock.getsockname() if name == "sockname" else self._sock.getpeername()
            except OSError:
                return default
            extra[name] = value
            return value
        return default

    def get_protocol(self) -> AttachedProtocol:
        return self._protocol

    def is_closing(self) -> bool:
        return self._closing

    # flow control ------------------------------------------------------------

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return (self._low_water, self._high_water)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if high is None:
            high = DEFAULT_HIGH_WATER if low is None else 4 * low
        if low is None:
            low = high // 4
        if not high >= low >= 0:
            raise ValueError(f"high ({high!r}) must be >= low ({low!r}) must be >= 0")
        self._high_water = high
        self._low_water = low
        self._maybe_pause_protocol()

    def _maybe_pause_protocol(self) -> None:
        if self._protocol_paused or self.get_write_buffer_size() <= self._high_water:
            return
        protocol = self._protocol
        if protocol is None:
            return  # connection_lost was called: nobody to tell
        self._protocol_paused = True
        try:
            protocol.pause_writing()
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._report("protocol.pause_writing() failed", exc)

    def _maybe_resume_protocol(self) -> None:
        if not self._protocol_paused or self.get_write_buffer_size() > self._low_water:
            return
        protocol = self._protocol
        if protocol is None:
            return
        self._protocol_paused = False
        try:
            protocol.resume_writing()
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._report("protocol.resume_writing() failed", exc)

    def _wake_drain_waiters(self) -> None:
        if self._drain_waiters:
            waiters, self._drain_waiters = self._drain_waiters, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    # errors ------------------------------------------------------------------

    def _fatal_error(self, exc: BaseException, message: str) -> None:
        if isinstance(exc, OSError):
            if self._loop.get_debug():
                logger.debug("%r: %s", self, message, exc_info=True)
        else:
            self._report(message, exc)
        self._force_close(exc)

    def _report(self, message: str, exc: BaseException) -> None:
        self._loop.call_exception_handler(
            {"message": message, "exception": exc, "transport": self, "protocol": self._protocol}
        )


class SocketTransportBase(TransportBase):
    """Reading paused and resumed, closing and aborting, on one socket; see the module's docstring."""

    if not TYPE_CHECKING:
        __slots__ = ()
    _reading_paused: bool
    _conn_lost: int

    # what reading and writing mean: the concrete transport's --------------------

    def _stop_receiving(self) -> None:
        """Reading was paused or the transport is closing: stop taking data from the socket."""
        raise NotImplementedError

    def _restart_receiving(self) -> None:
        """Reading was resumed (the protocol is connected): take data from the socket again."""
        raise NotImplementedError

    def _writes_in_progress(self) -> bool:
        """Bytes were written that have not all been handed to the kernel yet."""
        raise NotImplementedError

    def _abandon_writes(self) -> None:
        """``abort()``: drop what was written and not yet handed over; stop sending."""
        raise NotImplementedError

    def _call_connection_lost(self, exc: BaseException | None) -> None:
        raise NotImplementedError

    # reading --------------------------------------------------------------------

    def is_reading(self) -> bool:
        return not self._reading_paused and not self._closing

    def pause_reading(self) -> None:
        if self._closing or self._reading_paused:
            return
        self._reading_paused = True
        self._stop_receiving()

    def resume_reading(self) -> None:
        if self._closing or not self._reading_paused:
            return
        self._reading_paused = False
        if self._protocol_connected:
            self._restart_receiving()

    # closing --------------------------------------------------------------------

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._stop_receiving()
        if not self._writes_in_progress():
            self._conn_lost += 1
            self._loop.call_soon(self._call_connection_lost, None)

    def abort(self) -> None:
        self._force_close(None)

    def _force_close(self, exc: BaseException | None) -> None:
        if self._conn_lost:
            return
        self._abandon_writes()
        if not self._closing:
            self._closing = True
            self._stop_receiving()
        self._conn_lost += 1
        self._loop.call_soon(self._call_connection_lost, exc)


class StreamTransportBase(SocketTransportBase):
    """``write_eof`` and the rest of the stream half of the API; see the module's docstring."""

    if not TYPE_CHECKING:
        __slots__ = ()
    _eof_written: bool

    def write(self, data: bytes | bytearray | memoryview) -> None:
        raise NotImplementedError  # the concrete transport's

    def writelines(self, list_of_data: Iterable[ReadableBuffer]) -> None:
        self.write(b"".join(list_of_data))

    def write_eof(self) -> None:
        if self._closing or self._eof_written:
            return
        self._eof_written = True
        if not self._writes_in_progress():
            self._shutdown_write()

    def _shutdown_write(self) -> None:
        """Everything written before ``write_eof`` went out: send the FIN."""
        try:
            self._sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the peer is gone already; reading will tell the protocol

    def can_write_eof(self) -> bool:
        return True

    def _eof_to_protocol(self) -> None:
        """The peer finished sending: ``eof_received()``, and close unless it keeps us open."""
        try:
            keep_open = self._protocol.eof_received()
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._fatal_error(exc, "Fatal error: protocol.eof_received() call failed.")
            return
        if not keep_open:
            self.close()

    async def _wait_until_drained(self) -> None:
        """Resolve once everything written so far was handed to the kernel (for sendfile)."""
        if not self._writes_in_progress():
            return
        waiter: asyncio.Future[None] = self._loop.create_future()
        self._drain_waiters.append(waiter)
        await waiter
