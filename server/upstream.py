"""The proxy's client side: keep-alive connections to upstream servers.

`UpstreamPool` sends one request to one of its upstream addresses and hands
back an `UpstreamResponse` whose body is read as it arrives. It runs on the
asyncio transport contract only (so on every loop backend) and parses with
httptools, as the server side does.

Choosing an address (nginx's ``upstream`` block): round-robin over the
addresses; one that refuses a connection, or times out connecting, is skipped
for ``fail_timeout`` seconds (passive health). When every address is marked
down, they are tried anyway: an outage must end the moment a server is back.

Connections (nginx's ``keepalive``): after a response is read whole and both
sides allow it, the connection goes back to its address's idle list (at most
``keepalive`` per address, newest reused first). A request sent on a reused
connection that dies before any byte of its answer came back (the upstream
closed it while idle: a race no client can avoid) is sent once more on a new
connection, if the request is idempotent.

Errors name who failed: a refused connection, a reset, or an answer that is
not HTTP, or frames its body two ways at once (Content-Length with
Transfer-Encoding), or breaks its chunk framing, is `UpstreamError` 502; no
connection, no answer, or no further body bytes within the timeouts is 504.
A broken answer is never relayed.

Invariants
----------
* A connection serves one request at a time and is idle only after its answer
  was read to its end with keep-alive on both sides; anything else closes it.
* The body of an answer is held in memory only up to ``BODY_HIGH_WATER``
  bytes: past it the upstream connection stops reading until the reader
  catches up, so a slow client never makes the proxy buffer a large answer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import cast
from urllib.parse import urlsplit

import httptools

log = logging.getLogger("forkloop.proxy")

BODY_HIGH_WATER = 256 * 1024
IDEMPOTENT = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS", "TRACE"})


class UpstreamError(Exception):
    """The upstream could not answer: ``status`` is what the client gets (502, 504)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class UpstreamSettings:
    connect_timeout: float = 5.0  # nginx proxy_connect_timeout (60s there; 5 is kinder)
    send_timeout: float = 60.0  # proxy_send_timeout: between two writes of the request
    read_timeout: float = 60.0  # proxy_read_timeout: between two reads of the answer
    keepalive: int = 32  # idle connections kept per upstream address
    fail_timeout: float = 10.0  # an address that failed is skipped this long


@dataclass
class UpstreamAddress:
    host: str
    port: int
    down_until: float = 0.0
    idle: list[UpstreamConnection] = field(default_factory=list)

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


def parse_upstream(url: str) -> tuple[str, int]:
    """``http://host:port`` → (host, port); ValueError with a sentence otherwise."""
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme != "http":
        raise ValueError(f"upstream {url!r}: only http:// upstreams are supported")
    if not parts.hostname:
        raise ValueError(f"upstream {url!r} names no host")
    if parts.path not in ("", "/") or parts.query:
        raise ValueError(f"upstream {url!r}: a path or query on the upstream is not supported")
    try:
        port = parts.port or 80
    except ValueError:
        raise ValueError(f"upstream {url!r} has a port that is not a number") from None
    return parts.hostname, port


class UpstreamPool:
    """Upstream addresses, their idle connections, and the round-robin between them."""

    def __init__(self, urls: list[str], settings: UpstreamSettings | None = None) -> None:
        if not urls:
            raise ValueError("a proxy needs at least one upstream")
        self.addresses = [UpstreamAddress(*parse_upstream(url)) for url in urls]
        self.host = str(self.addresses[0])  # the Host sent for a client that sent none
        self.settings = settings or UpstreamSettings()
        self._next = 0
        self.connections_opened = 0  # counters, for /stats
        self.retries = 0
        self.busy: set[UpstreamConnection] = set()  # carrying a request now

    def _pick(self) -> UpstreamAddress:
        now = time.monotonic()
        count = len(self.addresses)
        for step in range(count):
            address = self.addresses[(self._next + step) % count]
            if address.down_until <= now:
                self._next = (self._next + step + 1) % count
                return address
        address = min(self.addresses, key=lambda a: a.down_until)  # all down: try anyway
        self._next = (self.addresses.index(address) + 1) % count
        return address

    async def request(
        self,
        method: str,
        target: bytes,
        head_lines: bytes,
        body: AsyncIterator[bytes] | None,
        chunked: bool = False,
    ) -> UpstreamResponse:
        """Send a request (its head's header lines already encoded, each ending in
        CRLF, its framing header among them) with its body, sent as it is read
        (chunk-encoded if ``chunked``), and wait for the head of the answer.
        `UpstreamError` if there is none."""
        address = self._pick()
        reused = bool(address.idle)
        connection = address.idle.pop() if reused else await self._connect(address)
        self.busy.add(connection)
        try:
            return await connection.exchange(method, target, head_lines, body, chunked)
        except _Stale:
            # the upstream closed the idle connection as we sent: once more, on a new one
            if method not in IDEMPOTENT or body is not None:
                raise UpstreamError(502, f"upstream {address} closed the connection") from None
            self.retries += 1
            self.busy.discard(connection)
            connection = await self._connect(address)
            self.busy.add(connection)
            try:
                return await connection.exchange(method, target, head_lines, None)
            except _Stale:
                raise UpstreamError(502, f"upstream {address} closed the connection") from None

    async def _connect(self, address: UpstreamAddress) -> UpstreamConnection:
        loop = asyncio.get_running_loop()
        settings = self.settings
        try:
            async with asyncio.timeout(settings.connect_timeout):
                _, protocol = await loop.create_connection(
                    lambda: UpstreamConnection(self, address), address.host, address.port
                )
        except TimeoutError:
            address.down_until = time.monotonic() + settings.fail_timeout
            raise UpstreamError(504, f"upstream {address} did not accept a connection") from None
        except OSError as exc:
            address.down_until = time.monotonic() + settings.fail_timeout
            reason = exc.strerror or type(exc).__name__
            raise UpstreamError(
                502, f"upstream {address} refused the connection ({reason})"
            ) from None
        self.connections_opened += 1
        return protocol

    def release(self, connection: UpstreamConnection) -> None:
        """An answer was read whole: keep its connection for the next request, or close it."""
        address = connection.address
        self.busy.discard(connection)
        if connection.reusable and len(address.idle) < self.settings.keepalive:
            connection.idle()
            address.idle.append(connection)
        else:
            connection.close()

    def close(self) -> None:
        for address in self.addresses:
            while address.idle:
                address.idle.pop().close()


class _Stale(Exception):
    """A reused connection died before any byte of its answer: safe to send again."""


class UpstreamConnection(asyncio.Protocol):
    """One connection to an upstream address; one request at a time."""

    def __init__(self, pool: UpstreamPool, address: UpstreamAddress) -> None:
        self.pool = pool
        self.address = address
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.used = False  # it has carried a request before this one
        self.answered = False  # a byte of the current answer arrived
        self.reusable = False
        self.head_ignored_body = False  # the answer to HEAD: no body follows its head
        self.head: asyncio.Future[tuple[int, list[tuple[bytes, bytes]]]] | None = None
        self.headers: list[tuple[bytes, bytes]] = []
        self.framing: set[bytes] = set()
        self.pieces: deque[bytes] = deque()
        self.waiting = 0
        self.complete = False
        self.failure: UpstreamError | None = None
        self.reading_paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._write_paused = False
        self._drained: asyncio.Future[None] | None = None

    # ------------------------------------------------------------------ the request

    async def exchange(
        self,
        method: str,
        target: bytes,
        head_lines: bytes,
        body: AsyncIterator[bytes] | None,
        chunked: bool = False,
    ) -> UpstreamResponse:
        transport = self.transport
        stale = self.used
        if transport is None or transport.is_closing():
            if stale:
                raise _Stale
            raise UpstreamError(502, f"upstream {self.address} closed the connection")
        loop = asyncio.get_running_loop()
        self.head = loop.create_future()
        self.head_ignored_body = method == "HEAD"
        self.used = True
        settings = self.pool.settings
        transport.write(b"%s %s HTTP/1.1\r\n%s\r\n" % (method.encode(), target, head_lines))
        try:
            if body is not None:
                async for piece in body:
                    if piece:
                        transport.write(b"%x\r\n%b\r\n" % (len(piece), piece) if chunked else piece)
                    if self._write_paused:
                        async with asyncio.timeout(settings.send_timeout):
                            await self._drain()
                if chunked:
                    transport.write(b"0\r\n\r\n")
            async with asyncio.timeout(settings.read_timeout):
                status, headers = await self.head
        except TimeoutError:
            self.close()
            raise UpstreamError(504, f"upstream {self.address} did not answer in time") from None
        except _Stale:
            self.close()
            raise
        except BaseException:
            self.close()
            raise
        return UpstreamResponse(self, status, headers)

    async def _drain(self) -> None:
        self._drained = asyncio.get_running_loop().create_future()
        await self._drained

    def idle(self) -> None:
        self.answered = False
        self.complete = False
        self.reusable = False
        self.headers = []
        self.framing = set()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    # ------------------------------------------------------------------ transport events

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.answered = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(502, "answered with a protocol switch")
        except httptools.HttpParserError as exc:
            self._fail(502, f"sent a malformed answer ({exc})")

    def eof_received(self) -> bool:
        if not self.complete:
            try:
                self.parser.feed_data(b"")  # ends a body delimited by the close
            except httptools.HttpParserError:
                pass
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.reusable = False
        self.pool.busy.discard(self)
        if self in self.address.idle:
            self.address.idle.remove(self)
        if self.head is not None and not self.head.done():
            if not self.answered and self.used:
                self.head.set_exception(_Stale())
            else:
                self._fail(502, "closed the connection before its answer")
        elif not self.complete:
            self._fail(502, "closed the connection in the middle of its answer")
        drained = self._drained
        if drained is not None and not drained.done():
            drained.set_exception(UpstreamError(502, f"upstream {self.address} went away"))

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        drained = self._drained
        if drained is not None and not drained.done():
            drained.set_result(None)

    # ------------------------------------------------------------------ httptools callbacks

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))
        lowered = name.lower()
        if lowered in (b"content-length", b"transfer-encoding"):
            self.framing.add(lowered)

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200:  # an interim answer: the final one follows
            self.headers = []
            self.framing = set()
            return
        if len(self.framing) == 2:
            self._fail(502, "framed its answer with both Content-Length and Transfer-Encoding")
            return
        head = self.head
        if head is not None and not head.done():
            head.set_result((status, self.headers))
        if self.head_ignored_body:  # no body follows the head of an answer to HEAD
            self.complete = True
            self.reusable = False  # the parser would wait for a body: do not reuse
            self._wake()

    def on_body(self, chunk: bytes) -> None:
        self.pieces.append(chunk)
        self.waiting += len(chunk)
        self._wake()
        if self.waiting > BODY_HIGH_WATER and not self.reading_paused and self.transport:
            self.reading_paused = True
            self.transport.pause_reading()

    def on_message_complete(self) -> None:
        if self.complete:
            return
        self.complete = True
        self.reusable = self.parser.should_keep_alive()
        self._wake()

    # ------------------------------------------------------------------ the answer's body

    def _fail(self, status: int, reason: str) -> None:
        error = UpstreamError(status, f"upstream {self.address} {reason}")
        if self.failure is None:
            self.failure = error
        log.warning("%s", error.reason)
        head = self.head
        if head is not None and not head.done():
            head.set_exception(error)
        self._wake()
        self.reusable = False
        self.close()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def read(self) -> tuple[bytes, bool]:
        """What arrived of the body since the last read, waiting for some; and
        whether more follows."""
        settings = self.pool.settings
        while not self.pieces and not self.complete:
            if self.failure is not None:
                raise self.failure
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                async with asyncio.timeout(settings.read_timeout):
                    await self._waiter
            except TimeoutError:
                self.close()
                raise UpstreamError(
                    504, f"upstream {self.address} sent nothing for {settings.read_timeout}s"
                ) from None
            finally:
                self._waiter = None
        pieces = self.pieces
        data = pieces.popleft() if len(pieces) == 1 else b"".join(pieces)
        pieces.clear()
        self.waiting = 0
        if self.reading_paused and self.transport is not None:
            self.reading_paused = False
            self.transport.resume_reading()
        if self.failure is not None and not data:
            raise self.failure
        return data, bool(self.pieces) or not self.complete


class UpstreamResponse:
    """The head of an upstream's answer, and its body to read."""

    def __init__(
        self, connection: UpstreamConnection, status: int, headers: list[tuple[bytes, bytes]]
    ) -> None:
        self.connection = connection
        self.status = status
        self.headers = headers

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None

    async def read(self) -> tuple[bytes, bool]:
        return await self.connection.read()

    def whole_body(self) -> bytes | None:
        """The whole body, taken at once, when all of it has arrived; else None."""
        connection = self.connection
        if not connection.complete or connection.failure is not None:
            return None
        body = b"".join(connection.pieces)
        connection.pieces.clear()
        connection.waiting = 0
        return body

    def release(self) -> None:
        """The body was read to its end: the connection may serve another request."""
        self.connection.pool.release(self.connection)

    def abort(self) -> None:
        """Stop: nobody reads the rest (the client left); the connection is closed."""
        self.connection.reusable = False
        self.connection.close()
