"""One worker's HTTP service: its connections, its clock and its counters.

`HttpService` is what a worker process runs on its event loop. Once started it
holds one `ConnectionContext` (what every connection shares, the set of live
connections among it) and builds an `HttpConnection` on it per accepted
socket; graceful shutdown and the housekeeping tick walk over that set.

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
import socket
import ssl
from collections.abc import Callable
from typing import Any

from . import fleet_cache
from .config import Config
from .context import SHUTDOWN, ConnectionContext, Stats
from .frontdoor import FrontDoor, start_front_door, stop_front_door
from .logs import AccessLog
from .protocol import HttpConnection

log = logging.getLogger("forkloop")

ACCEPTED_SETTLE = 0.1  # seconds for already-accepted connections to arrive at shutdown


def tls_context(config: Config) -> ssl.SSLContext | None:
    """The server-side TLS context for --certfile/--keyfile, or None for plain HTTP."""
    if config.certfile is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(config.certfile, config.keyfile)
    context.set_alpn_protocols(["http/1.1"])
    return context


class HttpService:
    """Serves one front door (an `App`, an ASGI application) on a running event loop."""

    def __init__(self, app: FrontDoor, config: Config, access_log: AccessLog | None = None) -> None:
        self.app = app
        self.config = config
        self.access_log = access_log
        self.servers: list[asyncio.AbstractServer] = []
        # set by a supervised worker: own counters -> counters summed over the server
        self.server_totals: Callable[[dict[str, int]], dict[str, int]] | None = None
        self._context: ConnectionContext | None = None
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

    @property
    def context(self) -> ConnectionContext:
        """What every connection shares; exists once `start` has run."""
        if self._context is None:
            raise RuntimeError("the service has not started")
        return self._context

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self.context.loop

    @property
    def stats(self) -> Stats:
        return self.context.stats

    @property
    def connections(self) -> set[Any]:
        return self.context.connections

    # ------------------------------------------------------------------ lifecycle

    async def start(self, sockets: list[socket.socket]) -> None:
        """Serve on already-bound listening sockets."""
        loop = asyncio.get_running_loop()
        self._context = ConnectionContext(
            loop,
            self.config.limits,
            self.app.resolve,
            self.access_log,
            self.snapshot,
            stream_bodies=getattr(self.app, "streams_bodies", False),
            websockets=getattr(self.app, "serves_websockets", False),
            instant=getattr(self.app, "instant_answers", None),
        )
        await start_front_door(self.app)  # an ASGI lifespan: before the first connection
        self._tick_handle = loop.call_later(self.tick_interval, self._tick)
        tls = tls_context(self.config)
        for sock in sockets:
            server = await loop.create_server(
                self.create_connection,
                sock=sock,
                backlog=self.config.backlog,
                ssl=tls if sock.family != socket.AF_UNIX else None,
            )
            self.servers.append(server)

    def create_connection(self) -> HttpConnection:
        return HttpConnection(self.context)

    def stop_accepting(self) -> None:
        for server in self.servers:
            server.close()

    async def shutdown(self, timeout: float) -> None:
        """Stop accepting, let in-flight requests finish (up to ``timeout``), close the rest."""
        context = self.context
        self.stop_accepting()
        context.draining = True
        # A connection the loop accepted just before the close may reach
        # connection_made a loop turn or two later (asyncio creates transports in a
        # task); counting the connections before it arrives would reset it at exit.
        await asyncio.sleep(ACCEPTED_SETTLE)
        for connection in list(context.connections):
            connection.close_if_idle()
        await self._wait_for_connections(timeout)
        if context.connections:  # past the grace: cancel what still runs, answer 503 where we can
            for connection in list(context.connections):
                connection.cancel_active(SHUTDOWN)
            await self._wait_for_connections(min(1.0, timeout) if timeout else 0.1)
        for connection in list(context.connections):
            connection.abort()
        if self._tick_handle is not None:
            self._tick_handle.cancel()
        for server in self.servers:
            await server.wait_closed()
        await stop_front_door(self.app)

    async def _wait_for_connections(self, timeout: float) -> None:
        context = self.context
        deadline = context.loop.time() + timeout
        while context.connections and context.loop.time() < deadline:
            await asyncio.sleep(min(0.05, self.tick_interval))

    # ------------------------------------------------------------------ housekeeping

    def _tick(self) -> None:
        context = self.context
        context.refresh_date()
        now = context.loop.time()
        # Deadlines were set from a clock up to one tick old: checking them against
        # a clock one tick behind means no deadline fires early.
        for connection in list(context.connections):
            connection.check_deadlines(now - self.tick_interval)
        context.clock = now
        self._tick_handle = context.loop.call_later(self.tick_interval, self._tick)

    def counters(self) -> dict[str, int]:
        """Flat counters for the scoreboard: HTTP, cancellations and the cache."""
        counters = self.stats.counters(len(self.connections))
        for name, value in (self.app.cache_stats or {}).items():
            counters[f"cache_{name}"] = value
        if fleet_cache.current() is not None:
            for name, value in fleet_cache.counters().items():
                counters[f"cache_{name}"] = value
        return counters

    def snapshot(self) -> dict[str, Any]:
        loop = self.loop
        snapshot = self.stats.snapshot(len(self.connections))
        snapshot["cache"] = self.app.cache_stats or {}
        snapshot["loop"] = f"{type(loop).__module__}.{type(loop).__qualname__}"
        engine = getattr(loop, "engine_name", None)  # loops with several engines say which
        if engine is not None:
            snapshot["loop_engine"] = engine
        if self.server_totals is not None:
            snapshot["server"] = self.server_totals(self.counters())
        return snapshot
