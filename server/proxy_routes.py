"""Proxied path prefixes beside an app's own routes: ``app.proxy()`` and ``[[proxy]]``.

    app = App()
    app.proxy("/api/", "http://127.0.0.1:9000", cache=True)

    # forkloop.toml, for any app (a forkloop App or an ASGI one)
    [[proxy]]
    prefix = "/api/"
    upstream = ["http://127.0.0.1:9000", "http://127.0.0.1:9001"]
    cache = true

One server then answers its own routes and proxies the others, as an nginx
``server`` block with a ``location /api/ { proxy_pass ...; }`` beside its own
locations. A request whose path starts with a proxied prefix (the longest
that matches) goes to that prefix's proxy (`server.proxy`, or
`server.proxy_cache` with ``cache``) with its path unchanged, as
``proxy_pass`` without a URI part; every other request to the app.

Request bodies: the app's own front door decides whether the connection
streams bodies; a forkloop `App` reads them whole, so a proxied prefix of an
App forwards each body once it has arrived (bounded by the body-size limit, as
nginx's default ``proxy_request_buffering on``). `forkloop proxy` alone streams
them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .cache import ResponseCache
from .frontdoor import DirectRoute, FrontDoor
from .http import Request, Response
from .proxy import ProxyFrontDoor
from .proxy_cache import CachingProxy, ProxyCacheSettings
from .upstream import UpstreamPool, UpstreamSettings

if TYPE_CHECKING:
    from .app import Route

ProxyDoor = ProxyFrontDoor | CachingProxy


def build_proxy(
    upstreams: list[str] | tuple[str, ...],
    settings: UpstreamSettings | None = None,
    cache: ResponseCache | None = None,
    cache_settings: ProxyCacheSettings | None = None,
) -> ProxyDoor:
    """A proxy to ``upstreams`` (round-robin), behind ``cache`` when one is given."""
    proxy = ProxyFrontDoor(UpstreamPool(list(upstreams), settings))
    if cache is None:
        return proxy
    return CachingProxy(proxy, cache, cache_settings)


class ProxyPrefixes:
    """Path prefixes, each with its proxy; the longest matching prefix wins."""

    def __init__(self) -> None:
        self.routes: list[tuple[str, ProxyDoor]] = []
        self.prefixes: tuple[str, ...] = ()

    def add(self, prefix: str, proxy: ProxyDoor) -> None:
        if not prefix.startswith("/"):
            raise ValueError(f"a proxied prefix starts with '/', not {prefix!r}")
        if any(known == prefix for known, _ in self.routes):
            raise ValueError(f"{prefix} is already proxied")
        self.routes.append((prefix, proxy))
        self.routes.sort(key=lambda route: len(route[0]), reverse=True)
        self.prefixes = tuple(prefix for prefix, _ in self.routes)

    def resolve(self, request: Request) -> Route | DirectRoute | None:
        """The proxy's route for ``request``; None when no prefix matches."""
        path = request.path
        if not path.startswith(self.prefixes):
            return None
        for prefix, proxy in self.routes:
            if path.startswith(prefix):
                return proxy.resolve(request)
        return None

    @property
    def cache_stats(self) -> dict[str, int] | None:
        totals: dict[str, int] = {}
        for _, proxy in self.routes:
            stats = proxy.cache_stats
            for name, value in (stats or {}).items():
                totals[name] = totals.get(name, 0) + value
        return totals or None

    async def shutdown(self) -> None:
        for _, proxy in self.routes:
            await proxy.shutdown()

    def __bool__(self) -> bool:
        return bool(self.routes)


class WithProxiedPrefixes:
    """Any front door (an ASGI app) with proxied prefixes in front of it: the
    ``[[proxy]]`` sections of a config file. A forkloop `App` takes them as
    ``app.proxy()`` routes instead."""

    def __init__(self, inner: Any, prefixes: ProxyPrefixes) -> None:
        self.inner: FrontDoor = inner
        self.prefixes = prefixes
        self.streams_bodies = getattr(inner, "streams_bodies", False)
        self.serves_websockets = getattr(inner, "serves_websockets", False)

    @property
    def cache_stats(self) -> dict[str, int] | None:
        own = self.inner.cache_stats
        proxied = self.prefixes.cache_stats
        if own is None or proxied is None:
            return own or proxied
        return {name: own.get(name, 0) + proxied.get(name, 0) for name in own.keys() | proxied}

    async def startup(self) -> None:
        startup = getattr(self.inner, "startup", None)
        if startup is not None:
            await startup()

    async def shutdown(self) -> None:
        shutdown = getattr(self.inner, "shutdown", None)
        if shutdown is not None:
            await shutdown()
        await self.prefixes.shutdown()

    def resolve(self, request: Request) -> Route | Response | DirectRoute:
        route = self.prefixes.resolve(request)
        return route if route is not None else self.inner.resolve(request)
