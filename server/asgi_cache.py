"""The response cache in front of an ASGI application: `CachedAsgiApp`.

    forkloop serve main:app --cache --cache-size 256MiB --cache-prefix /api/

A front door around `AsgiApp`. GET and HEAD requests under the cached path
prefixes go through the same `ResponseCache` native routes use
(`server.cache`): what the application marks cacheable (``Cache-Control:
public, max-age`` or ``s-maxage``; ``Vary`` honoured) is stored and served
without calling it, and N concurrent misses of one URL call the application
once (single-flight); ``private``, ``no-store``, ``no-cache``, a ``Set-Cookie``
and an ``Authorization`` request (unless the answer says ``public``) are never
stored. Everything else goes to the application as if the cache were not
there.

How a fill runs
---------------
A miss runs the application through an `HttpCycle` whose responder is an
`AnswerCapture`, not the client's connection: the answer is gathered whole,
stored if it may be, then sent to every request that waited for it (each
through its own connection, with ``X-Cache``). The fill belongs to no single
client: it is cancelled only when every request waiting on it has gone
(`server.singleflight`), and a client that leaves cancels only its own wait.

Invariants: the application never sees a cached request; a captured answer is
whole before anyone gets it (a streamed one is gathered, bounded by
``max_capture`` bytes: past that the answer is a 502, and nothing is stored);
the application's own headers are kept as it sent them, less those the server
frames itself.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from .asgi import AsgiApp, HttpCycle
from .cache import CachePolicy, ResponseCache, inspect_awaitable
from .frontdoor import AnswerStream, DirectRoute, Responder
from .http import Request, Response, error_response
from .instant import InstantAnswers

log = logging.getLogger("forkloop.cache")

DEFAULT_MAX_CAPTURE = 16 * 1024 * 1024


class CachedAsgiApp:
    """`AsgiApp` behind the response cache; see the module's docstring."""

    def __init__(
        self,
        inner: AsgiApp,
        cache: ResponseCache,
        prefixes: tuple[str, ...] = ("/",),
        policy: CachePolicy | None = None,
        max_capture: int = DEFAULT_MAX_CAPTURE,
    ) -> None:
        self.inner = inner
        self.cache = cache
        self.prefixes = prefixes
        self.policy = policy or CachePolicy()
        self.max_capture = max_capture
        self.route = DirectRoute(self._serve)
        self.streams_bodies = inner.streams_bodies
        self.serves_websockets = inner.serves_websockets

    @property
    def cache_stats(self) -> dict[str, int]:
        return self.cache.stats.as_dict()

    @property
    def instant_answers(self) -> InstantAnswers:
        """Fresh hits, ready for the parser to answer (`server.instant`)."""
        return self.cache.instant

    async def startup(self) -> None:
        await self.inner.startup()

    async def shutdown(self) -> None:
        await self.inner.shutdown()

    def resolve(self, request: Request) -> DirectRoute:
        if (
            request.method in ("GET", "HEAD")
            and request.upgrade is None  # a WebSocket handshake is never cached
            and request.path.startswith(self.prefixes)
        ):
            return self.route
        return self.inner.resolve(request)

    async def _serve(self, request: Request, connection: Responder) -> None:
        endpoint = connection.endpoint
        answer = self.cache.serve(request, self._filler(endpoint), self.policy)
        if inspect_awaitable(answer):
            answer = await answer  # type: ignore[misc]
        if not connection.client_gone:
            connection.send_response(request, answer)  # type: ignore[arg-type]

    def _filler(
        self, endpoint: tuple[str, tuple[str, int] | None]
    ) -> Callable[[Request], Awaitable[Response]]:
        async def fill(request: Request) -> Response:
            capture = AnswerCapture(endpoint, self.max_capture)
            await HttpCycle(self.inner, request, capture).run()
            return capture.response()

        return fill


class AnswerCapture:
    """A `Responder` that gathers the application's answer instead of sending it."""

    client_gone = False

    def __init__(self, endpoint: tuple[str, tuple[str, int] | None], max_capture: int) -> None:
        self.endpoint = endpoint
        self.max_capture = max_capture
        self.answer: Response | None = None

    def response(self) -> Response:
        if self.answer is None:
            return error_response(502, "the application gave no complete answer")
        return self.answer

    def send_response(self, request: Request, response: Response) -> None:
        block = response.encoded_headers
        if block is not None:  # the ASGI fast path: headers as one encoded block
            response.encoded_headers = None
            response.headers = _header_pairs(block)
        self.answer = response

    def begin_stream(self, request: Request, response: Response) -> AnswerStream:
        return GatheredBody(self, response)

    def finish_stream(self, body: AnswerStream) -> None:
        body.finish()

    def cut_stream(self, body: AnswerStream) -> None:
        body.cut_short()

    def send_continue(self) -> None:
        """The application reads a body nobody waits to send: nothing to say."""

    def watch_disconnect(self, watcher: Callable[[], None]) -> None:
        """The fill has no client of its own: nobody to watch."""

    def cancel_active(self, reason: str, now: bool = False) -> None:
        """Cancelling a fill is the single-flight group's call, not a client's."""

    def extra_info(self, name: str) -> Any:
        return None


class GatheredBody:
    """A streamed answer gathered whole, up to the capture's bound."""

    def __init__(self, capture: AnswerCapture, response: Response) -> None:
        self.capture = capture
        self.response = response
        self.pieces: list[bytes] = []
        self.size = 0
        self.too_large = False

    async def write(self, chunk: bytes) -> bool:
        self.size += len(chunk)
        if self.size > self.capture.max_capture:
            self.too_large = True
            return False  # as if the client had gone: the application is told to stop
        self.pieces.append(chunk)
        return True

    def finish(self) -> bool:
        response = self.response
        if self.too_large:
            limit = self.capture.max_capture
            log.error("an answer to cache was larger than %d bytes: not stored", limit)
            self.capture.answer = error_response(502, f"the answer is larger than {limit} bytes")
            return False
        headers = [(n, v) for n, v in response.headers if n.lower() != "content-length"]
        whole = Response(b"".join(self.pieces), response.status, headers, response.content_type)
        self.capture.answer = whole
        return True

    def cut_short(self) -> None:
        if self.too_large:
            self.finish()  # the 502 that says why
        else:
            self.capture.answer = None


def _header_pairs(block: bytes) -> list[tuple[str, str]]:
    pairs = []
    for line in block.decode("latin-1").split("\r\n"):
        name, separator, value = line.partition(": ")
        if separator:
            pairs.append((name, value))
    return pairs
