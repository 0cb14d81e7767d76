"""Listening sockets: parse ``--bind`` addresses and bind them.

Accepted forms, as gunicorn and uvicorn users write them:
``127.0.0.1:8000``, ``:8000`` (all IPv4 interfaces), ``[::1]:8000``,
``localhost:8000``, ``unix:/run/forkloop.sock``. A refused address says what
was wrong with it and what would do (a scheme, a port out of range, an IPv6
address without brackets).

Binding is split from listening: the master binds at start (so a port in use
fails at once, exit 3) and the sockets start listening when the workers start
serving, after every one of them has booted; until then a client is refused,
not queued behind workers that are still importing the app.

``--reuse-port`` lets several sockets share a port. It is meant for this
server's own workers, not for two servers: `check_port_free` refuses a port
that another live socket already listens on, unless that socket is this
server's previous master handing over on USR2. A Unix socket file is this
server's to remove when it exits (`remove_unix_sockets`).
"""

from __future__ import annotations

import os
import socket
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


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
    scheme, has_scheme, rest = text.partition("://")
    if has_scheme:
        example = rest.rstrip("/") if scheme.lower() in ("http", "https", "tcp") else "HOST:PORT"
        raise ValueError(
            f"bind address {text!r} has a scheme: write HOST:PORT without it, e.g. {example}"
        )
    host, sep, port_text = text.rpartition(":")
    if not sep or not (port_text.isascii() and port_text.isdigit()):
        raise ValueError(f"bind address {text!r} needs a port: HOST:PORT, [IPv6]:PORT or unix:PATH")
    if not 0 <= int(port_text) <= 65535:
        raise ValueError(f"bind address {text!r}: port {port_text} is not between 0 and 65535")
    if host.startswith("[") and host.endswith("]"):
        return BindAddress(socket.AF_INET6, host[1:-1], int(port_text))
    if ":" in host:
        raise ValueError(f"IPv6 address in {text!r} must be in brackets: [{host}]:{port_text}")
    return BindAddress(socket.AF_INET, host or "0.0.0.0", int(port_text))


def bind(
    address: BindAddress, backlog: int = 2048, reuse_port: bool = False, listen: bool = True
) -> socket.socket:
    """A non-blocking socket bound to ``address``, listening unless ``listen`` is false."""
    if address.family == socket.AF_UNIX:
        _remove_stale_unix_socket(address.host)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        target: Any = address.host
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
        if listen:
            sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {address}: {exc.strerror}") from None
    sock.setblocking(False)
    return sock


def check_port_free(address: BindAddress) -> None:
    """Refuse a TCP port another live socket listens on, ``--reuse-port`` or not.

    SO_REUSEPORT would let a second server bind beside the first and the kernel
    would split the connections between them; a plain bind (SO_REUSEADDR only,
    so connections in TIME_WAIT do not count) fails exactly when a socket
    listens there."""
    if address.family == socket.AF_UNIX:
        return
    infos = socket.getaddrinfo(
        address.host, address.port, address.family, socket.SOCK_STREAM, 0, socket.AI_PASSIVE
    )
    family, kind, proto, _, target = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            probe.bind(target)
        except OSError as exc:
            raise OSError(
                exc.errno,
                f"cannot listen on {address}: another process already serves this port "
                f"({exc.strerror}); --reuse-port shares a port only among this server's "
                "own workers",
            ) from None


def remove_unix_sockets(addresses: list[BindAddress]) -> None:
    """Remove the Unix socket files this server bound (at exit)."""
    for address in addresses:
        if address.family == socket.AF_UNIX:
            _remove_stale_unix_socket(address.host)


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
UPGRADE_FDS_ENV = "FORKLOOP_LISTEN_FDS"  # the listeners an upgrading master hands over
UPGRADE_METRICS_FD_ENV = "FORKLOOP_METRICS_FD"  # and its /metrics listener
UPGRADE_FROM_ENV = "FORKLOOP_UPGRADE_FROM"  # the old master's pid: its ports are ours


def inherited_metrics_socket(environ: Mapping[str, str] | None = None) -> socket.socket | None:
    """The ``/metrics`` listener an upgrading master handed over, if any."""
    environ = environ if environ is not None else os.environ
    text = environ.get(UPGRADE_METRICS_FD_ENV)
    os.environ.pop(UPGRADE_METRICS_FD_ENV, None)
    if not text:
        return None
    sock = socket.socket(fileno=int(text))
    sock.setblocking(False)
    os.set_inheritable(sock.fileno(), False)
    return sock


def is_upgrade(environ: Mapping[str, str] | None = None) -> bool:
    """True in a master started by USR2 (its ports are still held by the old master)."""
    environ = environ if environ is not None else os.environ
    return bool(environ.get(UPGRADE_FROM_ENV))


def inherited_sockets(environ: Mapping[str, str] | None = None) -> list[socket.socket]:
    """Listening sockets handed over by an upgrading master or by systemd, if any.

    ``FORKLOOP_LISTEN_FDS=3,4`` is what `forkloop` sets on USR2; systemd socket
    activation sets ``LISTEN_FDS=N`` (fds 3..3+N-1) and ``LISTEN_PID``.
    """
    environ = environ if environ is not None else os.environ
    fds: list[int] = []
    if environ.get(UPGRADE_FDS_ENV):
        fds = [int(fd) for fd in environ[UPGRADE_FDS_ENV].split(",")]
    elif environ.get("LISTEN_FDS") and environ.get("LISTEN_PID") == str(os.getpid()):
        count = int(environ["LISTEN_FDS"])
        fds = list(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count))
    sockets = []
    for fd in fds:
        sock = socket.socket(fileno=fd)
        sock.setblocking(False)
        os.set_inheritable(fd, False)
        sockets.append(sock)
    for name in (UPGRADE_FDS_ENV, "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    return sockets
