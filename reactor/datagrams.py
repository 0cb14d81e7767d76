"""Datagram endpoints: ``create_datagram_endpoint``, on every forkloop loop.

`Datagrams` is the part of the loop (`reactor.loop_part.LoopPart`) that opens
UDP and Unix datagram sockets and hands them to a
`reactor.transports.DatagramTransport`. That transport is readiness-based and
serves both loops: on the proactor its socket is watched through the loop's
``_poller`` (one-shot polls on the engine) like any ``add_reader``.

Addresses
---------
``local_addr`` and ``remote_addr`` are resolved (a numeric host in this thread,
a name in the executor: the core's ``_resolve_address``) and paired by
``(family, proto)``: one socket is tried per pair in which every address that
was asked for resolved, in getaddrinfo's order, and the first that binds and
connects is the endpoint; if none does, the first error is raised. For
``AF_UNIX`` the addresses are paths, and a stale socket file at the local path
is removed first. ``remote_addr`` connects the socket (``send``, and
``sendto`` refuses another address) unless ``allow_broadcast`` is set.

``reuse_address`` is refused when true and warned about when given at all, as
asyncio does since 3.11: ``SO_REUSEADDR`` on UDP lets another process take the
port.
"""

from __future__ import annotations

import asyncio
import socket
import warnings
from collections.abc import Callable
from typing import TypeVar

from .loop_part import LoopPart, SocketAddress
from .networking import remove_stale_unix_socket, set_reuse_port
from .transport_base import wait_until_started
from .transports import DatagramTransport

P = TypeVar("P", bound=asyncio.BaseProtocol)
_UNSET = object()


class Datagrams(LoopPart):
    """``create_datagram_endpoint`` (mixed into the concrete loop)."""

    async def create_datagram_endpoint(
        self,
        protocol_factory: Callable[[], P],
        local_addr: tuple[str, int] | str | None = None,
        remote_addr: tuple[str, int] | str | None = None,
        *,
        family: int = 0,
        proto: int = 0,
        flags: int = 0,
        reuse_address: object = _UNSET,
        reuse_port: bool | None = None,
        allow_broadcast: bool | None = None,
        sock: socket.socket | None = None,
    ) -> tuple[asyncio.DatagramTransport, P]:
        if reuse_address is not _UNSET:
            if reuse_address:
                raise ValueError(
                    "Passing `reuse_address=True` is no longer supported, as the usage of "
                    "SO_REUSEPORT in UDP poses a significant security concern."
                )
            warnings.warn(
                "The *reuse_address* parameter has been deprecated as of 3.5.10 "
                "and is scheduled for removal in 3.11.",
                DeprecationWarning,
                stacklevel=2,
            )
        remote = None
        if sock is not None:
            if sock.type != socket.SOCK_DGRAM:
                raise ValueError(f"A UDP Socket was expected, got {sock!r}")
            modifiers = dict(
                local_addr=local_addr,
                remote_addr=remote_addr,
                family=family,
                proto=proto,
                flags=flags,
                reuse_port=reuse_port,
                allow_broadcast=allow_broadcast,
            )
            problems = ", ".join(f"{name}={value}" for name, value in modifiers.items() if value)
            if problems:
                raise ValueError(
                    "socket modifier keyword arguments can not be used "
                    f"when sock is specified. ({problems})"
                )
            sock.setblocking(False)
        else:
            sock, remote = await self._open_datagram_socket(
                local_addr, remote_addr, family, proto, flags, reuse_port, allow_broadcast
            )
        protocol = protocol_factory()
        waiter: asyncio.Future[None] = self.create_future()
        transport = self._make_datagram_transport(sock, protocol, remote, waiter)
        await wait_until_started(transport, waiter)
        return transport, protocol

    async def _datagram_address_pairs(
        self,
        local_addr: tuple[str, int] | str | None,
        remote_addr: tuple[str, int] | str | None,
        family: int,
        proto: int,
        flags: int,
    ) -> list[tuple[tuple[int, int], list[SocketAddress]]]:
        """Candidate (family, proto) -> [local address, remote address] pairs to try."""
        if not (local_addr or remote_addr):
            if family == 0:
                raise ValueError("unexpected address family")
            return [((family, proto), [None, None])]
        if family == getattr(socket, "AF_UNIX", None):
            for address in (local_addr, remote_addr):
                if address is not None and not isinstance(address, (str, bytes)):
                    raise TypeError("string is expected")
            if isinstance(local_addr, (str, bytes)) and local_addr:  # a str, as just checked
                remove_stale_unix_socket(local_addr)
            return [((family, proto), [local_addr, remote_addr])]
        pairs: dict[tuple[int, int], list[SocketAddress]] = {}
        for index, address in enumerate((local_addr, remote_addr)):
            if address is None:
                continue
            if not (isinstance(address, tuple) and len(address) == 2):
                raise TypeError("2-tuple is expected")
            infos = await self._resolve_address(
                *address, family=family, type=socket.SOCK_DGRAM, proto=proto, flags=flags
            )
            for info_family, _, info_proto, _, sockaddr in infos:
                pair = pairs.setdefault((info_family, info_proto), [None, None])
                if pair[index] is None:
                    pair[index] = sockaddr
        complete = [
            (key, pair)
            for key, pair in pairs.items()
            if not (local_addr and pair[0] is None) and not (remote_addr and pair[1] is None)
        ]
        if not complete:
            raise ValueError("can not get address information")
        return complete

    async def _open_datagram_socket(
        self,
        local_addr: tuple[str, int] | str | None,
        remote_addr: tuple[str, int] | str | None,
        family: int,
        proto: int,
        flags: int,
        reuse_port: bool | None,
        allow_broadcast: bool | None,
    ) -> tuple[socket.socket, SocketAddress]:
        pairs = await self._datagram_address_pairs(local_addr, remote_addr, family, proto, flags)
        exceptions: list[OSError] = []
        for (pair_family, pair_proto), (local, remote) in pairs:
            sock = socket.socket(pair_family, socket.SOCK_DGRAM, pair_proto)
            try:
                if reuse_port:
                    set_reuse_port(sock)
                if allow_broadcast:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
                sock.setblocking(False)
                if local_addr:
                    sock.bind(local)
                if remote_addr and not allow_broadcast:
                    await self.sock_connect(sock, remote)
                return sock, (remote if remote_addr else None)
            except OSError as exc:
                sock.close()
                exceptions.append(exc)
            except BaseException:
                sock.close()
                raise
        raise exceptions[0]

    def _make_datagram_transport(
        self,
        sock: socket.socket,
        protocol: asyncio.BaseProtocol,
        address: SocketAddress = None,
        waiter: asyncio.Future[None] | None = None,
    ) -> DatagramTransport:
        return DatagramTransport(self, sock, protocol, address, waiter)
