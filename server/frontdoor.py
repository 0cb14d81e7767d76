"""The seam between a connection and what answers its requests: front doors.

A front door turns each complete request into a *resolution*: a ready
`Response` (a 404, say), a `Route` of a forkloop `App` (its handler returns a
response), or a `DirectRoute`, whose handler answers through the connection
itself (the ASGI adapter, the proxy). `HttpConnection` calls nothing else of
it; `HttpService` also runs its `startup` before accepting and its `shutdown`
on the way out, and publishes its `cache_stats`.

The native `App` (`server.app`) and `AsgiApp` (`server.asgi`) are the two
front doors today; each is a module of its own, and neither copies any of the
connection.

A direct handler may also switch the connection to another protocol
(`ProtocolSwitch`): the ASGI front door does so for WebSockets, handing the
transport to an `UpgradedSession` (`server.websocket`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from .http import Request, Response

if TYPE_CHECKING:
    import asyncio

    from .app import Route
    from .flow import FlowControl

DirectHandler = Callable[[Request, "Responder"], Awaitable[None]]


class DirectRoute:
    """A route whose handler answers through the connection itself.

    Its handler is called as ``handler(request, connection)`` in the request's
    task and answers through the connection's responder methods
    (`send_response`, `begin_stream`, `finish_stream`, `cut_stream`) instead of
    returning a `Response`. It may ask to hear of a client that leaves
    (`watch_disconnect`) rather than be cancelled at once."""

    __slots__ = ("handler",)

    def __init__(self, handler: DirectHandler) -> None:
        self.handler = handler


class AnswerStream(Protocol):
    """The body of a streamed answer, sent piece by piece (`server.responses.BodyStream`)."""

    async def write(self, chunk: bytes) -> bool: ...
    def finish(self) -> bool: ...
    def cut_short(self) -> None: ...


class Responder(Protocol):
    """What a direct handler answers through: the connection (`HttpConnection`), or
    a stand-in that captures the answer (the cache in front of an ASGI app)."""

    @property
    def client_gone(self) -> bool: ...
    @property
    def endpoint(self) -> tuple[str, tuple[str, int] | None]: ...

    def send_response(self, request: Request, response: Response) -> None: ...
    def begin_stream(self, request: Request, response: Response) -> AnswerStream | None: ...
    def finish_stream(self, body: AnswerStream) -> None: ...
    def cut_stream(self, body: AnswerStream) -> None: ...
    def send_continue(self) -> None: ...
    def watch_disconnect(self, watcher: Callable[[], None]) -> None: ...
    def cancel_active(self, reason: str, now: bool = False) -> None: ...
    def extra_info(self, name: str) -> Any: ...


class UpgradedSession(Protocol):
    """What a connection hands its transport to once it has switched protocols
    (`server.websocket.WebSocketSession`): every transport event from then on."""

    def take_over(self, transport: asyncio.Transport, flow: FlowControl) -> None: ...
    def data_received(self, data: bytes) -> None: ...
    def eof_received(self) -> bool: ...
    def connection_lost(self, exc: Exception | None) -> None: ...
    def resume_writing(self) -> None: ...
    def going_away(self) -> None: ...


@runtime_checkable
class ProtocolSwitch(Protocol):
    """A responder that can switch protocols (the connection; not the cache's
    stand-in): it answers an upgrade request with a 101 and hands the transport
    to ``session``; False if the client is gone."""

    def switch_protocol(
        self, request: Request, header_lines: bytes, session: UpgradedSession
    ) -> bool: ...


class FrontDoor(Protocol):
    """What the connection and the service need of whatever serves the requests."""

    @property
    def cache_stats(self) -> dict[str, int] | None: ...

    def resolve(self, request: Request) -> Route | Response | DirectRoute: ...


async def start_front_door(front_door: FrontDoor) -> None:
    """Run the front door's start-up (an ASGI lifespan), if it has one."""
    startup: Callable[[], Awaitable[None]] | None = getattr(front_door, "startup", None)
    if startup is not None:
        await startup()


async def stop_front_door(front_door: FrontDoor) -> None:
    shutdown: Callable[[], Awaitable[None]] | None = getattr(front_door, "shutdown", None)
    if shutdown is not None:
        await shutdown()
