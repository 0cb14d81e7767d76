"""The proxy's cache in front of a real upstream, on every backend.

The upstream (tests/server/upstream_support.py) answers ``/cache/NAME?...``
with the caching headers its query asks for and counts the requests per path,
so every rule is checked by how often the upstream was asked and what the
client got.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from forkloop.server.cache import ResponseCache
from forkloop.server.proxy import ProxyFrontDoor
from forkloop.server.proxy_cache import CachingProxy, ProxyCacheSettings, purge_networks
from forkloop.server.upstream import UpstreamPool, UpstreamSettings
from tests.server.master_support import wait_for
from tests.server.stampede_support import stampede
from tests.server.support import RawClient, running_server
from tests.server.upstream_support import Upstream, check_a_slow_client_holds_the_upstream_back

pytestmark = pytest.mark.timeout(60)


@contextmanager
def caching_proxy(backend, port: int, read_timeout: float = 5.0, **settings) -> Iterator:
    pool = UpstreamPool([f"http://127.0.0.1:{port}"], UpstreamSettings(read_timeout=read_timeout))
    front = CachingProxy(ProxyFrontDoor(pool), ResponseCache(), ProxyCacheSettings(**settings))
    with running_server(backend, front, request_timeout=0) as server:
        yield server


def get(port: int, target: str, *headers: tuple[str, str], method: str = "GET"):
    with RawClient(port) as client:
        client.request(method, target, list(headers))
        return client.read_reply()


def head(port: int, target: str) -> dict[str, str]:
    """The answer to HEAD: its status and header fields (lower-case), and what
    followed them before the server closed (nothing, for HEAD)."""
    with RawClient(port) as client:
        client.request("HEAD", target, [("Connection", "close")])
        answer = b""
        while chunk := client.read_raw():
            answer += chunk
    top, _, rest = answer.partition(b"\r\n\r\n")
    lines = top.decode("latin-1").split("\r\n")
    fields = dict(line.lower().split(": ", 1) for line in lines[1:])
    return {"status": lines[0][9:12], "after": rest.decode(), **fields}


def counted(upstream: Upstream, name: str) -> int:
    return upstream.seen.counts.get(f"/cache/{name}".encode(), 0)


def expire(seconds: float = 1.05) -> None:
    """Let a ``max-age=1`` entry go stale (its freshness is whole seconds)."""
    time.sleep(seconds)


def test_a_fresh_answer_is_stored_and_served_without_the_upstream(backend):
    with Upstream() as upstream, caching_proxy(backend, upstream.port) as proxy:
        first = get(proxy.port, "/cache/a?max_age=60")
        second = get(proxy.port, "/cache/a?max_age=60")
        answer_to_head = head(proxy.port, "/cache/a?max_age=60")
    assert (first.status, first.body, first.header("x-cache")) == (200, b"a #1", "MISS")
    assert (second.body, second.header("x-cache")) == (b"a #1", "HIT")
    assert second.header("cache-control") == "max-age=60" and second.header("via") == "1.1 forkloop"
    assert answer_to_head["x-cache"] == "hit" and answer_to_head["after"] == ""
    assert answer_to_head["content-length"] == "4"
    assert counted(upstream, "a") == 1


@pytest.mark.parametrize(
    ("query", "headers"),
    [
        ("max_age=60&private", ()),
        ("max_age=60&no_store", ()),
        ("max_age=60&no_cache", ()),
        ("max_age=60&cookie", ()),
        ("", ()),  # no freshness at all
        ("expires=-10", ()),
        ("max_age=60&status=201", ()),
        ("max_age=60", (("Authorization", "Bearer x"),)),
    ],
)
def test_answers_that_may_not_be_stored_reach_the_upstream_every_time(backend, query, headers):
    with Upstream() as upstream, caching_proxy(backend, upstream.port) as proxy:
        replies = [get(proxy.port, f"/cache/n?{query}", *headers) for _ in range(2)]
    assert [r.body for r in replies] == [b"n #1", b"n #2"]
    assert counted(upstream, "n") == 2


def test_what_is_public_or_expires_later_is_stored(backend):
    with Upstream() as upstream, caching_proxy(backend, upstream.port) as proxy:
        for _ in range(2):
            get(proxy.port, "/cache/auth?max_age=60&public", ("Authorization", "Bearer x"))
            get(proxy.port, "/cache/expires?expires=60")
            get(proxy.port, "/cache/shared?s_maxage=60&max_age=0")
    assert counted(upstream, "auth") == counted(upstream, "expires") == 1
    assert counted(upstream, "shared") == 1


def test_vary_keeps_one_copy_per_variant(backend):
    with Upstream() as upstream, caching_proxy(backend, upstream.port) as proxy:
        target = "/cache/v?max_age=60&vary=Accept-Language"
        bodies = [
            get(proxy.port, target, ("Accept-Language", language)).body
            for language in ("en", "fr", "en", "fr")
        ]
    assert bodies == [b"v #1 en", b"v #2 fr", b"v #1 en", b"v #2 fr"]
    assert counted(upstream, "v") == 2


def test_an_expired_entry_is_revalidated_by_its_etag(backend):
    with Upstream() as upstream, caching_proxy(backend, upstream.port) as proxy:
        target = "/cache/e?max_age=1&etag=v1"
        assert get(proxy.port, target).body == b"e #1"
        expire()
        again = get(proxy.port, target)
        assert (again.status, again.body) == (200, b"e #1")  # the stored body, confirmed
        assert get(proxy.port, target).header("x-cache") == "HIT"  # fresh again
        stats = proxy.call(lambda: proxy.service.app.cache_stats)
    conditional = upstream.seen.heads[1].lower()
    assert b'if-none-match: "v1"' in conditional
    assert counted(upstream, "e") == 2 and stats["revalidated"] == 1


def test_a_client_condition_never_reaches_a_fill_and_is_answered_from_the_cache(backend):
    target = "/cache/c?max_age=60&etag=v1"
    with Upstream() as upstream, caching_proxy(backend, upstream.port) as proxy:
        holder = get(proxy.port, target, ("If-None-Match", '"v1"'))
        other = get(proxy.port, target)  # the fill is for everyone: the whole page was stored
        again = get(proxy.port, target, ("If-None-Match", 'W/"v1"'))
        outdated = get(proxy.port, target, ("If-None-Match", '"v0"'))
    assert b"if-none-match" not in upstream.seen.heads[0].lower()
    assert (holder.status, holder.header("x-cache"), holder.body) == (304, "MISS", b"")
    assert (other.status, other.header("x-cache"), other.body) == (200, "HIT", b"c #1")
    assert (again.status, again.header("x-cache"), again.header("etag")) == (304, "HIT", '"v1"')
    assert (outdated.status, outdated.body) == (200, b"c #1")
    assert counted(upstream, "c") == 1


def test_stale_if_error_serves_the_stale_entry_while_the_upstream_fails(backend):
    with Upstream() as upstream, caching_proxy(backend, upstream.port) as proxy:
        get(proxy.port, "/cache/s?max_age=1&sie=60")
        get(proxy.port, "/cache/plain?max_age=1")
        upstream.failing = True
        expire()
        stale = get(proxy.port, "/cache/s?max_age=1&sie=60")
        failed = get(proxy.port, "/cache/plain?max_age=1")
        upstream.stop()  # and with the upstream gone altogether
        still_stale = get(proxy.port, "/cache/s?max_age=1&sie=60")
        refused = get(proxy.port, "/cache/plain?max_age=1")
    assert (stale.status, stale.body, stale.header("x-cache")) == (200, b"s #1", "STALE")
    assert (failed.status, failed.body) == (503, b"down")  # relayed once, not stored
    assert (still_stale.body, still_stale.header("x-cache")) == (b"s #1", "STALE")
    assert refused.status == 502


def test_use_stale_serves_any_stale_entry_for_the_failures_it_names(backend):
    with Upstream() as upstream:
        port = upstream.port
        with caching_proxy(backend, port, use_stale=frozenset({"error", "http_503"})) as proxy:
            get(proxy.port, "/cache/u?max_age=1")
            upstream.failing = True
            expire()
            assert get(proxy.port, "/cache/u?max_age=1").header("x-cache") == "STALE"
            upstream.stop()  # the upstream goes away: refused
            down = get(proxy.port, "/cache/u?max_age=1")
            cold = get(proxy.port, "/cache/never?max_age=1")
    assert (down.status, down.body, down.header("x-cache")) == (200, b"u #1", "STALE")
    assert cold.status == 502


def test_updating_serves_the_stale_entry_while_one_refresh_runs(backend):
    with Upstream() as upstream:
        settings = {"use_stale": frozenset({"updating"})}
        with caching_proxy(backend, upstream.port, **settings) as proxy:
            get(proxy.port, "/cache/w?max_age=1&ms=100")
            expire()
            replies = stampede(proxy.port, "/cache/w?max_age=1&ms=100", 50)
            assert wait_for(lambda: counted(upstream, "w") == 2, 5)
    assert {status for status, _, _ in replies} == {200}
    assert Counter(cache for _, cache, _ in replies) == {"STALE": 1, "UPDATING": 49}
    assert counted(upstream, "w") == 2


def test_concurrent_misses_make_one_upstream_request(backend):
    with Upstream() as upstream, caching_proxy(backend, upstream.port) as proxy:
        replies = stampede(proxy.port, "/cache/m?max_age=60&ms=200", 200)
        expired = "/cache/x?max_age=1&ms=200"
        get(proxy.port, expired)
        expire()
        again = stampede(proxy.port, expired, 200)
    assert counted(upstream, "m") == 1
    assert [(s, b) for s, _, b in replies] == [(200, b"m #1")] * 200
    assert Counter(cache for _, cache, _ in replies) == {"MISS": 1, "HIT": 199}
    assert counted(upstream, "x") == 2  # one fill for the expired entry, not 200
    assert [(s, b) for s, _, b in again] == [(200, b"x #2")] * 200


def test_a_failing_fill_is_not_stored_and_each_waiter_gets_its_error_once(backend):
    with Upstream() as upstream, caching_proxy(backend, upstream.port) as proxy:
        replies = stampede(proxy.port, "/cache/f?max_age=60&status=500&ms=200", 50)
        later = get(proxy.port, "/cache/f?max_age=60&status=500")
    assert [s for s, _, _ in replies] == [500] * 50
    assert later.status == 500 and counted(upstream, "f") == 2


def test_the_last_client_leaving_aborts_the_fill(backend):
    with Upstream() as upstream, caching_proxy(backend, upstream.port) as proxy:
        target = "/cache/gone?max_age=60&ms=5000"
        clients = [RawClient(proxy.port) for _ in range(3)]
        for client in clients:
            client.request("GET", target)
        assert wait_for(lambda: counted(upstream, "gone") == 1, 5)
        for client in clients[:2]:
            client.close()
        time_left = wait_for(lambda: upstream.seen.aborted, 0.5)
        assert not time_left  # one client still waits: the fill goes on
        clients[2].close()
        assert wait_for(lambda: upstream.seen.aborted == [target.encode()], 5)


def test_finish_abandoned_fills_keeps_the_fill_for_the_next_client(backend):
    with Upstream() as upstream:
        with caching_proxy(backend, upstream.port, finish_abandoned_fills=True) as proxy:
            client = RawClient(proxy.port)
            client.request("GET", "/cache/kept?max_age=60&ms=300")
            assert wait_for(lambda: counted(upstream, "kept") == 1, 5)
            client.close()
            assert wait_for(lambda: proxy.call(lambda: len(proxy.service.app.cache)) == 1, 5)
            reply = get(proxy.port, "/cache/kept?max_age=60&ms=300")
    assert upstream.seen.aborted == []
    assert (reply.body, reply.header("x-cache")) == (b"kept #1", "HIT")


def test_an_answer_larger_than_an_entry_streams_past_the_cache(backend):
    with Upstream() as upstream, caching_proxy(backend, upstream.port, max_entry=100_000) as proxy:
        target = "/cache/big?max_age=60&size=300000"
        replies = [get(proxy.port, target) for _ in range(2)]
    assert [len(r.body) for r in replies] == [300_000, 300_000]
    assert replies[1].body.startswith(b"big #2")
    assert counted(upstream, "big") == 2


def test_a_slow_client_of_an_uncacheable_answer_holds_the_upstream_back(backend):
    with Upstream() as upstream, caching_proxy(backend, upstream.port) as proxy:
        check_a_slow_client_holds_the_upstream_back(upstream, proxy, proxy.service.app.proxy.pool)


def test_purge_forgets_a_url_for_allowed_addresses_only(backend):
    with Upstream() as upstream:
        with caching_proxy(
            backend, upstream.port, purge_allow=purge_networks("127.0.0.1")
        ) as allowed:
            get(allowed.port, "/cache/p?max_age=60")
            purged = get(allowed.port, "/cache/p?max_age=60", method="PURGE")
            after = get(allowed.port, "/cache/p?max_age=60")
        with caching_proxy(backend, upstream.port) as refusing:
            get(refusing.port, "/cache/q?max_age=60")
            refused = get(refusing.port, "/cache/q?max_age=60", method="PURGE")
            kept = get(refusing.port, "/cache/q?max_age=60")
    assert purged.status == 200 and after.body == b"p #2" and after.header("x-cache") == "MISS"
    assert refused.status == 403 and kept.header("x-cache") == "HIT"
    assert counted(upstream, "q") == 1


def test_other_methods_pass_through_uncached(backend):
    with Upstream() as upstream, caching_proxy(backend, upstream.port) as proxy:
        with RawClient(proxy.port) as client:
            for _ in range(2):
                client.request("POST", "/echo", body=b"posted")
                reply = client.read_reply()
                assert (reply.body, reply.header("x-cache")) == (b"posted", "BYPASS")
    assert upstream.seen.counts[b"/echo"] == 2
