"""forkloop as a reverse proxy: `ProxyFrontDoor` (nginx's ``proxy_pass``).

    forkloop proxy http://127.0.0.1:9000 --bind 127.0.0.1:8080 --workers 4

A front door like `App` and `AsgiApp`: each request resolves to one
`DirectRoute` whose handler sends it upstream (`server.upstream`) and relays
the answer through the connection's responder. Everything the server
guarantees about what it reads (the framing checks, the limits, the
hostile-input table) happens before a request gets here, so a smuggled request
never reaches the upstream: the proxy re-frames every request it forwards
(Content-Length as read, or chunked), it never forwards bytes as received.

What is forwarded (RFC 9110 7.6)
--------------------------------
* Hop-by-hop fields are removed both ways: Connection and every field it
  names, Keep-Alive, Proxy-Connection, TE, Trailer, Transfer-Encoding,
  Upgrade, Proxy-Authenticate, Proxy-Authorization.
* Added to the request: ``X-Forwarded-For`` (the client appended to what came
  in), ``X-Forwarded-Proto``, ``X-Forwarded-Host`` and ``Via: 1.1 forkloop``;
  the client's Host is kept. ``Via`` is added to the answer too.
* Bodies stream both ways with backpressure: the upload is read from the client
  as the upstream takes it, the answer written to the client as it comes, the
  upstream connection pausing while the client is slow (`server.upstream`
  keeps at most a high-water mark of the answer).

Failures: an upstream that refuses, resets or answers badly is a 502, one that
does not answer in time a 504, each with the reason logged; an answer that
breaks after its head was relayed ends by closing the client's connection.
A client that leaves closes the upstream connection at once: the upstream
stops working for nobody.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from .frontdoor import DirectRoute, Responder
from .http import Request, Response, error_response
from .request_body import BodyFailed
from .upstream import UpstreamError, UpstreamPool, UpstreamResponse

log = logging.getLogger("forkloop.proxy")

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authenticate",
        b"proxy-authorization",
    }
)
# the server frames and dates its own answers; these come from the upstream's answer
_SERVER_OWNED = frozenset({b"content-length", b"date", b"server"})
# what a client asks of its own copy: a cache fill fetches the whole resource instead
_CLIENT_CONDITIONS = frozenset(
    {
        b"if-none-match",
        b"if-modified-since",
        b"if-match",
        b"if-unmodified-since",
        b"if-range",
        b"range",
    }
)


class ProxyFrontDoor:
    """Every request, sent to the upstream pool; see the module's docstring."""

    cache_stats: dict[str, int] | None = None
    streams_bodies = True  # uploads are forwarded as they arrive

    def __init__(self, pool: UpstreamPool, marks: tuple[tuple[str, str], ...] = ()) -> None:
        self.pool = pool
        self.marks = marks  # header fields added to every relayed answer (X-Cache: BYPASS)
        self.route = DirectRoute(self._serve)

    def resolve(self, request: Request) -> DirectRoute:
        return self.route

    async def shutdown(self) -> None:
        self.pool.close()

    async def _serve(self, request: Request, connection: Responder) -> None:
        scheme = connection.endpoint[0]
        head_lines, body, chunked = upstream_head(request, scheme, self.pool.host, connection)
        try:
            answer = await self.pool.request(
                request.method, request.target, head_lines, body, chunked
            )
        except UpstreamError as error:
            log.warning("%s %s: %d: %s", request.method, request.path, error.status, error.reason)
            if not connection.client_gone:
                connection.send_response(request, error_response(error.status, error.reason))
            return
        except BodyFailed:
            return  # the client left mid-upload, or its body was refused: the connection answers
        failure = answer.connection.failure
        if failure is not None:  # broken before its head went out: never relayed
            log.warning("%s %s: 502: %s", request.method, request.path, failure.reason)
            connection.send_response(request, error_response(502, failure.reason))
            return
        response = answer_head(answer)
        response.headers += self.marks
        await relay(request, response, answer, connection)


def upstream_head(
    request: Request, scheme: str, default_host: str, connection: Responder | None = None
) -> tuple[bytes, AsyncIterator[bytes] | None, bool]:
    """The header lines to send upstream for ``request``, the body to stream, and
    whether it is chunked. The client's Host is kept; a client that sent none
    (HTTP/1.0) has ``default_host`` sent for it, as nginx sends ``$proxy_host``.
    Without a ``connection`` (a cache fill, which belongs to no client) the
    request goes without its body, its conditions or its range: the fill fetches
    the whole resource for everyone."""
    named = _named_by_connection(request.raw_headers)
    dropped = HOP_BY_HOP if connection is not None else HOP_BY_HOP | _CLIENT_CONDITIONS
    lines = []
    forwarded_for = b""
    length: bytes | None = None
    chunked = False
    host = b""
    for name, value in request.raw_headers:
        lowered = name.lower()
        if lowered == b"transfer-encoding":
            chunked = True
            continue
        if lowered in dropped or lowered in named:
            continue
        if lowered == b"x-forwarded-for":
            forwarded_for = value if not forwarded_for else forwarded_for + b", " + value
            continue
        if lowered == b"content-length":
            length = value
            continue
        if lowered == b"host":
            host = value
        lines.append(b"%s: %s\r\n" % (name, value))
    client = request.client[0].encode() if request.client else b"unix"
    forwarded_for = forwarded_for + b", " + client if forwarded_for else client
    lines.append(
        b"X-Forwarded-For: %s\r\nX-Forwarded-Proto: %s\r\n" % (forwarded_for, scheme.encode())
    )
    if host:
        lines.append(b"X-Forwarded-Host: %s\r\n" % host)
    else:  # HTTP/1.1 upstream requests need a Host
        lines.append(b"Host: %s\r\n" % default_host.encode())
    lines.append(b"Via: 1.1 forkloop\r\n")
    body: AsyncIterator[bytes] | None = None
    if connection is None:
        return b"".join(lines), None, False
    if chunked:
        lines.append(b"Transfer-Encoding: chunked\r\n")
        body = _body_pieces(request, connection)
    elif length is not None and length != b"0":
        lines.append(b"Content-Length: %s\r\n" % length)
        body = _body_pieces(request, connection)
    elif request.method in ("POST", "PUT", "PATCH"):
        lines.append(b"Content-Length: 0\r\n")
    return b"".join(lines), body, chunked


def answer_head(answer: UpstreamResponse) -> Response:
    """The upstream's answer as a `Response` with no body yet: its own header
    fields less the hop-by-hop ones and those the server writes itself, with
    ``Via``; its declared Content-Length kept (a stream checks it is met, and the
    answer to HEAD says it)."""
    named = _named_by_connection(answer.headers)
    headers = []
    declared: str | None = None
    for name, value in answer.headers:
        lowered = name.lower()
        if lowered == b"content-length":
            declared = value.decode("latin-1")
        if lowered in HOP_BY_HOP or lowered in named or lowered in _SERVER_OWNED:
            continue
        headers.append((name.decode("latin-1"), value.decode("latin-1")))
    headers.append(("Via", "1.1 forkloop"))
    if declared is not None:
        headers.append(("Content-Length", declared))
    return Response(b"", answer.status, headers, content_type=None)


async def relay(
    request: Request,
    response: Response,
    answer: UpstreamResponse,
    connection: Responder,
    first: bytes = b"",
) -> None:
    """The upstream's answer, through the client's connection, piece by piece:
    ``first`` (what was already read of its body), then the rest as it comes."""
    rest = answer.whole_body() if request.method != "HEAD" else None
    if rest is not None:  # all of it is here: one write, framed by the server itself
        response.body = first + rest
        response.headers = [h for h in response.headers if h[0] != "Content-Length"]
        connection.send_response(request, response)
        answer.release()
        return
    complete = answer.connection.complete
    stream = connection.begin_stream(request, response)
    if stream is None:  # its head could not be sent: a 500 went out
        answer.abort()
        return
    if request.method == "HEAD":  # the head says the length; no body follows
        connection.finish_stream(stream)
        if complete:
            answer.release()
        else:
            answer.abort()
        return
    try:
        data, more = first, True
        while more:
            if data and not await stream.write(data):
                answer.abort()  # the client is gone: so is the upstream request
                return
            data, more = await answer.read()
        if data and not await stream.write(data):
            answer.abort()
            return
    except UpstreamError as error:
        log.warning("%s %s: the answer broke: %s", request.method, request.path, error.reason)
        connection.cut_stream(stream)
        return
    except asyncio.CancelledError:
        answer.abort()
        connection.cut_stream(stream)
        raise
    except RuntimeError as error:  # its length does not match what it declared
        log.warning("%s %s: %s", request.method, request.path, error)
        answer.abort()
        connection.cut_stream(stream)
        return
    connection.finish_stream(stream)
    answer.release()


def _named_by_connection(headers: list[tuple[bytes, bytes]]) -> frozenset[bytes]:
    """The fields a Connection header names: hop-by-hop too (RFC 9110 7.6.1)."""
    named: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            named.update(token.strip().lower() for token in value.split(b",") if token.strip())
    return frozenset(named)


async def _body_pieces(request: Request, connection: Responder) -> AsyncIterator[bytes]:
    """The request body as it arrives (or whole, when it came whole); a client that
    waits for 100 Continue gets it once the upstream takes the body."""
    streamed = request.streamed_body
    if streamed is None:
        yield await request.body()
        return
    if streamed.take_continue():
        connection.send_continue()
    more = True
    while more:
        data, more = await streamed.read()
        if data:
            yield data
