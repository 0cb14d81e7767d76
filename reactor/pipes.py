"""Pipe transports: the read end and the write end of a pipe, on the reactor's poller.

They back ``loop.connect_read_pipe``/``connect_write_pipe`` and the standard
streams of subprocesses. Both put the fd in non-blocking mode and follow the
socket transports' rules: ``connection_made`` first, via ``call_soon``;
``connection_lost`` exactly once, via ``call_soon``, after which the pipe is
closed.

Read end: ``os.read`` when the poller says readable; an empty read is the end
of the stream: ``eof_received()``, then ``connection_lost(None)``.

Write end: ``write()`` tries ``os.write`` at once and buffers the rest, with the
same high/low-water flow control as sockets. A pipe says its reader went away
only through an error on the write end (EPOLLERR); the transport also watches
its own fd for readability, which the poller reports on that error, so a
vanished reader is noticed even while nothing is being written. With data
still buffered that is a ``BrokenPipeError``; without, a plain close.
"""

from __future__ import annotations

import asyncio
import os
import stat
import warnings
from collections.abc import Callable
from typing import Any, Protocol

from .loop import logger
from .loop_part import LoopPart
from .transport_base import DEFAULT_HIGH_WATER, AttachedProtocol, TransportBase

MAX_READ_SIZE = 64 * 1024


class Pipe(Protocol):
    """What a pipe transport needs of the object it is given: its fd, and closing it."""

    def fileno(self) -> int: ...
    def close(self) -> None: ...


def _pipe_fd(pipe: Pipe) -> int:
    fd = pipe.fileno()
    mode = os.fstat(fd).st_mode
    if not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or stat.S_ISCHR(mode)):
        raise ValueError("Pipe transport is only for pipes, sockets and character devices")
    os.set_blocking(fd, False)
    return fd


class _PipeTransport:
    """Lifecycle shared by both ends."""

    _protocol: AttachedProtocol

    def _setup(
        self,
        loop: LoopPart,
        pipe: Pipe,
        protocol: asyncio.BaseProtocol,
        extra: dict[str, Any] | None,
    ) -> None:
        self._loop = loop
        self._poller = loop._poller
        self._pipe: Pipe | None = pipe
        self._fd = _pipe_fd(pipe)
        self._protocol = protocol
        self._extra = {"pipe": pipe, **(extra or {})}
        self._closing = False
        self._lost = False

    def __repr__(self) -> str:
        state = "closed" if self._pipe is None else ("closing" if self._closing else "open")
        return f"<{type(self).__name__} fd={self._fd} {state}>"

    def __del__(self, _warn: Callable[..., None] = warnings.warn) -> None:
        pipe = getattr(self, "_pipe", None)
        if pipe is not None:
            _warn(f"unclosed transport {self!r}", ResourceWarning, source=self)
            pipe.close()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._extra.get(name, default)

    def get_protocol(self) -> AttachedProtocol:
        return self._protocol

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol

    def is_closing(self) -> bool:
        return self._closing

    def _start_watching(self) -> None:
        raise NotImplementedError  # each end watches its fd its own way

    def _start(self, waiter: asyncio.Future[None] | None) -> None:
        self._protocol.connection_made(self)
        self._start_watching()
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fatal_error(self, exc: BaseException, message: str) -> None:
        if not isinstance(exc, OSError):
            self._loop.call_exception_handler(
                {
                    "message": message,
                    "exception": exc,
                    "transport": self,
                    "protocol": self._protocol,
                }
            )
        self._close(exc)

    def _close(self, exc: BaseException | None) -> None:
        if self._lost:
            return
        self._lost = True
        self._closing = True
        self._poller.clear_reader(self._fd)
        self._poller.clear_writer(self._fd)
        self._clear_buffer()
        self._loop.call_soon(self._call_connection_lost, exc)

    def _clear_buffer(self) -> None:
        pass

    def _call_connection_lost(self, exc: BaseException | None) -> None:
        try:
            self._protocol.connection_lost(exc)
        finally:
            pipe, self._pipe = self._pipe, None
            if pipe is not None:
                pipe.close()
            self._protocol = None


class ReadPipeTransport(_PipeTransport, asyncio.ReadTransport):
    """The read end of a pipe."""

    def __init__(
        self,
        loop: LoopPart,
        pipe: Pipe,
        protocol: asyncio.BaseProtocol,
        waiter: asyncio.Future[None] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        self._setup(loop, pipe, protocol, extra)
        self._paused = False
        loop.call_soon(self._start, waiter)

    def _start_watching(self) -> None:
        if not self._closing and not self._paused:
            self._poller.set_reader(self._fd, self._read_ready)

    def _read_ready(self) -> None:
        try:
            data = os.read(self._fd, MAX_READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._fatal_error(exc, "Fatal read error on pipe transport")
            return
        if data:
            self._protocol.data_received(data)
            return
        self._closing = True
        self._poller.clear_reader(self._fd)
        self._loop.call_soon(self._protocol.eof_received)
        self._lost = True
        self._loop.call_soon(self._call_connection_lost, None)

    def pause_reading(self) -> None:
        if self._closing or self._paused:
            return
        self._paused = True
        self._poller.clear_reader(self._fd)

    def resume_reading(self) -> None:
        if self._closing or not self._paused:
            return
        self._paused = False
        self._poller.set_reader(self._fd, self._read_ready)

    def is_reading(self) -> bool:
        return not self._paused and not self._closing

    def close(self) -> None:
        if not self._closing:
            self._close(None)


class WritePipeTransport(_PipeTransport, TransportBase, asyncio.WriteTransport):
    """The write end of a pipe."""

    def __init__(
        self,
        loop: LoopPart,
        pipe: Pipe,
        protocol: asyncio.BaseProtocol,
        waiter: asyncio.Future[None] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        self._setup(loop, pipe, protocol, extra)
        self._buffer = bytearray()
        self._high_water = DEFAULT_HIGH_WATER
        self._low_water = DEFAULT_HIGH_WATER // 4
        self._protocol_paused = False
        self._lost_writes = 0
        loop.call_soon(self._start, waiter)

    def _start_watching(self) -> None:
        # Readability of a write end means an error: its reader has gone away.
        self._poller.set_reader(self._fd, self._reader_gone)

    def _reader_gone(self) -> None:
        self._close(BrokenPipeError() if self._buffer else None)

    def get_write_buffer_size(self) -> int:
        return len(self._buffer)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(
                f"data argument must be a bytes-like object, not {type(data).__name__!r}"
            )
        data = memoryview(data).cast("B")
        if not data:
            return
        if self._lost or self._closing:
            self._lost_writes += 1
            if self._lost_writes >= 5:
                logger.warning("pipe closed by peer or os.write(pipe, data) raised exception.")
            return
        if not self._buffer:
            try:
                written = os.write(self._fd, data)
            except (BlockingIOError, InterruptedError):
                written = 0
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as exc:
                self._fatal_error(exc, "Fatal write error on pipe transport")
                return
            if written == len(data):
                return
            data = data[written:]
            self._poller.set_writer(self._fd, self._write_ready)
        self._buffer += data
        self._maybe_pause_protocol()

    def _write_ready(self) -> None:
        try:
            written = os.write(self._fd, self._buffer)
        except (BlockingIOError, InterruptedError):
            return
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._buffer.clear()
            self._fatal_error(exc, "Fatal write error on pipe transport")
            return
        del self._buffer[:written]
        self._maybe_resume_protocol()
        if self._buffer:
            return
        self._poller.clear_writer(self._fd)
        if self._closing:
            self._close(None)

    def _clear_buffer(self) -> None:
        self._buffer.clear()

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        if self._closing:
            return
        self._closing = True
        if not self._buffer:
            self._close(None)

    def close(self) -> None:
        if not self._closing:
            self.write_eof()

    def abort(self) -> None:
        self._close(None)
