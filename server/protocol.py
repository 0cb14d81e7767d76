"""The HTTP/1.1 connection layer: one `asyncio.Protocol` for every loop backend.

It uses nothing but the transport contract (write, close, pause/resume
reading, get_extra_info, pause_writing/resume_writing callbacks), so asyncio,
uvloop and forkloop's own loops all run it unchanged. It imports nothing of
the worker: what it needs of it comes in one `ConnectionContext`.

A connection is four small objects
----------------------------------
* `RequestReader` (`server.parsing`): bytes in, complete requests out, into
  its ``pending`` queue; its phase (idle, head, body, linger) says what the
  client is sending and which deadline runs.
* `ResponseWriter` (`server.responses`): responses out, as bytes, in order.
* `FlowControl` (`server.flow`): pausing, stashing and draining, both ways.
* `HttpConnection` (here): the transport's events, the handler of the request
  being answered, and the connection's phase.

The connection's phase
----------------------
``phase`` says what the server side is doing; `_enter` is the only place
that changes it.

=========== ========================================================
OPEN        answering: queued requests run as soon as they arrive
RUNNING     a handler task runs (``active_request``); the next
            queued request waits for it
STREAMING   a streaming response of ``active_request`` is being sent
CLOSING     the connection closes once its output is written and no
            handler runs (the handler may still be finishing)
UPGRADED    the connection switched protocols (WebSocket): every
            transport event goes to ``session``, nothing is parsed
CLOSED      the transport is gone
=========== ========================================================

Transitions: OPEN -> RUNNING when a handler suspends (a plain ``def`` handler,
or an async one that finishes in its first step, never leaves OPEN);
RUNNING -> STREAMING when its response is a stream; RUNNING or STREAMING ->
OPEN when it is answered; OPEN, RUNNING or STREAMING -> CLOSING on a response
that ends the connection, a refusal, a timeout, EOF or shutdown; RUNNING ->
UPGRADED when the handler of an upgrade request switches (`switch_protocol`);
any -> CLOSED on ``connection_lost``. `TRANSITIONS` lists them as data, and
the unit tests hold the connection to it.

The switch: a handler that accepts an upgrade request (see `server.parsing`)
calls `switch_protocol`; from then on the transport's events are its
`UpgradedSession`'s, and the handler's task stays the active request until it
returns, so cancellation reaches it as it reaches any handler.

How a request is answered
-------------------------
After each read, `_run_pending` answers queued requests in order, one at a
time:

* a plain ``def`` handler runs inline and its response joins the output;
* an ``async def`` handler's first step runs inline too (`server.eager`), so
  one that never suspends finishes inside this call, with no task of its own;
  one that suspends is driven on by a host task. While it runs, later
  requests wait in ``pending`` and responses stay in request order.

Everything answered during one ``data_received`` goes out in one
``transport.write``: a burst of 16 pipelined requests costs one send.

Rules that keep it honest
-------------------------
1. At most one request is active (running a handler or streaming) per
   connection; responses leave in request order.
2. A framing error stops parsing at once. Requests complete before the error
   are still answered; then the refusal goes out with ``Connection: close`` and
   the connection closes. Nothing after it is read.
3. Backpressure is logical first (`server.flow`): while the write buffer is
   above its high-water mark or ``max_pipelined`` requests are queued, new bytes
   are stashed, not parsed. Queued requests wait too while the buffer is above
   the mark, and a large body is written at once rather than gathered: a client
   that pipelines requests for big responses and reads nothing holds one write
   buffer's worth of the server's memory, not ``max_pipelined`` responses.
4. Deadlines are numbers on the reader (and the send deadline on the flow
   control), enforced by the service's housekeeping tick through
   `check_deadlines`: setting one per request is an attribute write, not a
   timer.
5. Every request gets exactly one response, in order, or the connection
   closes. A response the handler made unsendable becomes a 500; anything else
   that goes wrong while answering is logged and closes the connection, since
   the responses behind it could no longer be matched to their requests.
6. A connection closed on a refused request lingers (nginx's lingering close):
   the client may still be sending the body, and closing with bytes unread
   makes the kernel send a reset that can destroy the answer before the client
   reads it. So the answer goes out with a FIN (``write_eof``), and what arrives
   after is read and thrown away until the client closes, or is quiet for
   ``lingering_timeout``, or ``lingering_time`` has passed.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable, Coroutine
from functools import partial
from typing import Any, Final, cast

from .context import DEADLINE, DISCONNECT, SHUTDOWN, ConnectionContext
from .flow import FlowControl
from .frontdoor import AnswerStream, DirectHandler, DirectRoute, UpgradedSession
from .http import Request, Response, as_response, error_response
from .instant import MAX_KNOWN_BYTES, InstantAnswers, remember
from .parsing import BODY, HEAD, IDLE, LINGER, RequestReader
from .responses import CONTINUE, BodyStream, ResponseWriter, peer_name

log = logging.getLogger("forkloop.http")

FIRST_REQUEST_GRACE = 1.0  # seconds a fresh connection gets to send a request during shutdown

# the connection's phases (compared by identity)
OPEN: Final = "open"
RUNNING: Final = "running"
STREAMING: Final = "streaming"
CLOSING: Final = "closing"
UPGRADED: Final = "upgraded"
CLOSED: Final = "closed"

TRANSITIONS: Final[dict[str, frozenset[str]]] = {
    OPEN: frozenset({RUNNING, CLOSING, CLOSED}),
    RUNNING: frozenset({STREAMING, OPEN, CLOSING, UPGRADED, CLOSED}),
    STREAMING: frozenset({OPEN, CLOSING, CLOSED}),
    CLOSING: frozenset({CLOSED}),
    UPGRADED: frozenset({CLOSED}),
    CLOSED: frozenset(),
}

# phases in which nothing is parsed (one set lookup: cheaper than three comparisons)
_NOT_PARSING: Final = frozenset({CLOSING, CLOSED, UPGRADED})

_CANCEL_EXPLANATIONS = {
    DISCONNECT: "the client went away",
    DEADLINE: "the request timeout passed",
    SHUTDOWN: "the server is shutting down",
}

Handler = Callable[[Request], Awaitable[Any]]


class HttpConnection(asyncio.Protocol):
    """One client connection: parse, dispatch, respond, enforce limits."""

    reader: RequestReader
    writer: ResponseWriter
    flow: FlowControl

    def __init__(self, context: ConnectionContext) -> None:
        self.context = context
        self.limits = context.limits
        self.loop = context.loop
        self.stats = context.stats
        self.resolve = context.resolve  # the front door: request -> route or response
        self.phase: str = OPEN
        self.transport: asyncio.Transport | None = None
        self.client: tuple[str, int] | None = None
        self.active_request: Request | None = None  # the request a handler is answering
        self.task: asyncio.Task[None] | None = None  # its task, once it has suspended
        self.request_timer: asyncio.TimerHandle | None = None
        self.peer_closed = False
        # set by a direct handler: called instead of cancelling it when the client leaves
        self.disconnect_watcher: Callable[[], None] | None = None
        self._endpoint: tuple[str, tuple[str, int] | None] | None = None
        self.session: UpgradedSession | None = None  # after a protocol switch (UPGRADED)

    def _enter(self, phase: str) -> None:
        """The one transition of the connection's phase (see `TRANSITIONS`)."""
        if self.phase is not CLOSED:  # a lost connection stays lost
            self.phase = phase

    # ------------------------------------------------------------------ transport events

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # a stream transport (uvloop's do not subclass asyncio.Transport, so no isinstance)
        self.transport = transport = cast(asyncio.Transport, transport)
        # --write-buffer-high: above it pause_writing() stops reading and starts send_timeout
        transport.set_write_buffer_limits(high=self.limits.write_buffer_high)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            self.client = (peer[0], peer[1])
        self.flow = flow = FlowControl(transport)
        self.writer = ResponseWriter(transport, self.context, flow, self.client)
        drained = self._body_drained if self.context.stream_bodies else None
        self.reader = RequestReader(self.context, flow, self.client, self._expect_continue, drained)
        instant = self.context.instant
        if instant is not None:  # fresh cache hits answered from the parser
            self.reader.answer_instantly = partial(self._answer_instantly, instant)
        self.known_requests = self.context.known_requests  # (server.instant) or None
        self.context.connection_opened(self)

    def data_received(self, data: bytes) -> None:
        phase, reader = self.phase, self.reader
        if phase in _NOT_PARSING or reader.rejection is not None:
            if phase is UPGRADED:
                cast(UpgradedSession, self.session).data_received(data)
            elif reader.phase is LINGER:  # read and thrown away; quiet for long ends it
                reader.discard()
            return  # nothing after Connection: close or a framing error is read
        if self.flow.read_paused:
            self.flow.hold(data)
            return
        known = self.known_requests
        if known is not None and not reader.in_message and len(data) <= MAX_KNOWN_BYTES:
            request = known.get(data)
            if request is not None and self._answer_known(*request):
                return
            self._feed_and_learn(known, data)
        else:
            reader.feed(data)
        self._run_pending()

    def _answer_known(self, target: bytes, method: bytes) -> bool:
        """Answer a read that is a known request (`server.instant`) without parsing it;
        False when it must be parsed after all."""
        answer = self.reader.answer_instantly  # set whenever requests are known
        if answer is None or not answer(target, method):
            return False
        reader = self.reader
        reader.phase = IDLE  # the request came and went: the keep-alive timeout runs
        reader.deadline = self.context.clock + self.limits.keepalive_timeout
        self._flush()
        return True

    def _feed_and_learn(self, known: dict[bytes, tuple[bytes, bytes]], data: bytes) -> None:
        """Parse ``data``, read from a message boundary; if it was exactly one request,
        answered instantly, remember it (`server.instant`)."""
        reader = self.reader
        answered = reader.instant_answers
        reader.feed(data)
        if reader.instant_answers == answered + 1 and not (
            reader.in_message or reader.pending or reader.rejection
        ):
            remember(known, data, reader.last_instant)

    def eof_received(self) -> bool:
        self.peer_closed = True
        if self.session is not None:
            return self.session.eof_received()
        self.reader.fail_body("the client closed before sending the whole body")
        if self.reader.phase is LINGER:
            return False  # the client is done: close
        if self.reader.pending or self.flow.stash:
            return True  # half-closed: answer what was pipelined (parsed or not), then close
        self.cancel_active(DISCONNECT)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._enter(CLOSED)
        if self.session is not None:
            self.session.connection_lost(exc)
        self.reader.fail_body("the client went away")
        self.reader.pending.clear()
        self.context.connection_closed(self)
        self.cancel_active(DISCONNECT)
        self.flow.connection_lost()
        self.writer.detach()
        self.transport = None

    def pause_writing(self) -> None:
        self.flow.pause_writing(self.context.clock + self.limits.send_timeout)

    def resume_writing(self) -> None:
        self.flow.resume_writing()
        phase = self.phase
        if phase is UPGRADED:
            cast(UpgradedSession, self.session).resume_writing()
        elif phase is not CLOSING and phase is not CLOSED:
            self._run_pending()

    def refuse(self, answer: bytes) -> None:
        """Over the connection limit: answer at once and close."""
        assert self.transport is not None
        self.transport.write(answer)
        self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    # ------------------------------------------------------------------ answering

    def _run_pending(self) -> None:
        """Answer queued requests in order until one has to wait; then flush."""
        pending, flow = self.reader.pending, self.flow
        try:
            while True:
                while pending and self.phase is OPEN and not flow.write_paused:
                    self._dispatch(pending.popleft())
                if self.phase is not OPEN or (pending and flow.write_paused):
                    break  # until the handler is done, or the client reads (rule 3)
                reader = self.reader
                if reader.rejection is None and not (
                    self.peer_closed or flow.read_paused or reader.continue_owed
                ):
                    if not reader.deadline and reader.phase is IDLE:
                        reader.start_keepalive()  # the last request is answered
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
        self.reader.pending.clear()
        self._enter(CLOSING)

    def _settle_pipeline(self) -> bool:
        """The queue is empty and nothing runs: act on errors, EOF, pauses, owed 100s.

        True when there may be new requests to run."""
        reader, flow = self.reader, self.flow
        if reader.rejection is not None:
            self.writer.refuse(*reader.rejection)
            self._enter(CLOSING)
            return False
        if flow.read_paused and not flow.write_paused:
            self._resume_reading()
            if reader.pending or reader.rejection is not None:
                return True
        if self.peer_closed:
            if not flow.read_paused:  # all it sent before its EOF is answered (or never will be)
                self._enter(CLOSING)
            return False
        if reader.continue_owed and reader.url:
            reader.continue_owed = False
            self.writer.output.append(CONTINUE)
        if not flow.read_paused:
            reader.start_keepalive()
        return False

    def _expect_continue(self) -> None:
        """A head asked for 100 Continue: now, or once the requests ahead are answered."""
        if self.active_request is None and not self.reader.pending:
            self.writer.output.append(CONTINUE)
        else:
            self.reader.continue_owed = True

    def _body_drained(self) -> None:
        """A handler read its streamed body down: parse again (the body deadline
        runs again from now)."""
        flow, reader = self.flow, self.reader
        if self.phase is CLOSED or not flow.read_paused or flow.write_paused:
            return
        self._resume_reading()
        if reader.phase is BODY and not reader.deadline:
            reader.enter(BODY)
        self._run_pending()

    def _resume_reading(self) -> None:
        if len(self.reader.pending) >= self.limits.max_pipelined or self.reader.switching:
            return  # (after an upgrade request the stash is the new protocol's)
        data = self.flow.resume_reading()
        if data:
            self.reader.feed(data)

    def _answer_instantly(self, instant: InstantAnswers, target: bytes, method: bytes) -> bool:
        """Answer a request the reader has just parsed with a ready cache hit
        (`server.instant`); False when it must take the usual way: something runs
        ahead of it, the client is not reading, or the connection closes after it."""
        if self.phase is not OPEN or self.flow.write_paused:
            return False
        writer, context = self.writer, self.context
        if writer.requests_left <= 1 or context.draining:
            return False
        ready = instant.answer(target, method, context.date_and_server)
        if ready is None:
            return False
        writer.requests_left -= 1
        output = writer.output
        output.append(ready.head if method == b"HEAD" else ready.get)
        if ready.large or len(output) >= 32:
            # written now, as respond() does for a large body: once the client stops
            # reading, write_paused sends what follows the usual way, into the queue
            writer.flush()
        self.stats.requests += 1
        context.stats.responses[ready.status] += 1
        if context.instant_metrics is not None:
            context.instant_metrics.observe_method(method.decode(), ready.status, 0.0)
        return True

    def _dispatch(self, request: Request) -> None:
        self.stats.requests += 1
        # a Route, a Response or a DirectRoute, told apart by class (cheaper than isinstance)
        route: Any = self.resolve(request)
        route_class = route.__class__
        if route_class is Response:  # 404, 405: cheaper than isinstance on the hot path
            if not self.writer.respond(request, route):
                self._enter(CLOSING)
            return
        if route_class is DirectRoute:
            self._start_task(request, self._run_direct(request, route.handler))
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
                if not self.writer.respond(request, response):
                    self._enter(CLOSING)
                return
            self._start_task(request, self._run_handler(request, None, response))
            return
        self._start_task(request, self._run_handler(request, route.handler))

    def _respond(self, request: Request, response: Response) -> None:
        if not self.writer.respond(request, response):
            self._enter(CLOSING)

    def _start_task(self, request: Request, coroutine: Coroutine[Any, Any, None]) -> None:
        """Run ``coroutine``'s first step now (`server.eager`); if it suspends, a
        host task drives the rest and the request may overrun its deadline."""
        self.active_request = request
        self._enter(RUNNING)
        task = self.context.starter.start(coroutine)
        if task is not None and self.active_request is request:
            self.task = task
            if self.limits.request_timeout:
                self.request_timer = self.loop.call_later(
                    self.limits.request_timeout, self.cancel_active, DEADLINE
                )

    async def _run_handler(
        self, request: Request, handler: Handler | None, response: Response | None = None
    ) -> None:
        """Await the handler (unless ``response`` is ready), then send what it gave."""
        try:
            try:
                if response is None:
                    assert handler is not None
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
            self._handler_done()

    async def _run_direct(self, request: Request, handler: DirectHandler) -> None:
        """Run a `DirectRoute`'s handler; answer for it only if it was cancelled
        before it began an answer of its own."""
        answered = self.writer.requests_left
        try:
            await handler(request, self)
        except asyncio.CancelledError:
            response = self._answer_for_cancelled(request)
            if response is not None and self.writer.requests_left == answered:
                self._respond(request, response)
        except Exception:
            self._abandon(f"answering {request.method} {request.path}")
        finally:
            self.disconnect_watcher = None
            self._handler_done()

    # ------------------------------------------------------------------ the responder
    #
    # What a direct handler answers through. Each request gets exactly one
    # answer: a whole response, or a stream begun and then finished or cut.

    def send_response(self, request: Request, response: Response) -> None:
        """Answer with a complete response: written at once by a handler that has
        suspended; in a handler's first step (no task yet), it joins the output
        that `_run_pending` writes when it is done (one write for a pipelined burst)."""
        if not self.writer.respond(request, response):
            self._enter(CLOSING)
        if self.task is not None:
            self._flush()

    def begin_stream(self, request: Request, response: Response) -> BodyStream | None:
        """Write the head of a streamed answer; None if a 500 went out instead."""
        if self.phase is RUNNING:
            self._enter(STREAMING)
        body = self.writer.begin_stream(request, response)
        if body is None and not self.writer.stream_keep_alive:
            self._enter(CLOSING)
        return body

    def send_continue(self) -> None:
        """100 Continue: the client waits for it before it sends the body."""
        self.writer.output.append(CONTINUE)
        self._flush()

    def finish_stream(self, body: AnswerStream) -> None:
        if not body.finish():
            self._enter(CLOSING)

    def cut_stream(self, body: AnswerStream) -> None:
        """End a streamed answer early: the connection closes (the only way to say so)."""
        body.cut_short()
        self._enter(CLOSING)

    def switch_protocol(
        self, request: Request, header_lines: bytes, session: UpgradedSession
    ) -> bool:
        """Answer the upgrade ``request`` with a 101 and hand the transport to
        ``session``; False if the client is gone (nothing was sent)."""
        transport = self.transport
        if transport is None or transport.is_closing() or self.phase is not RUNNING:
            return False
        if self.request_timer is not None:  # a session may last: the app is not late
            self.request_timer.cancel()
            self.request_timer = None
        self._enter(UPGRADED)
        self.session = session
        self.reader.deadline = 0.0
        self.writer.switch(request, header_lines)
        session.take_over(transport, self.flow)  # with the bytes stashed since the head
        if self.context.draining:
            session.going_away()
        return True

    @property
    def client_gone(self) -> bool:
        transport = self.transport
        return transport is None or transport.is_closing()

    def watch_disconnect(self, watcher: Callable[[], None]) -> None:
        """Call ``watcher`` when the client leaves (it may be called more than once),
        instead of cancelling the handler; the handler's owner cancels it later with
        ``cancel_active(DISCONNECT, now=True)``, or lets it run to its end."""
        self.disconnect_watcher = watcher

    @property
    def endpoint(self) -> tuple[str, tuple[str, int] | None]:
        """The scheme (http, https) and the local address of the connection, asked
        of the transport once."""
        endpoint = self._endpoint
        if endpoint is None:
            transport = self.transport
            sockname = transport.get_extra_info("sockname") if transport is not None else None
            tls = transport is not None and transport.get_extra_info("sslcontext") is not None
            server = (sockname[0], sockname[1]) if isinstance(sockname, tuple) else None
            endpoint = self._endpoint = ("https" if tls else "http", server)
        return endpoint

    def extra_info(self, name: str) -> Any:
        transport = self.transport
        return None if transport is None else transport.get_extra_info(name)

    async def _stream(self, request: Request, response: Response) -> None:
        if self.phase is RUNNING:
            self._enter(STREAMING)
        try:
            keep_alive = await self.writer.stream(request, response)
        except BaseException:
            self._enter(CLOSING)  # cut short: the writer closed the transport
            raise
        if not keep_alive:
            self._enter(CLOSING)

    def _handler_done(self) -> None:
        """The active request is answered (or abandoned): the next one may run."""
        if self.request_timer is not None:
            self.request_timer.cancel()
            self.request_timer = None
        finished_inline = self.task is None
        self.task = None
        self.active_request = None
        if self.phase is RUNNING or self.phase is STREAMING:
            self._enter(OPEN)
        if not finished_inline and self.transport is not None:
            self._run_pending()

    def cancel_active(self, reason: str, now: bool = False) -> None:
        """Cancel the running handler (or stream) for ``reason``: disconnect, deadline,
        shutdown. A handler that watches for its client leaving is told instead,
        unless ``now``."""
        watcher = self.disconnect_watcher
        if watcher is not None and reason is DISCONNECT and not now:
            watcher()  # told on EOF, and again when the connection is lost
            return
        task, request = self.task, self.active_request
        if task is None or task.done():
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
            timeout = self.limits.request_timeout
            return error_response(504, f"the handler did not answer within {timeout}s")
        return error_response(503, "the server is shutting down")

    def _handler_failed(self, request: Request) -> Response:
        log.exception("handler for %s %s raised", request.method, request.path)
        return error_response(500, "the handler raised an exception")

    # ------------------------------------------------------------------ closing

    def _flush(self) -> None:
        """Write the output; close once it is written if the connection is closing."""
        transport = self.transport
        if transport is None:
            return
        output = self.writer.output  # ResponseWriter.flush, written out: once per read
        if output:
            transport.write(output[0] if len(output) == 1 else b"".join(output))
            output.clear()
        if self.phase is CLOSING and self.active_request is None:
            self._close_when_sent(transport)

    def _close_when_sent(self, transport: asyncio.Transport) -> None:
        """Close after the output, or linger first when the client may still be sending."""
        if self.reader.phase is LINGER:
            return  # already lingering: the tick or the client's FIN ends it
        if self._client_may_be_sending() and transport.can_write_eof():
            self.reader.enter(LINGER)
            self.flow.resume_transport()
            transport.write_eof()  # the answer, then a FIN
        else:
            transport.close()

    def _client_may_be_sending(self) -> bool:
        """A refused request's body may still be on its way (a timed-out one is cut)."""
        rejection = self.reader.rejection
        return rejection is not None and rejection[0] != 408 and not self.peer_closed

    # ------------------------------------------------------------------ housekeeping

    def check_deadlines(self, now: float) -> None:
        """Called by the service's tick: enforce whichever deadline has passed."""
        transport, reader = self.transport, self.reader
        if transport is None:
            return
        send_deadline = self.flow.send_deadline
        if send_deadline and now >= send_deadline:
            timeout = self.limits.send_timeout
            log.info("%s: closed: client read nothing for %ss", peer_name(self.client), timeout)
            self.stats.timeouts += 1
            transport.abort()
            return
        if not reader.deadline or now < reader.deadline:
            return
        reader.deadline = 0.0
        kind = reader.phase
        if kind is LINGER:
            transport.close()  # quiet for lingering_timeout, or lingering_time is over
            return
        if kind is IDLE or (kind is HEAD and not reader.in_message):
            self._enter(CLOSING)
            self._flush()  # idle or nothing received: close quietly, as nginx does
            return
        self.stats.timeouts += 1
        if kind is HEAD:
            reason = f"client sent no complete request head within {self.limits.header_timeout}s"
        else:
            reason = f"client sent no body data for {self.limits.body_timeout}s"
        reader.rejection = (408, reason)
        reader.fail_body(reason)
        self._run_pending()

    def close_if_idle(self) -> bool:
        """For graceful shutdown: close now if no request is in progress.

        A connection that has not sent its first request yet may have one on the
        wire: closing it would answer that request with a reset. It gets
        FIRST_REQUEST_GRACE seconds to arrive (and is answered with
        ``Connection: close``), then is closed quietly."""
        reader = self.reader
        if reader.phase is LINGER:
            if self.transport is not None:
                self.transport.close()
            return True
        if self.session is not None:
            self.session.going_away()  # it closes once its client answers
            return False
        if self.active_request is not None or reader.pending or reader.in_message:
            return False
        if self.writer.requests_left == self.limits.max_keepalive_requests:
            grace = self.context.clock + FIRST_REQUEST_GRACE
            deadline = reader.deadline
            reader.enter(HEAD)
            reader.deadline = min(deadline, grace) if deadline else grace
            return False
        self._enter(CLOSING)
        self._flush()
        return True


def _awaiting(awaitable: Awaitable[Any]) -> Handler:
    """A handler-shaped callable that awaits what a plain handler returned."""

    async def handler(request: Request) -> Any:
        return await awaitable

    return handler
