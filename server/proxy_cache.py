"""The proxy's cache: nginx's ``proxy_cache`` and ``proxy_cache_lock``, done better.

    forkloop proxy http://127.0.0.1:9000 --cache --shared-cache on --workers 4

`CachingProxy` is a front door in front of `ProxyFrontDoor`: GET and HEAD
requests under the cached prefixes go through the `ResponseCache`
(`server.cache`), whose *filler* is one request upstream; every other request
is proxied as if the cache were not there. The cache brings its levels with
it: a worker's own entries, then the server-wide tier (``--shared-cache on``),
so one upstream request fills a key for the whole server, and waiters in
every worker are told the moment it is done (nginx's waiters poll the
shared zone every 500 ms, and its lock covers only keys not yet stored; here
the refresh of an expired entry is one fill per server too).

What a fill does
----------------
It sends ``GET`` (a HEAD is filled with GET, as nginx's
``proxy_cache_convert_head``) with the leader's headers less the ones that ask
for the client's own copy (``If-None-Match``, ``Range``...): the fill is for
everyone. When a stale entry is stored with an ``ETag`` or ``Last-Modified``,
the fill asks with ``If-None-Match`` / ``If-Modified-Since``; a ``304`` makes
the stored body fresh again under the new answer's headers (``REVALIDATED`` in
the counters), with no body on the wire. Then, by the answer's head alone:

- **may be stored** (`server.cache.may_store`: a cacheable status, no
  ``no-store``/``private``/``no-cache``, no ``Set-Cookie``, not an answer to
  ``Authorization`` unless ``public``; a freshness lifetime from ``s-maxage``,
  ``max-age`` or ``Expires``) and no larger than ``max_entry``: the body is
  read whole, stored, and given to every waiter;
- **may not**, or too large (said by its Content-Length, or found while
  reading): the answer goes to the leader only, streamed as it comes with the
  proxy's bounded buffering (what was read so far first); the cache remembers
  the key as uncacheable (hit-for-miss), and its waiters ask upstream each for
  itself;
- **failed** (no connection: ``error``; no answer in time: ``timeout``; a
  5xx: ``http_5xx``): a `FillFailed`, so nothing is stored and each waiter gets
  the error once; or a stale entry, within its ``stale-if-error``, or at any
  age for the failures named by ``use_stale`` (nginx's
  ``proxy_cache_use_stale``). ``updating`` there serves a stale entry while its
  one refresh runs, however old it is.

Cancellation: a fill belongs to no client. It is cancelled (its upstream
connection closed) when every request waiting on it has left, in every
worker, unless ``finish_abandoned_fills`` (nginx's behaviour: the answer is
fetched and stored for the next client).

``PURGE`` of a URL from an address in ``purge_allow`` forgets every variant
of it: in this worker, in the server-wide tier, and in every other worker
(`server.purges`: a purge stamps a shared board that each worker's hits read).
From any other address it is a 403.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Awaitable
from dataclasses import dataclass

from . import purges, shared_cache
from .app import Route
from .cache import (
    CachePolicy,
    Entry,
    FillFailed,
    ResponseCache,
    freshness_lifetime,
    may_store,
    normalized_url,
)
from .frontdoor import DirectRoute, Responder
from .http import Request, Response, error_response
from .instant import InstantAnswers
from .proxy import ProxyFrontDoor, answer_head, upstream_head
from .upstream import UpstreamError, UpstreamResponse

log = logging.getLogger("forkloop.proxy")

USE_STALE = ("error", "timeout", "http_500", "http_502", "http_503", "http_504", "updating")
DEFAULT_MAX_ENTRY = 16 * 1024 * 1024
_UPDATING_FOREVER = 10 * 365 * 86400.0  # "serve stale while updating", at any age
_ERROR_PAGE_LIMIT = 64 * 1024  # bytes of an upstream's 5xx kept to give its waiters

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class ProxyCacheSettings:
    """How the proxy caches (its flags: --cache, --cache-prefix, --proxy-cache-use-stale,
    --finish-abandoned-fills, --purge-allow)."""

    prefixes: tuple[str, ...] = ("/",)
    use_stale: frozenset[str] = frozenset()
    finish_abandoned_fills: bool = False
    purge_allow: tuple[Network, ...] = ()
    max_entry: int = DEFAULT_MAX_ENTRY
    lock_timeout: float = 5.0
    scheme: str = "http"  # X-Forwarded-Proto of a fill: https when the server serves TLS


@dataclass
class ProxyCacheStats:
    upstream_fills: int = 0  # requests a fill sent upstream
    revalidated: int = 0  # of those, answered 304: the stored body made fresh again
    not_stored: int = 0  # answers relayed to their one client (uncacheable or too large)
    purges: int = 0
    purges_refused: int = 0


class RelayedBody:
    """An upstream answer that goes to one client as it arrives, never stored: the
    `Response.stream` of a fill that may not be stored (`ResponseCache` gives it
    to the request that filled only). The connection streams it with its
    backpressure; closed before its end (the client left, or asked with HEAD),
    it closes the upstream connection too."""

    def __init__(self, answer: UpstreamResponse, first: bytes = b"") -> None:
        self.answer = answer
        self.first = first
        self.done = False

    def __aiter__(self) -> RelayedBody:
        return self

    async def __anext__(self) -> bytes:
        if self.first:
            data, self.first = self.first, b""
            return data
        while not self.done:
            data, more = await self.answer.read()
            if not more:
                self.done = True
                self.answer.release()
            if data:
                return data
        raise StopAsyncIteration

    async def aclose(self) -> None:
        if not self.done:
            self.done = True
            self.answer.abort()


class CachingProxy:
    """`ProxyFrontDoor` behind the response cache; see the module's docstring."""

    streams_bodies = True

    def __init__(
        self,
        proxy: ProxyFrontDoor,
        cache: ResponseCache,
        settings: ProxyCacheSettings | None = None,
    ) -> None:
        self.proxy = proxy
        proxy.marks = (("X-Cache", "BYPASS"),)  # what the cache never sees still says so
        self.cache = cache
        self.settings = settings = settings or ProxyCacheSettings()
        self.policy = CachePolicy(
            stale_while_revalidate=_UPDATING_FOREVER if "updating" in settings.use_stale else 0,
            stale_on_statuses=_statuses(settings.use_stale),
            lock_timeout=settings.lock_timeout,
            finish_abandoned_fills=settings.finish_abandoned_fills,
        )
        self.stats = ProxyCacheStats()
        self.everywhere = settings.prefixes == ("/",)  # no path to decode to tell
        # a plain route: a hit is answered inline, with no task (`server.app`)
        self.cached = Route("/", "GET", self._lookup, False, {})
        self.purging = DirectRoute(self._purge)

    @property
    def cache_stats(self) -> dict[str, int]:
        return {**self.cache.stats.as_dict(), **vars(self.stats)}

    @property
    def instant_answers(self) -> InstantAnswers:
        """Fresh hits, ready for the parser to answer (`server.instant`)."""
        return self.cache.instant

    async def shutdown(self) -> None:
        await self.proxy.shutdown()

    def resolve(self, request: Request) -> Route | DirectRoute:
        method = request.method
        if method == "GET" or method == "HEAD":
            if request.upgrade is None and (
                self.everywhere or request.path.startswith(self.settings.prefixes)
            ):
                return self.cached
        elif method == "PURGE":
            return self.purging
        return self.proxy.route

    # ------------------------------------------------------------------ serving

    def _lookup(self, request: Request) -> Response | Awaitable[Response]:
        answer = self.cache.serve(request, self._fill, self.policy)
        if answer.__class__ is Response:
            return answer
        return _after_fill(answer)  # type: ignore[arg-type]

    async def _fill(self, request: Request) -> Response:
        """One request upstream for ``request``'s key; see the module's docstring."""
        head_lines, _, _ = upstream_head(request, self.settings.scheme, self.proxy.pool.host)
        stored = self.cache.stored(request)
        if stored is not None:
            head_lines += _conditions(stored.headers)
        self.stats.upstream_fills += 1
        try:
            answer = await self.proxy.pool.request("GET", request.target, head_lines, None)
        except UpstreamError as error:
            kind = "timeout" if error.status == 504 else "error"
            raise self._failed(request, error.status, error.reason, kind) from None
        try:
            return await self._take(request, answer, stored)
        except UpstreamError as error:  # the body broke, or did not come in time
            answer.abort()
            kind = "timeout" if error.status == 504 else "error"
            raise self._failed(request, error.status, error.reason, kind) from None
        except BaseException:  # cancelled: every waiter left; the upstream stops too
            answer.abort()
            raise

    async def _take(
        self, request: Request, answer: UpstreamResponse, stored: Entry | None
    ) -> Response:
        failure = answer.connection.failure
        if failure is not None:
            answer.abort()
            raise self._failed(request, 502, failure.reason, "error")
        response = answer_head(answer)
        if answer.status == 304 and stored is not None:
            answer.release()
            self.stats.revalidated += 1
            return _refreshed(stored, response)
        if answer.status >= 500:
            body, whole = await _read(answer, _ERROR_PAGE_LIMIT)
            if whole:
                answer.release()
            else:
                answer.abort()
            response.body = body
            response.headers = [h for h in response.headers if h[0] != "Content-Length"]
            kind = f"http_{answer.status}"
            raise FillFailed(response, kind in self.settings.use_stale)
        if not self._storable(request, response):
            self.stats.not_stored += 1
            response.stream = RelayedBody(answer)
            return response
        body, whole = await _read(answer, self.settings.max_entry)
        if not whole:  # larger than it said, or than an entry may be: relay it
            self.stats.not_stored += 1
            response.stream = RelayedBody(answer, body)
            return response
        answer.release()
        response.body = body
        response.headers = [h for h in response.headers if h[0] != "Content-Length"]
        return response

    def _storable(self, request: Request, response: Response) -> bool:
        """Whether the answer may be read whole for the cache, by its head alone."""
        if not may_store(request, response):
            return False
        declared = response.declared_length()
        if declared is not None and declared > self.settings.max_entry:
            return False
        return freshness_lifetime(response, self.policy.ttl) > 0

    def _failed(self, request: Request, status: int, reason: str, kind: str) -> FillFailed:
        log.warning("%s %s: %d: %s", request.method, request.path, status, reason)
        return FillFailed(error_response(status, reason), kind in self.settings.use_stale)

    # ------------------------------------------------------------------ purge

    async def _purge(self, request: Request, connection: Responder) -> None:
        client = request.client[0] if request.client else None
        if client is None or not _allowed(client, self.settings.purge_allow):
            self.stats.purges_refused += 1
            log.warning("PURGE %s from %s refused: not in --purge-allow", request.path, client)
            connection.send_response(request, error_response(403, "PURGE is not allowed"))
            return
        url = normalized_url(request)
        found = self.cache.purge(url)
        tier = shared_cache.current()
        if tier is not None:
            tier.keep(url.encode(), shared_cache.encode_uncacheable_marker(0.0))
        purges.stamp(url)  # every other worker's copy is stale from now
        self.stats.purges += 1
        status = 200 if found or tier is not None else 404
        connection.send_response(request, Response.json({"purged": url}, status))


def _statuses(use_stale: frozenset[str]) -> frozenset[int]:
    """The statuses of a failure shared by another worker's fill that are answered
    with a stale entry: the failure's kind travels as its status (error: 502,
    timeout: 504, http_N: N)."""
    statuses = {int(kind[5:]) for kind in use_stale if kind.startswith("http_")}
    statuses |= {502} if "error" in use_stale else set()
    statuses |= {504} if "timeout" in use_stale else set()
    return frozenset(statuses)


async def _after_fill(answer: Awaitable[Response]) -> Response:
    """The answer a miss waited for; the error, when its own fill failed with no
    stale entry to fall back on."""
    try:
        return await answer
    except FillFailed as failure:
        return failure.response


async def _read(answer: UpstreamResponse, limit: int) -> tuple[bytes, bool]:
    """The answer's body, up to ``limit`` bytes; and whether that was all of it."""
    pieces: list[bytes] = []
    size = 0
    more = True
    while more:
        data, more = await answer.read()
        pieces.append(data)
        size += len(data)
        if size > limit and more:
            return b"".join(pieces), False
    body = b"".join(pieces)
    return body, len(body) <= limit


def _conditions(headers: list[tuple[str, str]]) -> bytes:
    """The conditional request fields that revalidate a stored entry."""
    lines = b""
    for name, value in headers:
        lowered = name.lower()
        if lowered == "etag":
            lines += b"If-None-Match: %s\r\n" % value.encode("latin-1")
        elif lowered == "last-modified":
            lines += b"If-Modified-Since: %s\r\n" % value.encode("latin-1")
    return lines


# RFC 9111 4.3.4: a 304 updates the stored header fields it carries, except these
_KEPT_ON_304 = frozenset({"content-length", "content-encoding", "content-type", "via"})


def _refreshed(stored: Entry, not_modified: Response) -> Response:
    """The stored answer, fresh again under the header fields the 304 brought."""
    updated = {n.lower() for n, _ in not_modified.headers} - _KEPT_ON_304
    headers = [(n, v) for n, v in stored.headers if n.lower() not in updated]
    headers += [(n, v) for n, v in not_modified.headers if n.lower() in updated]
    return Response(stored.body, stored.status, headers, stored.content_type)


def _allowed(client: str, networks: tuple[Network, ...]) -> bool:
    try:
        address = ipaddress.ip_address(client)
    except ValueError:
        return False
    return any(address in network for network in networks)


def purge_networks(text: str) -> tuple[Network, ...]:
    """``--purge-allow``: comma-separated addresses or networks (``127.0.0.1``,
    ``10.0.0.0/8``); ValueError names the one that is neither."""
    networks = []
    for part in text.split(","):
        part = part.strip()
        if part:
            try:
                networks.append(ipaddress.ip_network(part, strict=False))
            except ValueError:
                raise ValueError(f"{part!r} is not an address or a network") from None
    return tuple(networks)
