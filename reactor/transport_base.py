"""What every forkloop transport shows its protocol, whatever drives its I/O.

How a transport moves bytes is its loop's business: readiness callbacks in the
reactor, completions in the proactor, ``os.read``/``os.write`` on pipes. What
the protocol sees of it is the same everywhere, so it is written once here and
mixed into the reactor's socket and pipe transports and the proactor's stream
transport:

* write-buffer limits, and ``pause_writing()`` / ``resume_writing()`` called
  on the protocol when the buffer passes the high-water mark and when it falls
  back to the low-water mark (each call made once per crossing);
* errors: an `OSError` on the socket ends the connection quietly (the
  protocol learns of it from ``connection_lost``); any other exception, raised
  by the protocol's own callbacks, also goes to the loop's exception handler;
* ``_start``: ``connection_made``, then reading, then the creator's waiter;
* ``get_extra_info`` with ``socket`` and a lazily read ``sockname`` and
  ``peername``; the waiters of ``loop.sendfile`` for an empty buffer.

A class that mixes it in provides ``get_write_buffer_size()``,
``_force_close(exc)`` and ``_start_reading()``, and the attributes named below.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Any

from .loop import logger

DEFAULT_HIGH_WATER = 64 * 1024
# Writes to a lost connection are dropped silently up to this count, then logged.
LOST_WRITE_LOG_THRESHOLD = 5


class TransportBase:
    """Flow control, error reporting and extra info; see the module's docstring."""

    __slots__ = ()  # the proactor's transport has slots: the concrete class lists them
    _loop: Any
    _sock: socket.socket | None
    _extra: dict[str, Any]
    _protocol: Any
    _closing: bool
    _high_water: int
    _low_water: int
    _protocol_paused: bool
    _drain_waiters: list[asyncio.Future]
    _protocol_connected: bool
    get_write_buffer_size: Callable[[], int]  # provided by the concrete transport
    _force_close: Callable[[BaseException | None], None]  # likewise
    _start_reading: Callable[[], None]  # likewise: read unless paused or closed

    def _start(self, waiter: asyncio.Future | None) -> None:
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
        if name in ("sockname", "peername") and self._sock is not None:
            try:  # a closed or detached socket raises: the default
                value = self._sock.getsockname() if name == "sockname" else self._sock.getpeername()
            except OSError:
                return default
            extra[name] = value
            return value
        return default

    def get_protocol(self) -> Any:
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
