"""The HTTP/1.1 connection layer, over real sockets, on every loop backend.

Malformed and hostile requests are one table in test_hostile_input.py; slow and
greedy clients are in test_slow_clients.py.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from forkloop.server.app import App
from forkloop.server.http import Request, Response
from tests.server.support import RawClient, running_server, send_raw

app = App()
produced = {"bytes": 0}


@app.get("/")
def hello(request: Request) -> Response:
    return Response(b"Hello, World!")


@app.get("/seq")
def sequence(request: Request) -> Response:
    return Response(request.query_param("i", "-"))


@app.post("/echo")
async def echo(request: Request) -> Response:
    return Response(await request.body(), content_type="application/octet-stream")


@app.get("/sleep")
async def sleep(request: Request) -> Response:
    await asyncio.sleep(int(request.query_param("ms", "10")) / 1000)
    return Response(b"slept")


@app.get("/boom")
def boom(request: Request) -> Response:
    raise RuntimeError("handler failure on purpose")


@app.get("/async-boom")
async def async_boom(request: Request) -> Response:
    await asyncio.sleep(0)
    raise RuntimeError("async handler failure on purpose")


@app.get("/stream")
def stream(request: Request) -> Response:
    async def parts():
        for part in (b"alpha ", b"beta ", b"gamma"):
            yield part

    return Response(stream=parts())


@app.get("/big")
def big(request: Request) -> Response:
    total = int(request.query_param("mb", "32")) * 1024 * 1024
    block = b"z" * 65536

    async def blocks():
        sent = 0
        while sent < total:
            produced["bytes"] += len(block)
            sent += len(block)
            yield block

    return Response(stream=blocks(), content_type="application/octet-stream")


@app.get("/stats")
def stats(request: Request) -> Response:
    return Response.json(request.server_stats())


# ---------------------------------------------------------------------- keep-alive


def test_keep_alive_reuses_one_connection(backend):
    with running_server(backend, app) as server, RawClient(server.port) as client:
        for _ in range(3):
            client.request("GET", "/")
            reply = client.read_reply()
            assert reply.status == 200
            assert reply.body == b"Hello, World!"
            assert reply.header("connection") is None
        assert not client.is_closed_by_server(timeout=0.2)


def test_response_carries_date_server_and_length(backend):
    with running_server(backend, app) as server, RawClient(server.port) as client:
        client.request("GET", "/")
        reply = client.read_reply()
        assert reply.header("server") == "forkloop"
        assert reply.header("date").endswith(" GMT")
        assert reply.header("content-length") == "13"
        assert reply.header("content-type") == "text/plain; charset=utf-8"


def test_http10_closes_unless_keep_alive_is_asked_for(backend):
    with running_server(backend, app) as server:
        raw = send_raw(server.port, b"GET / HTTP/1.0\r\n\r\n")
        assert raw.startswith(b"HTTP/1.1 200 OK\r\n")
        assert b"Connection: close\r\n" in raw
        with RawClient(server.port) as client:
            client.send(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            reply = client.read_reply()
            assert reply.header("connection") == "keep-alive"
            client.send(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            assert client.read_reply().status == 200


def test_connection_close_is_honoured(backend):
    with running_server(backend, app) as server, RawClient(server.port) as client:
        client.request("GET", "/", headers=[("Connection", "close")])
        reply = client.read_reply()
        assert reply.status == 200
        assert reply.header("connection") == "close"
        assert client.is_closed_by_server(timeout=2)


def test_idle_keep_alive_connection_is_closed_after_timeout(backend):
    with running_server(backend, app, keepalive_timeout=0.3) as server:
        with RawClient(server.port) as client:
            client.request("GET", "/")
            assert client.read_reply().status == 200
            started = time.monotonic()
            assert client.is_closed_by_server(timeout=3)
            assert time.monotonic() - started >= 0.3


def test_max_keepalive_requests_closes_the_connection(backend):
    with running_server(backend, app, max_keepalive_requests=3) as server:
        with RawClient(server.port) as client:
            client.send(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n" * 3)
            replies = client.read_replies(3)
            assert [r.header("connection") for r in replies] == [None, None, "close"]
            assert client.is_closed_by_server(timeout=2)


# ---------------------------------------------------------------------- pipelining


def test_hundred_pipelined_requests_are_answered_in_order(backend):
    with running_server(backend, app) as server, RawClient(server.port) as client:
        batch = b"".join(b"GET /seq?i=%d HTTP/1.1\r\nHost: t\r\n\r\n" % i for i in range(100))
        client.send(batch)
        replies = client.read_replies(100)
        assert [reply.body for reply in replies] == [b"%d" % i for i in range(100)]


def test_pipelined_requests_wait_behind_a_slow_async_handler(backend):
    with running_server(backend, app) as server, RawClient(server.port) as client:
        client.send(
            b"GET /sleep?ms=50 HTTP/1.1\r\nHost: t\r\n\r\n"
            b"GET /seq?i=2 HTTP/1.1\r\nHost: t\r\n\r\n"
            b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\nabc"
        )
        replies = client.read_replies(3)
        assert [reply.body for reply in replies] == [b"slept", b"2", b"abc"]


def test_half_closed_client_still_gets_its_pipelined_answers(backend):
    with running_server(backend, app) as server, RawClient(server.port) as client:
        client.send(
            b"GET /sleep?ms=20 HTTP/1.1\r\nHost: t\r\n\r\nGET /seq?i=2 HTTP/1.1\r\nHost: t\r\n\r\n"
        )
        client.sock.shutdown(1)  # SHUT_WR
        replies = client.read_replies(2)
        assert [reply.body for reply in replies] == [b"slept", b"2"]
        assert client.is_closed_by_server(timeout=2)


# ---------------------------------------------------------------------- bodies


def test_content_length_body_is_echoed(backend):
    with running_server(backend, app) as server, RawClient(server.port) as client:
        payload = bytes(range(256)) * 1000
        client.request("POST", "/echo", body=payload)
        reply = client.read_reply()
        assert reply.status == 200
        assert reply.body == payload


def test_chunked_request_body_is_reassembled(backend):
    with running_server(backend, app) as server, RawClient(server.port) as client:
        client.send(
            b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n1;ext=1\r\n \r\n5\r\nworld\r\n0\r\n\r\n"
        )
        assert client.read_reply().body == b"hello world"


def test_streaming_response_is_chunked(backend):
    with running_server(backend, app) as server, RawClient(server.port) as client:
        client.request("GET", "/stream")
        reply = client.read_reply()
        assert reply.chunked
        assert reply.header("content-length") is None
        assert reply.body == b"alpha beta gamma"
        client.request("GET", "/")  # the connection is still usable
        assert client.read_reply().status == 200


def test_streaming_response_to_http10_is_close_delimited(backend):
    with running_server(backend, app) as server:
        raw = send_raw(server.port, b"GET /stream HTTP/1.0\r\n\r\n")
        head, _, body = raw.partition(b"\r\n\r\n")
        assert b"Transfer-Encoding" not in head
        assert b"Connection: close" in head
        assert body == b"alpha beta gamma"


def test_head_has_the_get_length_and_no_body(backend):
    with running_server(backend, app) as server:
        raw = send_raw(
            server.port,
            b"HEAD / HTTP/1.1\r\nHost: t\r\n\r\n"
            b"GET /seq?i=9 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
        )
        head, _, rest = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK")
        assert b"Content-Length: 13" in head
        assert rest.startswith(b"HTTP/1.1 200 OK")  # no body bytes between the two
        assert rest.endswith(b"\r\n\r\n9")


def test_expect_100_continue_is_answered_before_the_body(backend):
    with running_server(backend, app) as server, RawClient(server.port) as client:
        client.send(
            b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n"
        )
        assert client.read_raw() == b"HTTP/1.1 100 Continue\r\n\r\n"
        client.send(b"data")
        reply = client.read_reply()
        assert reply.status == 200
        assert reply.body == b"data"


def test_expect_100_with_too_large_body_is_413_without_continue(backend):
    with running_server(backend, app, max_body_size=10) as server:
        raw = send_raw(
            server.port,
            b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 11\r\nExpect: 100-continue\r\n\r\n",
        )
        assert raw.startswith(b"HTTP/1.1 413 ")


# ---------------------------------------------------------------------- handler failures


@pytest.mark.parametrize("path", ["/boom", "/async-boom"])
def test_handler_exception_is_500_and_the_connection_goes_on(backend, path):
    with running_server(backend, app) as server, RawClient(server.port) as client:
        client.send(
            b"GET %b HTTP/1.1\r\nHost: t\r\n\r\nGET /seq?i=1 HTTP/1.1\r\nHost: t\r\n\r\n"
            % path.encode()
        )
        failed, following = client.read_replies(2)
        assert failed.status == 500
        assert following.status == 200
        assert following.body == b"1"


def test_unknown_path_is_404_and_wrong_method_is_405_with_allow(backend):
    with running_server(backend, app) as server, RawClient(server.port) as client:
        client.request("GET", "/missing")
        assert client.read_reply().status == 404
        client.request("DELETE", "/")
        reply = client.read_reply()
        assert reply.status == 405
        assert reply.header("allow") == "GET, HEAD"


# ---------------------------------------------------------------------- flow control


def test_slow_reader_does_not_make_the_server_buffer_the_whole_response(backend):
    with running_server(backend, app, write_buffer_high=64 * 1024) as server:
        with RawClient(server.port, timeout=10) as client:
            client.sock.setsockopt(
                __import__("socket").SOL_SOCKET, __import__("socket").SO_RCVBUF, 65536
            )
            produced["bytes"] = 0
            client.request("GET", "/big?mb=64")
            deadline = time.monotonic() + 3
            last = -1
            while time.monotonic() < deadline:  # wait until production stalls
                time.sleep(0.2)
                current = produced["bytes"]
                if current == last:
                    break
                last = current
            assert produced["bytes"] < 16 * 1024 * 1024, (
                "server kept producing for a client that reads nothing"
            )
            received = 0
            while True:
                chunk = client.sock.recv(1 << 20)
                if not chunk:
                    break
                received += len(chunk)
                if received >= 64 * 1024 * 1024:
                    break
            assert received >= 64 * 1024 * 1024
            assert produced["bytes"] == 64 * 1024 * 1024


# ---------------------------------------------------------------------- stats


def test_stats_counts_requests_and_statuses(backend):
    with running_server(backend, app) as server, RawClient(server.port) as client:
        for path in ("/", "/", "/missing", "/boom"):
            client.request("GET", path)
            client.read_reply()
        client.request("GET", "/stats")
        snapshot = json.loads(client.read_reply().body)
        assert snapshot["requests"] == 5
        assert snapshot["responses_by_status"] == {"200": 2, "404": 1, "500": 1}
        assert snapshot["errors_by_status"] == {"404": 1, "500": 1}
        assert snapshot["open_connections"] == 1


# ---------------------------------------------------------------------- graceful shutdown


def test_graceful_shutdown_closes_idle_connections_and_answers_busy_ones_with_close(backend):
    with running_server(backend, app) as server:
        with RawClient(server.port) as idle, RawClient(server.port) as busy:
            idle.request("GET", "/")
            assert idle.read_reply().status == 200
            busy.request("GET", "/sleep?ms=300")
            time.sleep(0.1)  # the slow request is in flight
            server.loop.call_soon_threadsafe(
                lambda: asyncio.ensure_future(server.service.shutdown(5.0))
            )
            assert idle.is_closed_by_server(timeout=2)
            reply = busy.read_reply()
            assert reply.status == 200
            assert reply.header("connection") == "close"
            assert busy.is_closed_by_server(timeout=2)
