"""Connections, servers and datagram endpoints: turning addresses into transports.

`Networking` holds the stream half of the ``create_*`` API (datagram endpoints
are `reactor.datagrams`). It resolves addresses, creates, binds, connects and
listens on sockets, and then asks the I/O layer for transports through what
`reactor.loop_part.LoopPart` declares: ``_make_socket_transport``,
``_start_listening`` (via `Server`), and ``sock_connect`` of the asyncio API.
The loop's listeners hand each accepted socket back to ``_accept_connection``.
Nothing here waits for readiness itself, so a completion-based loop can mix
this class in with its own transports.

Name resolution
---------------
A numeric host (``127.0.0.1``, ``::1``) is resolved in the calling thread with
``AI_NUMERICHOST | AI_NUMERICSERV``, which never touches DNS. Anything else goes
to ``getaddrinfo`` in the executor, so a slow resolver cannot stall the loop
(the core's ``_resolve_address``).

What is not here
----------------
Happy eyeballs: ``create_connection`` tries the resolved addresses one after
another; ``happy_eyeballs_delay`` and ``interleave`` are accepted and ignored.
TLS goes through `asyncio.sslproto.SSLProtocol` layered on the plain transport.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import ssl as ssl_module
import stat
import sys
from asyncio import sslproto
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar, cast

from .loop import AddressInfo, logger
from .loop_part import LoopPart, SocketAddress
from .servers import Server
from .transport_base import wait_until_started

ProtocolFactory = Callable[[], asyncio.BaseProtocol]
P = TypeVar("P", bound=asyncio.BaseProtocol)
# ssl= of create_connection and friends: a context, True for a default one, or no TLS.
SSLArgument = ssl_module.SSLContext | bool | None
UnixPath = str | bytes | os.PathLike[str] | os.PathLike[bytes]


def _check_ssl_arguments(
    ssl: SSLArgument, handshake_timeout: float | None, shutdown_timeout: float | None
) -> None:
    if handshake_timeout is not None and not ssl:
        raise ValueError("ssl_handshake_timeout is only meaningful with ssl")
    if shutdown_timeout is not None and not ssl:
        raise ValueError("ssl_shutdown_timeout is only meaningful with ssl")


def set_reuse_port(sock: socket.socket) -> None:
    if not hasattr(socket, "SO_REUSEPORT"):
        raise ValueError("reuse_port not supported by socket module")
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    except OSError:
        raise ValueError(
            "reuse_port not supported by socket module, SO_REUSEPORT defined but not implemented."
        ) from None


def _bind_error(exc: OSError, address: SocketAddress) -> OSError:
    reason = (exc.strerror or str(exc)).lower()
    return OSError(exc.errno, f"error while attempting to bind on address {address!r}: {reason}")


def remove_stale_unix_socket(path: str | bytes) -> None:
    if path[0] in (0, "\x00"):
        return  # Linux abstract namespace: nothing on disk
    try:
        if stat.S_ISSOCK(os.stat(path).st_mode):
            os.remove(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        logger.error("Unable to check or remove stale UNIX socket %r: %r", path, exc)


def _raise_connect_errors(exceptions: list[OSError], all_errors: bool) -> None:
    if all_errors:
        raise ExceptionGroup("create_connection failed", exceptions)
    if len(exceptions) == 1 or len({str(exc) for exc in exceptions}) == 1:
        raise exceptions[0]
    raise OSError(f"Multiple exceptions: {', '.join(str(exc) for exc in exceptions)}")


class Networking(LoopPart):
    """The ``create_*`` methods of the loop (mixed into the concrete loop class)."""

    # streams -------------------------------------------------------------------

    async def create_connection(
        self,
        protocol_factory: Callable[[], P],
        host: str | None = None,
        port: int | str | None = None,
        *,
        ssl: SSLArgument = None,
        family: int = 0,
        proto: int = 0,
        flags: int = 0,
        sock: socket.socket | None = None,
        local_addr: tuple[str, int] | None = None,
        server_hostname: str | None = None,
        ssl_handshake_timeout: float | None = None,
        ssl_shutdown_timeout: float | None = None,
        happy_eyeballs_delay: float | None = None,
        interleave: int | None = None,
        all_errors: bool = False,
    ) -> tuple[asyncio.Transport, P]:
        if server_hostname is not None and not ssl:
            raise ValueError("server_hostname is only meaningful with ssl")
        if server_hostname is None and ssl:
            if not host:
                raise ValueError("You must set server_hostname when using ssl without a host")
            server_hostname = host
        _check_ssl_arguments(ssl, ssl_handshake_timeout, ssl_shutdown_timeout)
        if host is not None or port is not None:
            if sock is not None:
                raise ValueError("host/port and sock can not be specified at the same time")
            infos = await self._resolve_address(
                host, port, family=family, type=socket.SOCK_STREAM, proto=proto, flags=flags
            )
            local_infos = None
            if local_addr is not None:
                local_infos = await self._resolve_address(
                    *local_addr, family=family, type=socket.SOCK_STREAM, proto=proto, flags=flags
                )
            sock = await self._connect_first(infos, local_infos, all_errors)
        elif sock is None:
            raise ValueError("host and port was not specified and no sock specified")
        elif sock.type != socket.SOCK_STREAM:
            raise ValueError(f"A Stream Socket was expected, got {sock!r}")
        return await self._create_connection_transport(
            sock,
            protocol_factory,
            ssl,
            server_hostname,
            ssl_handshake_timeout=ssl_handshake_timeout,
            ssl_shutdown_timeout=ssl_shutdown_timeout,
        )

    async def _connect_first(
        self, infos: list[AddressInfo], local_infos: list[AddressInfo] | None, all_errors: bool
    ) -> socket.socket:
        exceptions: list[OSError] = []
        for family, type_, proto, _, address in infos:
            sock = socket.socket(family, type_, proto)
            try:
                sock.setblocking(False)
                if local_infos is not None:
                    self._bind_local(sock, family, local_infos)
                await self.sock_connect(sock, address)
                return sock
            except OSError as exc:
                sock.close()
                exceptions.append(exc)
            except BaseException:
                sock.close()
                raise
        _raise_connect_errors(exceptions, all_errors)
        raise AssertionError("unreachable")

    @staticmethod
    def _bind_local(sock: socket.socket, family: int, local_infos: list[AddressInfo]) -> None:
        errors = []
        for local_family, _, _, _, local_address in local_infos:
            if local_family != family:
                continue
            try:
                sock.bind(local_address)
                return
            except OSError as exc:
                errors.append(_bind_error(exc, local_address))
        if errors:
            raise errors[0]
        raise OSError(f"no matching local address with family={family!r} found")

    async def _create_connection_transport(
        self,
        sock: socket.socket,
        protocol_factory: Callable[[], P],
        ssl: SSLArgument,
        server_hostname: str | None,
        server_side: bool = False,
        ssl_handshake_timeout: float | None = None,
        ssl_shutdown_timeout: float | None = None,
    ) -> tuple[asyncio.Transport, P]:
        sock.setblocking(False)
        protocol = protocol_factory()
        waiter: asyncio.Future[None] = self.create_future()
        if ssl:
            transport = self._make_ssl_transport(
                sock,
                protocol,
                None if isinstance(ssl, bool) else ssl,
                waiter,
                server_side=server_side,
                server_hostname=server_hostname,
                ssl_handshake_timeout=ssl_handshake_timeout,
                ssl_shutdown_timeout=ssl_shutdown_timeout,
            )
        else:
            transport = self._make_socket_transport(sock, protocol, waiter)
        await wait_until_started(transport, waiter)
        return transport, protocol

    def _accept_connection(
        self, server: Server, conn: socket.socket, address: SocketAddress
    ) -> None:
        """A listener accepted ``conn``: give it a protocol from the server and a transport."""
        try:
            protocol = server._protocol_factory()
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            conn.close()
            self.call_exception_handler(
                {"message": "Error in protocol_factory of server", "exception": exc}
            )
            return
        extra = None if address is None else {"peername": address}
        if server._ssl_context is not None:
            self._make_ssl_transport(
                conn,
                protocol,
                server._ssl_context,
                None,
                server_side=True,
                extra=extra,
                server=server,
                ssl_handshake_timeout=server._ssl_handshake_timeout,
                ssl_shutdown_timeout=server._ssl_shutdown_timeout,
            )
        else:
            self._make_socket_transport(conn, protocol, None, extra, server)

    def _make_ssl_transport(
        self,
        sock: socket.socket,
        protocol: asyncio.BaseProtocol,
        ssl_context: ssl_module.SSLContext | None,
        waiter: asyncio.Future[None] | None,
        *,
        server_side: bool = False,
        server_hostname: str | None = None,
        extra: dict[str, Any] | None = None,
        server: Server | None = None,
        ssl_handshake_timeout: float | None = None,
        ssl_shutdown_timeout: float | None = None,
    ) -> asyncio.Transport:
        """TLS as a protocol layered on a plain socket transport (the stdlib's SSLProtocol)."""
        # typeshed wants a context and a waiter; SSLProtocol takes None for either (a
        # default context; no one waiting, on the server side), and a float timeout.
        ssl_protocol = sslproto.SSLProtocol(
            self,
            protocol,
            ssl_context,  # type: ignore[arg-type]
            waiter,  # type: ignore[arg-type]
            server_side,
            server_hostname,
            ssl_handshake_timeout=ssl_handshake_timeout,  # type: ignore[arg-type]
            ssl_shutdown_timeout=ssl_shutdown_timeout,
        )
        self._make_socket_transport(sock, ssl_protocol, None, extra, server)
        return ssl_protocol._app_transport

    async def start_tls(
        self,
        transport: asyncio.WriteTransport,
        protocol: asyncio.BaseProtocol,
        sslcontext: ssl_module.SSLContext,
        *,
        server_side: bool = False,
        server_hostname: str | None = None,
        ssl_handshake_timeout: float | None = None,
        ssl_shutdown_timeout: float | None = None,
    ) -> asyncio.Transport:
        """Upgrade a plain connection to TLS in place; returns the new (TLS) transport."""
        if not isinstance(sslcontext, ssl_module.SSLContext):
            raise TypeError(
                f"sslcontext is expected to be an instance of ssl.SSLContext, got {sslcontext!r}"
            )
        if not getattr(transport, "_start_tls_compatible", False):
            raise TypeError(f"transport {transport!r} is not supported by start_tls()")
        # Only forkloop's stream transports say _start_tls_compatible: they read too.
        stream = cast(asyncio.Transport, transport)
        waiter: asyncio.Future[None] = self.create_future()
        ssl_protocol = sslproto.SSLProtocol(
            self,
            protocol,
            sslcontext,
            waiter,
            server_side,
            server_hostname,
            ssl_handshake_timeout=ssl_handshake_timeout,  # type: ignore[arg-type]  # a float
            ssl_shutdown_timeout=ssl_shutdown_timeout,
            call_connection_made=False,
        )
        # Nothing may be read between the switch of protocols and the handshake.
        stream.pause_reading()
        stream.set_protocol(ssl_protocol)
        connection_made = self.call_soon(ssl_protocol.connection_made, stream)
        resume_reading = self.call_soon(stream.resume_reading)
        try:
            await waiter
        except BaseException:
            stream.close()
            connection_made.cancel()
            resume_reading.cancel()
            raise
        return ssl_protocol._app_transport

    # typeshed has create_server return asyncio's own Server class; forkloop's Server
    # is an asyncio.AbstractServer of its own, as uvloop's is.
    async def create_server(  # type: ignore[override]
        self,
        protocol_factory: ProtocolFactory,
        host: str | Sequence[str] | None = None,
        port: int | str | None = None,
        *,
        family: int = socket.AF_UNSPEC,
        flags: int = socket.AI_PASSIVE,
        sock: socket.socket | None = None,
        backlog: int = 100,
        ssl: SSLArgument = None,
        reuse_address: bool | None = None,
        reuse_port: bool | None = None,
        keep_alive: bool | None = None,
        ssl_handshake_timeout: float | None = None,
        ssl_shutdown_timeout: float | None = None,
        start_serving: bool = True,
    ) -> Server:
        if isinstance(ssl, bool):
            raise TypeError("ssl argument must be an SSLContext or None")
        _check_ssl_arguments(ssl, ssl_handshake_timeout, ssl_shutdown_timeout)
        if host is not None or port is not None:
            if sock is not None:
                raise ValueError("host/port and sock can not be specified at the same time")
            if reuse_address is None:
                reuse_address = os.name == "posix" and sys.platform != "cygwin"
            hosts: Iterable[str | None]
            if host is None or host == "":
                hosts = [None]
            elif isinstance(host, (str, bytes)) or not isinstance(host, Iterable):
                hosts = [host]
            else:
                hosts = host
            infos: dict[AddressInfo, None] = {}  # ordered and deduplicated
            for one_host in hosts:
                for info in await self._resolve_address(
                    one_host, port, family=family, type=socket.SOCK_STREAM, flags=flags
                ):
                    infos[info] = None
            sockets = self._bind_listening_sockets(infos, reuse_address, reuse_port, keep_alive)
        else:
            if sock is None:
                raise ValueError("Neither host/port nor sock were specified")
            if sock.type != socket.SOCK_STREAM:
                raise ValueError(f"A Stream Socket was expected, got {sock!r}")
            sockets = [sock]
        for listening in sockets:
            listening.setblocking(False)
        return self._serve(
            sockets,
            protocol_factory,
            ssl,
            backlog,
            ssl_handshake_timeout,
            ssl_shutdown_timeout,
            start_serving,
        )

    def _serve(
        self,
        sockets: list[socket.socket],
        protocol_factory: ProtocolFactory,
        ssl: ssl_module.SSLContext | None,
        backlog: int,
        ssl_handshake_timeout: float | None,
        ssl_shutdown_timeout: float | None,
        start_serving: bool,
    ) -> Server:
        """The `Server` of these listening sockets, accepting already if ``start_serving``."""
        server = Server(
            self,
            sockets,
            protocol_factory,
            ssl,
            backlog,
            ssl_handshake_timeout,
            ssl_shutdown_timeout,
        )
        if start_serving:
            server._start_serving()
        return server

    @staticmethod
    def _bind_listening_sockets(
        infos: Iterable[AddressInfo],
        reuse_address: bool | None,
        reuse_port: bool | None,
        keep_alive: bool | None,
    ) -> list[socket.socket]:
        sockets: list[socket.socket] = []
        try:
            for family, type_, proto, _, address in infos:
                try:
                    sock = socket.socket(family, type_, proto)
                except OSError:
                    continue  # a family this host cannot open; the other addresses may do
                sockets.append(sock)
                if reuse_address:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if reuse_port:
                    set_reuse_port(sock)
                if keep_alive:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
                if family == socket.AF_INET6:
                    # Binding "::" must not also claim the IPv4 port bound next to it.
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                try:
                    sock.bind(address)
                except OSError as exc:
                    raise _bind_error(exc, address) from None
        except BaseException:
            for sock in sockets:
                sock.close()
            raise
        if not sockets:
            raise OSError("could not open a listening socket for any resolved address")
        return sockets

    async def connect_accepted_socket(
        self,
        protocol_factory: Callable[[], P],
        sock: socket.socket,
        *,
        ssl: SSLArgument = None,
        ssl_handshake_timeout: float | None = None,
        ssl_shutdown_timeout: float | None = None,
    ) -> tuple[asyncio.Transport, P]:
        if sock.type != socket.SOCK_STREAM:
            raise ValueError(f"A Stream Socket was expected, got {sock!r}")
        _check_ssl_arguments(ssl, ssl_handshake_timeout, ssl_shutdown_timeout)
        return await self._create_connection_transport(
            sock,
            protocol_factory,
            ssl,
            "",
            server_side=True,
            ssl_handshake_timeout=ssl_handshake_timeout,
            ssl_shutdown_timeout=ssl_shutdown_timeout,
        )

    # Unix stream sockets ------------------------------------------------------------

    async def create_unix_connection(
        self,
        protocol_factory: Callable[[], P],
        path: UnixPath | None = None,
        *,
        ssl: SSLArgument = None,
        sock: socket.socket | None = None,
        server_hostname: str | None = None,
        ssl_handshake_timeout: float | None = None,
        ssl_shutdown_timeout: float | None = None,
    ) -> tuple[asyncio.Transport, P]:
        if ssl:
            if server_hostname is None:
                raise ValueError("you have to pass server_hostname when using ssl")
        elif server_hostname is not None:
            raise ValueError("server_hostname is only meaningful with ssl")
        _check_ssl_arguments(ssl, ssl_handshake_timeout, ssl_shutdown_timeout)
        if path is not None:
            if sock is not None:
                raise ValueError("path and sock can not be specified at the same time")
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, 0)
            try:
                sock.setblocking(False)
                await self.sock_connect(sock, os.fspath(path))
            except BaseException:
                sock.close()
                raise
        else:
            if sock is None:
                raise ValueError("no path and sock were specified")
            if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
                raise ValueError(f"A UNIX Domain Stream Socket was expected, got {sock!r}")
        return await self._create_connection_transport(
            sock,
            protocol_factory,
            ssl,
            server_hostname,
            ssl_handshake_timeout=ssl_handshake_timeout,
            ssl_shutdown_timeout=ssl_shutdown_timeout,
        )

    async def create_unix_server(  # type: ignore[override]  # forkloop's Server, as above
        self,
        protocol_factory: ProtocolFactory,
        path: UnixPath | None = None,
        *,
        sock: socket.socket | None = None,
        backlog: int = 100,
        ssl: SSLArgument = None,
        ssl_handshake_timeout: float | None = None,
        ssl_shutdown_timeout: float | None = None,
        start_serving: bool = True,
    ) -> Server:
        if isinstance(ssl, bool):
            raise TypeError("ssl argument must be an SSLContext or None")
        _check_ssl_arguments(ssl, ssl_handshake_timeout, ssl_shutdown_timeout)
        if path is not None:
            if sock is not None:
                raise ValueError("path and sock can not be specified at the same time")
            path = os.fspath(path)
            remove_stale_unix_socket(path)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.bind(path)
            except OSError as exc:
                sock.close()
                if exc.errno == errno.EADDRINUSE:
                    raise OSError(errno.EADDRINUSE, f"Address {path!r} is already in use") from None
                raise
            except BaseException:
                sock.close()
                raise
        else:
            if sock is None:
                raise ValueError("path was not specified, and no sock specified")
            if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
                raise ValueError(f"A UNIX Domain Stream Socket was expected, got {sock!r}")
        sock.setblocking(False)
        return self._serve(
            [sock],
            protocol_factory,
            ssl,
            backlog,
            ssl_handshake_timeout,
            ssl_shutdown_timeout,
            start_serving,
        )
