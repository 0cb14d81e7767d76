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
import logging
import os
import signal
import socket

from server import backends
from server.app import App, import_app
from server.config import Config
from server.listeners import bind, parse_bind
from server.logs import AccessLog
from server.service import HttpService

log = logging.getLogger("forkloop")

GRACEFUL_SIGNALS = (signal.SIGQUIT,)
FAST_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def load_app(config: Config) -> App:
    if config.app is None:
        from server.demo import app

        return app
    return import_app(config.app)


def bind_all(config: Config) -> list[socket.socket]:
    return [bind(parse_bind(text), config.backlog, config.reuse_port) for text in config.binds]


class Worker:
    """Serve ``config`` on ``sockets`` until told to stop."""

    def __init__(
        self, config: Config, sockets: list[socket.socket], graceful_timeout: float = 30.0
    ):
        self.config = config
        self.sockets = sockets
        self.graceful_timeout = graceful_timeout
        self.stop_signal: int | None = None
        self._stop_requested: asyncio.Event | None = None

    def run(self) -> None:
        app = load_app(self.config)
        backend = backends.resolve(self.config.loop)
        with asyncio.Runner(loop_factory=backend.loop_factory()) as runner:
            runner.run(self.serve(app, backend.name))

    async def serve(self, app: App, backend_name: str) -> None:
        loop = asyncio.get_running_loop()
        self._stop_requested = asyncio.Event()
        access_log = AccessLog(self.config.access_log_path) if self.config.access_log else None
        service = HttpService(app, self.config, access_log)
        await service.start(self.sockets)
        for signum in GRACEFUL_SIGNALS + FAST_SIGNALS:
            loop.add_signal_handler(signum, self._record_signal, signum)
        addresses = ", ".join(_describe(sock) for sock in self.sockets)
        log.info("worker %d serving on %s (loop: %s)", os.getpid(), addresses, backend_name)
        try:
            await self._stop_requested.wait()
        finally:
            for signum in GRACEFUL_SIGNALS + FAST_SIGNALS:
                loop.remove_signal_handler(signum)
        graceful = self.stop_signal in GRACEFUL_SIGNALS
        log.info(
            "worker %d: %s shutdown on %s",
            os.getpid(),
            "graceful" if graceful else "fast",
            signal.Signals(self.stop_signal).name if self.stop_signal else "request",
        )
        await service.shutdown(self.graceful_timeout if graceful else 0.0)

    def _record_signal(self, signum: int) -> None:
        self.stop_signal = signum
        if self._stop_requested is not None:
            self._stop_requested.set()


def _describe(sock: socket.socket) -> str:
    address = sock.getsockname()
    if sock.family == socket.AF_UNIX:
        return f"unix:{address}"
    if sock.family == socket.AF_INET6:
        return f"http://[{address[0]}]:{address[1]}"
    return f"http://{address[0]}:{address[1]}"
