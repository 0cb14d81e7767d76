"""What every connection of one worker shares: `ConnectionContext`.

A connection needs a handful of things from the worker that serves it: the
limits, a clock, the counters, the cached ``Date``/``Server`` lines, the access
log, whether the worker is draining, the app's router and the registry of live
connections. `HttpService` builds one context and hands it to every
connection; the connection layer (`server.protocol`, `server.responses`)
imports nothing of the service, so a connection can be built in a unit test
with a context, a fake transport and no worker at all.

Invariants
----------
* ``clock`` is the loop's time as of the last housekeeping tick: deadlines are
  set from it with one attribute read, never a system call per request. It may
  be up to one tick old; the tick compensates when it checks deadlines.
* ``date_and_server`` changes at most once a second (`refresh_date`), and every
  prefix in the response-prefix cache was built from the current one.
* ``connections`` holds exactly the connections between ``connection_made``
  and ``connection_lost`` that were not refused for ``max_connections``.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from email.utils import formatdate
from typing import TYPE_CHECKING, Any, Protocol

from .config import Limits
from .eager import EagerStarter
from .http import SERVER_NAME, STATUS_LINES, Request, Response, content_type_line, status_line
from .logs import AccessLog

if TYPE_CHECKING:
    from .app import Route
    from .frontdoor import DirectRoute
    from .instant import InstantAnswers

TOO_MANY_CONNECTIONS = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Content-Length: 46\r\nConnection: close\r\n\r\n"
    b"503 Service Unavailable: too many connections\n"
)

# why a handler was cancelled (Request.cancel_reason), counted in Stats.cancelled
DISCONNECT, DEADLINE, SHUTDOWN = "disconnect", "deadline", "shutdown"


class Connection(Protocol):
    """What the context and the service's tick need of a connection."""

    def check_deadlines(self, now: float) -> None: ...
    def refuse(self, answer: bytes) -> None: ...
    def close_if_idle(self) -> bool: ...
    def cancel_active(self, reason: str) -> None: ...
    def abort(self) -> None: ...


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
        self.cancelled = {DISCONNECT: 0, DEADLINE: 0, SHUTDOWN: 0}

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


class ConnectionContext:
    """The worker's side of every connection; see the module's docstring."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        limits: Limits,
        resolve: Callable[[Request], Route | Response | DirectRoute],
        access_log: AccessLog | None = None,
        snapshot: Callable[[], dict[str, Any]] | None = None,
        stream_bodies: bool = False,
        websockets: bool = False,
        instant: InstantAnswers | None = None,
    ) -> None:
        self.loop = loop
        # the front door reads request bodies as they arrive (server.request_body)
        self.stream_bodies = stream_bodies
        # the front door takes WebSocket upgrades (server.websocket); else they are declined
        self.websockets = websockets
        self.limits = limits
        self.resolve = resolve
        self.starter = EagerStarter(loop)  # runs async handlers' first steps inline
        self.access_log = access_log
        # the front door's ready cache hits (server.instant), when no access log line
        # needs the request: the reader answers them itself
        self.instant = instant if access_log is None or not access_log.lines else None
        self.instant_metrics = access_log.metrics if access_log is not None else None
        # requests answered instantly, by their bytes: target and method (server.instant)
        self.known_requests: dict[bytes, tuple[bytes, bytes]] | None = None
        if self.instant is not None:
            self.instant.enabled = True
            self.known_requests = {}
        self.stats = Stats()
        self.connections: set[Connection] = set()
        self.draining = False
        self.clock = loop.time()
        self.date_and_server = b""
        self._snapshot = snapshot
        self._date_second = -1
        self._prefixes: dict[tuple[int, str | None], bytes] = {}
        self.refresh_date()

    # ------------------------------------------------------------------ connections

    def connection_opened(self, connection: Connection) -> bool:
        """Register a new connection; False (and it is answered 503) past the limit."""
        self.stats.connections_total += 1
        limit = self.limits.max_connections
        if limit and len(self.connections) >= limit:
            # Over --max-connections: answer at once and close, rather than leave the
            # client waiting in the backlog behind a worker that cannot take it.
            self.stats.connections_refused += 1
            connection.refuse(TOO_MANY_CONNECTIONS)
            return False
        self.connections.add(connection)
        if self.draining:
            connection.close_if_idle()
        return True

    def connection_closed(self, connection: Connection) -> None:
        self.connections.discard(connection)

    # ------------------------------------------------------------------ responses

    def refresh_date(self) -> None:
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

    def count_response(self, request: Request | None, status: int, size: int) -> None:
        self.stats.responses[status] += 1
        if self.access_log is not None:
            self.access_log.write(request, status, size)

    def snapshot(self) -> dict[str, Any]:
        """The worker's ``/stats`` document (its counters alone when no service set one)."""
        if self._snapshot is not None:
            return self._snapshot()
        return self.stats.snapshot(len(self.connections))
