"""Readiness operations: callbacks on fds and the ``sock_*`` coroutines.

`ReadinessOperations` is the part of the asyncio API that waits for a file
descriptor to become readable or writable. It needs only ``self._poller`` (a
`reactor.poller.Poller`), ``self._transports`` (fd -> transport) and the
scheduling core (`reactor.loop_part.LoopPart`), so a loop whose own I/O is not
readiness based, like the io_uring proactor, can mix it in over a poller of its
own.

* ``add_reader``/``add_writer`` and their removals, for user callbacks. The
  callback is wrapped in an `asyncio.Handle` once, at registration, so its
  context and error reporting match stdlib asyncio; the poller then calls the
  handle's ``_run`` directly on every event. An fd that an open transport owns
  is refused, as stdlib asyncio does: two owners would steal each other's
  events.
* ``sock_recv``, ``sock_sendall``, ``sock_connect``, ``sock_accept`` and the
  rest follow one pattern (`ReadinessOperations._when_ready`): try the system
  call at once, and only if it would block, register a retry with the poller
  and return a future that the retry resolves. A cancelled future
  unregisters the retry; a retry replaced by another operation on the same fd
  is left alone. Each try looks the socket's method up anew (``sock.recv``,
  not a method bound when the operation began), as stdlib asyncio does, so a
  method replaced while the operation waits (a test double's) is the one the
  next try calls.
* ``sock_sendfile`` uses ``os.sendfile`` and waits for writability between
  chunks; file objects without an fd fall back to reads in the executor and
  ``sock_sendall``.
"""

from __future__ import annotations

import asyncio
import errno
import io
import os
import socket
import ssl as ssl_module
from collections.abc import Callable
from typing import IO, TYPE_CHECKING, Protocol, TypeVar, TypeVarTuple

from .loop_part import LoopPart, SocketAddress

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer, WriteableBuffer

SENDFILE_FALLBACK_CHUNK = 256 * 1024
SENDFILE_MAX_CHUNK = 1 << 30

T = TypeVar("T")
TransportT = TypeVar("TransportT", bound=asyncio.BaseTransport)
Ts = TypeVarTuple("Ts")


class HasFileno(Protocol):
    def fileno(self) -> int: ...


FileDescriptorLike = int | HasFileno


def _fileno(fileobj: FileDescriptorLike) -> int:
    if isinstance(fileobj, int):
        fd = fileobj
    else:
        try:
            fd = int(fileobj.fileno())
        except (AttributeError, TypeError, ValueError):
            raise ValueError(f"Invalid file object: {fileobj!r}") from None
    if fd < 0:
        raise ValueError(f"Invalid file descriptor: {fd}")
    return fd


def sendfile_transport(
    transport: asyncio.BaseTransport, kind: type[TransportT], refusal: str
) -> TransportT:
    """The transport ``loop.sendfile`` was given, if the loop can send over it (one of ``kind``).

    A closing one is refused with RuntimeError, one of another kind with
    `asyncio.SendfileNotAvailableError` saying ``refusal``, as asyncio's loops do.
    """
    if transport.is_closing():
        raise RuntimeError("Transport is closing")
    if not isinstance(transport, kind):
        raise asyncio.SendfileNotAvailableError(f"{refusal}, not {transport!r}")
    return transport


def check_sendfile_params(
    sock: socket.socket, file: IO[bytes], offset: int, count: int | None
) -> None:
    """Refuse what ``loop.sendfile`` and ``sock_sendfile`` refuse, with asyncio's messages."""
    if "b" not in getattr(file, "mode", "b"):
        raise ValueError("file should be opened in binary mode")
    if sock.type != socket.SOCK_STREAM:
        raise ValueError("only SOCK_STREAM type sockets are supported")
    if count is not None:
        if not isinstance(count, int):
            raise TypeError(f"count must be a positive integer (got {count!r})")
        if count <= 0:
            raise ValueError(f"count must be a positive integer (got {count!r})")
    if not isinstance(offset, int):
        raise TypeError(f"offset must be a non-negative integer (got {offset!r})")
    if offset < 0:
        raise ValueError(f"offset must be a non-negative integer (got {offset!r})")


class ReadinessOperations(LoopPart):
    """fd callbacks and ``sock_*`` operations over ``self._poller`` (mixed into a loop)."""

    # user callbacks on file descriptors --------------------------------------------

    def add_reader(
        self, fd: FileDescriptorLike, callback: Callable[[*Ts], object], *args: *Ts
    ) -> None:
        self._check_closed()
        fd = _fileno(fd)
        self._ensure_fd_no_transport(fd)
        self._poller.set_reader(fd, asyncio.Handle(callback, args, self, None)._run)

    def remove_reader(self, fd: FileDescriptorLike) -> bool:
        if self._closed:
            return False
        fd = _fileno(fd)
        self._ensure_fd_no_transport(fd)
        return self._poller.clear_reader(fd)

    def add_writer(
        self, fd: FileDescriptorLike, callback: Callable[[*Ts], object], *args: *Ts
    ) -> None:
        self._check_closed()
        fd = _fileno(fd)
        self._ensure_fd_no_transport(fd)
        self._poller.set_writer(fd, asyncio.Handle(callback, args, self, None)._run)

    def remove_writer(self, fd: FileDescriptorLike) -> bool:
        if self._closed:
            return False
        fd = _fileno(fd)
        self._ensure_fd_no_transport(fd)
        return self._poller.clear_writer(fd)

    def _ensure_fd_no_transport(self, fd: int) -> None:
        transport = self._transports.get(fd)
        if transport is not None and not transport.is_closing():
            raise RuntimeError(f"File descriptor {fd!r} is used by transport {transport!r}")

    # socket operations -----------------------------------------------------------------

    def _when_ready(
        self, sock: socket.socket, writable: bool, operation: Callable[[], T]
    ) -> asyncio.Future[T]:
        """A future for ``operation()``, retried whenever ``sock`` is ready.

        The operation signals "not yet" by raising BlockingIOError, as the
        socket calls themselves do. It names the socket's method in its body
        (``lambda: sock.recv(n)``), so every try looks the method up again.
        """
        fd = sock.fileno()
        self._ensure_fd_no_transport(fd)
        future: asyncio.Future[T] = self.create_future()
        poller = self._poller
        clear = poller.clear_writer if writable else poller.clear_reader

        def attempt() -> None:
            if future.done():
                clear(fd, attempt)
                return
            try:
                result = operation()
            except (BlockingIOError, InterruptedError):
                return
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as exc:
                clear(fd, attempt)
                future.set_exception(exc)
            else:
                clear(fd, attempt)
                future.set_result(result)

        if writable:
            poller.set_writer(fd, attempt)
        else:
            poller.set_reader(fd, attempt)
        future.add_done_callback(lambda _: clear(fd, attempt))
        return future

    def _check_socket(self, sock: socket.socket) -> None:
        if isinstance(sock, ssl_module.SSLSocket):
            raise TypeError("Socket cannot be of type SSLSocket")
        if self._debug and sock.gettimeout() != 0:
            raise ValueError("the socket must be non-blocking")

    async def sock_recv(self, sock: socket.socket, nbytes: int) -> bytes:
        self._check_socket(sock)
        try:
            return sock.recv(nbytes)
        except (BlockingIOError, InterruptedError):
            pass
        return await self._when_ready(sock, False, lambda: sock.recv(nbytes))

    async def sock_recv_into(self, sock: socket.socket, buf: WriteableBuffer) -> int:
        self._check_socket(sock)
        try:
            return sock.recv_into(buf)
        except (BlockingIOError, InterruptedError):
            pass
        return await self._when_ready(sock, False, lambda: sock.recv_into(buf))

    async def sock_recvfrom(self, sock: socket.socket, bufsize: int) -> tuple[bytes, SocketAddress]:
        self._check_socket(sock)
        try:
            return sock.recvfrom(bufsize)
        except (BlockingIOError, InterruptedError):
            pass
        return await self._when_ready(sock, False, lambda: sock.recvfrom(bufsize))

    async def sock_recvfrom_into(
        self, sock: socket.socket, buf: WriteableBuffer, nbytes: int = 0
    ) -> tuple[int, SocketAddress]:
        self._check_socket(sock)
        try:
            return sock.recvfrom_into(buf, nbytes)
        except (BlockingIOError, InterruptedError):
            pass
        return await self._when_ready(sock, False, lambda: sock.recvfrom_into(buf, nbytes))

    async def sock_sendto(
        self, sock: socket.socket, data: ReadableBuffer, address: SocketAddress
    ) -> int:
        self._check_socket(sock)
        try:
            return sock.sendto(data, address)
        except (BlockingIOError, InterruptedError):
            pass
        return await self._when_ready(sock, True, lambda: sock.sendto(data, address))

    async def sock_sendall(self, sock: socket.socket, data: ReadableBuffer) -> None:
        self._check_socket(sock)
        try:
            sent = sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        view = memoryview(data).cast("B")
        if sent == len(view):
            return
        position = sent

        def send_rest() -> None:
            nonlocal position
            position += sock.send(view[position:])
            if position < len(view):
                raise BlockingIOError  # partial progress: wait for writability again

        await self._when_ready(sock, True, send_rest)

    async def sock_connect(self, sock: socket.socket, address: SocketAddress) -> None:
        self._check_socket(sock)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            address = await self._resolve_socket_address(sock, address)
        try:
            sock.connect(address)
            return
        except (BlockingIOError, InterruptedError):
            pass

        def finish_connect() -> None:
            error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if error:
                raise OSError(error, f"Connect call failed {address}")

        await self._when_ready(sock, True, finish_connect)

    async def _resolve_socket_address(
        self, sock: socket.socket, address: SocketAddress
    ) -> SocketAddress:
        host, port = address[:2]
        try:
            socket.inet_pton(sock.family, host)
            return address  # already numeric
        except (OSError, TypeError, ValueError):
            pass
        infos = await self._resolve_address(
            host, port, family=sock.family, type=sock.type, proto=sock.proto
        )
        return infos[0][4]

    async def sock_accept(self, sock: socket.socket) -> tuple[socket.socket, SocketAddress]:
        self._check_socket(sock)
        try:
            conn, address = sock.accept()
        except (BlockingIOError, InterruptedError):
            conn, address = await self._when_ready(sock, False, lambda: sock.accept())
        conn.setblocking(False)
        return conn, address

    async def sock_sendfile(
        self,
        sock: socket.socket,
        file: IO[bytes],
        offset: int = 0,
        count: int | None = None,
        *,
        fallback: bool | None = True,
    ) -> int:
        self._check_socket(sock)
        check_sendfile_params(sock, file, offset, count)
        try:
            return await self._sendfile_native(sock, file, offset, count)
        except asyncio.SendfileNotAvailableError:
            if not fallback:
                raise
        return await self._sendfile_by_reads(sock, file, offset, count)

    async def _sendfile_native(
        self, sock: socket.socket, file: IO[bytes], offset: int, count: int | None
    ) -> int:
        if not hasattr(os, "sendfile"):
            raise asyncio.SendfileNotAvailableError("os.sendfile() is not available")
        try:
            file_fd = file.fileno()
            size = os.fstat(file_fd).st_size
        except (AttributeError, io.UnsupportedOperation, OSError) as exc:
            raise asyncio.SendfileNotAvailableError("not a regular file") from exc
        end = offset + count if count else size
        position = offset
        try:
            while position < end:
                try:
                    sent = os.sendfile(
                        sock.fileno(), file_fd, position, min(end - position, SENDFILE_MAX_CHUNK)
                    )
                except (BlockingIOError, InterruptedError):
                    await self._when_ready(sock, True, lambda: None)
                    continue
                except OSError as exc:
                    if position == offset and exc.errno in (errno.EINVAL, errno.ENOSYS):
                        raise asyncio.SendfileNotAvailableError("os.sendfile() failed") from exc
                    raise
                if not sent:
                    break  # end of file
                position += sent
        finally:
            if position > offset:
                file.seek(position)
        return position - offset

    async def _sendfile_by_reads(
        self, sock: socket.socket, file: IO[bytes], offset: int, count: int | None
    ) -> int:
        if offset:
            file.seek(offset)
        chunk = min(count, SENDFILE_FALLBACK_CHUNK) if count else SENDFILE_FALLBACK_CHUNK
        buffer = bytearray(chunk)
        total = 0
        try:
            while count is None or total < count:
                want = chunk if count is None else min(chunk, count - total)
                view = memoryview(buffer)[:want]
                # IO[bytes] (typeshed's type for sendfile's file) names no readinto; the
                # binary files sendfile is given have it, and asyncio's fallback uses it too.
                read = await self.run_in_executor(None, file.readinto, view)  # type: ignore[attr-defined]
                if not read:
                    break
                await self.sock_sendall(sock, view[:read])
                total += read
            return total
        finally:
            if total > 0 and hasattr(file, "seek"):
                file.seek(offset + total)
