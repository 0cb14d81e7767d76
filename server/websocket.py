"""WebSocket connections after the switch: `WebSocketSession`, and the handshake.

A WebSocket connection begins as an HTTP request, and that request travels
the one connection layer like any other: the reader checks its framing (the
limits, the single Host, ...), marks it ``upgrade`` and parses nothing after
its head (`server.parsing`); the ASGI front door hands it to a
`WebSocketCycle` (`server.asgi_websocket`), which checks the handshake here
(`check_handshake`). When the application accepts, the cycle asks the
connection to switch (`server.frontdoor.ProtocolSwitch`): the 101 goes out,
and from then on the connection forwards its transport's events to a
`WebSocketSession` (`server.protocol`, phase UPGRADED), which the cycle reads
messages from and sends them through.

The protocol itself is spoken by the sans-I/O layer of the ``websockets``
library (``websockets.server.ServerProtocol``): bytes in, frames out, and the
bytes to write back. It was chosen over ``wsproto`` by measuring both behind
the same echo server (``loadtest/wsbench.py``; the figures are in the README):
it costs about half the CPU per message, on one connection and on many. It
checks the handshake, unmasks (in C), answers pings and close frames, enforces
the message size (compressed or not) and runs permessage-deflate; forkloop
adds what a server must decide: when to read, when to write, when to ping,
when to give up.

The session: rules that bound it
--------------------------------
1. Reading stops when the application is behind: once ``max_queue`` messages
   wait in ``inbox``, the flow control's ``read_paused`` is set and what
   arrives is stashed unparsed (the transport itself pauses past the stash's
   limit, `server.flow`); a ``receive()`` that makes room parses the stash.
   A large read is parsed ``FEED_SLICE`` bytes at a time, and what is left
   when the queue fills is stashed too. What a worker holds for one connection
   is then ``max_queue`` messages (each at most ``max_size``), the messages of
   one slice, and the stash (its limit, plus one read).
2. Writing waits for the client: ``send()`` returns once the bytes are in the
   transport, and waits first while its buffer is above the high-water mark;
   the connection's send deadline still cuts a client that reads nothing.
   While the buffer is full, reading stops too (an echo cannot amplify).
3. Every close is bounded in time: the server's close frame gets
   ``close_timeout`` for the client's answer, a ping ``ping_timeout`` for its
   pong; then the socket closes.
4. ``ending`` (the ``websocket.disconnect`` the application will receive) is
   set once, by whichever end closed first, and ``receive()`` gives it after
   the messages that arrived before it.
5. An EOF that arrives while bytes wait in the stash (the application is
   behind) waits behind them: they are parsed first, as the application makes
   room, so a close frame the client sent before its EOF is the end the
   application hears of (its code, not 1006).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import deque
from typing import Final, cast

from websockets.datastructures import Headers
from websockets.exceptions import InvalidHandshake, InvalidUpgrade, PayloadTooBig, ProtocolError
from websockets.extensions.base import ServerExtensionFactory
from websockets.extensions.permessage_deflate import ServerPerMessageDeflateFactory
from websockets.frames import Close, Frame, Opcode
from websockets.http11 import Request as Handshake
from websockets.protocol import OPEN as PROTOCOL_OPEN
from websockets.server import ServerProtocol

from .asgi import Message, one_line
from .config import WebSocketSettings
from .flow import FlowControl
from .http import Request, Response, encode_header, error_response
from .responses import peer_name

log = logging.getLogger("forkloop.websocket")
# The library logs each connection's opening and closing at INFO: a line per
# connection, which the access log already gives. Its warnings still come through.
_LIBRARY_LOG = logging.getLogger("forkloop.websocket.library")
_LIBRARY_LOG.setLevel(logging.WARNING)

OP_TEXT, OP_BINARY, OP_CONT = Opcode.TEXT, Opcode.BINARY, Opcode.CONT
OP_PONG, OP_CLOSE = Opcode.PONG, Opcode.CLOSE

FEED_SLICE = 64 * 1024  # bytes parsed at a time from a large read (rule 1)

# the session's states (compared by identity)
OPEN: Final = "open"  # messages flow both ways
CLOSING: Final = "closing"  # a close frame went out, or the library failed the connection
CLOSED: Final = "closed"  # the transport is gone


class WebSocketClosed(OSError):
    """``send()`` on a WebSocket that is closing or closed (ASGI asks for an OSError)."""


def extension_factories(settings: WebSocketSettings) -> list[ServerExtensionFactory]:
    """permessage-deflate with 4 KiB windows and a small compressor: a connection's
    compression state stays in the tens of kilobytes, not megabytes."""
    if not settings.per_message_deflate:
        return []
    return [
        ServerPerMessageDeflateFactory(
            server_max_window_bits=12,
            client_max_window_bits=12,
            compress_settings={"memLevel": 5},
        )
    ]


def check_handshake(
    request: Request, settings: WebSocketSettings
) -> tuple[ServerProtocol, bytes] | Response:
    """The library's checks of an upgrade request (key, version, Connection,
    extensions): the protocol ready for frames and the 101's own header lines, or
    the response that refuses the handshake (426 without a valid Upgrade, else 400)."""
    if request.version != "1.1":
        return error_response(400, "a WebSocket handshake needs HTTP/1.1")
    protocol = ServerProtocol(
        extensions=extension_factories(settings),
        state=PROTOCOL_OPEN,  # the handshake is ours: the library starts at the frames
        max_size=settings.max_size,
        logger=_LIBRARY_LOG,
    )
    fields = [(n.decode("latin-1"), v.decode("latin-1")) for n, v in request.raw_headers]
    try:
        accept, extensions, _ = protocol.process_request(
            Handshake(request.target.decode("latin-1"), Headers(fields))
        )
    except InvalidUpgrade as problem:
        refusal = error_response(426, f"client sent an invalid WebSocket upgrade ({problem})")
        refusal.headers.append(("Upgrade", "websocket"))
        return refusal
    except InvalidHandshake as problem:
        return error_response(400, f"client sent an invalid WebSocket handshake ({problem})")
    lines = [b"Upgrade: websocket\r\nConnection: Upgrade\r\n"]
    lines.append(encode_header("Sec-WebSocket-Accept", accept))
    if extensions is not None:
        lines.append(encode_header("Sec-WebSocket-Extensions", extensions))
    return protocol, b"".join(lines)


class WebSocketSession:
    """One switched connection: frames in, messages out; see the module's docstring."""

    __slots__ = (
        "protocol",
        "settings",
        "loop",
        "client",
        "transport",
        "flow",
        "state",
        "inbox",
        "max_queue",
        "ending",
        "waiter",
        "drain_waiter",
        "fragments",
        "fragment_opcode",
        "ping_payload",
        "timer",
        "eof_pending",
    )

    def __init__(
        self,
        protocol: ServerProtocol,
        settings: WebSocketSettings,
        loop: asyncio.AbstractEventLoop,
        client: tuple[str, int] | None,
    ) -> None:
        self.protocol = protocol
        self.settings = settings
        self.loop = loop
        self.client = client
        self.transport: asyncio.Transport | None = None
        self.flow: FlowControl | None = None
        self.state: str = OPEN
        self.inbox: deque[Message] = deque()  # received, not yet taken by the application
        self.max_queue = settings.max_queue
        self.ending: Message | None = None  # the websocket.disconnect to come (rule 4)
        self.waiter: asyncio.Future[None] | None = None  # receive() waiting for a message
        self.drain_waiter: asyncio.Future[None] | None = None  # send() waiting for the client
        self.fragments: list[bytes] = []  # a fragmented message so far
        self.fragment_opcode: Opcode = OP_BINARY
        self.ping_payload: bytes | None = None  # the ping whose pong is awaited
        # the next ping, or the deadline of a pong or of the client's close frame
        self.timer: asyncio.TimerHandle | None = None
        self.eof_pending = False  # the client's EOF came behind stashed bytes (rule 5)

    # ------------------------------------------------------------------ the connection's events

    def take_over(self, transport: asyncio.Transport, flow: FlowControl) -> None:
        """The connection has switched: the transport is ours, with what it stashed."""
        self.transport, self.flow = transport, flow
        self._schedule_ping()
        if not flow.write_paused:  # else once the client reads (resume_writing)
            stashed = flow.resume_reading()
            if stashed:
                self._feed(stashed)

    def data_received(self, data: bytes) -> None:
        flow = self.flow
        assert flow is not None
        if flow.read_paused:  # rules 1 and 2: the application or the client is behind
            flow.hold(data)
            return
        self._feed(data)

    def eof_received(self) -> bool:
        flow = self.flow
        if flow is not None and flow.stash and self.state is not CLOSED:
            self.eof_pending = True  # rule 5: what came before it is read first
            return True  # the transport stays open until then
        self._eof()
        return False  # the transport closes

    def _eof(self) -> None:
        """The client's end of stream, once everything it sent before is parsed."""
        self.eof_pending = False
        self.protocol.receive_eof()  # without a close frame: the library fails with 1006
        self._write_output()
        self._end(1006, "")

    def connection_lost(self, exc: Exception | None) -> None:
        self.state = CLOSED
        self.transport = None
        self._cancel_timer()
        self._end(1006, "")
        waiter = self.drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def resume_writing(self) -> None:
        waiter = self.drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        self._resume_reading()

    def going_away(self) -> None:
        """Graceful shutdown: close with 1001; the client's answer ends the connection."""
        self.close(1001, "the server is shutting down")

    # ------------------------------------------------------------------ reading

    def _feed(self, data: bytes) -> None:
        if len(data) > FEED_SLICE:  # rule 1 holds within a read too (a loop may read megabytes)
            flow = self.flow
            assert flow is not None
            for start in range(0, len(data), FEED_SLICE):
                if flow.read_paused:
                    flow.hold(data[start:])
                    return
                self._parse(data[start : start + FEED_SLICE])
            return
        self._parse(data)

    def _parse(self, data: bytes) -> None:
        protocol = self.protocol
        protocol.receive_data(data)
        # with the handshake done by us, the library's events are all frames
        for frame in cast(list[Frame], protocol.events_received()):
            opcode = frame.opcode
            if opcode is OP_TEXT or opcode is OP_BINARY:
                if frame.fin:
                    self._deliver(opcode, frame.data)
                else:
                    self.fragment_opcode = opcode
                    self.fragments = [bytes(frame.data)]
            elif opcode is OP_CONT:
                self.fragments.append(bytes(frame.data))
                if frame.fin:
                    whole, self.fragments = b"".join(self.fragments), []
                    self._deliver(self.fragment_opcode, whole)
            elif opcode is OP_PONG:
                self._pong(bytes(frame.data))
            elif opcode is OP_CLOSE:
                self._close_received()
            # pings are answered by the library (its pong is in the output)
        self._write_output()
        if protocol.parser_exc is not None and self.state is OPEN:
            self._parser_failed(protocol.parser_exc)

    def _deliver(self, opcode: Opcode, data: bytes | bytearray | memoryview) -> None:
        if self.state is not OPEN:
            return  # after a close frame, messages are discarded
        if data.__class__ is not bytes:
            data = bytes(data)
        if opcode is OP_TEXT:
            try:
                message: Message = {"type": "websocket.receive", "text": data.decode()}
            except UnicodeDecodeError:
                self._fail(1007, "invalid UTF-8 in a text message")
                return
        else:
            message = {"type": "websocket.receive", "bytes": data}
        inbox = self.inbox
        inbox.append(message)
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if len(inbox) >= self.max_queue:
            assert self.flow is not None
            self.flow.read_paused = True  # rule 1: until receive() makes room

    def _close_received(self) -> None:
        received = self.protocol.close_rcvd
        self.state = CLOSING  # the library answered (if we had not closed first) and ends
        self._cancel_timer()
        if received is None:
            self._end(1005, "")
        else:
            self._end(received.code, received.reason)

    def _parser_failed(self, problem: Exception) -> None:
        """The library refused what the client sent and closed (its close frame is out)."""
        self.state = CLOSING
        sent = self.protocol.close_sent
        code, reason = (sent.code, sent.reason) if sent is not None else (1006, "")
        if isinstance(problem, PayloadTooBig):
            why = f"client sent a message larger than {self.settings.max_size} bytes"
        else:
            why = f"client broke the WebSocket protocol ({one_line(problem)})"
        log.info("%s: WebSocket closed with %d: %s", peer_name(self.client), code, why)
        self._end(code, reason)

    def _resume_reading(self) -> None:
        flow = self.flow
        if flow is None or not flow.read_paused or flow.write_paused or self.state is CLOSED:
            return
        if len(self.inbox) >= self.max_queue and self.state is OPEN:
            return
        stashed = flow.resume_reading()
        if stashed:
            self._feed(stashed)
        if self.eof_pending and not flow.stash:
            self._eof()
            if self.transport is not None:
                self.transport.close()

    # ------------------------------------------------------------------ the application's side

    async def receive(self) -> Message:
        """The next message, or the ``websocket.disconnect`` once none will come."""
        inbox = self.inbox
        while not inbox:
            ending = self.ending
            if ending is not None:
                return ending
            waiter = self.waiter
            if waiter is None or waiter.done():
                waiter = self.waiter = self.loop.create_future()
            await waiter
        message = inbox.popleft()
        flow = self.flow
        if flow is not None and flow.read_paused:
            self._resume_reading()
        return message

    async def send(self, opcode: Opcode, data: bytes) -> None:
        if self.state is not OPEN:
            raise WebSocketClosed("the WebSocket connection is closed")
        if opcode is OP_TEXT:
            self.protocol.send_text(data)
        else:
            self.protocol.send_binary(data)
        self._write_output()
        flow = self.flow
        if flow is not None and flow.write_paused:
            await self._drained(flow)

    async def _drained(self, flow: FlowControl) -> None:
        """Rule 2: wait until the client has read the buffer down (any number of
        senders may wait)."""
        while flow.write_paused and self.state is not CLOSED:
            waiter = self.drain_waiter
            if waiter is None or waiter.done():
                waiter = self.drain_waiter = self.loop.create_future()
            await waiter

    def close(self, code: int, reason: str) -> None:
        """Send a close frame (`ProtocolError` for a code or reason a frame cannot
        carry); the client's answer, or ``close_timeout``, ends the connection."""
        if self.state is not OPEN or self.protocol.state is not PROTOCOL_OPEN:
            return
        Close(code, reason).serialize()  # checks the code and reason before anything is sent
        if len(reason.encode()) > 123:
            raise ProtocolError("a close reason is at most 123 bytes")
        self.protocol.send_close(code, reason)
        self.state = CLOSING
        self._write_output()
        self._end(code, reason)
        self._cancel_timer()
        self.timer = self.loop.call_later(self.settings.close_timeout, self._close_unanswered)
        self._resume_reading()  # the client's close frame must be read, whatever waits

    def fail(self, code: int, reason: str) -> None:
        """Close at once without waiting for the client (the library sends the frame)."""
        if self.state is OPEN:
            self._fail(code, reason)

    # ------------------------------------------------------------------ writing and ending

    def _write_output(self) -> None:
        output = self.protocol.data_to_send()
        transport = self.transport
        if not output or transport is None:
            return
        if output[-1]:  # the common case: frames, no end of stream
            transport.write(output[0] if len(output) == 1 else b"".join(output))
            return
        data = b"".join(output)
        if data:
            transport.write(data)
        transport.close()  # the library's end of stream: a server closes the TCP connection

    def _fail(self, code: int, reason: str) -> None:
        self.protocol.fail(code, reason)
        self.state = CLOSING
        self._write_output()
        self._end(code, reason)

    def _end(self, code: int, reason: str) -> None:
        """Rule 4: the first end is the one the application hears of."""
        if self.ending is not None:
            return
        self.ending = {"type": "websocket.disconnect", "code": code, "reason": reason}
        if self.state is OPEN:
            self.state = CLOSING
        self.ping_payload = None
        self._cancel_timer()  # no more pings (a close sets its own deadline after this)
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _close_unanswered(self) -> None:
        self.timer = None
        if self.transport is not None:
            log.info(
                "%s: WebSocket closed: no answer to the close frame within %ss",
                peer_name(self.client),
                self.settings.close_timeout,
            )
            self.transport.close()

    # ------------------------------------------------------------------ keepalive

    def _schedule_ping(self) -> None:
        interval = self.settings.ping_interval
        if interval > 0 and self.state is OPEN:
            self.timer = self.loop.call_later(interval, self._ping)

    def _ping(self) -> None:
        self.timer = None
        if self.state is not OPEN:
            return
        payload = self.ping_payload = os.urandom(4)
        self.protocol.send_ping(payload)
        self._write_output()
        timeout = self.settings.ping_timeout
        if timeout > 0:
            self.timer = self.loop.call_later(timeout, self._pong_missing)
        else:
            self.ping_payload = None
            self._schedule_ping()

    def _pong(self, data: bytes) -> None:
        if self.state is OPEN and self.ping_payload is not None and data == self.ping_payload:
            self.ping_payload = None
            self._cancel_timer()
            self._schedule_ping()

    def _pong_missing(self) -> None:
        self.timer = None
        if self.state is not OPEN:
            return
        timeout = self.settings.ping_timeout
        log.info("%s: WebSocket closed: no pong within %ss", peer_name(self.client), timeout)
        self._fail(1011, "keepalive ping timeout")

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
