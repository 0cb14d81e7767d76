"""A cache hit to a client that holds the entry already is a 304 (RFC 9110 13.2.2).

A cached route of a native App on real sockets, every backend: If-None-Match
by weak comparison (``*`` matches any entry), else If-Modified-Since against
the entry's Last-Modified; a 304 carries the entry's ETag, Cache-Control,
Expires and Vary, X-Cache and Age, and no body; only a 200 entry qualifies.
A conditional request is never answered from the parser's ready answers
(`server.instant`), which do not read the request's headers.
"""

from __future__ import annotations

import pytest

from forkloop.server.app import App
from forkloop.server.cache import CachePolicy
from forkloop.server.http import Request, Response
from tests.server.support import RawClient, running_server

pytestmark = pytest.mark.timeout(60)

MODIFIED = "Wed, 02 Dec 2026 10:00:00 GMT"


def site() -> tuple[App, list[str]]:
    app = App()
    computed: list[str] = []

    @app.get("/tagged", cache=CachePolicy(ttl=60))
    def tagged(request: Request) -> Response:
        computed.append("tagged")
        headers = {"ETag": '"v1"', "Last-Modified": MODIFIED, "Cache-Control": "max-age=60"}
        return Response("the page", headers=headers)

    @app.get("/plain", cache=CachePolicy(ttl=60))
    def plain(request: Request) -> Response:
        computed.append("plain")
        return Response("no validators")

    @app.get("/missing", cache=CachePolicy(ttl=60))
    def missing(request: Request) -> Response:
        computed.append("missing")
        return Response("gone", status=404, headers={"ETag": '"v1"'})

    return app, computed


def ask(client: RawClient, path: str, *headers: tuple[str, str], method: str = "GET"):
    client.request(method, path, headers)
    if method == "HEAD":
        head = b""
        while not head.endswith(b"\r\n\r\n"):
            head += client.read_raw()
        return head
    return client.read_reply()


def test_a_hit_the_client_holds_is_a_304_by_etag_or_date(backend):
    app, computed = site()
    with running_server(backend, app) as server, RawClient(server.port) as client:
        for _ in range(3):  # a miss, then hits ready to be answered from the parser
            assert ask(client, "/tagged").body == b"the page"
        answers = {
            "same tag": ask(client, "/tagged", ("If-None-Match", '"v1"')),
            "weak tag": ask(client, "/tagged", ("If-None-Match", 'W/"v1"')),
            "one of a list": ask(client, "/tagged", ("If-None-Match", '"v0", "v1"')),
            "any": ask(client, "/tagged", ("If-None-Match", "*")),
            "same date": ask(client, "/tagged", ("If-Modified-Since", MODIFIED)),
            "later date": ask(
                client, "/tagged", ("If-Modified-Since", "Sat, 05 Dec 2026 10:00:00 GMT")
            ),
        }
        changed = {
            "other tag": ask(client, "/tagged", ("If-None-Match", '"v0"')),
            "tag first, then date": ask(
                client, "/tagged", ("If-None-Match", '"v0"'), ("If-Modified-Since", MODIFIED)
            ),
            "earlier date": ask(
                client, "/tagged", ("If-Modified-Since", "Tue, 01 Dec 2026 10:00:00 GMT")
            ),
            "not a date": ask(client, "/tagged", ("If-Modified-Since", "yesterday")),
        }
        head = ask(client, "/tagged", ("If-None-Match", '"v1"'), method="HEAD")
        after = ask(client, "/tagged")  # the connection is where it should be after them all
    for why, reply in answers.items():
        assert (why, reply.status, reply.body) == (why, 304, b"")
        assert reply.header("etag") == '"v1"' and reply.header("cache-control") == "max-age=60"
        assert reply.header("x-cache") == "HIT" and reply.header("age") is not None
        assert reply.header("content-length") is None and reply.header("last-modified") is None
    for why, reply in changed.items():
        assert (why, reply.status, reply.body) == (why, 200, b"the page")
    assert head.startswith(b"HTTP/1.1 304 ") and b'ETag: "v1"' in head
    assert after.status == 200 and after.body == b"the page"
    assert computed == ["tagged"]


def test_only_a_200_entry_with_a_matching_validator_is_a_304(backend):
    app, computed = site()
    with running_server(backend, app) as server, RawClient(server.port) as client:
        replies = [
            ask(client, "/plain"),
            ask(client, "/plain", ("If-None-Match", '"v1"')),
            ask(client, "/plain", ("If-Modified-Since", MODIFIED)),
            ask(client, "/missing"),
            ask(client, "/missing", ("If-None-Match", "*")),
        ]
    assert [r.status for r in replies] == [200, 200, 200, 404, 404]
    assert [r.header("x-cache") for r in replies] == ["MISS", "HIT", "HIT", "MISS", "HIT"]
    assert computed == ["plain", "missing"]


def test_the_client_that_misses_holding_the_page_gets_a_304_too(backend):
    app, computed = site()
    with running_server(backend, app) as server, RawClient(server.port) as client:
        reply = ask(client, "/tagged", ("If-None-Match", '"v1"'))
    assert (reply.status, reply.header("x-cache"), reply.body) == (304, "MISS", b"")
    assert computed == ["tagged"]
