"""A worker: one process, one event loop, serving the app on listening sockets.

The worker imports the app (`server.apploader`), builds its loop from the
backend registry and an `HttpService` for the app's sockets (bound by the
master, or by itself with ``--reuse-port`` or when it runs alone), plus one
for the ``/metrics`` socket when there is one. A supervised worker then says
it has booted and waits for the master's gate (`server.scoreboard`) before it
accepts a connection, so the server answers only once every worker is up.

It serves until a signal says stop:

* SIGQUIT, and SIGTERM under ``--term graceful`` (the default): graceful
  shutdown. The worker stops accepting, takes in the connections already
  waiting in the listen queue (closing a listener resets them, and a client
  of a draining server must not see that), lets in-flight requests finish for
  up to ``--graceful-timeout`` seconds, then stops what is left;
* SIGINT, SIGTERM under ``--term fast``, and a second SIGTERM or SIGINT during
  a graceful shutdown: fast shutdown (in-flight requests are cancelled at once
  and answered 503 where an answer can still be sent).

The handlers stay installed until the worker exits: a signal that arrives
during a shutdown escalates it or is ignored, it never kills the worker by
its default action. Signal handlers only record which signal came; the
worker's main coroutine acts on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import logging
import os
import signal
import socket
from typing import TYPE_CHECKING

from . import backends, fleet_cache, shared_cache
from .apploader import load_app
from .config import Config
from .fleet_cache import FleetTier
from .listeners import bind, describe, parse_bind
from .logs import AccessLog, LoopErrorReporter
from .metrics import MeteredFrontDoor, RequestMetrics, metrics_app
from .scoreboard import READY, STOPPING
from .service import HttpService, tls_context
from .shared_cache import SharedTier

if TYPE_CHECKING:
    from .frontdoor import FrontDoor
    from .master import Supervision

log = logging.getLogger("forkloop")

STOP_SIGNALS = (signal.SIGQUIT, signal.SIGTERM, signal.SIGINT)
GATE_POLL_SECONDS = 0.01
MAX_SHARED_ENTRY = 8 * 1024 * 1024  # bytes: a larger response stays in the worker's cache


def bind_all(config: Config, listen: bool = True) -> list[socket.socket]:
    return [
        bind(parse_bind(text), config.backlog, config.reuse_port, listen) for text in config.binds
    ]


def stop_kind(signum: int, term: str, already: str | None) -> str:
    """ "graceful" or "fast": what ``signum`` asks of a worker (or master) stopping ``already``."""
    if signum == signal.SIGQUIT:
        return "graceful"
    if signum == signal.SIGTERM and term == "graceful" and already is None:
        return "graceful"
    return "fast"


class Worker:
    """Serve ``config`` on ``sockets`` until told to stop."""

    def __init__(
        self,
        config: Config,
        sockets: list[socket.socket],
        supervision: Supervision | None = None,
        metrics_socket: socket.socket | None = None,
    ):
        self.config = config
        self.sockets = sockets
        self.supervision = supervision
        self.metrics_socket = metrics_socket
        self.stopping: str | None = None  # "graceful" | "fast"
        self.stop_reason = ""
        self._stop_requested: asyncio.Event | None = None
        self._shutdown: asyncio.Future[None] | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.service: HttpService | None = None
        self.metrics_service: HttpService | None = None
        self.metrics: RequestMetrics | None = None
        self.front: MeteredFrontDoor | None = None
        self.serving = False
        self._listener_copies: list[socket.socket] = []

    def run(self) -> int:
        if self.supervision is not None:
            _exit_with_parent()
        app = load_app(self.config)
        backend = backends.resolve(self.config.loop)
        with asyncio.Runner(loop_factory=backend.loop_factory()) as runner:
            runner.run(self.serve(app, backend.name))
        return 0

    async def serve(self, app: FrontDoor, backend_name: str) -> None:
        loop = self.loop = asyncio.get_running_loop()
        loop.set_exception_handler(LoopErrorReporter())
        self._stop_requested = asyncio.Event()
        for signum in STOP_SIGNALS:
            loop.add_signal_handler(signum, self._record_signal, signum)
        loop.add_signal_handler(signal.SIGUSR1, self._reopen_logs)
        config = self.config
        self.metrics = RequestMetrics() if config.metrics_bind else None
        access_log = None
        if config.access_log or self.metrics is not None:
            access_log = AccessLog(
                config.access_log_path, config.access_log_format, config.access_log, self.metrics
            )
        front = self.front = MeteredFrontDoor(app, config.health_path, access_log is not None)
        service = self.service = HttpService(front, config, access_log)
        await self._connect_shared_cache()
        await front.startup()  # an ASGI lifespan: part of booting, before the worker is ready
        supervision = self.supervision
        if supervision is not None:
            supervision.scoreboard.set_state(supervision.slot, READY)
            self._beat()
            await self._wait_for_gate()
        if not self._stop_requested.is_set():
            await self._start_serving(service, backend_name)
        try:
            await self._stop_requested.wait()
            await self._stop()
        finally:
            for signum in (*STOP_SIGNALS, signal.SIGUSR1):
                loop.remove_signal_handler(signum)

    async def _connect_shared_cache(self) -> None:
        """The server-wide cache tier, when the master runs a cache process, and the fleet
        tier, when --cache-url names a store: connected at boot; a tier that cannot be
        reached is bypassed (this worker fills alone, or for its server) until it can."""
        config = self.config
        if config.cache_url is not None:
            fleet = FleetTier(
                config.cache_url,
                config.cache_key_prefix,
                config.cache_call_timeout,
                config.cache_max_entry,
            )
            fleet_cache.install(fleet)
            await fleet.connect()
        path = self.supervision.shared_cache if self.supervision is not None else None
        if path is None:
            return
        max_entry = max(1, min(self.config.shared_cache_size // 8, MAX_SHARED_ENTRY))
        tier = SharedTier(path, max_entry)
        shared_cache.install(tier)
        await tier.connect()

    async def _start_serving(self, service: HttpService, backend_name: str) -> None:
        if not self.sockets:  # --reuse-port: each worker binds its own
            self.sockets = bind_all(self.config)
        # Kept to take in the listen queue at a graceful stop (see _drain_listen_queue):
        # the service's close closes its own descriptors.
        self._listener_copies = [sock.dup() for sock in self.sockets]
        await service.start(self.sockets)
        if self.supervision is not None:  # /stats of the demo app: totals over the server
            board, slot = self.supervision.scoreboard, self.supervision.slot
            service.server_totals = lambda own: board.totals(slot, own)
        if self.metrics_socket is not None:
            plain = dataclasses.replace(self.config, certfile=None, keyfile=None, access_log=False)
            self.metrics_service = HttpService(metrics_app(self._totals), plain)
            await self.metrics_service.start([self.metrics_socket])
        self.serving = True
        addresses = ", ".join(describe(sock) for sock in self.sockets)
        log.info("worker %d serving on %s (loop: %s)", os.getpid(), addresses, backend_name)

    async def _wait_for_gate(self) -> None:
        """Booted: wait until the master says every worker has (or a stop comes first)."""
        supervision, stop = self.supervision, self._stop_requested
        assert supervision is not None and stop is not None
        while not supervision.scoreboard.gate_open() and not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), GATE_POLL_SECONDS)

    async def _stop(self) -> None:
        supervision, service = self.supervision, self.service
        assert service is not None
        log.info("worker %d: %s", os.getpid(), self.stop_reason)
        if supervision is not None:
            supervision.scoreboard.set_state(supervision.slot, STOPPING)
        if not self.serving:
            assert self.front is not None
            await self.front.shutdown()  # the lifespan ran as the worker booted
            return
        graceful = self.stopping == "graceful"
        if graceful:
            service.stop_accepting()
            await self._until_only_the_copies_listen()
            self._drain_listen_queue(service)
        for copy in self._listener_copies:
            copy.close()
        timeout = self.config.graceful_timeout if graceful else 0.0
        self._shutdown = asyncio.ensure_future(self._shut_down_services(timeout))
        await asyncio.wait({self._shutdown})
        if self._shutdown.cancelled():  # a fast stop came during the graceful one
            await self._shut_down_services(0.0)
        if supervision is not None:
            supervision.scoreboard.beat(supervision.slot, self._own_counters())

    async def _shut_down_services(self, timeout: float) -> None:
        assert self.service is not None
        services = [self.service] + ([self.metrics_service] if self.metrics_service else [])
        await asyncio.gather(*(service.shutdown(timeout) for service in services))

    async def _until_only_the_copies_listen(self, timeout: float = 1.0) -> None:
        """Wait until the loop has let go of its listening descriptors (bounded).

        A loop may close them a turn or two after ``server.close()`` (the proactor
        closes its listener once its standing accept has ended). Were the drain to
        run before, the loop's descriptor would be the last to close, and the
        connections queued meanwhile would be reset with it."""
        inodes = set()
        for copy in self._listener_copies:
            with contextlib.suppress(OSError):
                inodes.add(os.fstat(copy.fileno()).st_ino)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while _open_listener_fds(inodes) > len(inodes) and loop.time() < deadline:
            await asyncio.sleep(0.005)

    def _drain_listen_queue(self, service: HttpService) -> None:
        """Stop accepting, then accept what already waits in the listen queue.

        Closing the last descriptor of a listening socket resets the connections
        still in its queue: clients that connected before the stop would lose their
        request. So the worker accepts them first, with no await between the last
        accept and the close, and serves them like any other connection."""
        service.stop_accepting()
        loop = self.loop
        assert loop is not None
        tls = tls_context(self.config)
        for copy in self._listener_copies:
            copy.setblocking(False)
            while True:
                try:
                    connection, _ = copy.accept()
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:
                    break
                connection.setblocking(False)
                wrap = tls if connection.family != socket.AF_UNIX else None
                loop.create_task(
                    loop.connect_accepted_socket(service.create_connection, connection, ssl=wrap)
                )

    def _totals(self) -> dict[str, int]:
        """Counters over the whole server, this worker's live ones included."""
        own = self._own_counters()
        if self.supervision is None:
            return {**own, "workers": 1}
        board, slot = self.supervision.scoreboard, self.supervision.slot
        # Published as they are shown: a scrape must never see a counter go back, even
        # when this worker is killed before its next heartbeat would have published it.
        board.beat(slot, own)
        return board.totals(slot, own)

    def _own_counters(self) -> dict[str, int]:
        counters = self.service.counters() if self.serving and self.service else {}
        if self.metrics is not None:
            counters.update(self.metrics.counters())
        return counters

    def _beat(self) -> None:
        """Heartbeat and counters to the scoreboard; retire or leave when it is time."""
        supervision, loop = self.supervision, self.loop
        assert supervision is not None and loop is not None
        if self.stopping is not None:
            return
        supervision.scoreboard.beat(supervision.slot, self._own_counters())
        requests = self.service.stats.requests if self.serving and self.service else 0
        if supervision.max_requests and requests >= supervision.max_requests:
            self._request_stop("graceful", f"retiring after {requests} requests (--max-requests)")
        elif os.getppid() != supervision.master_pid:
            self._request_stop("graceful", "the master is gone: stopping gracefully")
        else:
            loop.call_later(supervision.heartbeat_interval, self._beat)

    def _reopen_logs(self) -> None:
        if self.service is not None and self.service.access_log is not None:
            self.service.access_log.reopen()

    def _request_stop(self, kind: str, reason: str) -> None:
        if self.stopping == "fast" or self.stopping == kind:
            return
        escalating = self.stopping == "graceful"
        self.stopping = kind
        self.stop_reason = reason
        if escalating:
            log.info("worker %d: %s", os.getpid(), reason)
            if self._shutdown is not None:
                self._shutdown.cancel()
        if self._stop_requested is not None:
            self._stop_requested.set()

    def _record_signal(self, signum: int) -> None:
        kind = stop_kind(signum, self.config.term, self.stopping)
        name = signal.Signals(signum).name
        self._request_stop(kind, f"{kind} shutdown requested ({name})")


PR_SET_PDEATHSIG = 1


def _exit_with_parent() -> None:
    """Ask the kernel for SIGQUIT (graceful stop) when the master dies, even by SIGKILL."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGQUIT, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: the heartbeat's parent check still notices


def _open_listener_fds(inodes: set[int]) -> int:
    """How many of this process's descriptors name these sockets (0 without /proc)."""
    names = {f"socket:[{inode}]" for inode in inodes}
    count = 0
    try:
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/self/fd/{fd}") in names:
                    count += 1
    except OSError:
        return 0
    return count
