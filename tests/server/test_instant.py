"""Instant answers: fresh cache hits answered from the parser (`server.instant`).

A cached route of a native App on real sockets, every backend. Each test says
what a client sees (the same answer as the usual way, in the same order, with
the same counting) and whether the hit went the instant way, told by the app's
router: an instant answer is never routed.
"""

from __future__ import annotations

import asyncio
import io
import time

import pytest

from forkloop.server import purges
from forkloop.server.app import App
from forkloop.server.cache import CachePolicy
from forkloop.server.http import Request, Response
from forkloop.server.logs import AccessLog
from forkloop.server.metrics import RequestMetrics
from tests.server.support import RawClient, running_server, send_raw
from tests.waiting import until

pytestmark = pytest.mark.timeout(60)


class Site:
    """An app with a cached page, a slow page, a varying page; counts routing."""

    def __init__(self) -> None:
        self.app = App()
        self.routed = 0
        self.computed = 0
        app = self.app
        resolve = app.resolve

        def counting(request: Request):
            self.routed += 1
            return resolve(request)

        app.resolve = counting  # type: ignore[method-assign]

        @app.get("/page", cache=CachePolicy(ttl=60))
        def page(request: Request) -> Response:
            self.computed += 1
            return Response(f"page #{self.computed}")

        @app.get("/short", cache=CachePolicy(ttl=0.3))
        def short(request: Request) -> Response:
            self.computed += 1
            return Response(f"short #{self.computed}")

        @app.get("/varying", cache=CachePolicy(ttl=60))
        def varying(request: Request) -> Response:
            self.computed += 1
            return Response("varies", headers={"Vary": "Accept-Language"})

        @app.get("/slow")
        async def slow(request: Request) -> Response:
            await asyncio.sleep(0.2)
            return Response("slow")


def test_a_fresh_hit_is_answered_without_routing_and_counted_as_any(backend):
    site = Site()
    with running_server(backend, site.app) as server, RawClient(server.port) as client:
        replies = []
        for _ in range(3):
            client.request("GET", "/page")
            replies.append(client.read_reply())
        routed = site.routed
        stats = server.call(lambda: (server.service.context.snapshot(), site.app.cache_stats))
    assert [r.body for r in replies] == [b"page #1"] * 3
    assert [r.header("x-cache") for r in replies] == ["MISS", "HIT", "HIT"]
    assert replies[2].header("age") is not None and replies[2].header("content-length") == "7"
    assert routed == 2  # the miss and the hit that made the answer ready; not the third
    snapshot, cache = stats
    assert snapshot["requests"] == 3 and snapshot["responses_by_status"] == {"200": 3}
    assert cache["hits"] == 2 and cache["misses"] == 1


def test_head_is_answered_instantly_without_a_body(backend):
    site = Site()
    with running_server(backend, site.app) as server, RawClient(server.port) as client:
        client.request("GET", "/page")
        client.read_reply()
        for _ in range(2):
            client.send(b"HEAD /page HTTP/1.1\r\nHost: t\r\n\r\n")
            head = b""
            while not head.endswith(b"\r\n\r\n"):
                head += client.read_raw()
            assert b"\r\nContent-Length: 7\r\n" in head and b"X-Cache: HIT" in head
        client.request("GET", "/page")  # nothing was left over: the next answer is whole
        assert client.read_reply().body == b"page #1"
    assert site.routed == 3  # GET miss, HEAD made ready; then HEAD and GET instantly


def test_a_hit_pipelined_behind_a_slow_request_keeps_its_place(backend):
    site = Site()
    with running_server(backend, site.app) as server, RawClient(server.port) as client:
        for _ in range(2):
            client.request("GET", "/page")
            client.read_reply()
        client.send(
            b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\n" + b"GET /page HTTP/1.1\r\nHost: t\r\n\r\n" * 2
        )
        replies = client.read_replies(3)
    assert [r.body for r in replies] == [b"slow", b"page #1", b"page #1"]


def test_what_the_usual_way_must_decide_is_never_answered_instantly(backend):
    site = Site()
    with running_server(backend, site.app, max_keepalive_requests=4) as server:
        with RawClient(server.port) as client:
            for _ in range(3):
                client.request("GET", "/page")
                assert client.read_reply().header("connection") is None
            client.request("GET", "/page")  # the last this connection may carry
            last = client.read_reply()
        closing = send_raw(
            server.port, b"GET /page HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
        )
        old = send_raw(server.port, b"GET /page HTTP/1.0\r\nHost: t\r\n\r\n")
        for language in ("en", "fr"):  # Vary: the request's headers matter
            for _ in range(2):
                with RawClient(server.port) as client:
                    client.request("GET", "/varying", [("Accept-Language", language)])
                    assert client.read_reply().header("vary") == "Accept-Language"
    assert last.header("connection") == "close" and last.body == b"page #1"
    assert b"\r\nConnection: close\r\n" in closing and closing.endswith(b"page #1")
    assert b"\r\nConnection: close\r\n" in old and old.endswith(b"page #1")


def test_an_expired_or_purged_entry_is_not_answered_instantly(backend):
    site = Site()
    board = purges.PurgeBoard(slots=64)
    purges.install(board)
    try:
        with running_server(backend, site.app) as server, RawClient(server.port) as client:
            for _ in range(2):
                client.request("GET", "/short")
                assert client.read_reply().body == b"short #1"
            time.sleep(0.35)
            client.request("GET", "/short")
            assert client.read_reply().body == b"short #2"  # expired: computed again
            for _ in range(2):
                client.request("GET", "/page")
                assert client.read_reply().body == b"page #3"
            board.stamp("/page")  # as a PURGE in another worker does
            client.request("GET", "/page")
            assert client.read_reply().body == b"page #4"
    finally:
        purges.install(None)


def test_metrics_count_instant_answers_by_method_and_an_access_log_turns_them_off(backend):
    site = Site()
    metrics = RequestMetrics()
    with running_server(
        backend, site.app, access_log=AccessLog(lines=False, metrics=metrics)
    ) as server:
        with RawClient(server.port) as client:
            for _ in range(3):
                client.request("GET", "/page")
                client.read_reply()
    assert site.routed == 2  # metrics alone keep instant answers on
    assert metrics.counters()["http_GET_200"] == 3
    lines = io.StringIO()
    site = Site()
    logged = AccessLog(path=None, lines=True)
    logged.stream = lines
    with running_server(backend, site.app, access_log=logged) as server:
        with RawClient(server.port) as client:
            for _ in range(3):
                client.request("GET", "/page")
                client.read_reply()
    assert site.routed == 3  # every request logged as it came: the usual way
    assert len(lines.getvalue().splitlines()) == 3


# ---------------------------------------------------------------------- known requests
#
# A read that is byte for byte a request answered instantly before is answered
# without parsing (`server.instant`, "Known requests"). What a client sees must
# not change; what could go wrong is answering bytes that, where they fall in
# the stream, are not that request.

PAGE = b"GET /page HTTP/1.1\r\nHost: t\r\n\r\n"


def wait_on_server_loop(server, predicate) -> None:
    asyncio.run_coroutine_threadsafe(until(predicate), server.loop).result(10)


def known_requests(server) -> dict:
    return server.call(lambda: dict(server.service.context.known_requests))


def test_a_known_request_is_answered_on_any_connection_without_routing(backend):
    site = Site()
    with running_server(backend, site.app) as server:
        with RawClient(server.port) as first:
            for _ in range(3):  # a miss, a hit that makes it ready, an instant answer
                first.send(PAGE)
                first.read_reply()
        assert known_requests(server) == {PAGE: (b"/page", b"GET")}
        routed = site.routed
        with RawClient(server.port) as second:  # its very first read: a known request
            second.send(PAGE)
            second.send(PAGE)
            replies = [second.read_reply(), second.read_reply()]
        snapshot = server.call(server.service.context.snapshot)
    assert [(r.body, r.header("x-cache")) for r in replies] == [(b"page #1", "HIT")] * 2
    assert site.routed == routed
    assert snapshot["requests"] == 5 and snapshot["responses_by_status"] == {"200": 5}


def test_a_known_request_after_a_stray_byte_is_parsed_with_it(backend):
    """b"G" then the known bytes is the request line b"GGET /page": a 400, not a hit."""
    site = Site()
    with running_server(backend, site.app) as server, RawClient(server.port) as client:
        for _ in range(3):
            client.send(PAGE)
            client.read_reply()
        client.send(b"G")
        connections = server.service.context.connections
        wait_on_server_loop(server, lambda: any(c.reader.in_message for c in connections))
        client.send(PAGE)
        reply = client.read_reply()
        assert client.is_closed_by_server()
    assert reply.status == 400 and reply.header("connection") == "close"


def test_two_known_requests_in_one_read_get_two_answers(backend):
    site = Site()
    with running_server(backend, site.app) as server, RawClient(server.port) as client:
        for _ in range(3):
            client.send(PAGE)
            client.read_reply()
        client.send(PAGE * 2)
        replies = client.read_replies(2)
        client.send(PAGE)  # and the connection is where it should be after them
        replies.append(client.read_reply())
        known = known_requests(server)
    assert [r.body for r in replies] == [b"page #1"] * 3
    assert list(known) == [PAGE]  # the pair was answered, not remembered as one request


def test_a_known_request_behind_a_running_handler_waits_its_turn(backend):
    site = Site()
    with running_server(backend, site.app) as server, RawClient(server.port) as client:
        for _ in range(3):
            client.send(PAGE)
            client.read_reply()
        client.send(b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\n")
        connections = server.service.context.connections
        wait_on_server_loop(server, lambda: any(c.active_request for c in connections))
        client.send(PAGE)  # read while /slow runs
        replies = client.read_replies(2)
    assert [r.body for r in replies] == [b"slow", b"page #1"]


def test_a_known_request_at_the_keepalive_limit_is_answered_and_closes(backend):
    site = Site()
    with running_server(backend, site.app, max_keepalive_requests=4) as server:
        with RawClient(server.port) as client:
            replies = []
            for _ in range(4):
                client.send(PAGE)
                replies.append(client.read_reply())
            assert client.is_closed_by_server()
    assert [r.header("connection") for r in replies] == [None, None, None, "close"]
    assert [r.body for r in replies] == [b"page #1"] * 4
