"""The HTTP/1.1 connection layer: one `asyncio.Protocol` for every loop backend.

It uses nothing but the transport contract (write, close, pause/resume
reading, get_extra_info, pause_writing/resume_writing callbacks), so asyncio,
uvloop and forkloop's own loops all run it unchanged.

How a connection works
----------------------
Bytes go into httptools; its callbacks assemble one request at a time. Only
when a request is *complete* (``on_message_complete``) is it appended to the
``pending`` queue: a handler never starts for a request whose framing might
still turn out bad, and the body is already buffered (bounded by
``max_body_size``). After each feed, `_run_pending` answers queued requests in
order, one at a time:

* a plain ``def`` handler runs inline and its response is appended to
  ``output``;
* an ``async def`` handler runs as a task (eagerly started on Python 3.12+, so
  a handler that never suspends finishes inside this call too); while it runs,
  later requests wait in ``pending`` and responses stay in request order.

Everything appended to ``output`` during one `data_received` goes out in one
``transport.write``: a burst of 16 pipelined requests costs one send.

Rules that keep it honest
-------------------------
1. At most one request is *active* (running an async handler or streaming a
   body) per connection; responses leave in request order.
2. A framing error (`_reject`) stops parsing at once. Requests complete before
   the error are still answered; then the error response goes out with
   ``Connection: close`` and the connection closes. Nothing after it is read.
3. Backpressure is logical first: while the write buffer is above its
   high-water mark or ``max_pipelined`` requests are queued, new bytes are
   stashed, not parsed. The transport keeps reading (so a client that hangs up
   is noticed, and its handler cancelled) until the stash itself is full.
   Queued requests wait too while the buffer is above the mark, and a large
   body is written at once rather than gathered: a client that pipelines
   requests for big responses and reads nothing holds one write buffer's
   worth of the server's memory, not ``max_pipelined`` responses.
4. Deadlines are stored on the connection (`deadline`, `deadline_kind`) and
   enforced by the service's housekeeping tick: setting one per request is an
   attribute write, not a timer. The header deadline runs from the first byte
   of a request and is not extended by later bytes.
5. Every request gets exactly one response, in order, or the connection
   closes. A response the handler made unsendable (a status outside 200-599,
   CR/LF or a non-Latin-1 character in a header) becomes a 500; anything else
   that goes wrong while answering is logged and closes the connection, since
   the responses behind it could no longer be matched to their requests.
6. A connection closed on a refused request lingers (nginx's lingering close):
   the client may still be sending the body, and closing with bytes unread
   makes the kernel send a reset that can destroy the answer before the client
   reads it. So the answer goes out with a FIN (`write_eof`), and what arrives
   after is read and thrown away until the client closes, or is quiet for
   ``lingering_timeout``, or ``lingering_time`` has passed.

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
  its body, on the assumption that the protocol switches. We never switch, so
  the body would be parsed as the next request: a smuggling vector (an
  ``Upgrade: h2c`` POST, as Java's and curl's HTTP/2 clients send, carrying a
  request in its body). `_decline_upgrade` parses such a body again, as the
  body (httptools issue 124).
* Host is checked for what a host can be (RFC 3986 reg-name, IP literal,
  port) and must appear exactly once, HTTP/1.0 included (RFC 9112 3.2).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import sys
from collections import deque
from typing import TYPE_CHECKING, Any

import httptools

from .http import Request, Response, as_response, error_response
from .responses import ResponseWriter, peer_name

if TYPE_CHECKING:
    from .service import HttpService

log = logging.getLogger("forkloop.http")

EAGER_TASKS = sys.version_info >= (3, 12)

# deadline kinds
HEAD, BODY, IDLE, LINGER = "head", "body", "idle", "linger"

# why a handler was cancelled (Request.cancel_reason)
DISCONNECT, DEADLINE, SHUTDOWN = "disconnect", "deadline", "shutdown"

CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_CANCEL_EXPLANATIONS = {
    DISCONNECT: "the client went away",
    DEADLINE: "the request timeout passed",
    SHUTDOWN: "the server is shutting down",
}
_STASH_LIMIT = 256 * 1024
FIRST_REQUEST_GRACE = 1.0  # seconds a fresh connection gets to send a request during shutdown
_STARTING = object()  # `active` while an eager task runs its first step

_METHODS: dict[bytes, str] = {}


def _method_name(raw: bytes) -> str:
    return _METHODS.setdefault(raw, raw.decode("ascii"))


class _Rejected(Exception):
    """Raised from a parser callback to stop parsing; the reason is on the connection."""


class HttpConnection(ResponseWriter, asyncio.Protocol):
    """One client connection: parse, dispatch, respond, enforce limits."""

    def __init__(self, service: HttpService) -> None:
        self.service = service
        self.limits = limits = service.config.limits
        self.loop = service.loop
        self.max_header_bytes = limits.max_header_bytes
        self.max_header_count = limits.max_header_count
        self.max_request_line = limits.max_request_line
        self.max_pipelined = limits.max_pipelined
        self.requests_left = limits.max_keepalive_requests
        self.header_timeout = limits.header_timeout
        self.keepalive_timeout = limits.keepalive_timeout
        self.stats = service.stats
        self.resolve = service.app.resolve
        self.transport: Any = None
        self.client: tuple[str, int] | None = None
        self.parser = httptools.HttpRequestParser(self)

        # the request being parsed
        self.url = b""  # non-empty while a request is in progress
        self.head_done = False
        self.framing = False  # a body, framing header or oversized head was seen
        self.version = "1.1"
        self.headers: list[tuple[bytes, bytes]] = []
        self.head_size = 0
        self.head_chunk_bytes = 0
        self.host_count = 0
        self.content_length = 0
        self.chunked = False
        self.expect_continue = False
        self.upgrade_with_body = False  # httptools is about to skip this request's body
        self.body: list[bytes] = []
        self.body_size = 0

        # requests and responses
        self.pending: deque[Request] = deque()
        self.active: Any = None  # the task of the request being answered, if it needs one
        self.active_request: Request | None = None
        self.request_timer: asyncio.TimerHandle | None = None
        self.request_timeout = limits.request_timeout
        self.output: list[bytes] = []
        self.continue_owed = False
        self.rejection: tuple[int, str] | None = None
        self.closing = False
        self.peer_closed = False

        # flow control
        self.read_paused = False
        self.transport_paused = False
        self.stash: list[bytes] = []
        self.stash_size = 0
        self.write_paused = False
        self.drain_waiter: asyncio.Future[None] | None = None

        # deadlines, enforced by HttpService.sweep()
        self.deadline = 0.0
        self.deadline_kind = HEAD
        self.send_deadline = 0.0
        self.linger_until = 0.0

    # ------------------------------------------------------------------ transport events

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        # --write-buffer-high: above it pause_writing() stops reading and starts send_timeout
        transport.set_write_buffer_limits(high=self.limits.write_buffer_high)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            self.client = (peer[0], peer[1])
        self.service.connection_opened(self)
        self.deadline = self.service.clock + self.limits.header_timeout

    def data_received(self, data: bytes) -> None:
        if self.closing or self.rejection is not None:
            if self.deadline_kind is LINGER:  # read and thrown away; quiet for long ends it
                clock = self.service.clock
                self.deadline = min(clock + self.limits.lingering_timeout, self.linger_until)
            return  # nothing after Connection: close or a framing error is read
        if self.read_paused:
            self._stash(data)
            return
        self._feed(data)
        self._run_pending()

    def eof_received(self) -> bool:
        self.peer_closed = True
        if self.deadline_kind is LINGER:
            return False  # the client is done: close
        if self.pending or self.stash:
            return True  # half-closed: answer what was pipelined (parsed or not), then close
        self.cancel_active(DISCONNECT)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.pending.clear()
        self.service.connection_closed(self)
        self.cancel_active(DISCONNECT)
        if self.drain_waiter is not None and not self.drain_waiter.done():
            self.drain_waiter.set_exception(ConnectionResetError("client connection lost"))
        self.transport = None

    def pause_writing(self) -> None:
        self.write_paused = True
        self.send_deadline = self.service.clock + self.limits.send_timeout
        self.read_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self.send_deadline = 0.0
        waiter = self.drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if not self.closing:
            self._run_pending()

    # ------------------------------------------------------------------ parsing
    #
    # A request is "in progress" from its first URL byte (``url`` non-empty)
    # until on_message_complete, which also resets the per-request state for
    # the next one. Fields that only some requests touch (body, framing
    # headers) are reset only when ``framing`` says one was touched.

    def _feed(self, data: bytes) -> None:
        in_head = self.url and not self.head_done
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
            # Still in a head, and the same one: no request was completed on the way
            # (the chunk may finish the head it began in and start another).
            if in_head and self.url and not self.head_done and len(self.pending) == queued:
                self._count_head_chunk(len(data))

    def _count_head_chunk(self, size: int) -> None:
        """A whole chunk went into a head still incomplete: it is buffered in the parser."""
        self.framing = True
        self.head_chunk_bytes += size
        if self.head_chunk_bytes > self.max_header_bytes:
            self.rejection = (431, _head_too_large(self.max_header_bytes))

    def _record_parser_error(self, exc: Exception) -> None:
        message = str(exc)
        if isinstance(exc, httptools.HttpParserInvalidMethodError):
            self.rejection = (400, "client sent an invalid request method or request line")
        elif "HTTP version" in message:
            self.rejection = (505, "client sent an unsupported HTTP version")
        else:
            self.rejection = (400, f"client sent a malformed request ({message})")

    def _reject(self, status: int, reason: str) -> None:
        self.rejection = (status, reason)
        raise _Rejected(reason)

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
        self.parser = httptools.HttpRequestParser(self)
        rest = data[offset:]
        if upgrade_with_body and last is not None:
            self.pending.pop()
            rest = _head_without_upgrade(last) + rest
        if rest:
            self._feed(rest)

    def on_url(self, piece: bytes) -> None:
        url = self.url
        if url:
            url = self.url = url + piece
        else:
            url = self.url = piece
            if self.deadline_kind is not HEAD:  # a new request: its head deadline starts now
                self.deadline_kind = HEAD
                self.deadline = self.service.clock + self.header_timeout
        if len(url) > self.max_request_line:
            self._reject(414, f"request target is longer than {self.max_request_line} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.head_done:
            self._on_trailer_field(name, value)
            return
        headers = self.headers
        headers.append((name, value))
        size = self.head_size = self.head_size + len(name) + len(value) + 4
        if size > self.max_header_bytes:
            self._reject(431, _head_too_large(self.max_header_bytes))
        if len(headers) > self.max_header_count:
            self._reject(431, f"client sent more than {self.max_header_count} header fields")
        if len(name) in _CHECKED_NAME_LENGTHS:
            name = name.lower()
            if name == b"host":
                self.host_count += 1
                if value.translate(None, _HOST_CHARACTERS):
                    self._reject(400, f"client sent an invalid Host: {value.decode('latin-1')}")
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
            self._reject(431, _head_too_large(self.max_header_bytes))

    def _on_content_length(self, value: bytes) -> None:
        self.content_length = int(value)  # the parser has already checked the digits

    def _on_transfer_encoding(self, value: bytes) -> None:
        if self.parser.get_http_version() == "1.0":
            self._reject(400, "client sent Transfer-Encoding in an HTTP/1.0 request")
        codings = [coding.strip().lower() for coding in value.split(b",")]
        if codings == [b"chunked"] and not self.chunked:
            self.chunked = True
        elif b"chunked" in codings[:-1] or self.chunked:
            self._reject(400, "client sent chunked, but not as the final transfer coding")
        else:
            coding = value.decode("latin-1")
            self._reject(501, f"client sent an unsupported Transfer-Encoding: {coding}")

    def _on_expect(self, value: bytes) -> None:
        if value.lower() == b"100-continue":
            # an HTTP/1.0 client cannot read a 100: ignore the expectation (RFC 9110 10.1.1)
            self.expect_continue = self.parser.get_http_version() != "1.0"
        else:
            self._reject(417, f"client sent an unsupported Expect: {value.decode('latin-1')}")

    def on_headers_complete(self) -> None:
        self.head_done = True
        version = self.version = self.parser.get_http_version()
        if version != "1.1" or self.host_count != 1:
            self._check_version_and_host(version)
        if self.framing:
            self._expect_body()

    def _check_version_and_host(self, version: str) -> None:
        if version == "0.9":
            self._reject(400, "client sent an HTTP/0.9 request line")
        if version not in ("1.0", "1.1"):
            self._reject(505, f"client sent HTTP/{version}, which this server does not speak")
        if self.host_count > 1:  # in any version (RFC 9112 3.2)
            self._reject(400, f"client sent duplicate Host headers in an HTTP/{version} request")
        if self.host_count == 0 and version == "1.1":
            self._reject(400, "client sent no Host header in an HTTP/1.1 request")

    def _expect_body(self) -> None:
        if not (self.chunked or self.content_length):
            return
        if self.content_length > self.limits.max_body_size:
            self._reject(413, _body_too_large(self.limits.max_body_size))
        if self.parser.should_upgrade():
            self.upgrade_with_body = True  # httptools will skip the body: see _decline_upgrade
            self.expect_continue = False  # the 100 goes out when the head is parsed again
        self.deadline_kind = BODY
        self.deadline = self.service.clock + self.limits.body_timeout
        if self.expect_continue:
            if self.active is None and not self.pending:
                self.output.append(CONTINUE)
            else:
                self.continue_owed = True

    def on_body(self, chunk: bytes) -> None:
        self.body_size += len(chunk)
        if self.body_size > self.limits.max_body_size:
            self._reject(413, _body_too_large(self.limits.max_body_size))
        self.body.append(chunk)
        self.deadline = self.service.clock + self.limits.body_timeout

    def on_message_complete(self) -> None:
        parser = self.parser
        method = _METHODS.get(parser.get_method()) or _method_name(parser.get_method())
        self.pending.append(
            Request(
                method,
                self.url,
                self.version,
                self.headers,
                self.client,
                parser.should_keep_alive(),
                self._take_body() if self.framing else b"",
                self.service,
            )
        )
        self.url = b""
        self.headers = []
        self.head_size = 0
        self.host_count = 0
        self.head_done = False
        self.deadline = 0.0
        self.deadline_kind = IDLE
        if len(self.pending) >= self.max_pipelined:
            self.read_paused = True

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
        self.framing = False
        return payload

    # ------------------------------------------------------------------ dispatch

    def _run_pending(self) -> None:
        """Answer queued requests in order until one has to wait; then flush."""
        pending = self.pending
        try:
            while True:
                while pending and self.active is None and not (self.closing or self.write_paused):
                    self._dispatch(pending.popleft())
                if self.active is not None or self.closing or (pending and self.write_paused):
                    break  # until the handler is done, or the client reads (rule 3)
                if self.rejection is None and not (
                    self.peer_closed or self.read_paused or self.continue_owed
                ):
                    if not self.deadline and self.deadline_kind is IDLE:
                        # the last request is answered: the keep-alive timeout runs from now
                        self.deadline = self.service.clock + self.keepalive_timeout
                    break
                if not self._settle_pipeline():
                    break
        except Exception:
            self._abandon("answering a request")
        self._flush()

    def _abandon(self, doing: str) -> None:
        """Rule 5's last resort: an error nothing above foresaw. The responses behind
        it could no longer be matched to their requests, so the connection closes."""
        log.exception("%s: closed after an internal error while %s", peer_name(self.client), doing)
        self.pending.clear()
        self.closing = True

    def _settle_pipeline(self) -> bool:
        """The queue is empty and nothing runs: act on errors, EOF, pauses, owed 100s.

        True when there may be new requests to run."""
        if self.rejection is not None:
            self._send_rejection()
            return False
        if self.read_paused and not self.write_paused:
            self._resume_reading()
            if self.pending or self.rejection is not None:
                return True
        if self.peer_closed:
            if not self.read_paused:  # all it sent before its EOF is answered (or never will be)
                self.closing = True
            return False
        if self.continue_owed and self.url:
            self.continue_owed = False
            self.output.append(CONTINUE)
        if not self.read_paused and not self.deadline and self.deadline_kind is IDLE:
            self.deadline = self.service.clock + self.keepalive_timeout
        return False

    def _dispatch(self, request: Request) -> None:
        self.stats.requests += 1
        route = self.resolve(request)
        if route.__class__ is Response:
            self._respond(request, route)
            return
        if not route.is_async:
            try:
                response = route.handler(request)
                if response.__class__ is not Response:
                    if inspect.isawaitable(response):  # the cheap path declined: await the rest
                        self._start_task(request, self._run_handler(request, _awaiting(response)))
                        return
                    response = as_response(response)
            except Exception:
                response = self._handler_failed(request)
            if response.stream is None:
                self._respond(request, response)
                return
            self._start_task(request, self._run_handler(request, None, response))
            return
        self._start_task(request, self._run_handler(request, route.handler))

    def _start_task(self, request: Request, coroutine: Any) -> None:
        """Run ``coroutine`` as the request's task; eager where Python has it."""
        self.active = _STARTING
        self.active_request = request
        if EAGER_TASKS:
            task = asyncio.Task(coroutine, loop=self.loop, eager_start=True)
        else:
            task = self.loop.create_task(coroutine)
        if self.active is _STARTING:  # it suspended: from now on it can overrun its deadline
            self.active = task
            if self.request_timeout:
                self.request_timer = self.loop.call_later(
                    self.request_timeout, self.cancel_active, DEADLINE
                )

    async def _run_handler(
        self, request: Request, handler: Any, response: Response | None = None
    ) -> None:
        """Await the handler (unless ``response`` is ready), then send what it gave."""
        try:
            try:
                if response is None:
                    response = as_response(await handler(request))
            except asyncio.CancelledError:
                response = self._answer_for_cancelled(request)
                if response is None:
                    return
            except Exception:
                response = self._handler_failed(request)
            try:
                if response.stream is None:
                    self._respond(request, response)
                else:
                    await self._stream(request, response)
            except Exception:
                self._abandon(f"sending the response to {request.method} {request.path}")
        finally:
            if self.request_timer is not None:
                self.request_timer.cancel()
                self.request_timer = None
            finished_inline = self.active is _STARTING
            self.active = None
            self.active_request = None
            if not finished_inline and self.transport is not None:
                self._run_pending()

    def cancel_active(self, reason: str) -> None:
        """Cancel the running handler (or stream) for ``reason``: disconnect, deadline, shutdown."""
        task, request = self.active, self.active_request
        if task is None or task is _STARTING or task.done():
            return
        if request is not None and request.cancel_reason is None:
            request.cancel_reason = reason
            self.stats.cancelled[reason] += 1
            log.info(
                "%s: %s %s cancelled: %s",
                peer_name(self.client),
                request.method,
                request.path,
                _CANCEL_EXPLANATIONS[reason],
            )
        task.cancel(f"request cancelled: {reason}")
        task.add_done_callback(self._after_cancel)

    def _after_cancel(self, task: asyncio.Task) -> None:
        """A task cancelled before its first step (Python 3.11 starts tasks lazily) never
        ran `_run_handler`, so its clean-up falls to this done callback: otherwise the
        connection would keep a dead ``active`` task, and its request timer would keep
        the connection and its body alive for ``request_timeout``."""
        if self.active is not task:
            return  # _run_handler ran and cleaned up
        request = self.active_request
        if self.request_timer is not None:
            self.request_timer.cancel()
            self.request_timer = None
        self.active = None
        self.active_request = None
        if self.transport is None or request is None:
            return
        response = self._answer_for_cancelled(request)
        if response is not None:
            self._respond(request, response)
        self._run_pending()

    def _answer_for_cancelled(self, request: Request) -> Response | None:
        """What to send once a handler is cancelled: nothing to a client that is gone,
        504 past the deadline, 503 at shutdown. A cancellation that is not ours
        (the loop itself shutting down) propagates."""
        reason = request.cancel_reason
        if reason is None:
            raise asyncio.CancelledError
        task = asyncio.current_task()
        if task is not None:
            task.uncancel()  # handled here: the request's own task ends normally
        if reason == DISCONNECT or self.transport is None:
            return None
        request.keep_alive = False
        if reason == DEADLINE:
            return error_response(504, f"the handler did not answer within {self.request_timeout}s")
        return error_response(503, "the server is shutting down")

    def _handler_failed(self, request: Request) -> Response:
        log.exception("handler for %s %s raised", request.method, request.path)
        return error_response(500, "the handler raised an exception")

    # ------------------------------------------------------------------ closing

    def _close_when_sent(self, transport: Any) -> None:
        """Close after the output, or linger first when the client may still be sending."""
        if self.deadline_kind is LINGER:
            return  # already lingering: the tick or the client's FIN ends it
        if self._client_may_be_sending() and transport.can_write_eof():
            self._linger(transport)
        else:
            transport.close()

    def _client_may_be_sending(self) -> bool:
        """A refused request's body may still be on its way (a timed-out one is cut)."""
        rejection = self.rejection
        return rejection is not None and rejection[0] != 408 and not self.peer_closed

    def _linger(self, transport: Any) -> None:
        now = self.service.clock
        self.deadline_kind = LINGER
        self.linger_until = now + self.limits.lingering_time
        self.deadline = min(now + self.limits.lingering_timeout, self.linger_until)
        if self.transport_paused:
            self.transport_paused = False
            transport.resume_reading()
        transport.write_eof()  # the answer, then a FIN

    # ------------------------------------------------------------------ flow control

    def _stash(self, data: bytes) -> None:
        self.stash.append(data)
        self.stash_size += len(data)
        if self.stash_size > _STASH_LIMIT and not self.transport_paused:
            self.transport_paused = True
            self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if len(self.pending) >= self.max_pipelined:
            return
        self.read_paused = False
        if self.transport_paused:
            self.transport_paused = False
            self.transport.resume_reading()
        if self.stash:
            data = b"".join(self.stash)
            self.stash.clear()
            self.stash_size = 0
            self._feed(data)

    # ------------------------------------------------------------------ housekeeping

    def check_deadlines(self, now: float) -> None:
        """Called by the service's tick: enforce whichever deadline has passed."""
        if self.send_deadline and now >= self.send_deadline:
            log.info(
                "%s: closed: client read nothing for %ss",
                peer_name(self.client),
                self.limits.send_timeout,
            )
            self.service.stats.timeouts += 1
            self.transport.abort()
            return
        if not self.deadline or now < self.deadline:
            return
        self.deadline = 0.0
        kind = self.deadline_kind
        if kind is LINGER:
            self.transport.close()  # quiet for lingering_timeout, or lingering_time is over
            return
        if kind is IDLE or (kind is HEAD and not self.url):
            self.closing = True
            self._flush()  # idle or nothing received: close quietly, as nginx does
            return
        self.service.stats.timeouts += 1
        if kind is HEAD:
            reason = f"client sent no complete request head within {self.limits.header_timeout}s"
        else:
            reason = f"client sent no body data for {self.limits.body_timeout}s"
        self.rejection = (408, reason)
        self._run_pending()

    def close_if_idle(self) -> bool:
        """For graceful shutdown: close now if no request is in progress.

        A connection that has not sent its first request yet may have one on the
        wire: closing it would answer that request with a reset. It gets
        FIRST_REQUEST_GRACE seconds to arrive (and is answered with
        ``Connection: close``), then is closed quietly."""
        if self.deadline_kind is LINGER:
            self.transport.close()
            return True
        if self.active is not None or self.pending or self.url:
            return False
        if self.requests_left == self.limits.max_keepalive_requests:
            grace = self.service.clock + FIRST_REQUEST_GRACE
            self.deadline_kind = HEAD
            self.deadline = min(self.deadline, grace) if self.deadline else grace
            return False
        self.closing = True
        self._flush()
        return True


# Headers that change how a request is framed; Host is counted inline in on_header.
_HEADER_CHECKS = {
    b"content-length": HttpConnection._on_content_length,
    b"transfer-encoding": HttpConnection._on_transfer_encoding,
    b"expect": HttpConnection._on_expect,
}
_CHECKED_NAME_LENGTHS = frozenset(len(name) for name in (b"host", *_HEADER_CHECKS))
# What a Host value may hold: reg-name or IP literal, and a port (RFC 3986 3.2.2);
# `value.translate(None, _HOST_CHARACTERS)` leaves whatever else it holds.
_HOST_CHARACTERS = (
    b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~!$&'()*+,;=:[]%"
)


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


def _awaiting(awaitable: Any) -> Any:
    """A handler-shaped callable that awaits what a plain handler returned."""

    async def handler(request: Request) -> Any:
        return await awaitable

    return handler


def _head_too_large(limit: int) -> str:
    return f"request head is larger than {limit} bytes"


def _body_too_large(limit: int) -> str:
    return f"request body is larger than the {limit}-byte limit"
