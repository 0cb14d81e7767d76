"""Routing: from a request's method and path to a handler.

    app = App()

    @app.get("/items/{item_id}")
    async def show_item(request: Request) -> Response:
        return Response.json({"id": request.params["item_id"]})

A handler is either an ``async def`` (it may await; it runs as a task) or a
plain ``def`` that returns at once (it runs inline on the event loop, the
cheapest path: no task, no coroutine; it must not block). Either returns a
`Response` (or str / bytes / dict / list, converted). A plain handler may also
return an awaitable when it cannot answer at once: that one is then awaited
in a task. The response cache works this way: hits inline, misses in a task.

Static paths are one dict lookup; paths with ``{name}`` or ``{name:path}``
placeholders are tried in the order they were added. A GET route answers HEAD
too. An unknown path is 404; a known path with another method is 405 with an
``Allow`` header.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .cache import CachePolicy, ResponseCache
from .http import Request, Response, error_response

if TYPE_CHECKING:
    from .frontdoor import DirectRoute
    from .instant import InstantAnswers
    from .proxy_cache import ProxyCacheSettings
    from .proxy_routes import ProxyPrefixes
    from .upstream import UpstreamSettings

Handler = Callable[[Request], Any] | Callable[[Request], Awaitable[Any]]

_PLACEHOLDER = re.compile(r"{([A-Za-z_][A-Za-z0-9_]*)(?::(path))?}")


@dataclass(frozen=True)
class Route:
    """One handler for one method on one path pattern."""

    path: str
    method: str
    handler: Handler
    is_async: bool
    options: dict[str, Any]


@dataclass(frozen=True)
class _Pattern:
    regex: re.Pattern[str]
    routes: dict[str, Route]


class App:
    """A set of routes. Call `resolve()` to find the route for a request."""

    def __init__(self, cache: ResponseCache | None = None) -> None:
        self._cache = cache
        self._static: dict[str, dict[str, Route]] = {}
        # the same tables keyed by the raw request target, for targets that need no
        # decoding (no query, no percent-escapes): the common case costs one lookup
        self._static_raw: dict[bytes, dict[str, Route]] = {}
        self._patterns: dict[str, _Pattern] = {}
        self._proxied: ProxyPrefixes | None = None  # app.proxy(): prefixes sent upstream

    def route(
        self, path: str, methods: tuple[str, ...] | list[str] = ("GET",), **options: Any
    ) -> Callable[[Handler], Handler]:
        """Register a handler; ``options`` are kept on the `Route` for middleware to read."""
        if not path.startswith("/"):
            raise ValueError(f"route path {path!r} must start with '/'")

        policy = options.get("cache")
        if policy is not None and not isinstance(policy, CachePolicy):
            raise TypeError(f"cache= takes a CachePolicy, not {type(policy).__name__}")

        def register(handler: Handler) -> Handler:
            serving = handler if policy is None else self.cache.wrap(handler, policy)
            is_async = inspect.iscoroutinefunction(serving)
            table = self._table_for(path)
            for method in methods:
                method = method.upper()
                if method in table:
                    raise ValueError(f"{method} {path} is already routed")
                table[method] = Route(path, method, serving, is_async, dict(options))
            return handler

        return register

    def _table_for(self, path: str) -> dict[str, Route]:
        if not _PLACEHOLDER.search(path):
            table = self._static.setdefault(path, {})
            if path.isascii() and "%" not in path and "?" not in path:
                self._static_raw[path.encode()] = table
            return table
        pattern = self._patterns.get(path)
        if pattern is None:
            pattern = _Pattern(re.compile(_compile(path)), {})
            self._patterns[path] = pattern
        return pattern.routes

    def proxy(
        self,
        prefix: str,
        *upstreams: str,
        cache: bool | ProxyCacheSettings = False,
        settings: UpstreamSettings | None = None,
    ) -> None:
        """Send requests under ``prefix`` to ``upstreams`` (round-robin), path
        unchanged, for paths no route of this app matches (`server.proxy_routes`);
        ``cache=True`` (or `ProxyCacheSettings`) puts this app's cache in front."""
        from .proxy_cache import ProxyCacheSettings
        from .proxy_routes import ProxyPrefixes, build_proxy

        if not upstreams:
            raise ValueError(f"app.proxy({prefix!r}) needs at least one upstream URL")
        if self._proxied is None:
            self._proxied = ProxyPrefixes()
        cache_settings = cache if isinstance(cache, ProxyCacheSettings) else None
        response_cache = self.cache if cache else None
        self._proxied.add(prefix, build_proxy(upstreams, settings, response_cache, cache_settings))

    async def shutdown(self) -> None:
        """Close the proxied prefixes' upstream connections."""
        if self._proxied is not None:
            await self._proxied.shutdown()

    @property
    def cache(self) -> ResponseCache:
        """The response cache shared by this app's cached routes (made on first use)."""
        if self._cache is None:
            self._cache = ResponseCache()
        return self._cache

    @property
    def instant_answers(self) -> InstantAnswers | None:
        """The cached routes' fresh hits, ready for the parser to answer (`server.instant`)."""
        return self._cache.instant if self._cache is not None else None

    @property
    def cache_stats(self) -> dict[str, int] | None:
        return self._cache.stats.as_dict() if self._cache is not None else None

    def get(self, path: str, **options: Any) -> Callable[[Handler], Handler]:
        return self.route(path, ("GET",), **options)

    def post(self, path: str, **options: Any) -> Callable[[Handler], Handler]:
        return self.route(path, ("POST",), **options)

    def put(self, path: str, **options: Any) -> Callable[[Handler], Handler]:
        return self.route(path, ("PUT",), **options)

    def patch(self, path: str, **options: Any) -> Callable[[Handler], Handler]:
        return self.route(path, ("PATCH",), **options)

    def delete(self, path: str, **options: Any) -> Callable[[Handler], Handler]:
        return self.route(path, ("DELETE",), **options)

    def resolve(self, request: Request) -> Route | Response | DirectRoute:
        """The route for ``request`` (its ``params`` filled in), or a 404/405 response."""
        routes = self._static_raw.get(request.target)
        if routes is not None:
            route = routes.get(request.method)
            if route is not None:
                return route
        path = request.path
        routes = self._static.get(path)
        if routes is None:
            for pattern in self._patterns.values():
                match = pattern.regex.fullmatch(path)
                if match is not None:
                    routes = pattern.routes
                    request.params = match.groupdict()
                    break
            else:
                proxied = self._proxied
                if proxied is not None:  # no route of its own: a proxied prefix, maybe
                    proxy_route = proxied.resolve(request)
                    if proxy_route is not None:
                        return proxy_route
                return error_response(404, f"no route for {path}")
        route = routes.get(request.method)
        if route is None and request.method == "HEAD":
            route = routes.get("GET")
        if route is None:
            allowed = sorted(set(routes) | ({"HEAD"} if "GET" in routes else set()))
            response = error_response(405, f"{request.method} is not allowed on {path}")
            response.headers.append(("Allow", ", ".join(allowed)))
            return response
        return route


def _compile(path: str) -> str:
    parts = []
    position = 0
    for match in _PLACEHOLDER.finditer(path):
        parts.append(re.escape(path[position : match.start()]))
        name, kind = match.group(1), match.group(2)
        parts.append(f"(?P<{name}>.+)" if kind == "path" else f"(?P<{name}>[^/]+)")
        position = match.end()
    parts.append(re.escape(path[position:]))
    return "".join(parts)


def import_app(spec: str, factory: bool = False) -> App:
    """``"package.module:attribute"`` → the App it names; see `server.apploader`."""
    from .apploader import import_app as load

    app: App = load(spec, factory)
    return app
