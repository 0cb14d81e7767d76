"""``/metrics``: the server's counters in Prometheus' text format.

Three parts, one per process role:

* `RequestMetrics` lives in each worker. The connection layer reports every
  response once (through `server.logs.AccessLog.write`, which measures its
  latency); `observe` turns it into a few list increments: responses by method and status, and the
  latency histogram. The worker publishes them with its other counters on its
  heartbeat, into its scoreboard slot (`server.scoreboard` names every
  counter, once).
* `MeteredFrontDoor` wraps the app's front door (`server.frontdoor`: a
  forkloop `App` or an ASGI app) in each worker: it stamps each request with
  the moment it was dispatched (what the latency is measured from) and
  answers the health path (``--health-path``, ``/healthz`` by default) before
  the app sees it, so every app kind answers it alike. Its `startup` (an ASGI
  lifespan) runs once, when the worker boots, before it says it is ready.
* `metrics_app` is what every worker serves on the ``--metrics-bind``
  socket, a listener of its own that the master binds like the others (off
  the app's port, so a scrape never queues behind app traffic and the app's
  port never exposes metrics). Any worker can answer a scrape: it renders the
  totals over the whole server from the scoreboard, its own live counters in
  place of its last publish.

The exposition is written by the maintained ``prometheus_client`` library
(`generate_latest` over a custom collector), not by hand: escaping, the
``# HELP``/``# TYPE`` lines, histogram ``_bucket``/``_sum``/``_count``
series and the content type are the library's, and follow the format when it
changes. Only the numbers are forkloop's.

Invariants: every counter here only grows (except the ``open_connections``
and ``workers`` gauges), across worker restarts too, because reaped workers'
counters are folded into the scoreboard's retired slot, and a worker that
answers a scrape publishes its own counters as it shows them (a worker killed
before its next heartbeat cannot take back what a scrape has seen). A scrape
is as fresh as each other worker's last heartbeat (a second by default).
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from .http import Request, Response
from .scoreboard import (
    CACHE_COUNTERS,
    CANCEL_REASONS,
    LATENCY_BUCKETS,
    LATENCY_COUNTERS,
    METHODS,
    RESPONSE_COUNTERS,
    RESTART_REASONS,
    STATUSES,
)

if TYPE_CHECKING:
    from .app import App, Route
    from .frontdoor import DirectRoute, FrontDoor

Totals = Callable[[], dict[str, int]]

_OTHER_METHOD = len(METHODS) - 1
_METHOD_ROWS = {method: row for row, method in enumerate(METHODS[:-1])}
# status -> column in STATUSES: its own, or its class's ("4xx")
_STATUS_COLUMNS = [0] * 600
for _status in range(100, 600):
    _label = str(_status)
    _STATUS_COLUMNS[_status] = (
        STATUSES.index(_label) if _label in STATUSES else STATUSES.index(f"{_status // 100}xx")
    )
_FIRST_LATENCY = len(RESPONSE_COUNTERS)


class RequestMetrics:
    """One worker's responses by method and status, and their latencies."""

    __slots__ = ("values", "latency_sum")

    def __init__(self) -> None:
        self.values = [0] * (len(RESPONSE_COUNTERS) + len(LATENCY_BUCKETS) + 1)
        self.latency_sum = 0.0

    def observe(self, request: Request | None, status: int, seconds: float | None) -> None:
        """Count one response; ``seconds`` since its dispatch (None: never dispatched)."""
        # None: refused before it was a request (400, 413 on the head, 503)
        self.observe_method("" if request is None else request.method, status, seconds)

    def observe_method(self, method: str, status: int, seconds: float | None) -> None:
        """Count one response to ``method`` (an instant answer has no `Request`)."""
        row = _METHOD_ROWS.get(method, _OTHER_METHOD)
        column = _STATUS_COLUMNS[status] if 100 <= status < 600 else len(STATUSES) - 1
        values = self.values
        values[row * len(STATUSES) + column] += 1
        if seconds is not None:
            values[_FIRST_LATENCY + bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
            self.latency_sum += seconds

    def counters(self) -> dict[str, int]:
        """Named as the scoreboard names them."""
        counters = dict(zip(RESPONSE_COUNTERS + LATENCY_COUNTERS[:-1], self.values, strict=True))
        counters["latency_sum_microseconds"] = int(self.latency_sum * 1_000_000)
        return counters


class MeteredFrontDoor:
    """The app's front door as the connection sees it: health path first, a dispatch stamp."""

    def __init__(self, app: FrontDoor, health_path: str = "/healthz", stamp: bool = True) -> None:
        self.app = app
        self.health_path = health_path.encode() if health_path else None
        self.started = False
        # What runs per request is picked once: with nobody to read the dispatch stamp
        # (no metrics, no access log) and no health path, the app's own resolve.
        self.resolve: Callable[[Request], Route | Response | DirectRoute]
        if stamp:
            self.resolve = self._stamp_and_resolve
        elif self.health_path is not None:
            self.resolve = self._resolve
        else:
            self.resolve = app.resolve

    @property
    def cache_stats(self) -> dict[str, int] | None:
        return self.app.cache_stats

    def _stamp_and_resolve(self, request: Request) -> Route | Response | DirectRoute:
        request.dispatched_at = time.perf_counter()  # type: ignore[attr-defined]
        return self._resolve(request)

    def _resolve(self, request: Request) -> Route | Response | DirectRoute:
        if request.target == self.health_path and request.method in ("GET", "HEAD"):
            return Response(b"ok\n")
        return self.app.resolve(request)

    async def startup(self) -> None:
        """The app's start-up (an ASGI lifespan), once: the worker runs it as it boots."""
        if not self.started:
            self.started = True
            from .frontdoor import start_front_door

            await start_front_door(self.app)

    async def shutdown(self) -> None:
        from .frontdoor import stop_front_door

        await stop_front_door(self.app)

    def __getattr__(self, name: str) -> Any:  # cache, route(): the app's
        return getattr(self.app, name)


# ---------------------------------------------------------------------- exposition


def metrics_app(totals: Totals) -> App:
    """The app every worker serves on the metrics socket: ``/metrics`` and nothing else."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    from prometheus_client.registry import CollectorRegistry

    from .app import App

    registry = CollectorRegistry(auto_describe=False)
    registry.register(ScoreboardCollector(totals))
    app = App()

    @app.get("/metrics")
    def metrics(request: Request) -> Response:
        return Response(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)

    return app


class ScoreboardCollector:
    """Builds the metric families from the server-wide totals at each scrape."""

    def __init__(self, totals: Totals) -> None:
        self.totals = totals

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        totals = self.totals()
        requests = CounterMetricFamily(
            "forkloop_http_responses",
            "HTTP responses sent, by request method and status (a status without a series "
            "of its own is counted in its class, 4xx)",
            labels=("method", "status"),
        )
        for method in METHODS:
            for status in STATUSES:
                value = totals.get(f"http_{method}_{status}", 0)
                if value:
                    requests.add_metric((method, status), value)
        yield requests
        yield CounterMetricFamily(
            "forkloop_http_requests", "requests dispatched to the app", totals.get("requests", 0)
        )
        buckets = []
        cumulative = 0
        for index, bound in enumerate((*LATENCY_BUCKETS, float("inf"))):
            cumulative += totals.get(f"latency_bucket_{index}", 0)
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
        yield HistogramMetricFamily(
            "forkloop_http_request_duration_seconds",
            "seconds from a request's dispatch to its response",
            buckets=buckets,
            sum_value=totals.get("latency_sum_microseconds", 0) / 1_000_000,
        )
        yield GaugeMetricFamily(
            "forkloop_open_connections", "client connections open now", totals.get(
                "open_connections", 0)
        )  # fmt: skip
        yield CounterMetricFamily(
            "forkloop_connections", "client connections accepted", totals.get(
                "connections_total", 0)
        )  # fmt: skip
        yield CounterMetricFamily(
            "forkloop_requests_rejected",
            "requests refused for their framing or size (400, 413, 414, 431)",
            totals.get("rejected", 0),
        )
        yield CounterMetricFamily(
            "forkloop_timeouts", "connections closed by a timeout", totals.get("timeouts", 0)
        )
        cancelled = CounterMetricFamily(
            "forkloop_cancelled_handlers", "handlers cancelled, by reason", labels=("reason",)
        )
        for reason in CANCEL_REASONS:
            cancelled.add_metric((reason,), totals.get(f"cancelled_{reason}", 0))
        yield cancelled
        cache = CounterMetricFamily(
            "forkloop_cache_lookups",
            "response cache lookups, by result (coalesced: waited for another's fill)",
            labels=("result",),
        )
        for name in CACHE_COUNTERS:
            if name != "cache_computations":
                cache.add_metric((name.removeprefix("cache_"),), totals.get(name, 0))
        yield cache
        yield CounterMetricFamily(
            "forkloop_cache_computations",
            "handler runs that filled the response cache",
            totals.get("cache_computations", 0),
        )
        yield from shared_cache_families(totals)
        yield from fleet_cache_families(totals)
        proxied = CounterMetricFamily(
            "forkloop_proxy_cache_events",
            "the proxy cache's requests upstream (fill), 304s that refreshed an entry "
            "(revalidated), answers relayed unstored (not_stored), PURGEs (purge, refused)",
            labels=("event",),
        )
        for event, name in PROXY_EVENTS.items():
            proxied.add_metric((event,), totals.get(name, 0))
        yield proxied
        restarts = CounterMetricFamily(
            "forkloop_worker_restarts",
            "workers the master replaced, by why (retired: --max-requests)",
            labels=("reason",),
        )
        for reason in RESTART_REASONS:
            restarts.add_metric((reason,), totals.get(f"worker_restarts_{reason}", 0))
        yield restarts
        yield GaugeMetricFamily("forkloop_workers", "worker processes", totals.get("workers", 1))


PROXY_EVENTS = {
    "fill": "cache_upstream_fills",
    "revalidated": "cache_revalidated",
    "not_stored": "cache_not_stored",
    "purge": "cache_purges",
    "refused": "cache_purges_refused",
}


# The server-wide tier's events as the workers count them, and the cache process's own
# figures from its board (`server.cache_process`): only when the server runs one.
SHARED_EVENTS = {
    "cache_shared_hits": "hit",  # found filled by another worker
    "cache_shared_coalesced": "coalesced",  # waited for another worker's fill and got it
    "cache_shared_failures": "failed",  # waited for another worker's fill and got its error
}
SHARED_PROCESS_GAUGES = {
    "entries": "entries held",
    "bytes": "bytes held (keys, entries and a fixed overhead each)",
    "limit_bytes": "the bound on bytes held (--shared-cache-size)",
    "leases": "keys being filled now: one lease each, for the whole server",
    "waiters": "workers waiting now for a fill another worker holds the lease of",
}
SHARED_PROCESS_COUNTERS = {
    "evictions": "entries evicted to stay within the byte bound",
    "takeovers": "leases passed to a waiting worker when the filler left or died",
    "errors": "fills that failed, their error pushed to every waiting worker",
    "served": "waiting workers handed the entry of a fill another worker did",
}


def shared_cache_families(totals: dict[str, int]) -> Iterator[Any]:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    from . import shared_cache
    from .cache_process import HANG_TIMEOUT, board_path, read_board

    tier = shared_cache.current()
    if tier is None:
        return
    lookups = CounterMetricFamily(
        "forkloop_shared_cache_lookups",
        "asks of the server-wide tier that spared a computation, by result",
        labels=("result",),
    )
    for name, result in SHARED_EVENTS.items():
        lookups.add_metric((result,), totals.get(name, 0))
    yield lookups
    yield CounterMetricFamily(
        "forkloop_shared_cache_worker_takeovers",
        "fills a worker took over from a filler that left or died",
        totals.get("cache_takeovers", 0),
    )
    yield CounterMetricFamily(
        "forkloop_shared_cache_fallbacks",
        "fills done with this worker's own single-flight because the tier was unavailable",
        totals.get("cache_fallbacks", 0),
    )
    board = read_board(board_path(tier.path))
    up = board is not None and board["age_seconds"] < HANG_TIMEOUT
    yield GaugeMetricFamily(
        "forkloop_shared_cache_up", "1 while the cache process beats, else 0", int(up)
    )
    if board is None:
        return
    for name, text in SHARED_PROCESS_GAUGES.items():
        yield GaugeMetricFamily(f"forkloop_shared_cache_{name}", text, board[name])
    for name, text in SHARED_PROCESS_COUNTERS.items():
        yield CounterMetricFamily(
            f"forkloop_shared_cache_process_{name}",
            f"{text} (since the cache process last started)",
            board[name],
        )


# The fleet tier's events (`server.fleet_cache`), summed over the workers: only when the
# server names a store (--cache-url).
FLEET_EVENTS = {  # counter -> (label, what it counts)
    "cache_fleet_hits": ("hit", "an entry found in the store"),
    "cache_fleet_coalesced": ("coalesced", "an entry found after waiting for another server"),
    "cache_fleet_fills": ("fill", "a lease granted: this server computed for the fleet"),
    "cache_fleet_takeovers": ("takeover", "a lease granted after the filler elsewhere died"),
    "cache_fleet_notifications": ("notification", "a fill's end told by the store"),
    "cache_fleet_fenced": ("fenced", "a late write refused: the lease had passed on"),
    "cache_fleet_store_errors": ("store_error", "a call that failed or missed its deadline"),
    "cache_fleet_fallbacks": ("fallback", "an ask answered without the store (breaker open)"),
}


def fleet_cache_families(totals: dict[str, int]) -> Iterator[Any]:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    from . import fleet_cache

    if fleet_cache.current() is None:
        return
    events = CounterMetricFamily(
        "forkloop_fleet_cache_events",
        "the fleet tier's events, by kind: "
        + "; ".join(f"{label}: {text}" for label, text in FLEET_EVENTS.values()),
        labels=("event",),
    )
    for counter, (label, _) in FLEET_EVENTS.items():
        events.add_metric((label,), totals.get(counter, 0))
    yield events
    yield GaugeMetricFamily(
        "forkloop_fleet_cache_breaker_open",
        "workers whose breaker on the store is open (they fill for their server meanwhile)",
        totals.get("cache_fleet_breaker_open", 0),
    )
