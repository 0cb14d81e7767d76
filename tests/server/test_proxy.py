"""forkloop as a reverse proxy in front of a real upstream, on every backend.

The upstream (tests/server/upstream_support.py) records what reaches it and
can be slow, close its keep-alive connections, frame its answers badly or
stream a large body: every rule is checked by what the upstream saw and what
the client got.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from forkloop.server.proxy import ProxyFrontDoor
from forkloop.server.upstream import UpstreamPool, UpstreamSettings
from tests.server.frontdoor_support import Served, UserFolder
from tests.server.master_support import wait_for
from tests.server.support import RawClient, running_server, send_raw
from tests.server.upstream_support import Upstream, check_a_slow_client_holds_the_upstream_back


@contextmanager
def proxy_to(backend, port: int, **settings) -> Iterator:
    pool = UpstreamPool([f"http://127.0.0.1:{port}"], UpstreamSettings(**settings))
    with running_server(backend, ProxyFrontDoor(pool), request_timeout=0) as server:
        yield server


def test_headers_are_forwarded_by_the_rules_both_ways(backend):
    with Upstream() as upstream, proxy_to(backend, upstream.port) as proxy:
        with RawClient(proxy.port) as client:
            client.request(
                "GET",
                "/hello",
                [
                    ("Connection", "X-Secret"),
                    ("X-Secret", "hop"),
                    ("Keep-Alive", "timeout=1"),
                    ("Proxy-Authorization", "Basic abc"),
                    ("X-Forwarded-For", "198.51.100.1"),
                    ("X-End", "kept"),
                ],
            )
            reply = client.read_reply()
    assert reply.status == 200 and reply.body == b"hello from upstream"
    assert reply.header("x-kept") == "yes" and reply.header("via") == "1.1 forkloop"
    assert reply.header("x-hop") is None and reply.header("keep-alive") is None
    head = upstream.seen.heads[0].lower()
    assert b"x-end: kept" in head and b"host: test" in head
    for gone in (b"x-secret", b"keep-alive", b"proxy-authorization", b"connection:"):
        assert gone not in head, gone
    assert b"x-forwarded-for: 198.51.100.1, 127.0.0.1" in head
    assert b"x-forwarded-proto: http" in head and b"x-forwarded-host: test" in head
    assert b"via: 1.1 forkloop" in head


def test_the_answer_to_head_says_the_upstreams_length_and_sends_no_body(backend):
    with Upstream() as upstream, proxy_to(backend, upstream.port) as proxy:
        answer = send_raw(
            proxy.port, b"HEAD /hello HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
        )
        with RawClient(proxy.port) as client:
            client.request("GET", "/hello")
            assert client.read_reply().body == b"hello from upstream"
    head, _, after = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and b"\r\nContent-Length: 19\r\n" in head
    assert after == b"" and upstream.seen.heads[0].startswith(b"HEAD /hello ")


def test_a_client_without_host_gets_the_upstreams_name_sent_for_it(backend):
    with Upstream() as upstream, proxy_to(backend, upstream.port) as proxy:
        answer = send_raw(proxy.port, b"GET /hello HTTP/1.0\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"hello from upstream")
    head = upstream.seen.heads[0].lower()
    assert b"host: 127.0.0.1:%d\r\n" % upstream.port in head
    assert b"x-forwarded-host" not in head


def test_keep_alive_connections_to_the_upstream_are_reused(backend):
    with Upstream() as upstream, proxy_to(backend, upstream.port) as proxy:
        with RawClient(proxy.port) as client:
            for _ in range(10):
                client.request("GET", "/hello")
                assert client.read_reply().status == 200
    assert upstream.seen.connections == 1


def test_request_bodies_reach_the_upstream_whole(backend):
    with Upstream() as upstream, proxy_to(backend, upstream.port) as proxy:
        with RawClient(proxy.port) as client:
            client.request("POST", "/echo", body=b"a" * 100_000)
            assert client.read_reply().body == b"a" * 100_000
            client.send(
                b"POST /echo?chunked HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
            )
            assert client.read_reply().body == b"hello world"


def test_upstream_failures_are_502_and_504_and_never_relayed(backend):
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        nobody = closed.getsockname()[1]  # bound, not listening: refused
    with proxy_to(backend, nobody) as proxy:
        with RawClient(proxy.port) as client:
            client.request("GET", "/")
            reply = client.read_reply()
            assert reply.status == 502 and b"refused the connection" in reply.body
    with Upstream() as upstream, proxy_to(backend, upstream.port, read_timeout=0.3) as proxy:
        with RawClient(proxy.port) as client:
            client.request("GET", "/slow")
            assert client.read_reply().status == 504
        for path in ("/both-framing", "/bad-chunk"):
            with RawClient(proxy.port) as client:
                client.request("GET", path)
                reply = client.read_reply()
                assert reply.status == 502, (path, reply.body)
                assert b"hello" not in reply.body and b"bad" not in reply.body


def test_an_upstream_closing_its_idle_connection_costs_no_request(backend):
    with Upstream() as upstream, proxy_to(backend, upstream.port) as proxy:
        with RawClient(proxy.port) as client:
            client.request("GET", "/hello")
            assert client.read_reply().status == 200
            client.request("GET", "/close")
            assert client.read_reply().body == b"closed"
            for _ in range(3):
                client.request("GET", "/hello")
                assert client.read_reply().status == 200
    assert upstream.seen.connections == 2


def test_the_client_leaving_closes_the_upstream_request(backend):
    with Upstream() as upstream, proxy_to(backend, upstream.port) as proxy:
        client = RawClient(proxy.port)
        client.request("GET", "/slow?leaving")
        assert wait_for(lambda: any(b"/slow?leaving" in h for h in upstream.seen.heads), 5)
        client.close()
        assert wait_for(lambda: upstream.seen.aborted == [b"/slow?leaving"], 5)


def test_a_slow_client_holds_the_upstream_back(backend):
    with Upstream() as upstream, proxy_to(backend, upstream.port) as proxy:
        check_a_slow_client_holds_the_upstream_back(upstream, proxy, proxy.service.app.pool)


def test_a_smuggling_attempt_never_reaches_the_upstream(backend):
    with Upstream() as upstream, proxy_to(backend, upstream.port) as proxy:
        raw = send_raw(
            proxy.port,
            b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 30\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: t\r\n\r\n",
        )
    assert raw.startswith(b"HTTP/1.1 400 ")
    assert upstream.seen.heads == []


def test_forkloop_proxy_command_serves_through_the_upstream(tmp_path):
    folder = UserFolder(tmp_path / "project")
    with Upstream() as upstream:
        served = Served(
            folder.root, "proxy", f"http://127.0.0.1:{upstream.port}", "--workers", "2"
        ).start()
        try:
            assert served.get("/hello") == (200, b"hello from upstream")
        finally:
            served.stop()


@pytest.mark.parametrize("url", ["ftp://127.0.0.1:21", "http://127.0.0.1:99999", "http://h:1/x"])
def test_a_bad_upstream_url_is_a_one_line_usage_error(tmp_path, url):
    from tests.server.frontdoor_support import last_error_line, run_forkloop

    result = run_forkloop("proxy", url, "--check-config", cwd=tmp_path)
    assert result.returncode == 2
    assert last_error_line(result).startswith("forkloop: --upstream: upstream ")
