"""Listening sockets: parse ``--bind`` addresses and bind them.

Accepted forms, as gunicorn and uvicorn users write them:
``127.0.0.1:8000``, ``:8000`` (all IPv4 interfaces), ``[::1]:8000``,
``localhost:8000``, ``unix:/run/forkloop.sock``.
"""

from __future__ import annotations

import os
import socket
import stat
from dataclasses import dataclass


@dataclass(frozen=True)
class BindAddress:
    family: socket.AddressFamily
    host: str  # the Unix socket path for AF_UNIX
    port: int = 0

    def __str__(self) -> str:
        if self.family == socket.AF_UNIX:
            return f"unix:{self.host}"
        if self.family == socket.AF_INET6:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


def parse_bind(text: str) -> BindAddress:
    if text.startswith("unix:"):
        path = text[len("unix:") :]
        if not path:
            raise ValueError("unix: bind needs a path, e.g. unix:/tmp/forkloop.sock")
        return BindAddress(socket.AF_UNIX, path)
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"bind address {text!r} needs a port: HOST:PORT, [IPv6]:PORT or unix:PATH")
    if host.startswith("[") and host.endswith("]"):
        return BindAddress(socket.AF_INET6, host[1:-1], int(port_text))
    if ":" in host:
        raise ValueError(f"IPv6 address in {text!r} must be in brackets: [{host}]:{port_text}")
    return BindAddress(socket.AF_INET, host or "0.0.0.0", int(port_text))


def bind(address: BindAddress, backlog: int = 2048, reuse_port: bool = False) -> socket.socket:
    """A non-blocking listening socket for ``address``."""
    if address.family == socket.AF_UNIX:
        _remove_stale_unix_socket(address.host)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        target: object = address.host
    else:
        infos = socket.getaddrinfo(
            address.host, address.port, address.family, socket.SOCK_STREAM, 0, socket.AI_PASSIVE
        )
        family, kind, proto, _, target = infos[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    try:
        sock.bind(target)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {address}: {exc.strerror}") from None
    sock.setblocking(False)
    return sock


def _remove_stale_unix_socket(path: str) -> None:
    try:
        if stat.S_ISSOCK(os.stat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass
