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

    async def stream(self, request: Request, response: Response) -> bool:
        """Send a streaming response: chunked, or close-delimited for HTTP/1.0 clients.
        False if the connection must close after it.

        A body cut short (error, cancellation) can only be told to the client by
        closing the connection, so that is what happens."""
        stream = response.stream
        assert stream is not None
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
            keep_alive = self.respond(request, self._unsendable(request, exc))
            await _close_stream(stream)
            return keep_alive
        self.output.append(head)
        self.flush()
        sent = 0
        body_wanted = request.method != "HEAD"
        try:
            if body_wanted:
                async for chunk in stream:
                    if not chunk:
                        continue
                    sent += len(chunk)
                    if declared is not None and sent > declared:
                        raise RuntimeError(f"stream sent more than its Content-Length {declared}")
                    transport = self.transport
                    if transport is None or transport.is_closing():
                        # the client is gone (connection_lost may be a loop turn away): a
                        # generator that never suspends would otherwise write into the void
                        return False
                    transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else chunk)
                    if self.flow.write_paused:
                        await self.flow.drain(self.context.loop)
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
            keep_alive = False
        finally:
            await _close_stream(stream)
        self.context.count_response(request, response.status, sent)
        return keep_alive

    def _cut_short(self) -> None:
        if self.transport is not None:
            self.transport.close()

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
