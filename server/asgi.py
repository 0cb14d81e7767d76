"""ASGI applications behind forkloop's connection layer: `AsgiApp`.

`AsgiApp` is a front door, as `App` is: the connection asks it to resolve
each request, and it answers every HTTP request with the same `DirectRoute`,
whose handler runs the application in the request's own task (no second task
per request) and answers through the connection's responder. Everything the
connection guarantees (limits, timeouts, pipelining order, the hostile-input
answers, lingering close, the access log and the counters) holds for an ASGI
application because it is the same connection.

One request, one cycle
----------------------
`HttpCycle` is the ``receive``/``send`` pair of one request:

* ``receive()`` gives the body as ``http.request`` events as it arrives
  (`server.request_body`: a slow reader holds the client back, the worker
  buffers at most a high-water mark), sending ``100 Continue`` first if the
  client waits for it; then, once the client has gone (or the answer is
  complete), ``http.disconnect``; until then it waits. A body the client cuts
  short, or whose framing is refused, ends in ``http.disconnect`` too, and the
  connection answers the refusal itself.
* ``http.response.start`` is held until the first ``http.response.body``. A
  body that arrives whole (``more_body`` false) goes out with its head in one
  write and a Content-Length; otherwise the head goes out and each piece is
  written as it comes, chunked unless the application declared a length, and
  ``send()`` waits while the client is not reading (backpressure).
* A response the application gets wrong (a second start, a body before the
  start, anything after the end, a message of an unknown type) raises
  `RuntimeError` in the application, naming it; nothing malformed reaches the
  client. An application that raises before it starts its answer gets a 500;
  after, the connection closes (the only way to say a body ended early). One
  that returns without answering gets a 500 and a log line saying so.

Cancellation
------------
A client that leaves is told at once (``http.disconnect``); the application's
task is cancelled ``disconnect_grace`` seconds later (0: at once; None:
never, which is uvicorn's behaviour). ``--request-timeout`` cancels it with a
504 and shutdown with a 503 when no answer has begun, as for native handlers.

WebSockets
----------
A request the reader marked ``upgrade`` (a WebSocket handshake, checked like
any request) resolves to the WebSocket route instead: a
`server.asgi_websocket.WebSocketCycle` runs the application with the
``websocket`` scope, and ``websocket.accept`` switches the connection to a
`server.websocket.WebSocketSession`. With ``--ws none``, or without the
``websockets`` library, upgrades are declined: the application sees a plain
``http`` request, as before.

Lifespan
--------
`startup` runs the application's lifespan protocol once per worker, before
it accepts connections; `shutdown` on the way out. ``state`` is filled by the
application during startup and copied into every request's scope. A startup
failure raises `LifespanFailed` (the worker's boot fails, and the master's
back-off applies); with ``lifespan="auto"`` an application that does not speak
the protocol (it raises at once) is served without it.
"""

from __future__ import annotations

import asyncio
import importlib.util
import inspect
import logging
import re
from collections.abc import Awaitable, Callable, Coroutine, Iterable, MutableMapping
from typing import TYPE_CHECKING, Any, cast

from .config import WebSocketSettings
from .context import DISCONNECT
from .frontdoor import AnswerStream, DirectRoute, Responder
from .http import HeaderError, Request, Response, error_response
from .request_body import BodyFailed

if TYPE_CHECKING:
    from .asgi_websocket import WebSocketCycle

log = logging.getLogger("forkloop.asgi")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Asgi3App = Callable[[Scope, Receive, Send], Awaitable[None]]

ASGI_VERSION = {"version": "3.0", "spec_version": "2.4"}
DEFAULT_DISCONNECT_GRACE = 1.0
_NOBODY: frozenset[str] = frozenset()  # --proxy-headers off: no peer is trusted


class LifespanFailed(RuntimeError):
    """The application's lifespan startup (or shutdown) failed; the message says why."""


def looks_like_asgi(candidate: object) -> bool:
    """True for an ASGI application: an ``async`` callable of (scope, receive,
    send), an object whose ``__call__`` is one, or an ASGI 2 class."""
    if inspect.isclass(candidate):
        return "scope" in inspect.signature(candidate).parameters
    call = candidate if inspect.isroutine(candidate) else getattr(candidate, "__call__", None)  # noqa: B004
    if call is None:
        return False
    if inspect.iscoroutinefunction(call):
        return len(_positional(call)) == 3
    return len(_positional(call)) == 1  # an ASGI 2 double callable: app(scope)(receive, send)


def as_asgi3(app: Any) -> Asgi3App:
    """``app`` as an ASGI 3 callable; ASGI 2 double callables are wrapped."""
    call = app if inspect.isroutine(app) else getattr(app, "__call__", None)  # noqa: B004
    if not inspect.isclass(app) and call is not None and inspect.iscoroutinefunction(call):
        return cast(Asgi3App, app)

    async def asgi2(scope: Scope, receive: Receive, send: Send) -> None:
        instance = app(scope)
        await instance(receive, send)

    return asgi2


def _positional(call: Callable[..., Any]) -> list[str]:
    try:
        parameters = inspect.signature(call).parameters.values()
    except (TypeError, ValueError):
        return []
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [p.name for p in parameters if p.kind in kinds]


class AsgiApp:
    """The front door for an ASGI application; see the module's docstring."""

    cache_stats: dict[str, int] | None = None
    streams_bodies = True  # receive() gives the body as it arrives

    def __init__(
        self,
        app: Any,
        *,
        name: str = "",
        root_path: str = "",
        lifespan: str = "auto",
        disconnect_grace: float | None = DEFAULT_DISCONNECT_GRACE,
        proxy_headers: bool = False,
        forwarded_allow_ips: str = "127.0.0.1",
        websocket: WebSocketSettings | None = None,
    ) -> None:
        if lifespan not in ("auto", "on", "off"):
            raise ValueError(f"lifespan must be auto, on or off, not {lifespan!r}")
        self.app = as_asgi3(app)
        self.name = name or getattr(app, "__qualname__", type(app).__qualname__)
        self.root_path = root_path
        self.lifespan = lifespan
        self.disconnect_grace = disconnect_grace
        # peers whose X-Forwarded-For/-Proto are believed (None: every peer); off: ()
        self.trusted_proxies: frozenset[str] | None = _NOBODY
        if proxy_headers:
            addresses = {a.strip() for a in forwarded_allow_ips.split(",") if a.strip()}
            self.trusted_proxies = None if "*" in addresses else frozenset(addresses)
        self.state: dict[str, Any] = {}
        self.route = DirectRoute(self._serve)
        self.websocket_settings = websocket = websocket or WebSocketSettings()
        self._websocket_cycle = _websocket_cycle(websocket.library)
        # the connection's reader marks WebSocket upgrades only when this is true
        self.serves_websockets = self._websocket_cycle is not None
        self.websocket_route = DirectRoute(self._serve_websocket)
        self._lifespan_task: asyncio.Task[None] | None = None
        self._lifespan_inbox: asyncio.Queue[Message] | None = None
        self._lifespan_reply: asyncio.Queue[Message] | None = None

    def behind_proxy(
        self, request: Request, client: tuple[str, int] | None, scheme: str
    ) -> tuple[tuple[str, int] | None, str]:
        """The client and scheme a trusted proxy says it served (--proxy-headers):
        the nearest address in X-Forwarded-For that is not itself a trusted proxy,
        and X-Forwarded-Proto. From any other peer the headers are ignored."""
        trusted = self.trusted_proxies
        if client is not None and trusted is not None and client[0] not in trusted:
            return client, scheme
        chain: list[str] = []
        for name, value in request.raw_headers:
            lowered = name.lower()
            if lowered == b"x-forwarded-for":
                chain += [hop.strip() for hop in value.decode("latin-1").split(",") if hop.strip()]
            elif lowered == b"x-forwarded-proto":
                proto = value.decode("latin-1").strip().lower()
                if proto in ("http", "https"):
                    scheme = proto
        for hop in reversed(chain):
            if trusted is None or hop not in trusted:
                return (hop, 0), scheme
        if chain:
            return (chain[0], 0), scheme
        return client, scheme

    def resolve(self, request: Request) -> DirectRoute:
        if request.upgrade is not None:  # a WebSocket handshake (server.parsing)
            return self.websocket_route
        return self.route

    def _serve(self, request: Request, connection: Responder) -> Coroutine[Any, Any, None]:
        return HttpCycle(self, request, connection).run()  # no coroutine frame of its own

    def _serve_websocket(
        self, request: Request, connection: Responder
    ) -> Coroutine[Any, Any, None]:
        cycle = self._websocket_cycle
        assert cycle is not None  # the reader marks upgrades only when there is one
        return cycle(self, request, connection).run()

    # ------------------------------------------------------------------ lifespan

    async def startup(self) -> None:
        """Run the lifespan startup; `LifespanFailed` if the application refuses."""
        if self.lifespan == "off":
            return
        inbox: asyncio.Queue[Message] = asyncio.Queue()
        reply: asyncio.Queue[Message] = asyncio.Queue()
        self._lifespan_inbox, self._lifespan_reply = inbox, reply
        scope = {"type": "lifespan", "asgi": ASGI_VERSION, "state": self.state}

        async def run() -> None:
            try:
                await self.app(scope, inbox.get, reply.put)
            except Exception as exc:
                await reply.put({"type": "_raised", "error": exc})
            else:
                await reply.put({"type": "_returned"})

        self._lifespan_task = asyncio.get_running_loop().create_task(run())
        await inbox.put({"type": "lifespan.startup"})
        message = await reply.get()
        kind = message["type"]
        if kind == "lifespan.startup.complete":
            return
        self._lifespan_task = None
        if kind == "lifespan.startup.failed":
            reason = message.get("message") or "no message"
            raise LifespanFailed(f"ASGI app {self.name}: lifespan startup failed: {reason}")
        if kind == "_raised" and self.lifespan == "auto":
            log.info(
                "ASGI app %s does not support lifespan (%s); serving without it",
                self.name,
                one_line(message["error"]),
            )
            return
        if kind == "_raised":
            raise LifespanFailed(
                f"ASGI app {self.name}: lifespan startup raised {one_line(message['error'])}"
            )
        if self.lifespan == "on":
            raise LifespanFailed(f"ASGI app {self.name} returned during lifespan startup")

    async def shutdown(self) -> None:
        """Run the lifespan shutdown, if the startup ran; errors are logged."""
        task, inbox, reply = self._lifespan_task, self._lifespan_inbox, self._lifespan_reply
        if task is None or inbox is None or reply is None:
            return
        self._lifespan_task = None
        await inbox.put({"type": "lifespan.shutdown"})
        message = await reply.get()
        kind = message["type"]
        if kind == "lifespan.shutdown.failed":
            reason = message.get("message") or "no message"
            log.error("ASGI app %s: lifespan shutdown failed: %s", self.name, reason)
        elif kind == "_raised":
            log.error(
                "ASGI app %s: lifespan shutdown raised %s", self.name, one_line(message["error"])
            )
        await task


def _websocket_cycle(library: str) -> type[WebSocketCycle] | None:
    """The WebSocket support ``--ws`` asks for: auto (the websockets library if it
    is installed), none (upgrades are declined: the app sees HTTP), websockets."""
    if library not in ("auto", "none", "websockets"):
        raise ValueError(f"ws must be auto, none or websockets, not {library!r}")
    if library == "none":
        return None
    if importlib.util.find_spec("websockets") is None:
        if library == "auto":
            return None
        raise ValueError("--ws websockets: the websockets library is not installed "
                         "(pip install 'forkloop[ws]')")  # fmt: skip
    from .asgi_websocket import WebSocketCycle  # it imports websockets: only when wanted

    return WebSocketCycle


class HttpCycle:
    """``receive`` and ``send`` of one HTTP request; see the module's docstring."""

    __slots__ = (
        "front",
        "request",
        "connection",
        "body_sent",
        "start",
        "stream",
        "done",
        "disconnected",
        "client_left",
        "cancel_timer",
    )

    def __init__(self, front: AsgiApp, request: Request, connection: Responder) -> None:
        self.front = front
        self.request = request
        self.connection = connection
        self.body_sent = False  # the request body was handed to the application
        self.start: Message | None = None  # http.response.start, held until the first body
        self.stream: AnswerStream | None = None
        self.done = False  # the answer is complete
        self.disconnected: asyncio.Future[None] | None = None
        self.client_left = False
        self.cancel_timer: asyncio.TimerHandle | None = None

    def scope(self) -> Scope:
        request, front, connection = self.request, self.front, self.connection
        root = front.root_path
        target = request.target
        if target[:1] == b"/" and b"?" not in target and b"%" not in target:  # the common case
            path, raw_path, query = target.decode("utf-8", "replace"), target, b""
        else:
            path, raw_path, query = request.split_target()
        scheme, server = connection.endpoint
        client = request.client
        if front.trusted_proxies is not _NOBODY:
            client, scheme = front.behind_proxy(request, client, scheme)
        return {
            "type": "http",
            "asgi": ASGI_VERSION,
            "http_version": request.version,
            "method": request.method,
            "scheme": scheme,
            "path": root + path if root else path,
            "raw_path": root.encode() + raw_path if root else raw_path,
            "query_string": query,
            "root_path": root,
            "headers": [(name.lower(), value) for name, value in request.raw_headers],
            "client": client,
            "server": server,
            "state": front.state.copy(),
        }

    async def run(self) -> None:
        connection, request, front = self.connection, self.request, self.front
        connection.watch_disconnect(self._client_left)
        try:
            await front.app(self.scope(), self.receive, self.send)
        except asyncio.CancelledError:
            if self.stream is not None and not self.done:
                connection.cut_stream(self.stream)
            raise
        except Exception as exc:
            log.exception(
                "ASGI app %s raised on %s %s: %s",
                front.name,
                request.method,
                request.path,
                one_line(exc),
            )
            self._fail("the application raised an exception")
            return
        finally:
            if self.cancel_timer is not None:
                self.cancel_timer.cancel()
        if not self.done:
            if self.start is None and self.stream is None:
                log.error(
                    "ASGI app %s returned without answering %s %s",
                    front.name,
                    request.method,
                    request.path,
                )
            else:
                log.error(
                    "ASGI app %s returned before finishing its answer to %s %s",
                    front.name,
                    request.method,
                    request.path,
                )
            self._fail("the application returned without a complete response")

    def _fail(self, reason: str) -> None:
        """An answer that cannot be completed: a 500 if none began, else close.
        A request whose body failed is answered by the connection (its refusal), or
        by nobody (the client left)."""
        if self.done:
            return
        self.done = True
        streamed = self.request.streamed_body
        if streamed is not None and streamed.failure is not None and self.stream is None:
            return
        if self.stream is not None:
            self.connection.cut_stream(self.stream)
        elif not self.connection.client_gone:
            self.connection.send_response(self.request, error_response(500, reason))

    # ------------------------------------------------------------------ receive

    async def receive(self) -> Message:
        if not self.body_sent:
            streamed = self.request.streamed_body
            if streamed is None:  # no body, or it came whole
                self.body_sent = True
                return {"type": "http.request", "body": await self.request.body()}
            if streamed.take_continue():
                self.connection.send_continue()
            try:
                body, more = await streamed.read()
            except BodyFailed:
                self.body_sent = True
                return {"type": "http.disconnect"}
            self.body_sent = not more
            return {"type": "http.request", "body": body, "more_body": more}
        if not self.done and not self.connection.client_gone:
            waiter = self.disconnected
            if waiter is None:
                waiter = self.disconnected = asyncio.get_running_loop().create_future()
            await waiter
        return {"type": "http.disconnect"}

    def _client_left(self) -> None:
        """The connection lost its client: tell the application, cancel it after the grace."""
        if self.client_left:
            return
        self.client_left = True
        waiter = self.disconnected
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        grace = self.front.disconnect_grace
        if grace is None:
            return
        connection = self.connection
        if grace <= 0:
            connection.cancel_active(DISCONNECT, now=True)
        else:
            loop = asyncio.get_running_loop()
            self.cancel_timer = loop.call_later(grace, connection.cancel_active, DISCONNECT, True)

    # ------------------------------------------------------------------ send

    async def send(self, message: Message) -> None:
        kind = message.get("type")
        if kind == "http.response.body":
            start = self.start
            if start is not None and not message.get("more_body"):  # the whole answer at once
                response = self._whole_response(start, message.get("body", b""))
                self.start = None
                self.done = True
                connection = self.connection
                if not connection.client_gone:
                    connection.send_response(self.request, response)
                return
            await self._send_body(message)
        elif kind == "http.response.start":
            if self.start is not None or self.stream is not None or self.done:
                raise RuntimeError(self._misuse("sent http.response.start twice"))
            self.start = message
        else:
            raise RuntimeError(self._misuse(f"sent an unexpected message {kind!r}"))

    async def _send_body(self, message: Message) -> None:
        if self.done:
            raise RuntimeError(self._misuse("sent a body after its response was complete"))
        body = message.get("body", b"")
        more = message.get("more_body", False)
        if not isinstance(body, bytes | bytearray | memoryview):
            raise RuntimeError(self._misuse(f"sent a body of type {type(body).__name__}"))
        connection = self.connection
        stream = self.stream
        if stream is None:
            start = self.start
            if start is None:
                raise RuntimeError(self._misuse("sent a body before http.response.start"))
            self.start = None
            if not more:
                self.done = True
                if not connection.client_gone:
                    connection.send_response(self.request, self._whole_response(start, body))
                return
            response = self._response(start, b"")
            if connection.client_gone:
                return
            stream = self.stream = connection.begin_stream(self.request, response)
            if stream is None:  # its head could not be sent: a 500 went out
                self.done = True
                return
        if body and not await stream.write(bytes(body)):
            return  # the client is gone; http.disconnect tells the application
        if not more:
            self.done = True
            connection.finish_stream(stream)

    def _whole_response(self, start: Message, body: bytes | bytearray | memoryview) -> Response:
        """A response sent whole: its header block encoded once from the byte pairs."""
        status = start.get("status")
        if status.__class__ is not int:
            raise RuntimeError(self._misuse(f"sent a status that is not an int: {status!r}"))
        if body.__class__ is not bytes:
            if not isinstance(body, bytearray | memoryview):
                raise RuntimeError(self._misuse(f"sent a body of type {type(body).__name__}"))
            body = bytes(body)
        response = Response(body, status, None, content_type=None)
        try:
            block, declared, close = encode_header_block(start.get("headers", ()))
        except HeaderError as problem:
            log.error("%s", self._misuse(f"sent a response that cannot be sent: {problem}"))
            return error_response(500, "the application sent a response that cannot be sent")
        except (AttributeError, TypeError, ValueError):
            raise RuntimeError(self._misuse("sent headers that are not byte pairs")) from None
        if declared is not None and declared != len(body) and self.request.method != "HEAD":
            log.error(
                "%s", self._misuse(f"declared Content-Length {declared} and sent {len(body)} bytes")
            )
            return error_response(500, "the application sent a response that cannot be sent")
        if close:
            self.request.keep_alive = False
        response.encoded_headers = block
        return response

    def _response(self, start: Message, body: bytes) -> Response:
        status = start.get("status")
        if status.__class__ is not int:
            raise RuntimeError(self._misuse(f"sent a status that is not an int: {status!r}"))
        try:
            headers = [
                (name.decode("latin-1"), value.decode("latin-1"))
                for name, value in start.get("headers", ())
            ]
        except (AttributeError, TypeError, ValueError):
            raise RuntimeError(self._misuse("sent headers that are not byte pairs")) from None
        return Response(body, status, headers, content_type=None)

    def _misuse(self, what: str) -> str:
        request = self.request
        return f"ASGI app {self.front.name} {what} ({request.method} {request.path})"


# header names an application may not set: the connection frames the body itself
_FRAMING = {b"content-length", b"transfer-encoding", b"connection", b"date", b"server"}
_TOKEN = b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
_FORBIDDEN_IN_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


def encode_header_block(headers: Iterable[tuple[bytes, bytes]]) -> tuple[bytes, int | None, bool]:
    """An application's header pairs as lines, checked (a token name, no CR, LF or
    other control byte in a value); with the Content-Length it declared and whether
    it asked for ``Connection: close``. `HeaderError` names the first bad one.

    Applications send the same few pairs again and again (a content type, a
    length), often the same whole list, so each checked list and each checked
    pair is remembered (up to ``_LINE_CACHE_SIZE`` of each): a list seen before
    costs one dictionary lookup, a pair seen before one more."""
    key = tuple(headers)
    try:
        known = _BLOCK_CACHE.get(key)
    except TypeError:  # list pairs, as ASGI allows: not hashable
        return _encode_pairs(key)
    if known is None:
        known = _encode_pairs(key)
        if len(_BLOCK_CACHE) < _LINE_CACHE_SIZE:
            _BLOCK_CACHE[key] = known
    return known


def _encode_pairs(headers: Iterable[tuple[bytes, bytes]]) -> tuple[bytes, int | None, bool]:
    lines = []
    declared: int | None = None
    close = False
    cache = _LINE_CACHE
    for pair in headers:
        try:
            line = cache.get(pair)
        except TypeError:  # a list pair, as ASGI allows: not hashable
            pair = (pair[0], pair[1])
            line = cache.get(pair)
        if line is None:
            line = _checked_line(*pair)
            if len(cache) < _LINE_CACHE_SIZE:
                cache[pair] = line
        if line.__class__ is bytes:
            lines.append(line)
        elif line is _CLOSE:
            close = True
        elif line.__class__ is int:
            declared = line
    return b"".join(lines), declared, close


def _checked_line(name: bytes, value: bytes) -> bytes | int | object:
    """The header line of one pair, or what it means to the framing: the declared
    length (an int), `_CLOSE`, or `_DROPPED`."""
    if not name or name.translate(None, _TOKEN):
        raise HeaderError(f"header name {name!r} is not an HTTP token")
    if _FORBIDDEN_IN_VALUE.search(value):
        raise HeaderError(f"header {name.decode('latin-1')} has a control byte in its value")
    lowered = name.lower()
    if lowered not in _FRAMING:
        return b"%s: %s\r\n" % (name, value)
    if lowered == b"content-length":
        if not value.isdigit():
            raise HeaderError(f"Content-Length {value!r} is not a number")
        return int(value)
    if lowered == b"connection" and b"close" in value.lower():
        return _CLOSE
    return _DROPPED


_CLOSE, _DROPPED = object(), object()
_LINE_CACHE: dict[tuple[bytes, bytes], bytes | int | object] = {}
_BLOCK_CACHE: dict[tuple[tuple[bytes, bytes], ...], tuple[bytes, int | None, bool]] = {}
_LINE_CACHE_SIZE = 4096


def one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__
