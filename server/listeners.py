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
    if (
        not sep
        or not (port_text.isascii() and port_text.isdigit())
        or not 0 <= int(port_text) <= 65535
    ):
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


def describe(sock: socket.socket) -> str:
    """``http://127.0.0.1:8000``, ``http://[::1]:8000`` or ``unix:/path``."""
    address = sock.getsockname()
    if sock.family == socket.AF_UNIX:
        return f"unix:{address}"
    if sock.family == socket.AF_INET6:
        return f"http://[{address[0]}]:{address[1]}"
    return f"http://{address[0]}:{address[1]}"


SD_LISTEN_FDS_START = 3


def inherited_sockets(environ: dict[str, str] | None = None) -> list[socket.socket]:
    """Listening sockets handed over by an upgrading master or by systemd, if any.

    ``FORKLOOP_LISTEN_FDS=3,4`` is what `forkloop` sets on USR2; systemd socket
    activation sets ``LISTEN_FDS=N`` (fds 3..3+N-1) and ``LISTEN_PID``.
    """
    environ = os.environ if environ is None else environ
    fds: list[int] = []
    if environ.get("FORKLOOP_LISTEN_FDS"):
        fds = [int(fd) for fd in environ["FORKLOOP_LISTEN_FDS"].split(",")]
    elif environ.get("LISTEN_FDS") and environ.get("LISTEN_PID") == str(os.getpid()):
        count = int(environ["LISTEN_FDS"])
        fds = list(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count))
    sockets = []
    for fd in fds:
        sock = socket.socket(fileno=fd)
        sock.setblocking(False)
        os.set_inheritable(fd, False)
        sockets.append(sock)
    for name in ("FORKLOOP_LISTEN_FDS", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    return sockets
