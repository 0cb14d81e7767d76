"""The ASGI side of a WebSocket: `WebSocketCycle`, the ``websocket`` scope.

The ASGI front door (`server.asgi`) hands every request its reader marked
``upgrade`` to a `WebSocketCycle`, in the request's own task, as it hands an
HTTP request to `HttpCycle`. The cycle checks the handshake with the library
(`server.websocket.check_handshake`), runs the application with the
``websocket`` scope, and turns its messages into the switch, an HTTP answer,
or frames on the `WebSocketSession` that owns the switched connection.

``state`` is one of CONNECTING (the application has not answered the
handshake), RESPONDING (it began an HTTP answer instead:
``websocket.http.response.start``), ACCEPTED (the session runs) and FINISHED
(refused, answered or done: the connection closes after an HTTP answer).
CONNECTING -> ACCEPTED on ``websocket.accept``; CONNECTING -> RESPONDING ->
FINISHED for an HTTP answer; any -> FINISHED when the application refuses
(``websocket.close`` before accepting), returns or raises.

* The first ``receive()`` gives ``websocket.connect``. An invalid handshake
  (a malformed key, a version other than 13, HTTP/1.0) is answered 400 (426
  without a valid ``Upgrade``) before the application runs at all.
* ``websocket.accept`` switches, with the application's subprotocol and
  headers; ``websocket.close`` before accepting is answered 403;
  ``websocket.http.response.start``/``body`` is sent as an ordinary response.
* After the switch ``receive()`` gives ``websocket.receive`` (text or bytes)
  and, once the connection ends for any reason, ``websocket.disconnect`` with
  the code: the client's (1005 when its close frame had none), 1006 when the
  socket went without one, the server's own (1009 for an oversize message,
  1011 for a missing pong, 1001 at shutdown), or the application's own after it
  sent ``websocket.close``. ``send()`` raises `WebSocketClosed` (an `OSError`,
  as ASGI asks) once the connection is closing.
* An application that raises before answering gets a 500, after accepting a
  close with 1011; one that returns before answering gets a 500 and a log line,
  after accepting a close with 1000.
* A client that leaves is cancelled after ``disconnect_grace``, as for HTTP
  (the connection tells the cycle, `HttpConnection.watch_disconnect`); a
  graceful shutdown closes every session with 1001 and waits for the clients'
  close frames.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Final

from websockets.exceptions import ProtocolError
from websockets.server import ServerProtocol

from .asgi import ASGI_VERSION, Message, Scope, one_line
from .context import DISCONNECT
from .frontdoor import ProtocolSwitch, Responder
from .http import HeaderError, Request, Response, encode_header, error_response
from .websocket import OP_BINARY, OP_TEXT, WebSocketClosed, WebSocketSession, check_handshake

if TYPE_CHECKING:
    from .asgi import AsgiApp

log = logging.getLogger("forkloop.websocket")

# the cycle's states
CONNECTING: Final = "connecting"
RESPONDING: Final = "responding"
ACCEPTED: Final = "accepted"
FINISHED: Final = "finished"

CONNECT: Final = {"type": "websocket.connect"}
# header names of a 101 that are the server's to write
_HANDSHAKE_OWNED = frozenset(
    {"upgrade", "connection", "sec-websocket-accept", "sec-websocket-extensions", "date",
     "server", "content-length", "transfer-encoding"}
)  # fmt: skip


class WebSocketCycle:
    """``receive`` and ``send`` of one WebSocket connection; see the module's docstring."""

    __slots__ = (
        "front",
        "request",
        "connection",
        "state",
        "protocol",
        "accept_lines",
        "connect_sent",
        "session",
        "denial",
        "denial_body",
        "client_left",
        "left",
        "cancel_timer",
    )

    def __init__(self, front: AsgiApp, request: Request, connection: Responder) -> None:
        self.front = front
        self.request = request
        self.connection = connection
        self.state: str = CONNECTING
        self.protocol: ServerProtocol | None = None  # the library, once the handshake checks out
        self.accept_lines = b""  # the 101's own header lines
        self.connect_sent = False
        self.session: WebSocketSession | None = None
        self.denial: Message | None = None  # websocket.http.response.start, held
        self.denial_body: list[bytes] = []
        self.client_left = False
        self.left: asyncio.Future[None] | None = None  # receive() before an answer
        self.cancel_timer: asyncio.TimerHandle | None = None

    def scope(self) -> Scope:
        request, front = self.request, self.front
        root = front.root_path
        path, raw_path, query = request.split_target()
        scheme, server = self.connection.endpoint
        return {
            "type": "websocket",
            "asgi": ASGI_VERSION,
            "http_version": request.version,
            "scheme": "wss" if scheme == "https" else "ws",
            "path": root + path if root else path,
            "raw_path": root.encode() + raw_path if root else raw_path,
            "query_string": query,
            "root_path": root,
            "headers": [(name.lower(), value) for name, value in request.raw_headers],
            "client": request.client,
            "server": server,
            "subprotocols": _offered_subprotocols(request.raw_headers),
            "state": front.state.copy(),
            "extensions": {"websocket.http.response": {}},
        }

    async def run(self) -> None:
        connection, front = self.connection, self.front
        refusal = self._check_handshake()
        if refusal is not None:
            self.state = FINISHED
            connection.send_response(self.request, refusal)
            return
        connection.watch_disconnect(self._client_left)
        try:
            await front.app(self.scope(), self.receive, self.send)
        except asyncio.CancelledError:
            session = self.session
            if session is not None:  # at shutdown, or cancelled after the client left
                session.going_away()
            raise
        except Exception as exc:
            log.exception(
                "ASGI app %s raised on WebSocket %s: %s",
                front.name,
                self.request.path,
                one_line(exc),
            )
            self._finish_for_the_app(1011, "the application raised an exception")
            return
        finally:
            if self.cancel_timer is not None:
                self.cancel_timer.cancel()
        if self.state is CONNECTING or self.state is RESPONDING:
            log.error(
                "ASGI app %s returned without answering the WebSocket handshake of %s",
                front.name,
                self.request.path,
            )
        self._finish_for_the_app(1000, "")

    def _check_handshake(self) -> Response | None:
        """A response refusing the handshake, or None (and the library is ready)."""
        request = self.request
        if not isinstance(self.connection, ProtocolSwitch):
            return error_response(501, "WebSocket connections are not served here")
        checked = check_handshake(request, self.front.websocket_settings)
        if isinstance(checked, Response):
            return checked
        self.protocol, self.accept_lines = checked
        return None

    def _finish_for_the_app(self, code: int, reason: str) -> None:
        """The application is done (returned or raised): close what it left open."""
        state, self.state = self.state, FINISHED
        session = self.session
        if state is ACCEPTED and session is not None:
            if code == 1000:
                session.close(code, reason)
            else:
                session.fail(code, reason)
        elif state is not FINISHED and not self.connection.client_gone:
            reason = reason or "the application did not answer the WebSocket handshake"
            self.connection.send_response(self.request, error_response(500, reason))

    # ------------------------------------------------------------------ receive

    async def receive(self) -> Message:
        session = self.session
        if session is not None:
            inbox, flow = session.inbox, session.flow
            if inbox and flow is not None and not flow.read_paused:
                return inbox.popleft()  # the common case: nothing to wait for or resume
            return await session.receive()
        if not self.connect_sent:
            self.connect_sent = True
            return dict(CONNECT)
        if self.state is CONNECTING and not self.client_left:
            waiter = self.left
            if waiter is None:
                waiter = self.left = asyncio.get_running_loop().create_future()
            await waiter
        return {"type": "websocket.disconnect", "code": 1006, "reason": ""}

    def _client_left(self) -> None:
        """The connection lost its client: tell the application, cancel it after the grace."""
        if self.client_left:
            return
        self.client_left = True
        waiter = self.left
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        grace = self.front.disconnect_grace
        if grace is None:
            return
        if grace <= 0:
            self.connection.cancel_active(DISCONNECT, now=True)
        else:
            loop = asyncio.get_running_loop()
            self.cancel_timer = loop.call_later(
                grace, self.connection.cancel_active, DISCONNECT, True
            )

    # ------------------------------------------------------------------ send

    async def send(self, message: Message) -> None:
        kind = message.get("type")
        session = self.session
        if session is not None:
            if kind == "websocket.send":
                text = message.get("text")
                if text.__class__ is str:
                    await session.send(OP_TEXT, text.encode())
                    return
                data = message.get("bytes")
                if text is None and isinstance(data, bytes | bytearray | memoryview):
                    await session.send(OP_BINARY, bytes(data))
                    return
                raise RuntimeError(self._misuse("sent websocket.send without text or bytes"))
            if kind == "websocket.close":
                self._close(session, message)
                return
        elif self.state is CONNECTING:
            if kind == "websocket.accept":
                self._accept(message)
                return
            if kind == "websocket.close":
                self._answer(error_response(403, "the application refused the WebSocket"))
                return
            if kind == "websocket.http.response.start":
                self._begin_denial(message)
                return
        elif self.state is RESPONDING and kind == "websocket.http.response.body":
            self._continue_denial(message)
            return
        raise RuntimeError(self._misuse(f"sent {kind!r} in the {self.state} state"))

    def _accept(self, message: Message) -> None:
        connection, protocol = self.connection, self.protocol
        assert isinstance(connection, ProtocolSwitch) and protocol is not None
        lines = [self.accept_lines]
        subprotocol = message.get("subprotocol")
        try:
            if subprotocol is not None:
                lines.append(encode_header("Sec-WebSocket-Protocol", subprotocol))
            for name, value in message.get("headers") or ():
                text = name.decode("latin-1")
                if text.lower() not in _HANDSHAKE_OWNED:
                    lines.append(encode_header(text, value.decode("latin-1")))
        except (HeaderError, AttributeError, TypeError) as problem:
            raise RuntimeError(self._misuse(f"sent websocket.accept with {problem}")) from None
        loop = asyncio.get_running_loop()
        session = WebSocketSession(
            protocol, self.front.websocket_settings, loop, self.request.client
        )
        if not connection.switch_protocol(self.request, b"".join(lines), session):
            self.state = FINISHED
            raise WebSocketClosed("the client left before the WebSocket was accepted")
        self.session, self.state = session, ACCEPTED

    def _close(self, session: WebSocketSession, message: Message) -> None:
        code = message.get("code") or 1000
        reason = message.get("reason") or ""
        if code.__class__ is not int or reason.__class__ is not str:
            raise RuntimeError(self._misuse(f"sent websocket.close with {code!r}, {reason!r}"))
        try:
            session.close(code, reason)
        except ProtocolError as problem:
            raise RuntimeError(self._misuse(f"sent websocket.close with {problem}")) from None

    def _begin_denial(self, message: Message) -> None:
        status = message.get("status")
        if status.__class__ is not int:
            raise RuntimeError(self._misuse(f"sent a status that is not an int: {status!r}"))
        self.denial, self.state = message, RESPONDING

    def _continue_denial(self, message: Message) -> None:
        body = message.get("body", b"")
        if not isinstance(body, bytes | bytearray | memoryview):
            raise RuntimeError(self._misuse(f"sent a body of type {type(body).__name__}"))
        self.denial_body.append(bytes(body))
        if message.get("more_body"):
            return
        start = self.denial
        assert start is not None
        try:
            headers = [
                (n.decode("latin-1"), v.decode("latin-1")) for n, v in start.get("headers", ())
            ]
        except (AttributeError, TypeError, ValueError):
            raise RuntimeError(self._misuse("sent headers that are not byte pairs")) from None
        body = b"".join(self.denial_body)
        self._answer(Response(body, start["status"], headers, content_type=None))

    def _answer(self, response: Response) -> None:
        """An HTTP answer instead of the switch (the connection closes after it)."""
        self.state = FINISHED
        if not self.connection.client_gone:
            self.connection.send_response(self.request, response)

    def _misuse(self, what: str) -> str:
        return f"ASGI app {self.front.name} {what} (WebSocket {self.request.path})"


def _offered_subprotocols(headers: Iterable[tuple[bytes, bytes]]) -> list[str]:
    offered = []
    for name, value in headers:
        if len(name) == 22 and name.lower() == b"sec-websocket-protocol":
            offered += [token.strip() for token in value.decode("latin-1").split(",")]
    return [token for token in offered if token]
