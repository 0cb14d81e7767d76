"""One worker's HTTP service: its connections, its clock and its counters.

`HttpService` is what a worker process runs on its event loop. It builds an
`HttpConnection` per accepted socket and keeps the set of live ones, which is
what graceful shutdown and the housekeeping tick walk over.

The housekeeping tick (`_tick`) runs a few times a second. It refreshes the
cached ``Date``/``Server`` header lines (one formatting per second, not per
response) and enforces every connection's deadline. Connections store their
deadline as a number; nothing allocates a timer per request. A deadline is
therefore honoured within one tick: the tick is a quarter of the shortest
timeout, and at most a second.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
import time
from collections.abc import Callable
from email.utils import formatdate
from typing import Any

from .app import App
from .config import Config
from .http import SERVER_NAME, STATUS_LINES, Request, content_type_line, status_line
from .logs import AccessLog
from .protocol import SHUTDOWN, HttpConnection

log = logging.getLogger("forkloop")

TOO_MANY_CONNECTIONS = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Content-Length: 46\r\nConnection: close\r\n\r\n"
    b"503 Service Unavailable: too many connections\n"
)
ACCEPTED_SETTLE = 0.1  # seconds for already-accepted connections to arrive at shutdown


def tls_context(config: Config) -> ssl.SSLContext | None:
    """The server-side TLS context for --certfile/--keyfile, or None for plain HTTP."""
    if config.certfile is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(config.certfile, config.keyfile)
    context.set_alpn_protocols(["http/1.1"])
    return context


class Stats:
    """Per-process counters, served as JSON by ``/stats``."""

    __slots__ = (
        "requests",
        "rejected",
        "timeouts",
        "connections_total",
        "connections_refused",
        "responses",
        "cancelled",
    )

    def __init__(self) -> None:
        self.requests = 0
        self.rejected = 0
        self.timeouts = 0
        self.connections_total = 0
        self.connections_refused = 0
        self.responses = [0] * 1000  # indexed by status: cheaper than a Counter per response
        self.cancelled = {"disconnect": 0, "deadline": 0, "shutdown": 0}

    def counters(self, open_connections: int) -> dict[str, int]:
        """The flat counters the scoreboard publishes across workers."""
        responses = self.responses
        return {
            "requests": self.requests,
            "responses": sum(responses),
            "responses_2xx": sum(responses[200:300]),
            "responses_3xx": sum(responses[300:400]),
            "responses_4xx": sum(responses[400:500]),
            "responses_5xx": sum(responses[500:]),
            "rejected": self.rejected,
            "timeouts": self.timeouts,
            "open_connections": open_connections,
            "connections_total": self.connections_total,
            **{f"cancelled_{reason}": n for reason, n in self.cancelled.items()},
        }

    def snapshot(self, open_connections: int) -> dict[str, Any]:
        by_status = {str(status): n for status, n in enumerate(self.responses) if n}
        errors = {status: n for status, n in by_status.items() if int(status) >= 400}
        return {
            "pid": os.getpid(),
            "requests": self.requests,
            "responses": sum(self.responses),
            "responses_by_status": by_status,
            "errors_by_status": errors,
            "rejected": self.rejected,
            "timeouts": self.timeouts,
            "open_connections": open_connections,
            "connections_total": self.connections_total,
            "connections_refused": self.connections_refused,
            "cancelled": dict(self.cancelled),
        }


class HttpService:
    """Serves one `App` on a running event loop."""

    def __init__(self, app: App, config: Config, access_log: AccessLog | None = None) -> None:
        self.app = app
        self.config = config
        self.access_log = access_log
        self.stats = Stats()
        self.connections: set[HttpConnection] = set()
        self.draining = False
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]
        self.servers: list[asyncio.AbstractServer] = []
        # set by a supervised worker: own counters -> counters summed over the server
        self.server_totals: Callable[[dict[str, int]], dict[str, int]] | None = None
        self.date_and_server = b""
        self.clock = 0.0  # loop.time() as of the last tick: what deadlines are set from
        self._date_second = -1
        self._prefixes: dict[tuple[int, str | None], bytes] = {}
        self._tick_handle: asyncio.TimerHandle | None = None
        limits = config.limits
        shortest = min(
            limits.header_timeout,
            limits.body_timeout,
            limits.keepalive_timeout,
            limits.send_timeout,
            limits.lingering_timeout,
        )
        self.tick_interval = max(0.05, min(1.0, shortest / 4))

    # ------------------------------------------------------------------ lifecycle

    async def start(self, sockets: list[Any]) -> None:
        """Serve on already-bound listening sockets."""
        self.loop = asyncio.get_running_loop()
        self.clock = self.loop.time()
        self._refresh_date()
        self._tick_handle = self.loop.call_later(self.tick_interval, self._tick)
        tls = tls_context(self.config)
        for sock in sockets:
            server = await self.loop.create_server(
                self.create_connection,
                sock=sock,
                backlog=self.config.backlog,
                ssl=tls if sock.family != socket.AF_UNIX else None,
            )
            self.servers.append(server)

    def create_connection(self) -> HttpConnection:
        return HttpConnection(self)

    def stop_accepting(self) -> None:
        for server in self.servers:
            server.close()

    async def shutdown(self, timeout: float) -> None:
        """Stop accepting, let in-flight requests finish (up to ``timeout``), close the rest."""
        self.stop_accepting()
        self.draining = True
        # A connection the loop accepted just before the close may reach
        # connection_made a loop turn or two later (asyncio creates transports in a
        # task); counting the connections before it arrives would reset it at exit.
        await asyncio.sleep(ACCEPTED_SETTLE)
        for connection in list(self.connections):
            connection.close_if_idle()
        await self._wait_for_connections(timeout)
        if self.connections:  # past the grace: cancel what still runs, answer 503 where we can
            for connection in list(self.connections):
                connection.cancel_active(SHUTDOWN)
            await self._wait_for_connections(min(1.0, timeout) if timeout else 0.1)
        for connection in list(self.connections):
            if connection.transport is not None:
                connection.transport.abort()
        if self._tick_handle is not None:
            self._tick_handle.cancel()
        for server in self.servers:
            await server.wait_closed()

    async def _wait_for_connections(self, timeout: float) -> None:
        deadline = self.loop.time() + timeout
        while self.connections and self.loop.time() < deadline:
            await asyncio.sleep(min(0.05, self.tick_interval))

    # ------------------------------------------------------------------ connections

    def connection_opened(self, connection: HttpConnection) -> None:
        self.stats.connections_total += 1
        limit = self.config.limits.max_connections
        if limit and len(self.connections) >= limit:
            # Over --max-connections: answer at once and close, rather than leave the
            # client waiting in the backlog behind a worker that cannot take it.
            self.stats.connections_refused += 1
            connection.transport.write(TOO_MANY_CONNECTIONS)
            connection.transport.close()
            return
        self.connections.add(connection)
        if self.draining:
            connection.close_if_idle()

    def connection_closed(self, connection: HttpConnection) -> None:
        self.connections.discard(connection)

    def count_response(self, request: Request | None, status: int, size: int) -> None:
        self.stats.responses[status] += 1
        if self.access_log is not None:
            self.access_log.write(request, status, size)

    # ------------------------------------------------------------------ housekeeping

    def _tick(self) -> None:
        self._refresh_date()
        now = self.loop.time()
        # Deadlines were set from a clock up to one tick old: advancing it by a tick
        # after the check means no deadline fires early.
        for connection in list(self.connections):
            if connection.deadline or connection.send_deadline:
                connection.check_deadlines(now - self.tick_interval)
        self.clock = now
        self._tick_handle = self.loop.call_later(self.tick_interval, self._tick)

    def _refresh_date(self) -> None:
        second = int(time.time())
        if second != self._date_second:
            self._date_second = second
            date = formatdate(second, usegmt=True)
            self.date_and_server = f"Date: {date}\r\nServer: {SERVER_NAME}\r\n".encode()
            self._prefixes.clear()

    def response_prefix(self, status: int, content_type: str | None) -> bytes:
        """Status line, Date, Server and Content-Type: the same for every such response
        within a second, so it is built once a second."""
        prefix = self._prefixes.get((status, content_type))
        if prefix is None:
            prefix = (STATUS_LINES.get(status) or status_line(status)) + self.date_and_server
            if content_type is not None:
                prefix += content_type_line(content_type)
            if len(self._prefixes) < 1024:
                self._prefixes[(status, content_type)] = prefix
        return prefix

    def counters(self) -> dict[str, int]:
        """Flat counters for the scoreboard: HTTP, cancellations and the cache."""
        counters = self.stats.counters(len(self.connections))
        for name, value in (self.app.cache_stats or {}).items():
            counters[f"cache_{name}"] = value
        return counters

    def snapshot(self) -> dict[str, Any]:
        snapshot = self.stats.snapshot(len(self.connections))
        snapshot["cache"] = self.app.cache_stats or {}
        snapshot["loop"] = f"{type(self.loop).__module__}.{type(self.loop).__qualname__}"
        engine = getattr(self.loop, "engine_name", None)  # loops with several engines say which
        if engine is not None:
            snapshot["loop_engine"] = engine
        if self.server_totals is not None:
            snapshot["server"] = self.server_totals(self.counters())
        return snapshot
