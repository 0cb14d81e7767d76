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
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Protocol

from .http import Request, Response

if TYPE_CHECKING:
    from .app import Route
    from .protocol import HttpConnection

DirectHandler = Callable[[Request, "HttpConnection"], Awaitable[None]]


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
