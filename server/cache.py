"""The response cache: fresh hits inline, misses computed once (single-flight).

    app = App()

    @app.get("/report/{name}", cache=CachePolicy(ttl=30, stale_while_revalidate=10))
    async def report(request): ...

How a GET or HEAD request goes through it
------------------------------------------
The key is the normalized URL (percent-decoded path, query parameters sorted;
GET and HEAD share it) plus the values of the request headers that the
response's ``Vary`` named. Then:

- **fresh entry**: served at once, inline, without a task (``X-Cache: HIT``).
  With XFetch on (``xfetch_beta > 0``), a hit close to expiry may also start a
  background refresh early (Vattani et al., VLDB 2015): the closer the expiry
  and the longer the last computation took, the likelier.
- **stale, within stale-while-revalidate**: the stale entry is served at once
  (``STALE`` to the request that starts the refresh, ``UPDATING`` while it
  runs) and exactly one background refresh runs (RFC 5861).
- **miss** (or stale beyond that): the handler runs under `SingleFlight`, so N
  concurrent misses make one call. The leader gets ``MISS``; the followers, who
  waited instead of computing, get ``HIT`` and count as *coalesced*. A
  follower that has waited ``lock_timeout`` seconds (nginx's
  ``proxy_cache_lock_timeout``) computes for itself; that result is not
  stored. When the computation fails (raises, or answers 5xx) and a stale entry
  is still within ``stale-if-error``, the stale entry is served (``STALE``).
- **uncacheable** (``no-store``, ``private``, ``no-cache``, a ``Set-Cookie``, an
  answer to an ``Authorization`` request not marked ``public``, a streamed body,
  a status not cached, no freshness): the leader's response goes to the leader
  only; followers compute for themselves (a private page must never reach
  another client), and the key is remembered as uncacheable for
  ``hit_for_miss`` seconds, during which requests skip single-flight (Varnish's
  hit-for-miss) and get ``BYPASS``. Other methods get ``BYPASS`` too.

Levels
------
This cache is a worker's first level: a hit here costs no IPC. When the
server runs a shared tier (``--shared-cache on``: `server.shared_cache`, a
connection to the cache process the master supervises), a miss's single
leader in this worker asks it first: an entry another worker filled is a
``HIT`` here (and kept locally); a key another worker is filling makes this
worker wait for that fill, notified when it ends; otherwise this worker holds
the server's one lease for the key, computes, and shares the result. A fill
that fails (raises, or answers 5xx) is shared too, as a failure: its waiters
in every worker get its error once (or their stale entry within
``stale-if-error``) and compute nothing; nothing is stored. Behind the
server's tier there may be the fleet's (``--cache-url``: `server.fleet_cache`,
a Redis store several servers share), asked by the holder of the server's
lease; `server.cache_levels` stacks them, and ``shared_tier()`` returns the
stack. A request never knows how many levels there are; the counters do
(``shared_hits``, ``shared_coalesced``, ``takeovers``, ``fallbacks``, and the
fleet's own).

Freshness comes from the handler's ``Cache-Control`` (``s-maxage`` over
``max-age``; ``stale-while-revalidate`` and ``stale-if-error`` likewise) or
else from the route's policy: those rules, what may be stored and the key are
`server.freshness`; this module is the flow. Storage is an LRU bounded by
total bytes.

Cancellation through the cache
------------------------------
A cancelled request that was waiting on a fill just leaves. When the last
request interested in a fill leaves, the fill is cancelled (load shedding:
clients that gave up cost nothing more), unless the route says
``finish_abandoned_fills=True`` (as nginx keeps a cacheable upstream fetch
alive after a client abort): then the fill completes and its result is
stored for the next request. Background refreshes are never tied to a client
and always finish.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from . import cache_levels, purges, shared_cache
from .freshness import (
    CachePolicy,
    Entry,
    cache_control,
    freshness_lifetime,
    may_store,
    normalized_url,
    seconds,
    vary_key,
    vary_names,
    with_cache_status,
    xfetch_says_refresh,
)
from .http import Request, Response, as_response, error_response
from .instant import InstantAnswers
from .singleflight import SingleFlight

__all__ = [  # the rules live in server.freshness; importers of this module find them here
    "CachePolicy",
    "CacheStats",
    "Entry",
    "FillFailed",
    "ResponseCache",
    "freshness_lifetime",
    "inspect_awaitable",
    "may_store",
    "normalized_url",
]

log = logging.getLogger("forkloop.cache")

ENTRY_OVERHEAD = 256  # bytes counted per entry beyond its body and headers
MAX_NORMALIZED = 65536  # remembered target -> key normalizations (cleared when full)


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    stale: int = 0
    updating: int = 0
    bypass: int = 0
    coalesced: int = 0
    computations: int = 0
    refreshes: int = 0
    evictions: int = 0
    lock_timeouts: int = 0
    # the server-wide tier (server.shared_cache): hits found there, fills another
    # worker did while this one waited, fills taken over from a worker that left or
    # died, and fills done alone because the tier was unavailable
    shared_hits: int = 0
    shared_coalesced: int = 0
    takeovers: int = 0
    fallbacks: int = 0
    shared_failures: int = 0  # fills that failed in another worker: their error served here

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class _Variants:
    """Every stored variant of one URL, and the request headers its Vary names."""

    vary: tuple[str, ...] = ()
    entries: dict[tuple[str | None, ...], Entry] = field(default_factory=dict)
    uncacheable_until: float = 0.0


@dataclass(frozen=True)
class _FromSharedTier:
    """A fill answered by the server-wide tier: another worker computed it."""

    entry: Entry


class FillFailed(Exception):
    """A fill that failed with an answer to give (an upstream's 502, 504 or 5xx):
    its waiters get ``response`` once, or a stale entry instead when one is still
    within ``stale-if-error`` (any stale entry, with ``use_stale``: nginx's
    ``proxy_cache_use_stale``). Nothing is stored."""

    def __init__(self, response: Response, use_stale: bool = False) -> None:
        super().__init__(f"{response.status}")
        self.response = response
        self.use_stale = use_stale


@dataclass(frozen=True)
class _Uncacheable:
    """A fill result that must not be shared or stored."""

    response: Response


Handler = Callable[[Request], Any]


class ResponseCache:
    """An LRU of responses bounded by bytes, shared by every cached route of an app."""

    def __init__(
        self,
        max_bytes: int = 64 * 1024 * 1024,
        clock: Callable[[], float] = time.monotonic,
        shared_tier: Callable[[], cache_levels.Level | None] = cache_levels.current,
    ):
        self.max_bytes = max_bytes
        self.clock = clock
        self.shared_tier = shared_tier  # the levels behind this one (server, fleet), if any
        self.size = 0
        self.stats = CacheStats()
        self._urls: OrderedDict[str, _Variants] = OrderedDict()
        self._flights = SingleFlight()
        self._background: set[asyncio.Task[Any]] = set()
        self._normalized: dict[bytes, str] = {}  # raw request target -> normalized URL
        self._refreshing: set[tuple[str, tuple[str | None, ...]]] = set()
        # fresh hits kept ready to write, for the parser to answer (server.instant)
        self.instant = InstantAnswers(self._holds, self.stats, clock)

    # ------------------------------------------------------------------ the route wrapper

    def wrap(self, handler: Handler, policy: CachePolicy) -> Callable[[Request], Any]:
        """A plain handler: a Response for hits, an awaitable for the rest."""

        def cached(request: Request) -> Response | Awaitable[Response]:
            return self.serve(request, handler, policy)

        cached.__name__ = getattr(handler, "__name__", "cached")
        return cached

    def serve(
        self, request: Request, handler: Handler, policy: CachePolicy
    ) -> Response | Awaitable[Response]:
        if request.method not in ("GET", "HEAD"):
            self.stats.bypass += 1
            return self._bypass(request, handler)
        url = self._normalized.get(request.target)
        if url is None:
            url = normalized_url(request)
            if len(self._normalized) >= MAX_NORMALIZED:
                self._normalized.clear()
            self._normalized[request.target] = url
        now = self.clock()
        variants = self._urls.get(url)
        if variants is not None:
            self._urls.move_to_end(url)
            if variants.uncacheable_until > now:
                self.stats.bypass += 1
                return self._bypass(request, handler)
            entry = variants.entries.get(vary_key(request, variants.vary))
            board = purges.BOARD
            if entry is not None and board is not None and board.purged_since(url, entry.stored_at):
                self._forget_url(url)  # purged in another worker (server.purges)
                entry = None
            if entry is not None:
                if now < entry.fresh_until:
                    if policy.xfetch_beta:
                        if xfetch_says_refresh(entry, now, policy.xfetch_beta):
                            self._refresh_in_background(url, request, handler, policy)
                    elif not variants.vary and self.instant.enabled:
                        self.instant.offer(request.target, request.method, url, entry)
                    self.stats.hits += 1
                    return entry.answer(request, "HIT", now)
                if now < entry.stale_while_revalidate_until:
                    started = self._refresh_in_background(url, request, handler, policy)
                    if started:
                        self.stats.stale += 1
                        return entry.answer(request, "STALE", now)
                    self.stats.updating += 1
                    return entry.answer(request, "UPDATING", now)
        return self._miss(url, request, handler, policy)

    # ------------------------------------------------------------------ misses

    async def _miss(
        self, url: str, request: Request, handler: Handler, policy: CachePolicy
    ) -> Response:
        if not policy.single_flight:
            value = await self._compute_and_store(url, request, handler, policy)
            self.stats.misses += 1
            if isinstance(value, _Uncacheable):
                return with_cache_status(value.response, "MISS")
            return value.answer(request, "MISS", self.clock())
        key = self._flight_key(url, request)
        joining = key in self._flights
        try:
            if joining and policy.lock_timeout:
                async with asyncio.timeout(policy.lock_timeout):
                    result = await self._flights.do_with_info(
                        key,
                        lambda: self._fill(url, request, handler, policy),
                        finish_if_abandoned=policy.finish_abandoned_fills,
                    )
            else:
                result = await self._flights.do_with_info(
                    key,
                    lambda: self._fill(url, request, handler, policy),
                    finish_if_abandoned=policy.finish_abandoned_fills,
                )
        except TimeoutError:
            self.stats.lock_timeouts += 1
            log.info(
                "waited %ss for the fill of %s: computing without storing", policy.lock_timeout, url
            )
            return await self._compute_alone(request, handler, "MISS")
        except FillFailed as failure:
            stale = self._stale_for_error(url, request, any_age=failure.use_stale)
            if stale is not None:
                return stale
            self.stats.misses += 1
            return with_cache_status(failure.response, "MISS")
        except Exception:
            stale = self._stale_for_error(url, request)
            if stale is not None:
                return stale
            raise
        if isinstance(result.value, _FromSharedTier):
            self.stats.coalesced += result.coalesced
            self.stats.hits += 1
            return result.value.entry.answer(request, "HIT", self.clock())
        value = result.value
        if isinstance(value, _Uncacheable):
            if result.coalesced:  # never share what was not meant to be shared
                return await self._compute_alone(request, handler, "BYPASS")
            self.stats.misses += 1
            return with_cache_status(value.response, "MISS")
        if value.status >= 500:
            stale = self._stale_for_error(url, request)
            if stale is not None:
                return stale
        if result.coalesced:
            self.stats.coalesced += 1
            self.stats.hits += 1
            return value.answer(request, "HIT", self.clock())
        self.stats.misses += 1
        return value.answer(request, "MISS", self.clock())

    async def _fill(
        self,
        url: str,
        request: Request,
        handler: Handler,
        policy: CachePolicy,
    ) -> Entry | _Uncacheable | _FromSharedTier:
        """Fill the key once for the server: from the shared tier, or by running the
        handler once and storing what it gave, if it may be stored."""
        tier = self.shared_tier()
        lease: cache_levels.TierLease | None = None
        if tier is not None:
            got = await tier.acquire(url.encode(), policy.lock_timeout)
            if isinstance(got, shared_cache.Varies):  # ask for this request's variant
                variant = shared_cache.variant_key(url, vary_key(request, got.vary))
                got = await tier.acquire(variant, policy.lock_timeout)
                if isinstance(got, shared_cache.Varies):
                    got = shared_cache.ALONE  # a marker where a variant belongs
            if isinstance(got, shared_cache.Uncacheable):  # hit-for-miss, server-wide
                variants = self._urls.setdefault(url, _Variants())
                variants.uncacheable_until = max(variants.uncacheable_until, got.until)
                self.instant.changes += 1
                got = shared_cache.ALONE
            if isinstance(got, shared_cache.Hit):
                if got.waited:
                    self.stats.shared_coalesced += 1
                    self.stats.coalesced += 1
                else:
                    self.stats.shared_hits += 1
                vary = vary_names(got.entry.headers)
                self._keep(url, vary_key(request, vary), vary, got.entry)
                return _FromSharedTier(got.entry)
            if isinstance(got, shared_cache.Failed):  # its error, once: nobody here computes
                self.stats.shared_failures += 1
                entry = got.entry
                raise FillFailed(
                    Response(entry.body, entry.status, entry.headers, entry.content_type),
                    use_stale=entry.status in policy.stale_on_statuses,
                )
            if cache_levels.is_lease(got):
                lease = got
                self.stats.takeovers += got.took_over
            elif got is shared_cache.FALLBACK:
                self.stats.fallbacks += 1
        if lease is None:
            return await self._compute_and_store(url, request, handler, policy)
        return await self._fill_for_the_server(url, request, handler, policy, lease)

    async def _fill_for_the_server(
        self,
        url: str,
        request: Request,
        handler: Handler,
        policy: CachePolicy,
        lease: cache_levels.TierLease,
    ) -> Entry | _Uncacheable:
        """Compute under the server's lease and share the result. When this worker's
        own requests all leave while other workers wait, the computation runs on for
        them; it is cancelled when they have all left too (`server.shared_cache`)."""
        work = asyncio.get_running_loop().create_task(
            self._compute_and_store(url, request, handler, policy)
        )
        work.add_done_callback(partial(_end_lease, lease, self.stats, url, request, policy))
        try:
            return await asyncio.shield(work)
        except asyncio.CancelledError:
            if not work.done():
                if lease.others_waiting:
                    lease.on_abandoned = work.cancel
                    self._background.add(work)
                    work.add_done_callback(self._background.discard)
                else:
                    work.cancel()
            raise

    async def _compute_and_store(
        self, url: str, request: Request, handler: Handler, policy: CachePolicy
    ) -> Entry | _Uncacheable:
        started = self.clock()
        self.stats.computations += 1
        response = await _call(handler, request)
        now = self.clock()
        entry = self._entry_for(request, response, policy, now, now - started)
        if entry is None:
            variants = self._urls.setdefault(url, _Variants())
            variants.uncacheable_until = now + policy.hit_for_miss
            self.instant.changes += 1
            return _Uncacheable(response)
        if response.status < 500:
            self._store(url, request, response, entry)
        # A 5xx is shared with the waiters (an error page is nobody's secret) but never
        # stored; _miss falls back to a stale entry within stale-if-error.
        return entry

    def _entry_for(
        self, request: Request, response: Response, policy: CachePolicy, now: float, took: float
    ) -> Entry | None:
        if response.stream is not None:
            return None
        if response.status >= 500:  # shared with the waiters, never stored
            directives, ttl = {}, 0.0
        else:
            if not may_store(request, response):
                return None
            directives = cache_control(response.header("cache-control"))
            ttl = freshness_lifetime(response, policy.ttl)
            if ttl <= 0:
                return None
        swr = seconds(directives.get("stale-while-revalidate"), policy.stale_while_revalidate)
        sie = seconds(directives.get("stale-if-error"), policy.stale_if_error)
        headers = [(n, v) for n, v in response.headers if n.lower() not in ("x-cache", "age")]
        return Entry(
            response.status,
            headers,
            response.content_type,
            response.body,
            now,
            now + ttl,
            now + ttl + swr,
            now + ttl + sie,
            took,
        )

    def _store(self, url: str, request: Request, response: Response, entry: Entry) -> None:
        vary = vary_names(response.headers)
        if "*" in vary:
            return
        self._keep(url, vary_key(request, vary), vary, entry)

    def _keep(
        self, url: str, key: tuple[str | None, ...], vary: tuple[str, ...], entry: Entry
    ) -> None:
        variants = self._urls.get(url)
        if variants is None or variants.vary != vary:
            if variants is not None:
                self._forget_url(url)
            variants = self._urls[url] = _Variants(vary)
        self.instant.changes += 1  # ready answers check their entry again
        variants.uncacheable_until = 0.0
        old = variants.entries.get(key)
        if old is not None:
            self.size -= old.size
        entry.size = (
            len(entry.body) + sum(len(n) + len(v) for n, v in entry.headers) + ENTRY_OVERHEAD
        )
        variants.entries[key] = entry
        self._urls.move_to_end(url)
        self.size += entry.size
        while self.size > self.max_bytes and self._urls:
            oldest = next(iter(self._urls))
            self._forget_url(oldest)
            self.stats.evictions += 1

    def _forget_url(self, url: str) -> None:
        self.instant.changes += 1
        variants = self._urls.pop(url)
        self.size -= sum(entry.size for entry in variants.entries.values())

    # ------------------------------------------------------------------ stale and background

    def _refresh_in_background(
        self, url: str, request: Request, handler: Handler, policy: CachePolicy
    ) -> bool:
        """Start the one refresh for this key; False when one is already running."""
        key = self._flight_key(url, request)
        if key in self._flights or key in self._refreshing:
            return False
        self.stats.refreshes += 1
        self._refreshing.add(key)  # now, not when the task first runs: one refresh per key

        async def refresh() -> None:
            try:
                await self._flights.do(
                    key, lambda: self._fill(url, request, handler, policy), finish_if_abandoned=True
                )
            except Exception as exc:  # the stale entry stays; the next request tries again
                log.warning("background refresh of %s failed: %s", url, exc)
            finally:
                self._refreshing.discard(key)

        task = asyncio.get_running_loop().create_task(refresh())
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return True

    def _stale_for_error(
        self, url: str, request: Request, any_age: bool = False
    ) -> Response | None:
        variants = self._urls.get(url)
        if variants is None:
            return None
        entry = variants.entries.get(vary_key(request, variants.vary))
        now = self.clock()
        if entry is None or (now >= entry.stale_if_error_until and not any_age):
            return None
        self.stats.stale += 1
        return entry.answer(request, "STALE", now)

    # ------------------------------------------------------------------ instant answers

    def _holds(self, url: str, entry: Entry) -> bool:
        """Whether ``entry`` is still what is stored for ``url`` (a hit on it counts
        as use, for the LRU)."""
        variants = self._urls.get(url)
        if variants is None or variants.vary or variants.entries.get(()) is not entry:
            return False
        if variants.uncacheable_until and variants.uncacheable_until > self.clock():
            return False  # hit-for-miss now: the usual way bypasses the entry
        self._urls.move_to_end(url)
        return True

    # ------------------------------------------------------------------ for fillers

    def stored(self, request: Request) -> Entry | None:
        """What is stored for ``request``, fresh or stale: a filler that can
        revalidate (the proxy, with the entry's ``ETag``) asks for it."""
        variants = self._urls.get(normalized_url(request))
        if variants is None:
            return None
        return variants.entries.get(vary_key(request, variants.vary))

    def purge(self, url: str) -> bool:
        """Forget every variant stored for the normalized ``url``; False if none was."""
        if url not in self._urls:
            return False
        self._forget_url(url)
        return True

    # ------------------------------------------------------------------ helpers

    def _flight_key(self, url: str, request: Request) -> tuple[str, tuple[str | None, ...]]:
        variants = self._urls.get(url)
        return (url, vary_key(request, variants.vary) if variants is not None else ())

    async def _bypass(self, request: Request, handler: Handler) -> Response:
        return with_cache_status(await _call(handler, request), "BYPASS")

    async def _compute_alone(
        self, request: Request, handler: Handler, cache_status: str
    ) -> Response:
        self.stats.computations += 1
        if cache_status == "BYPASS":
            self.stats.bypass += 1
        else:
            self.stats.misses += 1
        return with_cache_status(await _call(handler, request), cache_status)

    @property
    def waiting(self) -> int:
        """Requests that joined a running fill so far (single-flight followers)."""
        return self._flights.stats.followers

    def __len__(self) -> int:
        return sum(len(variants.entries) for variants in self._urls.values())


async def _call(handler: Handler, request: Request) -> Response:
    result = handler(request)
    if inspect_awaitable(result):
        result = await result
    return as_response(result)


def inspect_awaitable(value: Any) -> bool:
    return hasattr(value, "__await__")


def _end_lease(
    lease: cache_levels.TierLease,
    stats: CacheStats,
    url: str,
    request: Request,
    policy: CachePolicy,
    work: asyncio.Task[Entry | _Uncacheable],
) -> None:
    """Share what the work gave, or say why not (a lease always ends exactly once)."""
    if work.cancelled():
        lease.release()  # the fill passes to a waiter elsewhere, if one is left
        return
    error = work.exception()
    value = None if error is not None else work.result()
    failure = _failure_for_the_waiters(error, value)
    if failure is not None:  # every waiter elsewhere gets it once; nothing is stored
        lease.error(failure)
        return
    if isinstance(value, _Uncacheable) and policy.hit_for_miss and lease.key == url.encode():
        # remembered server-wide: nobody waits on a lease for it meanwhile
        until = time.monotonic() + policy.hit_for_miss
        lease.store_encoded(shared_cache.encode_uncacheable_marker(until))
        return
    # not shareable (uncacheable, Vary: *, too big): waiters compute alone
    if not isinstance(value, Entry) or value.status >= 500 or value.size == 0:
        lease.fail()
        return
    vary = vary_names(value.headers)
    if not vary:
        lease.store(value)
        return
    # the variant first, then the marker: a waiter woken by the marker finds the variant
    variant = shared_cache.variant_key(url, vary_key(request, vary))
    entry = shared_cache.encode_entry(value)
    marker = shared_cache.encode_vary_marker(vary, value.fresh_until)
    if lease.key == variant:
        lease.store_encoded(entry)
        lease.tier.keep(url.encode(), marker)
    else:
        lease.tier.keep(variant, entry)
        lease.store_encoded(marker)


def _failure_for_the_waiters(error: BaseException | None, value: object) -> Entry | None:
    """The error a failed fill's waiters in other workers get: the 5xx it answered,
    the answer its `FillFailed` carried, or the 500 of a handler that raised."""
    if isinstance(value, Entry):
        return value if value.status >= 500 else None
    if error is None:
        return None
    response = (
        error.response
        if isinstance(error, FillFailed)
        else error_response(500, "the handler raised an exception")
    )
    if response.stream is not None:
        return None  # a streamed error cannot be copied: the waiters compute alone
    now = time.monotonic()
    headers = [(n, v) for n, v in response.headers if n.lower() not in ("x-cache", "age")]
    return Entry(
        response.status, headers, response.content_type, response.body, now, now, now, now, 0
    )
