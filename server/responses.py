"""How a connection answers: complete responses, streams, refusals, and the one write.

`ResponseWriter` is the sending half of a connection (`server.protocol`), an
object of its own with its own state: the output waiting to be written and the
count of requests the connection may still answer. It decides whether the
connection may stay open after each response; the connection decides what
that means for its phase.

* A complete response (``bytes`` body) becomes a head and a body appended to
  ``output``; `flush` sends all of ``output`` in one ``transport.write``, so a
  burst of pipelined requests answered inline costs one send. A small body is
  joined to its head; a large one is written at once, so a full write buffer
  holds back the requests queued behind it.
* A streaming response sends its head, then each chunk as it comes, waiting
  for the client whenever the transport has paused writing; HTTP/1.1 gets
  chunked framing unless the length was declared, HTTP/1.0 a close-delimited
  body. A stream cut short can only be told by closing the connection, which
  the writer does itself.
* A response a handler made unsendable (bad status, CR/LF or a non-Latin-1
  character in a header) is never half-written: it becomes a 500.

Invariants: every response is counted once (``stats.responses``, the access
log); ``output`` holds only whole responses (or a 100 Continue), in request
order; nothing is written once the transport is detached.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterable
from typing import Any

from .context import ConnectionContext
from .flow import FlowControl
from .http import STATUS_LINES, HeaderError, Request, Response, error_response, status_line

log = logging.getLogger("forkloop.http")

CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_NO_BODY_STATUSES = frozenset({204, 304})


class ResponseWriter:
    """Turns responses into bytes on the transport; see the module's docstring."""

    def __init__(
        self,
        transport: asyncio.Transport,
        context: ConnectionContext,
        flow: FlowControl,
        client: tuple[str, int] | None,
    ) -> None:
        self.transport: asyncio.Transport | None = transport
        self.context = context
        self.flow = flow
        self.client = client
        self.output: list[bytes] = []
        self.requests_left = context.limits.max_keepalive_requests
        self.stream_keep_alive = False  # what respond() said when begin_stream sent a 500

    def detach(self) -> None:
        """The connection is lost: nothing more is written."""
        self.transport = None

    def keep_alive_after(self, request: Request) -> bool:
        """Count one more response; may the connection stay open after it?"""
        left = self.requests_left = self.requests_left - 1
        return request.keep_alive and left > 0 and not self.context.draining

    def respond(self, request: Request, response: Response) -> bool:
        """Append a complete (bytes-body) response to the output; False if the
        connection must close after it."""
        keep_alive = self.keep_alive_after(request)
        context = self.context
        status = response.status
        try:
            if response.encoded_headers is not None:  # checked when it was made (cache entries)
                first_line = STATUS_LINES.get(status) or status_line(status)
                head = first_line + context.date_and_server + response.encoded_headers
            elif response.headers:
                head = self._head_with_headers(response)
                keep_alive = keep_alive and not response.wants_close()
            else:
                head = context.response_prefix(status, response.content_type)
            if status < 200:
                raise HeaderError(f"status {status} is not a final status")
        except HeaderError as exc:
            response, status = self._unsendable(request, exc), 500
            head = context.response_prefix(status, response.content_type)
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
            self.flush()  # now: if it fills the write buffer, the queue behind it waits
        context.stats.responses[status] += 1
        if context.access_log is not None:
            context.access_log.write(request, status, len(body))
        return keep_alive

    def _head_with_headers(self, response: Response) -> bytes:
        """Status line, Date, Server and the handler's own header lines; `HeaderError`
        if the handler set one that cannot be sent."""
        own = response.encode_headers()
        status = response.status
        return b"".join(
            (STATUS_LINES.get(status) or status_line(status), self.context.date_and_server, own)
        )

    def _unsendable(self, request: Request, problem: HeaderError) -> Response:
        """The 500 sent instead of a response the handler made unsendable."""
        log.error("response to %s %s dropped: %s", request.method, request.path, problem)
        return error_response(500, "the handler made a response that cannot be sent")

    def begin_stream(self, request: Request, response: Response) -> BodyStream | None:
        """Write the head of a response whose body follows in pieces; the returned
        `BodyStream` sends them. None when the head could not be sent: a 500 went
        out instead (see `respond`), and the body is not wanted."""
        try:
            keep_alive = self.keep_alive_after(request) and not response.wants_close()
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
                + self.context.date_and_server
                + response.encode_headers()
                + framing
                + _connection_line(request, keep_alive)
                + b"\r\n"
            )
        except HeaderError as exc:
            self.requests_left += 1  # counted again by respond
            self.stream_keep_alive = self.respond(request, self._unsendable(request, exc))
            return None
        self.output.append(head)
        self.flush()
        return BodyStream(self, request, response.status, keep_alive, chunked, declared)

    async def stream(self, request: Request, response: Response) -> bool:
        """Send a streaming response: chunked, or close-delimited for HTTP/1.0 clients.
        False if the connection must close after it.

        A body cut short (error, cancellation) can only be told to the client by
        closing the connection, so that is what happens."""
        stream = response.stream
        assert stream is not None
        try:
            body = self.begin_stream(request, response)
            if body is None:
                return self.stream_keep_alive
            try:
                if body.wanted:
                    async for chunk in stream:
                        if not await body.write(chunk):
                            return False  # the client is gone
                return body.finish()
            except (asyncio.CancelledError, ConnectionError):
                body.cut_short()
                raise
            except Exception:
                log.exception("streaming response to %s %s failed", request.method, request.path)
                body.cut_short()
                return False
        finally:
            await _close_stream(stream)

    def switch(self, request: Request, header_lines: bytes) -> None:
        """Write the 101 that switches protocols (its header lines given), counted
        as the request's one answer; the connection closes after what follows."""
        self.keep_alive_after(request)
        context = self.context
        if self.transport is not None:
            self.transport.write(
                STATUS_LINES[101] + context.date_and_server + header_lines + b"\r\n"
            )
        context.count_response(request, 101, 0)

    def refuse(self, status: int, reason: str) -> None:
        """Append the answer to a request refused for its framing or a timeout."""
        log.info("%s: answered %d and closed: %s", peer_name(self.client), status, reason)
        context = self.context
        context.stats.rejected += 1
        response = error_response(status, reason)
        self.output.append(
            STATUS_LINES[status]
            + context.date_and_server
            + response.encode_headers()
            + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(response.body)
            + response.body
        )
        context.count_response(None, status, len(response.body))

    def flush(self) -> None:
        """Write all of ``output`` in one ``transport.write``."""
        output = self.output
        if output and self.transport is not None:
            self.transport.write(output[0] if len(output) == 1 else b"".join(output))
            output.clear()


class BodyStream:
    """The body of one streamed response, sent piece by piece after its head.

    `write` waits while the transport's buffer is above its high-water mark, so
    a producer can never run ahead of the client by more than one buffer.
    `finish` ends the body (the last chunk, or the declared length checked) and
    counts the response; `cut_short` closes the connection instead, the only way
    to tell a client that a body ended early."""

    __slots__ = ("writer", "request", "status", "keep_alive", "chunked", "declared", "sent")

    def __init__(
        self,
        writer: ResponseWriter,
        request: Request,
        status: int,
        keep_alive: bool,
        chunked: bool,
        declared: int | None,
    ) -> None:
        self.writer = writer
        self.request = request
        self.status = status
        self.keep_alive = keep_alive
        self.chunked = chunked
        self.declared = declared
        self.sent = 0

    @property
    def wanted(self) -> bool:
        """False for the answer to HEAD: its body is never sent."""
        return self.request.method != "HEAD"

    async def write(self, chunk: bytes) -> bool:
        """Send one piece; False when the client is gone (nothing was sent)."""
        if not chunk or not self.wanted:
            return True
        sent = self.sent = self.sent + len(chunk)
        declared = self.declared
        if declared is not None and sent > declared:
            raise RuntimeError(f"stream sent more than its Content-Length {declared}")
        writer = self.writer
        transport = writer.transport
        if transport is None or transport.is_closing():
            # the client is gone (connection_lost may be a loop turn away): a
            # producer that never suspends would otherwise write into the void
            return False
        transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk) if self.chunked else chunk)
        if writer.flow.write_paused:
            await writer.flow.drain(writer.context.loop)
        return True

    def finish(self) -> bool:
        """End the body and count the response; False if the connection must close."""
        declared, sent = self.declared, self.sent
        if declared is not None and sent != declared and self.wanted:
            raise RuntimeError(f"stream sent {sent} of its Content-Length {declared}")
        transport = self.writer.transport
        if self.chunked and self.wanted and transport is not None:
            transport.write(b"0\r\n\r\n")
        self.writer.context.count_response(self.request, self.status, sent)
        return self.keep_alive

    def cut_short(self) -> None:
        transport = self.writer.transport
        if transport is not None:
            transport.close()


def _connection_line(request: Request, keep_alive: bool) -> bytes:
    if not keep_alive:
        return b"Connection: close\r\n"
    return b"" if request.version == "1.1" else b"Connection: keep-alive\r\n"


async def _close_stream(stream: AsyncIterable[bytes]) -> None:
    aclose: Any = getattr(stream, "aclose", None)
    if aclose is not None:
        await aclose()


def peer_name(client: tuple[str, int] | None) -> str:
    return f"{client[0]}:{client[1]}" if client else "unix client"
