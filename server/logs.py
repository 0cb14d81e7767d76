"""Error log and access log.

The error log is the standard `logging` tree under ``forkloop``, written to
stderr. The access log is separate and on by default, as uvicorn's and nginx's
are (``--no-access-log`` saves its formatted line per request): one line per
response, nginx's *combined* format unless ``--access-log-format`` says
otherwise, to stdout or to a file that `reopen()` reopens (for log rotation,
on SIGUSR1). Writing it never raises: a full disk or a closed pipe costs log
lines, never a worker.

`AccessLog` is also where the connection layer reports each response, once:
it counts the response for ``/metrics`` (`server.metrics.RequestMetrics`)
before it writes the line, so a worker with the access log off still counts.
"""

from __future__ import annotations

import asyncio
import logging
import os
import string
import sys
import time
from typing import IO, TYPE_CHECKING

from .config import COMBINED_FORMAT

if TYPE_CHECKING:
    from .http import Request
    from .metrics import RequestMetrics

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


class LoopErrorReporter:
    """A loop's exception handler that reports each message once per ``interval``.

    `RepeatFilter` drops the repeated log records, but asyncio's default handler
    has by then formatted every item of the context (the socket's repr, the
    traceback): out of file descriptors, stdlib asyncio calls it up to the
    backlog's times a second. Deciding on the message alone, before any of
    that, keeps such a worker nearly idle."""

    def __init__(self, interval: float = 5.0) -> None:
        self.interval = interval
        self.last_seen: dict[str, float] = {}

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, object]) -> None:
        message = str(context.get("message", ""))
        now = time.monotonic()
        if now - self.last_seen.get(message, -self.interval) < self.interval:
            return
        if len(self.last_seen) > 1024:
            self.last_seen.clear()
        self.last_seen[message] = now
        loop.default_exception_handler(context)


ACCESS_LOG_FIELDS = (
    "client",
    "time",
    "request",
    "method",
    "path",
    "status",
    "size",
    "referer",
    "user_agent",
    "duration_ms",
    "pid",
)


def check_access_log_format(template: str) -> str | None:
    """What is wrong with an ``--access-log-format``, or None when it is usable."""
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as exc:
        return f"the access log format {template!r} does not parse: {exc}"
    for name in names:
        if name not in ACCESS_LOG_FIELDS:
            return (
                f"the access log format has an unknown field {{{name}}}; "
                f"known: {', '.join('{' + f + '}' for f in ACCESS_LOG_FIELDS)}"
            )
    return None


class AccessLog:
    """``127.0.0.1 - - [23/Nov/2026:07:05:01 +0000] "GET / HTTP/1.1" 200 13 "-" "curl/8"``.

    ``lines`` off keeps the per-response hook (``metrics``) without writing lines."""

    def __init__(
        self,
        path: str | None = None,
        template: str = COMBINED_FORMAT,
        lines: bool = True,
        metrics: RequestMetrics | None = None,
    ) -> None:
        self.path = path
        self.template = template
        self.lines = lines
        self.metrics = metrics
        self.stream: IO[str] = sys.stdout
        self.failures = 0
        self.pid = os.getpid()
        if lines:
            self.reopen()

    def reopen(self) -> None:
        if not self.lines or self.path is None or self.path == "-":
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
        """Count the response and log its line; called once per response."""
        started = getattr(request, "dispatched_at", None)
        seconds = None if started is None else time.perf_counter() - started
        if self.metrics is not None:
            self.metrics.observe(request, status, seconds)
        if not self.lines:
            return
        if request is None:
            client, method, target, line, referer, agent = "-", "-", "-", "-", "-", "-"
        else:
            client = request.client[0] if request.client else "-"
            method = request.method
            target = request.target.decode("latin-1")
            line = f"{method} {target} HTTP/{request.version}"
            referer = request.headers.get("referer") or "-"
            agent = request.headers.get("user-agent") or "-"
        stamp = time.strftime("%d/%b/%Y:%H:%M:%S %z")
        if self.template is COMBINED_FORMAT or self.template == COMBINED_FORMAT:
            text = f'{client} - - [{stamp}] "{line}" {status} {size} "{referer}" "{agent}"\n'
        else:
            text = (
                self.template.format(
                    client=client,
                    time=stamp,
                    request=line,
                    method=method,
                    path=target,
                    status=status,
                    size=size,
                    referer=referer,
                    user_agent=agent,
                    duration_ms="-" if seconds is None else f"{seconds * 1000:.3f}",
                    pid=self.pid,
                )
                + "\n"
            )
        try:
            self.stream.write(text)
        except (OSError, ValueError):
            self.failures += 1
