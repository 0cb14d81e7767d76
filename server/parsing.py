"""The reading side of a connection: bytes in, complete requests out (`RequestReader`).

Bytes go into httptools; its callbacks assemble one request at a time. Only
when a request is *complete* (``on_message_complete``) is it appended to
``pending``: a handler never starts for a request whose framing might still
turn out bad, and the body is already buffered (bounded by ``max_body_size``).

The reader's phase
------------------
``phase`` says what the client is in the middle of sending, and decides which
deadline runs (the service's housekeeping tick enforces ``deadline``):

======== ============================================ ======================
phase    the client is ...                             deadline
======== ============================================ ======================
IDLE     between requests                              keep-alive, once every
                                                       request is answered
HEAD     sending a request head (from its first byte)  ``header_timeout``
BODY     sending a request body                        ``body_timeout`` of
                                                       silence
LINGER   ignored: its request was refused, and what    ``lingering_timeout``
         it still sends is read and thrown away        of silence, at most
                                                       ``lingering_time``
======== ============================================ ======================

Transitions go through `enter`: IDLE -> HEAD at a request's first byte;
HEAD -> BODY when a head announces a body; HEAD or BODY -> IDLE when the
request is complete; any -> LINGER when the connection closes on a refusal.
The two that every request takes (to HEAD in ``on_message_begin``, to IDLE in
``on_message_complete``) are written out where they happen, marked so: a call
per request there is a measurable share of a hello-world request.
The header deadline runs from the first byte of a head and is not extended by
later bytes; the body deadline is extended by each piece of body.

A framing error (`reject`) stops parsing at once: ``rejection`` holds the
status and the reason, and nothing after it is parsed.

Where httptools is not trusted
------------------------------
llhttp is strict (bare CR or LF, control bytes, obs-fold, space before a
colon, CL with TE, duplicate or signed Content-Length and bad chunk framing
are all parser errors), but three of its habits would let a request through
that a proxy in front of us reads differently, so they are fixed here:

* Trailer fields of a chunked body are reported through ``on_header`` like
  header fields. They are counted against the head limits and dropped, never
  merged into the request's headers (RFC 9110 6.5.1): a trailer cannot add a
  second Host, or an Authorization the proxy never saw.
* A request with ``Upgrade`` and ``Connection: upgrade`` makes httptools skip
  its body, on the assumption that the protocol switches. We switch only to
  WebSocket (a GET without a body, when the front door takes WebSockets), so
  any other upgrade's body would be parsed as the next request: a smuggling
  vector (an ``Upgrade: h2c`` POST, as Java's and curl's HTTP/2 clients send,
  carrying a request in its body). `_decline_upgrade` parses such a body
  again, as the body (httptools issue 124).

The WebSocket upgrade
---------------------
A ``GET`` asking for ``Upgrade: websocket`` with a ``Sec-WebSocket-Key``, with
no body, whose head passed every check above, is queued like any request,
marked ``upgrade``; from its
head's end on nothing is parsed (``switching``): what follows belongs to the
new protocol, or to nobody if the switch is refused (the refusal closes the
connection). Those bytes wait in the flow control's stash, which
`server.websocket` takes over with the socket.
* Host is checked for what a host can be (RFC 3986 reg-name, IP literal,
  port) and must appear exactly once, HTTP/1.0 included (RFC 9112 3.2).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Final

import httptools

from .config import Limits
from .context import ConnectionContext
from .flow import FlowControl
from .http import Request
from .request_body import StreamedBody

# the reader's phases (compared by identity)
IDLE: Final = "idle"
HEAD: Final = "head"
BODY: Final = "body"
LINGER: Final = "linger"

_METHODS: dict[bytes, str] = {}


def _method_name(raw: bytes) -> str:
    return _METHODS.setdefault(raw, raw.decode("ascii"))


class Rejected(Exception):
    """Raised from a parser callback to stop parsing; the reason is ``rejection``."""


class RequestReader:
    """Parses one connection's requests into ``pending``; see the module's docstring."""

    def __init__(
        self,
        context: ConnectionContext,
        flow: FlowControl,
        client: tuple[str, int] | None,
        on_expect_continue: Callable[[], None],
        on_body_drained: Callable[[], None] | None = None,
    ) -> None:
        self.context = context
        self.limits: Limits = context.limits
        self.flow = flow
        self.client = client
        self.on_expect_continue = on_expect_continue  # a head asked for 100 Continue
        # set when bodies are streamed to their handlers (see server.request_body):
        # the handler read what waited, parsing may go on
        self.on_body_drained = on_body_drained
        self.streamed: StreamedBody | None = None  # the body being streamed, if any
        # set by the connection when its front door keeps cache hits ready
        # (server.instant): answer(target, method) -> True when it answered
        self.answer_instantly: Callable[[bytes, bytes], bool] | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.max_header_bytes = self.limits.max_header_bytes
        self.max_header_count = self.limits.max_header_count
        self.max_request_line = self.limits.max_request_line
        self.max_pipelined = self.limits.max_pipelined
        self.header_timeout = self.limits.header_timeout

        self.phase: str = HEAD  # a new connection's first request is due at once
        self.deadline = context.clock + self.header_timeout
        self.linger_until = 0.0
        self.pending: deque[Request] = deque()  # complete requests, not yet answered
        self.rejection: tuple[int, str] | None = None
        self.continue_owed = False  # a 100 Continue is due once the request ahead is answered

        # the request being parsed
        self.url = b""
        self.in_message = False  # from a request's first byte to its end
        self.instant_answers = 0  # requests answered from the parser (server.instant)
        self.last_instant = (b"", b"")  # the last one's target and method
        self.head_done = False
        # a body, a framing header, a precondition or an oversized head was seen: the
        # request takes the usual way, and _take_body resets what these set
        self.framing = False
        self.conditional = False  # If-None-Match or If-Modified-Since
        self.version = "1.1"
        self.headers: list[tuple[bytes, bytes]] = []
        self.head_size = 0
        self.head_chunk_bytes = 0
        self.host_count = 0
        self.content_length = 0
        self.chunked = False
        self.expect_continue = False
        self.upgrade_with_body = False  # httptools is about to skip this request's body
        self.switching = False  # a WebSocket upgrade is queued: nothing more is parsed
        self.body: list[bytes] = []
        self.body_size = 0

    # ------------------------------------------------------------------ phases

    def enter(self, phase: str) -> None:
        """The one transition: set the phase and the deadline that goes with it."""
        self.phase = phase
        limits, clock = self.limits, self.context.clock
        if phase is HEAD:
            self.deadline = clock + self.header_timeout
        elif phase is BODY:
            self.deadline = clock + limits.body_timeout
        elif phase is LINGER:
            self.linger_until = clock + limits.lingering_time
            self.deadline = min(clock + limits.lingering_timeout, self.linger_until)
        else:
            self.deadline = 0.0  # IDLE: the keep-alive deadline starts when all is answered

    def start_keepalive(self) -> None:
        """Every request so far is answered: the keep-alive timeout runs from now."""
        if not self.deadline and self.phase is IDLE:
            self.deadline = self.context.clock + self.limits.keepalive_timeout

    def discard(self) -> None:
        """LINGER: a read was thrown away; silence for long ends the connection."""
        self.deadline = min(self.context.clock + self.limits.lingering_timeout, self.linger_until)

    # ------------------------------------------------------------------ feeding

    def feed(self, data: bytes) -> None:
        in_head = self.in_message and not self.head_done
        queued = len(self.pending)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self._decline_upgrade(data, upgrade.args[0])
        except httptools.HttpParserCallbackError:
            if self.rejection is None:
                self.rejection = (500, "internal error while parsing")
        except httptools.HttpParserError as exc:
            self._record_parser_error(exc)
        else:
            if self.rejection is not None:  # set by a check outside a callback (a 408)
                self.fail_body(self.rejection[1])
            # Still in a head, and the same one: no request was completed on the way
            # (the chunk may finish the head it began in and start another).
            if in_head and self.in_message and not self.head_done and len(self.pending) == queued:
                self._count_head_chunk(len(data))

    def fail_body(self, reason: str) -> None:
        """A streamed body will never be complete: its handler learns at its next read."""
        streamed = self.streamed
        if streamed is not None:
            self.streamed = None
            streamed.fail(reason)

    def _count_head_chunk(self, size: int) -> None:
        """A whole chunk went into a head still incomplete: it is buffered in the parser."""
        self.framing = True
        self.head_chunk_bytes += size
        if self.head_chunk_bytes > self.max_header_bytes:
            self.rejection = (431, _head_too_large(self.max_header_bytes))

    def _record_parser_error(self, exc: Exception) -> None:
        self.fail_body("the client sent a malformed body")
        message = str(exc)
        if isinstance(exc, httptools.HttpParserInvalidMethodError):
            self.rejection = (400, "client sent an invalid request method or request line")
        elif "HTTP version" in message:
            self.rejection = (505, "client sent an unsupported HTTP version")
        else:
            self.rejection = (400, f"client sent a malformed request ({message})")

    def reject(self, status: int, reason: str) -> None:
        self.rejection = (status, reason)
        self.fail_body(reason)
        raise Rejected(reason)

    def _decline_upgrade(self, data: bytes, offset: int) -> None:
        """httptools stops at Upgrade/CONNECT; we don't switch protocols, so carry on as HTTP.

        httptools completed an upgrade request at the end of its head, skipping
        its body. If it had one, that request is taken back and its head fed to a
        fresh parser again without its Upgrade field, so the bytes that follow are
        read as its body, not as a request."""
        upgrade_with_body, self.upgrade_with_body = self.upgrade_with_body, False
        last = self.pending[-1] if self.pending else None
        if last is not None and last.method == "CONNECT":
            last.keep_alive = False  # tunnel bytes follow: answer, then close
            return
        if last is not None and not upgrade_with_body and self.context.websockets:
            if last.method == "GET" and _asks_for_websocket(last):
                self._take_upgrade(last, data[offset:])
                return
        self.parser = httptools.HttpRequestParser(self)
        rest = data[offset:]
        if upgrade_with_body and last is not None:
            self.pending.pop()
            rest = _head_without_upgrade(last) + rest
        if rest:
            self.feed(rest)

    def _take_upgrade(self, request: Request, rest: bytes) -> None:
        """Queue ``request`` as a WebSocket upgrade; the bytes after its head (and all
        that follow) are kept for the new protocol, not parsed."""
        request.upgrade = "websocket"
        request.keep_alive = False  # a refused upgrade is answered, then the connection closes
        self.switching = True
        self.flow.read_paused = True  # what arrives from now on is stashed (server.flow)
        if rest:
            self.flow.hold(rest)

    # ------------------------------------------------------------------ httptools callbacks
    #
    # A request is "in progress" (``in_message``) from its first byte until
    # on_message_complete, which also resets the per-request state for
    # the next one. Fields that only some requests touch (body, framing
    # headers) are reset only when ``framing`` says one was touched.

    def on_message_begin(self) -> None:
        self.in_message = True
        if self.phase is not HEAD:  # a new request: its head deadline starts now
            self.phase = HEAD  # enter(HEAD), written out: once per request
            self.deadline = self.context.clock + self.header_timeout

    def on_url(self, piece: bytes) -> None:
        url = self.url = self.url + piece
        if len(url) > self.max_request_line:
            self.reject(414, f"request target is longer than {self.max_request_line} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.head_done:
            self._on_trailer_field(name, value)
            return
        headers = self.headers
        headers.append((name, value))
        size = self.head_size = self.head_size + len(name) + len(value) + 4
        if size > self.max_header_bytes:
            self.reject(431, _head_too_large(self.max_header_bytes))
        if len(headers) > self.max_header_count:
            self.reject(431, f"client sent more than {self.max_header_count} header fields")
        if len(name) in _CHECKED_NAME_LENGTHS:
            name = name.lower()
            if name == b"host":
                self.host_count += 1
                if value.translate(None, _HOST_CHARACTERS):
                    self.reject(400, f"client sent an invalid Host: {value.decode('latin-1')}")
            else:
                check = _HEADER_CHECKS.get(name)
                if check is not None:
                    self.framing = True
                    check(self, value)

    def _on_trailer_field(self, name: bytes, value: bytes) -> None:
        """A field in the trailer of a chunked body: dropped, but head and trailer
        together must fit in max_header_bytes (which also bounds how many there are)."""
        self.head_size += len(name) + len(value) + 4
        if self.head_size > self.max_header_bytes:
            self.reject(431, _head_too_large(self.max_header_bytes))

    def _on_content_length(self, value: bytes) -> None:
        self.content_length = int(value)  # the parser has already checked the digits

    def _on_transfer_encoding(self, value: bytes) -> None:
        if self.parser.get_http_version() == "1.0":
            self.reject(400, "client sent Transfer-Encoding in an HTTP/1.0 request")
        codings = [coding.strip().lower() for coding in value.split(b",")]
        if codings == [b"chunked"] and not self.chunked:
            self.chunked = True
        elif b"chunked" in codings[:-1] or self.chunked:
            self.reject(400, "client sent chunked, but not as the final transfer coding")
        else:
            coding = value.decode("latin-1")
            self.reject(501, f"client sent an unsupported Transfer-Encoding: {coding}")

    def _on_precondition(self, value: bytes) -> None:
        self.conditional = True  # the cache may answer 304 (server.freshness.not_modified)

    def _on_expect(self, value: bytes) -> None:
        if value.lower() == b"100-continue":
            # an HTTP/1.0 client cannot read a 100: ignore the expectation (RFC 9110 10.1.1)
            self.expect_continue = self.parser.get_http_version() != "1.0"
        else:
            self.reject(417, f"client sent an unsupported Expect: {value.decode('latin-1')}")

    def on_headers_complete(self) -> None:
        self.head_done = True
        version = self.version = self.parser.get_http_version()
        if version != "1.1" or self.host_count != 1:
            self._check_version_and_host(version)
        if self.framing:
            self._expect_body()

    def _check_version_and_host(self, version: str) -> None:
        if version == "0.9":
            self.reject(400, "client sent an HTTP/0.9 request line")
        if version not in ("1.0", "1.1"):
            self.reject(505, f"client sent HTTP/{version}, which this server does not speak")
        if self.host_count > 1:  # in any version (RFC 9112 3.2)
            self.reject(400, f"client sent duplicate Host headers in an HTTP/{version} request")
        if self.host_count == 0 and version == "1.1":
            self.reject(400, "client sent no Host header in an HTTP/1.1 request")

    def _expect_body(self) -> None:
        if not (self.chunked or self.content_length):
            return
        if self.content_length > self.limits.max_body_size:
            self.reject(413, _body_too_large(self.limits.max_body_size))
        if self.parser.should_upgrade():
            self.upgrade_with_body = True  # httptools will skip the body: see _decline_upgrade
            self.expect_continue = False  # the 100 goes out when the head is parsed again
        self.enter(BODY)
        if self.on_body_drained is not None and not self.upgrade_with_body:
            self._stream_body()  # its 100 Continue is sent by the handler's first read
        elif self.expect_continue:
            self.on_expect_continue()

    def _stream_body(self) -> None:
        """Queue the request now: its handler reads the body as it arrives."""
        parser = self.parser
        method = _METHODS.get(parser.get_method()) or _method_name(parser.get_method())
        request = Request(
            method,
            self.url,
            self.version,
            self.headers,
            self.client,
            parser.should_keep_alive(),
            b"",
            self.context,
        )
        assert self.on_body_drained is not None
        streamed = self.streamed = StreamedBody(self.on_body_drained, self.expect_continue)
        request.streamed_body = streamed
        self.pending.append(request)

    def on_body(self, chunk: bytes) -> None:
        self.body_size += len(chunk)
        if self.body_size > self.limits.max_body_size:
            self.reject(413, _body_too_large(self.limits.max_body_size))
        streamed = self.streamed
        if streamed is None:
            self.body.append(chunk)
        elif not streamed.feed(chunk):
            self.flow.read_paused = True  # until the handler reads (on_body_drained)
            self.deadline = 0.0  # the client is not the one holding things up
            return
        self.deadline = self.context.clock + self.limits.body_timeout

    def on_message_complete(self) -> None:
        if self.streamed is not None:
            self._finish_streamed_body()
            return
        parser = self.parser
        answer_instantly = self.answer_instantly
        if (
            answer_instantly is not None
            and not self.framing  # no body, no framing header, no Expect
            and not self.pending
            and self.version == "1.1"
            and parser.should_keep_alive()
            and not parser.should_upgrade()
            and answer_instantly(self.url, parser.get_method())
        ):
            self.instant_answers += 1
            self.last_instant = (self.url, parser.get_method())
            self._next_request()
            return
        method = _METHODS.get(parser.get_method()) or _method_name(parser.get_method())
        conditional = self.conditional
        request = Request(
            method,
            self.url,
            self.version,
            self.headers,
            self.client,
            parser.should_keep_alive(),
            self._take_body() if self.framing else b"",
            self.context,
        )
        if conditional:
            request.conditional = True
        self.pending.append(request)
        self._next_request()
        if len(self.pending) >= self.max_pipelined:
            self.flow.read_paused = True

    def _next_request(self) -> None:
        """The request just parsed is queued (or answered): ready for the next head."""
        self.url = b""
        self.in_message = False
        self.headers = []
        self.head_size = 0
        self.host_count = 0
        self.head_done = False
        self.phase = IDLE  # enter(IDLE), written out: once per request
        self.deadline = 0.0

    def _finish_streamed_body(self) -> None:
        streamed = self.streamed
        assert streamed is not None
        self.streamed = None
        streamed.finish()
        self._take_body()  # resets the framing fields
        self.url = b""
        self.in_message = False
        self.headers = []
        self.head_size = 0
        self.host_count = 0
        self.head_done = False
        self.enter(IDLE)
        if len(self.pending) >= self.max_pipelined:
            self.flow.read_paused = True

    def _take_body(self) -> bytes:
        """The body of the request just completed; resets the rarely used fields."""
        body = self.body
        payload = (body[0] if len(body) == 1 else b"".join(body)) if body else b""
        self.body = []
        self.body_size = 0
        self.content_length = 0
        self.chunked = False
        self.expect_continue = False
        self.head_chunk_bytes = 0
        self.continue_owed = False  # a client may send its body without waiting for 100
        self.conditional = False
        self.framing = False
        return payload


# Headers that change how a request is framed, and preconditions; Host is counted
# inline in on_header.
_HEADER_CHECKS: dict[bytes, Callable[[RequestReader, bytes], None]] = {
    b"content-length": RequestReader._on_content_length,
    b"transfer-encoding": RequestReader._on_transfer_encoding,
    b"expect": RequestReader._on_expect,
    b"if-none-match": RequestReader._on_precondition,
    b"if-modified-since": RequestReader._on_precondition,
}
_CHECKED_NAME_LENGTHS = frozenset(len(name) for name in (b"host", *_HEADER_CHECKS))
# What a Host value may hold: reg-name or IP literal, and a port (RFC 3986 3.2.2);
# `value.translate(None, _HOST_CHARACTERS)` leaves whatever else it holds.
_HOST_CHARACTERS = (
    b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~!$&'()*+,;=:[]%"
)


def _asks_for_websocket(request: Request) -> bool:
    """True for a WebSocket handshake: an Upgrade field naming websocket, and a
    Sec-WebSocket-Key (without one the request is no handshake: it is declined,
    and answered as plain HTTP)."""
    upgrade = key = False
    for name, value in request.raw_headers:
        if len(name) == 7 and name.lower() == b"upgrade":
            upgrade = upgrade or any(
                token.strip().lower() == b"websocket" for token in value.split(b",")
            )
        elif len(name) == 17 and name.lower() == b"sec-websocket-key":
            key = True
    return upgrade and key


def _head_without_upgrade(request: Request) -> bytes:
    """The head of ``request`` as it arrived, less the Upgrade field that made httptools
    skip its body: fed to a parser again so that its body is parsed as a body."""
    method, version = request.method.encode(), request.version.encode()
    lines = [b"%s %s HTTP/%s\r\n" % (method, request.target, version)]
    for name, value in request.raw_headers:
        if name.lower() != b"upgrade":
            lines.append(b"%s: %s\r\n" % (name, value))
    lines.append(b"\r\n")
    return b"".join(lines)


def _head_too_large(limit: int) -> str:
    return f"request head is larger than {limit} bytes"


def _body_too_large(limit: int) -> str:
    return f"request body is larger than the {limit}-byte limit"
