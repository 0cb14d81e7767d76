"""What the response cache may store, for how long, and under which key.

The rules every cache level applies alike, with no state and no I/O: the
response cache (`server.cache`), the caching proxy (`server.proxy_cache`) and
the tiers behind them (`server.shared_cache`, `server.fleet_cache`) store and
serve `Entry` values that these functions made and judged.

- **May it be stored?** (`may_store`, RFC 9111 3 and 3.5): a status a shared
  cache may keep (`CACHEABLE_STATUSES`), no ``no-store``, ``private`` or
  ``no-cache``, no ``Set-Cookie``, and no answer to an ``Authorization``
  request unless it says ``public``. A 5xx is never stored: the response
  cache shares it with the fill's waiters, and falls back to a stale entry.
- **For how long?** (`freshness_lifetime`, RFC 9111 4.2.1): ``s-maxage``, else
  ``max-age``, else ``Expires`` less ``Date``, else the route's `CachePolicy`
  ``ttl``; less the ``Age`` the response already had. ``stale-while-revalidate``
  and ``stale-if-error`` (RFC 5861) come from the response's ``Cache-Control``
  or else from the policy, and an `Entry` carries the moments each ends.
- **Under which key?** (`normalized_url`, `vary_key`): the percent-decoded path
  with its query parameters sorted (GET and HEAD share it), then the values of
  the request headers the stored response's ``Vary`` names (`vary_names`).
- **Refresh early?** (`xfetch_says_refresh`): XFetch (Vattani et al., VLDB
  2015) asks for a refresh before expiry with a probability that grows as the
  expiry nears and as the last computation took longer.

An `Entry` encodes its header lines once, when it is made; each hit only adds
``X-Cache`` and ``Age`` (`Entry.response`).
"""

from __future__ import annotations

import math
import random
import re
import time
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from urllib.parse import urlencode

from .http import Request, Response, content_type_line, encode_header

CACHEABLE_STATUSES = frozenset({200, 203, 204, 300, 301, 308, 404, 410})
_CACHE_STATUS_BYTES = {s: s.encode() for s in ("HIT", "MISS", "STALE", "UPDATING", "BYPASS")}


@dataclass(frozen=True)
class CachePolicy:
    """How one route is cached. Seconds throughout; 0 turns a feature off."""

    ttl: float = 0.0  # freshness when the handler sends no max-age
    stale_while_revalidate: float = 0.0
    stale_if_error: float = 0.0
    lock_timeout: float = 5.0
    hit_for_miss: float = 10.0
    xfetch_beta: float = 0.0  # 1.0 is the paper's default
    finish_abandoned_fills: bool = False
    # False: every concurrent miss computes (nginx's proxy_cache_lock off); for comparison
    single_flight: bool = True
    # a failure shared by another worker's fill with one of these statuses is answered
    # with a stale entry of any age (the proxy's --proxy-cache-use-stale)
    stale_on_statuses: frozenset[int] = frozenset()


@dataclass
class Entry:
    status: int
    headers: list[tuple[str, str]]
    content_type: str | None
    body: bytes
    stored_at: float
    fresh_until: float
    stale_while_revalidate_until: float
    stale_if_error_until: float
    compute_seconds: float
    size: int = 0
    header_block: bytes = b""  # the headers and Content-Type, validated and encoded once

    def __post_init__(self) -> None:
        self.header_block = b"".join(encode_header(n, v) for n, v in self.headers)
        if self.content_type is not None:
            self.header_block += content_type_line(self.content_type)

    def response(self, cache_status: str, now: float) -> Response:
        response = Response(self.body, self.status, None, self.content_type)
        response.encoded_headers = b"%sX-Cache: %s\r\nAge: %d\r\n" % (
            self.header_block,
            _CACHE_STATUS_BYTES[cache_status],
            now - self.stored_at,
        )
        return response

    def answer(self, request: Request, cache_status: str, now: float) -> Response:
        """The entry as the answer to ``request``: a 304 when the request's
        preconditions say the client's copy is this one (`not_modified`)."""
        if not request.conditional or not not_modified(request, self):
            return self.response(cache_status, now)
        # a 304 carries what the 200 would have of these (RFC 9110 15.4.5), no body
        response = Response(b"", 304, None, None)
        kept = b"".join(
            encode_header(name, value)
            for name, value in self.headers
            if name.lower() in _NOT_MODIFIED_FIELDS
        )
        response.encoded_headers = b"%sX-Cache: %s\r\nAge: %d\r\n" % (
            kept,
            _CACHE_STATUS_BYTES[cache_status],
            now - self.stored_at,
        )
        return response


_NOT_MODIFIED_FIELDS = frozenset({"etag", "cache-control", "expires", "vary", "content-location"})
_ENTITY_TAG = re.compile(r'(?:W/)?"[^"]*"|\*')


def not_modified(request: Request, entry: Entry) -> bool:
    """Whether ``request``'s preconditions say its client holds ``entry`` already
    (RFC 9110 13.2.2), for a 200 entry: If-None-Match by weak comparison (``*``
    matches any), else If-Modified-Since against the entry's Last-Modified."""
    if entry.status != 200 or request.method not in ("GET", "HEAD"):
        return False
    headers = request.headers
    asked = headers.get_all("if-none-match")
    if asked:
        tags = {tag.removeprefix("W/") for field in asked for tag in _ENTITY_TAG.findall(field)}
        etag = _entry_header(entry, "etag")
        return "*" in tags or (etag is not None and etag.strip().removeprefix("W/") in tags)
    since, modified = headers.get("if-modified-since"), _entry_header(entry, "last-modified")
    if since is None or modified is None:
        return False
    try:
        return parsedate_to_datetime(modified) <= parsedate_to_datetime(since)
    except (TypeError, ValueError):  # not a date, or one naive and one aware: no precondition
        return False


def _entry_header(entry: Entry, name: str) -> str | None:
    for key, value in entry.headers:
        if key.lower() == name:
            return value
    return None


def may_store(request: Request, response: Response) -> bool:
    """Whether a shared cache may keep ``response`` at all, told by its status and
    head alone (the body need not have arrived): RFC 9111 3 and 3.5."""
    if response.status not in CACHEABLE_STATUSES:
        return False
    directives = cache_control(response.header("cache-control"))
    if {"no-store", "private", "no-cache"} & directives.keys():
        return False
    # a shared cache keeps nobody's cookie, nor an answer to credentials unless
    # the answer says it is public (RFC 9111 3.5)
    if response.header("set-cookie") is not None:
        return False
    return "public" in directives or "authorization" not in request.headers


def freshness_lifetime(response: Response, default: float) -> float:
    """Seconds ``response`` stays fresh from now (RFC 9111 4.2.1): ``s-maxage``,
    else ``max-age``, else ``Expires`` less ``Date``, else ``default``; less the
    ``Age`` it already had when it came from another cache."""
    directives = cache_control(response.header("cache-control"))
    lifetime = seconds(directives.get("s-maxage"), seconds(directives.get("max-age"), -1.0))
    if lifetime < 0:
        expires = response.header("expires")
        if expires is None:
            lifetime = default
        else:
            expiry = http_date(expires)  # an invalid date means already expired
            date = http_date(response.header("date") or "") or time.time()
            lifetime = expiry - date if expiry is not None else 0.0
    return lifetime - seconds(response.header("age"), 0.0)


def http_date(value: str) -> float | None:
    try:
        return parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def vary_names(headers: list[tuple[str, str]]) -> tuple[str, ...]:
    """The request headers a stored response's Vary names, sorted and lower-case."""
    names = (value for name, value in headers if name.lower() == "vary")
    return tuple(sorted({n.strip().lower() for v in names for n in v.split(",") if n.strip()}))


def with_cache_status(response: Response, cache_status: str) -> Response:
    response.headers = [
        *(h for h in response.headers if h[0].lower() != "x-cache"),
        ("X-Cache", cache_status),
    ]
    return response


def normalized_url(request: Request) -> str:
    """Path percent-decoded, query parameters in sorted order: one key per resource."""
    if not request.query_string:
        return request.path
    pairs = sorted((k, v) for k, values in request.query.items() for v in values)
    return request.path + "?" + urlencode(pairs)


def vary_key(request: Request, vary: tuple[str, ...]) -> tuple[str | None, ...]:
    if not vary:
        return ()
    headers = request.headers
    return tuple(headers.get(name) for name in vary)


def cache_control(value: str | None) -> dict[str, str | None]:
    directives: dict[str, str | None] = {}
    if value:
        for part in value.split(","):
            name, _, argument = part.strip().partition("=")
            if name:
                directives[name.lower()] = argument.strip('"') if argument else None
    return directives


def seconds(value: str | None, default: float) -> float:
    if value is None or not (value.isascii() and value.isdigit()):
        return default
    return float(value)


def xfetch_says_refresh(entry: Entry, now: float, beta: float) -> bool:
    """XFetch: refresh early with a probability that grows as expiry nears."""
    return (
        now - entry.compute_seconds * beta * math.log(random.random() or 1e-300)
        >= entry.fresh_until
    )
