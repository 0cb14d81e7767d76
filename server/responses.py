"""How a connection answers: complete responses, streams, refusals, and the one write.

`ResponseWriter` is the sending half of `server.protocol.HttpConnection`, kept
apart so that each half reads on its own; it works on the connection's state
and is not used alone.

* A complete response (``bytes`` body) becomes a head and a body appended to
  ``output``; `_flush` sends all of ``output`` in one ``transport.write``. A
  small body is joined to its head; a large one is flushed at once, so a full
  write buffer holds back the requests queued behind it (protocol rule 3).
* A streaming response sends its head, then each chunk as it comes, waiting in
  `_drain` whenever the transport has paused writing; HTTP/1.1 gets chunked
  framing unless the length was declared, HTTP/1.0 a close-delimited body. A
  stream cut short can only be told by closing the connection.
* A response a handler made unsendable (bad status, CR/LF or a non-Latin-1
  character in a header) is never half-written: it becomes a 500.
* Once ``closing`` is set and no request is active, the connection closes
  when its output is sent; `HttpConnection._close_when_sent` decides whether
  it lingers first.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .http import (
    STATUS_LINES,
    HeaderError,
    Request,
    Response,
    error_response,
    status_line,
)

if TYPE_CHECKING:
    from .service import HttpService, Stats

log = logging.getLogger("forkloop.http")

_NO_BODY_STATUSES = frozenset({204, 304})


class ResponseWriter:
    """Appends responses to ``output`` and writes them; see the module's docstring."""

    # the connection's state this half works on (set by HttpConnection.__init__)
    service: HttpService
    stats: Stats
    loop: asyncio.AbstractEventLoop
    transport: Any
    client: tuple[str, int] | None
    output: list[bytes]
    requests_left: int
    rejection: tuple[int, str] | None
    closing: bool
    active: Any
    write_paused: bool
    drain_waiter: asyncio.Future[None] | None
    _close_when_sent: Callable[[Any], None]  # close, or linger first

    def _keep_alive_after(self, request: Request) -> bool:
        """Count one more response; may the connection stay open after it?"""
        left = self.requests_left = self.requests_left - 1
        return request.keep_alive and left > 0 and not self.service.draining

    def _respond(self, request: Request, response: Response) -> None:
        """Append a complete (bytes-body) response to the output."""
        keep_alive = self._keep_alive_after(request)
        status = response.status
        try:
            if response.encoded_headers is not None:  # checked when it was made (cache entries)
                first_line = STATUS_LINES.get(status) or status_line(status)
                head = first_line + self.service.date_and_server + response.encoded_headers
            elif response.headers:
                head = self._head_with_headers(response)
                keep_alive = keep_alive and not response.wants_close()
            else:
                head = self.service.response_prefix(status, response.content_type)
            if status < 200:
                raise HeaderError(f"status {status} is not a final status")
        except HeaderError as exc:
            response, status = self._unsendable(request, exc), 500
            head = self.service.response_prefix(status, response.content_type)
        body = response.body
        if status in _NO_BODY_STATUSES:
            body = b""
            head += _connection_line(request, keep_alive) + b"\r\n"
        elif keep_alive and request.version == "1.1":
            head = b"%sContent-Length: %d\r\n\r\n" % (head, len(body))
        else:
            connection = _connection_line(request, keep_alive)
            head = b"%sContent-Length: %d\r\n%s\r\n" % (head, len(body), connection)
        if not body or request.method == "HEAD":
            self.output.append(head)
        elif len(body) <= 4096:
            self.output.append(head + body)
        else:
            self.output += (head, body)
            self._flush()  # now: if it fills the write buffer, the queue behind it waits
        self.stats.responses[status] += 1
        if self.service.access_log is not None:
            self.service.access_log.write(request, status, len(body))
        if not keep_alive:
            self.closing = True

    def _head_with_headers(self, response: Response) -> bytes:
        """Status line, Date, Server and the handler's own header lines; `HeaderError`
        if the handler set one that cannot be sent."""
        own = response.encode_headers()
        status = response.status
        return b"".join(
            (STATUS_LINES.get(status) or status_line(status), self.service.date_and_server, own)
        )

    def _unsendable(self, request: Request, problem: HeaderError) -> Response:
        """The 500 sent instead of a response the handler made unsendable."""
        log.error("response to %s %s dropped: %s", request.method, request.path, problem)
        return error_response(500, "the handler made a response that cannot be sent")

    async def _stream(self, request: Request, response: Response) -> None:
        """Send a streaming response: chunked, or close-delimited for HTTP/1.0 clients.

        A body cut short (error, cancellation) can only be told to the client by
        closing the connection, so that is what happens."""
        try:
            keep_alive = self._keep_alive_after(request) and not response.wants_close()
            declared = response.declared_length()
            chunked = declared is None and request.version == "1.1"
            if declared is None and not chunked:
                keep_alive = False  # the end of the body is the end of the connection
            framing = (
                b"Transfer-Encoding: chunked\r\n"
                if chunked
                else (b"Content-Length: %d\r\n" % declared if declared is not None else b"")
            )
            if response.status < 200:
                raise HeaderError(f"status {response.status} is not a final status")
            head = (
                status_line(response.status)
                + self.service.date_and_server
                + response.encode_headers()
                + framing
                + _connection_line(request, keep_alive)
                + b"\r\n"
            )
        except HeaderError as exc:
            self.requests_left += 1  # counted again by _respond
            self._respond(request, self._unsendable(request, exc))
            await _close_stream(response.stream)
            return
        self.output.append(head)
        self._flush()
        sent = 0
        body_wanted = request.method != "HEAD"
        try:
            if body_wanted:
                async for chunk in response.stream:
                    if not chunk:
                        continue
                    sent += len(chunk)
                    if declared is not None and sent > declared:
                        raise RuntimeError(f"stream sent more than its Content-Length {declared}")
                    if self.transport is None or self.transport.is_closing():
                        # the client is gone (connection_lost may be a loop turn away): a
                        # generator that never suspends would otherwise write into the void
                        return
                    self.transport.write(
                        b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else chunk
                    )
                    if self.write_paused:
                        await self._drain()
            if declared is not None and sent != declared and body_wanted:
                raise RuntimeError(f"stream sent {sent} of its Content-Length {declared}")
            if chunked and body_wanted and self.transport is not None:
                self.transport.write(b"0\r\n\r\n")
        except (asyncio.CancelledError, ConnectionError):
            self._cut_short()
            raise
        except Exception:
            log.exception("streaming response to %s %s failed", request.method, request.path)
            self._cut_short()
        finally:
            await _close_stream(response.stream)
        self.stats.responses[response.status] += 1
        if self.service.access_log is not None:
            self.service.access_log.write(request, response.status, sent)
        if not keep_alive:
            self.closing = True

    def _cut_short(self) -> None:
        self.closing = True
        if self.transport is not None:
            self.transport.close()

    async def _drain(self) -> None:
        waiter = self.drain_waiter = self.loop.create_future()
        try:
            await waiter
        finally:
            self.drain_waiter = None

    def _send_rejection(self) -> None:
        status, reason = self.rejection or (400, "bad request")
        log.info("%s: answered %d and closed: %s", peer_name(self.client), status, reason)
        self.service.stats.rejected += 1
        response = error_response(status, reason)
        self.output.append(
            STATUS_LINES[status]
            + self.service.date_and_server
            + response.encode_headers()
            + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(response.body)
            + response.body
        )
        self.service.count_response(None, status, len(response.body))
        self.closing = True

    def _flush(self) -> None:
        transport = self.transport
        if transport is None:
            return
        output = self.output
        if output:
            transport.write(output[0] if len(output) == 1 else b"".join(output))
            output.clear()
        if self.closing and self.active is None:
            self._close_when_sent(transport)


def _connection_line(request: Request, keep_alive: bool) -> bytes:
    if not keep_alive:
        return b"Connection: close\r\n"
    return b"" if request.version == "1.1" else b"Connection: keep-alive\r\n"


async def _close_stream(stream: Any) -> None:
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        await aclose()


def peer_name(client: tuple[str, int] | None) -> str:
    return f"{client[0]}:{client[1]}" if client else "unix client"
