"""Test support: a server running in a thread on any backend, and a raw HTTP client.

`running_server` serves an `App` on 127.0.0.1 from a background thread whose
event loop comes from the backend under test; the test drives it with
`RawClient`, a blocking socket client that parses responses with httptools'
response parser, so every byte the server sends is checked as a client would.
Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import httptools

from forkloop.server.app import App
from forkloop.server.config import Config, Limits
from forkloop.server.service import HttpService


@dataclass
class RunningServer:
    service: HttpService
    port: int
    loop: asyncio.AbstractEventLoop

    def call(self, fn, *args):
        """Run ``fn(*args)`` on the server's loop and return its result."""
        done = threading.Event()
        box: list = []

        def run() -> None:
            box.append(fn(*args))
            done.set()

        self.loop.call_soon_threadsafe(run)
        assert done.wait(5), "server loop did not answer within 5 s"
        return box[0]


@contextlib.contextmanager
def running_server(
    backend, app: App, tls: tuple[str, str] | None = None, access_log=None, **limits
) -> Iterator[RunningServer]:
    """Serve ``app`` on 127.0.0.1; ``tls=(certfile, keyfile)`` serves HTTPS."""
    certfile, keyfile = tls or (None, None)
    config = Config(limits=Limits(**limits), certfile=certfile, keyfile=keyfile)
    service = HttpService(app, config, access_log)
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    listener.setblocking(False)
    port = listener.getsockname()[1]
    started = threading.Event()
    stop: list[asyncio.Event] = []
    failure: list[BaseException] = []

    async def serve() -> None:
        stop.append(asyncio.Event())
        await service.start([listener])
        started.set()
        await stop[0].wait()
        await service.shutdown(1.0)

    def thread_main() -> None:
        try:
            with asyncio.Runner(loop_factory=backend.new_event_loop) as runner:
                runner.run(serve())
        except BaseException as exc:  # surfaced to the test below
            failure.append(exc)
            started.set()

    thread = threading.Thread(target=thread_main, daemon=True)
    thread.start()
    assert started.wait(10), "server did not start within 10 s"
    if failure:
        raise failure[0]
    try:
        yield RunningServer(service, port, service.loop)
    finally:
        service.loop.call_soon_threadsafe(stop[0].set)
        thread.join(10)
        assert not thread.is_alive(), "server thread did not stop within 10 s"
        if failure:
            raise failure[0]


@dataclass
class HttpReply:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    chunked: bool = False

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())


class _ReplyCollector:
    def __init__(self) -> None:
        self.replies: list[HttpReply] = []
        self.current: HttpReply | None = None
        self.parser = httptools.HttpResponseParser(self)

    def on_message_begin(self) -> None:
        self.current = HttpReply(0)

    def on_header(self, name: bytes, value: bytes) -> None:
        assert self.current is not None
        key = name.decode("latin-1").lower()
        if key in self.current.headers:
            self.current.headers[key] += ", " + value.decode("latin-1")
        else:
            self.current.headers[key] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        assert self.current is not None
        self.current.status = self.parser.get_status_code()
        self.current.chunked = "chunked" in self.current.headers.get("transfer-encoding", "")

    def on_body(self, body: bytes) -> None:
        assert self.current is not None
        self.current.body += body

    def on_message_complete(self) -> None:
        assert self.current is not None
        self.replies.append(self.current)
        self.current = None


class RawClient:
    """A blocking client that sends raw bytes and parses what comes back."""

    def __init__(self, port: int, timeout: float = 5.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.timeout = timeout
        self.collector = _ReplyCollector()
        self.closed_by_server = False
        self.head_requests = 0

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def request(self, method: str = "GET", path: str = "/", headers=(), body: bytes = b"") -> None:
        lines = [f"{method} {path} HTTP/1.1", "Host: test"]
        lines += [f"{name}: {value}" for name, value in headers]
        if body and not any(name.lower() == "transfer-encoding" for name, _ in headers):
            lines.append(f"Content-Length: {len(body)}")
        self.send("\r\n".join(lines).encode() + b"\r\n\r\n" + body)

    def _receive(self) -> bool:
        try:
            data = self.sock.recv(65536)
        except ConnectionResetError:
            data = b""
        if not data:
            self.closed_by_server = True
            with contextlib.suppress(httptools.HttpParserError):
                self.collector.parser.feed_data(b"")  # ends a close-delimited body
            return False
        self.collector.parser.feed_data(data)
        return True

    def read_replies(self, count: int) -> list[HttpReply]:
        while len(self.collector.replies) < count:
            if not self._receive():
                break
        replies = self.collector.replies[:count]
        del self.collector.replies[:count]
        assert len(replies) == count, f"server closed after {len(replies)} of {count} replies"
        return replies

    def read_reply(self) -> HttpReply:
        return self.read_replies(1)[0]

    def unfinished_reply(self) -> HttpReply | None:
        """The reply that began to arrive and has not ended: after a close, a cut reply."""
        return self.collector.current

    def read_raw(self, max_bytes: int = 65536) -> bytes:
        return self.sock.recv(max_bytes)

    def is_closed_by_server(self, timeout: float | None = None) -> bool:
        """True when the server closes the connection within ``timeout`` seconds."""
        if self.closed_by_server:
            return True
        self.sock.settimeout(timeout if timeout is not None else self.timeout)
        try:
            while self._receive():
                pass
        except TimeoutError:
            return False
        finally:
            self.sock.settimeout(self.timeout)
        return True

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def send_raw(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Send ``data``, then read everything until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)
