"""Error log and access log.

The error log is the standard `logging` tree under ``forkloop``, written to
stderr. The access log is separate and off by default (it costs a formatted
line per request): one line per response in nginx's *combined* format, to
stdout or to a file that `reopen()` reopens (for log rotation, on SIGUSR1).
Writing it never raises: a full disk or a closed pipe costs log lines, never
a worker.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    from .http import Request

LOG_FORMAT = "%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s"


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format=LOG_FORMAT, stream=sys.stderr, force=True)
    logging.getLogger("asyncio").addFilter(RepeatFilter(interval=5.0))


class RepeatFilter(logging.Filter):
    """Let one record of each message template through per ``interval`` seconds.

    Stdlib asyncio, out of file descriptors, retries accept() up to the backlog
    (2048) times a second and logs a traceback for every failure: the logging,
    not the accepting, is what would keep a worker busy. One line every few
    seconds says the same."""

    def __init__(self, interval: float) -> None:
        super().__init__()
        self.interval = interval
        self.last_seen: dict[str, float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        now = time.monotonic()
        if now - self.last_seen.get(record.msg, -self.interval) < self.interval:
            return False
        if len(self.last_seen) > 1024:
            self.last_seen.clear()
        self.last_seen[record.msg] = now
        return True


class AccessLog:
    """``127.0.0.1 - - [23/Nov/2026:07:05:01 +0000] "GET / HTTP/1.1" 200 13 "-" "curl/8"``."""

    def __init__(self, path: str | None = None) -> None:
        self.path = path
        self.stream: IO[str] = sys.stdout
        self.failures = 0
        self.reopen()

    def reopen(self) -> None:
        if self.path is None or self.path == "-":
            self.stream = sys.stdout
            return
        try:
            stream = open(self.path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115
        except OSError as exc:
            logging.getLogger("forkloop").error("cannot open access log %s: %s", self.path, exc)
            return
        if self.stream is not sys.stdout:
            self.stream.close()
        self.stream = stream

    def write(self, request: Request | None, status: int, size: int) -> None:
        if request is None:
            client, line, referer, agent = "-", "-", "-", "-"
        else:
            client = request.client[0] if request.client else "-"
            target = request.target.decode("latin-1")
            line = f"{request.method} {target} HTTP/{request.version}"
            referer = request.headers.get("referer", "-")
            agent = request.headers.get("user-agent", "-")
        stamp = time.strftime("%d/%b/%Y:%H:%M:%S %z")
        try:
            self.stream.write(
                f'{client} - - [{stamp}] "{line}" {status} {size} "{referer}" "{agent}"\n'
            )
        except (OSError, ValueError):
            self.failures += 1
