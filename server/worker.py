"""A worker: one process, one event loop, serving the app on listening sockets.

The worker builds its loop from the backend registry, starts an `HttpService`
on the sockets it was given (bound by the master, or by itself when it runs
alone), and serves until a signal says stop:

* SIGTERM, SIGINT: fast shutdown (in-flight requests get no time);
* SIGQUIT: graceful shutdown (stop accepting, finish in-flight requests, up to
  ``graceful_timeout`` seconds).

Signal handlers only record which signal came; the worker's main coroutine
acts on it.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import socket
from typing import TYPE_CHECKING

from . import backends
from .app import App, import_app
from .config import Config
from .listeners import bind, describe, parse_bind
from .logs import AccessLog
from .scoreboard import READY, STOPPING
from .service import HttpService

if TYPE_CHECKING:
    from .master import Supervision

log = logging.getLogger("forkloop")

GRACEFUL_SIGNALS = (signal.SIGQUIT,)
FAST_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def load_app(config: Config) -> App:
    if config.app is None:
        from .demo import app

        return app
    return import_app(config.app)


def bind_all(config: Config) -> list[socket.socket]:
    return [bind(parse_bind(text), config.backlog, config.reuse_port) for text in config.binds]


class Worker:
    """Serve ``config`` on ``sockets`` until told to stop."""

    def __init__(
        self,
        config: Config,
        sockets: list[socket.socket],
        graceful_timeout: float = 30.0,
        supervision: Supervision | None = None,
    ):
        self.config = config
        self.sockets = sockets
        self.graceful_timeout = graceful_timeout
        self.supervision = supervision
        self.stop_signal: int | None = None
        self.stop_reason = ""
        self._stop_requested: asyncio.Event | None = None
        self.service: HttpService | None = None

    def run(self) -> int:
        if self.supervision is not None:
            _exit_with_parent()
        app = load_app(self.config)
        backend = backends.resolve(self.config.loop)
        if not self.sockets:  # --reuse-port: each worker binds its own
            self.sockets = bind_all(self.config)
        with asyncio.Runner(loop_factory=backend.loop_factory()) as runner:
            runner.run(self.serve(app, backend.name))
        return 0

    async def serve(self, app: App, backend_name: str) -> None:
        loop = asyncio.get_running_loop()
        self._stop_requested = asyncio.Event()
        access_log = AccessLog(self.config.access_log_path) if self.config.access_log else None
        service = self.service = HttpService(app, self.config, access_log)
        await service.start(self.sockets)
        for signum in GRACEFUL_SIGNALS + FAST_SIGNALS:
            loop.add_signal_handler(signum, self._record_signal, signum)
        loop.add_signal_handler(signal.SIGUSR1, self._reopen_logs)
        supervision = self.supervision
        if supervision is not None:
            board, slot = supervision.scoreboard, supervision.slot
            service.server_totals = lambda own: board.totals(slot, own)
            board.set_state(slot, READY)
            self._beat()
        addresses = ", ".join(describe(sock) for sock in self.sockets)
        log.info("worker %d serving on %s (loop: %s)", os.getpid(), addresses, backend_name)
        try:
            await self._stop_requested.wait()
        finally:
            for signum in (*GRACEFUL_SIGNALS, *FAST_SIGNALS, signal.SIGUSR1):
                loop.remove_signal_handler(signum)
        graceful = self.stop_signal in GRACEFUL_SIGNALS
        log.info(
            "worker %d: %s shutdown (%s)",
            os.getpid(),
            "graceful" if graceful else "fast",
            self.stop_reason or signal.Signals(self.stop_signal).name,
        )
        if supervision is not None:
            supervision.scoreboard.set_state(supervision.slot, STOPPING)
        await service.shutdown(self.graceful_timeout if graceful else 0.0)
        if supervision is not None:
            supervision.scoreboard.beat(supervision.slot, service.counters())

    def _beat(self) -> None:
        """Heartbeat and counters to the scoreboard; retire or leave when it is time."""
        supervision, service = self.supervision, self.service
        assert supervision is not None and service is not None
        if self._stop_requested is not None and self._stop_requested.is_set():
            return
        stats = service.stats
        supervision.scoreboard.beat(supervision.slot, service.counters())
        if supervision.max_requests and stats.requests >= supervision.max_requests:
            self._request_stop(signal.SIGQUIT, f"retiring after {stats.requests} requests")
        elif os.getppid() != supervision.master_pid:
            self._request_stop(signal.SIGQUIT, "the master is gone")
        else:
            service.loop.call_later(supervision.heartbeat_interval, self._beat)

    def _reopen_logs(self) -> None:
        if self.service is not None and self.service.access_log is not None:
            self.service.access_log.reopen()

    def _request_stop(self, signum: int, reason: str) -> None:
        self.stop_reason = reason
        self._record_signal(signum)

    def _record_signal(self, signum: int) -> None:
        self.stop_signal = signum
        if self._stop_requested is not None:
            self._stop_requested.set()


PR_SET_PDEATHSIG = 1


def _exit_with_parent() -> None:
    """Ask the kernel for SIGQUIT (graceful stop) when the master dies, even by SIGKILL."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGQUIT, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: the heartbeat's parent check still notices
