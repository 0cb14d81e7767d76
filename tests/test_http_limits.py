"""Limits, timeouts and malformed requests: each answered with its status, then closed.

Every case is sent on a fresh connection; the server must answer with the
expected status and ``Connection: close``, close the connection, and go on
serving: after each case a normal request on a new connection gets 200.
"""

from __future__ import annotations

import socket
import time

import pytest

from server.app import App
from server.http import Request, Response
from tests.support import RawClient, running_server, send_raw

app = App()
started: list[str] = []


@app.route("/", methods=("GET", "POST"))
def index(request: Request) -> Response:
    started.append(request.method)
    return Response(b"ok")


LIMITS = dict(
    max_request_line=256,
    max_header_bytes=2048,
    max_header_count=20,
    max_body_size=1000,
)

H = b"Host: t\r\n"

CASES = [
    # (name, raw request, expected status)
    ("request target too long", b"GET /" + b"a" * 300 + b" HTTP/1.1\r\n" + H + b"\r\n", 414),
    ("one huge header", b"GET / HTTP/1.1\r\n" + H + b"X-Big: " + b"v" * 3000 + b"\r\n\r\n", 431),
    (
        "too many headers",
        b"GET / HTTP/1.1\r\n" + H + b"".join(b"X-%d: 1\r\n" % i for i in range(25)) + b"\r\n",
        431,
    ),
    ("body over the limit", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 1001\r\n\r\n", 413),
    (
        "chunked body over the limit",
        b"POST / HTTP/1.1\r\n"
        + H
        + b"Transfer-Encoding: chunked\r\n\r\n"
        + b"200\r\n"
        + b"a" * 512
        + b"\r\n"
        + b"200\r\n"
        + b"a" * 512
        + b"\r\n0\r\n\r\n",
        413,
    ),
    (
        "gzip, chunked",
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        501,
    ),
    ("unknown coding", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: xchunked\r\n\r\n", 501),
    (
        "chunked not last",
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked, gzip\r\n\r\n",
        400,
    ),
    (
        "chunked twice",
        b"POST / HTTP/1.1\r\n"
        + H
        + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
        400,
    ),
    (
        "content-length with chunked",
        b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
        400,
    ),
    (
        "chunked with content-length",
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
        400,
    ),
    (
        "duplicate content-length",
        b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 1\r\nContent-Length: 1\r\n\r\na",
        400,
    ),
    ("content-length +1", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: +1\r\n\r\na", 400),
    ("content-length list", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 1, 1\r\n\r\na", 400),
    ("missing host", b"GET / HTTP/1.1\r\n\r\n", 400),
    ("duplicate host", b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    (
        "transfer-encoding on HTTP/1.0",
        b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    ("obs-fold", b"GET / HTTP/1.1\r\n" + H + b"X-A: a\r\n b\r\n\r\n", 400),
    ("space before colon", b"GET / HTTP/1.1\r\nHost : t\r\n\r\n", 400),
    ("NUL in a header value", b"GET / HTTP/1.1\r\n" + H + b"X-A: a\x00b\r\n\r\n", 400),
    ("HTTP/0.9 request line", b"GET /\r\n\r\n", 400),
    ("HTTP/2.0 request line", b"GET / HTTP/2.0\r\n" + H + b"\r\n", 505),
    ("HTTP/3.0 request line", b"GET / HTTP/3.0\r\n" + H + b"\r\n", 505),
    ("invalid method", b"G@T / HTTP/1.1\r\n" + H + b"\r\n", 400),
    (
        "unsupported Expect",
        b"POST / HTTP/1.1\r\n" + H + b"Expect: magic\r\nContent-Length: 1\r\n\r\na",
        417,
    ),
    (
        "chunk size overflow",
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\nFFFFFFFFFFFFFFFFFF\r\n",
        400,
    ),
    (
        "bad chunk framing",
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n3\r\nabcX\r\n0\r\n\r\n",
        400,
    ),
]


@pytest.mark.parametrize(("name", "raw", "status"), CASES, ids=[case[0] for case in CASES])
def test_malformed_or_oversized_request_gets_its_status_and_a_close(backend, name, raw, status):
    started.clear()
    with running_server(backend, app, **LIMITS) as server:
        reply = send_raw(server.port, raw)
        assert reply.startswith(b"HTTP/1.1 %d " % status), reply[:200]
        head = reply.partition(b"\r\n\r\n")[0]
        assert b"\r\nConnection: close\r\n" in head + b"\r\n"
        assert started == [], "a handler started for a request whose framing was bad"
        with RawClient(server.port) as client:
            client.request("GET", "/")
            assert client.read_reply().status == 200


def test_case_table_is_large_enough():
    assert len(CASES) >= 25


def test_slow_header_client_is_cut_at_the_deadline_not_kept_alive_by_each_byte(backend):
    with running_server(backend, app, header_timeout=0.6) as server:
        with RawClient(server.port) as client:
            started_at = time.monotonic()
            trickle = b"GET / HTTP/1.1\r\nHost: t\r\nX-Slow: "
            answer = b""
            for byte in trickle + b"a" * 100:
                try:
                    client.send(bytes([byte]))
                except (BrokenPipeError, ConnectionResetError):
                    break
                client.sock.settimeout(0.05)
                try:
                    answer = client.sock.recv(4096)
                except TimeoutError:
                    continue
                break
            elapsed = time.monotonic() - started_at
            assert answer.startswith(b"HTTP/1.1 408 "), answer
            assert 0.6 <= elapsed < 3.0
        with RawClient(server.port) as client:
            client.request("GET", "/")
            assert client.read_reply().status == 200


def test_connection_with_no_request_is_closed_quietly_at_the_header_deadline(backend):
    with running_server(backend, app, header_timeout=0.3) as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            assert sock.recv(100) == b""


def test_slow_body_is_cut_after_the_body_timeout(backend):
    with running_server(backend, app, body_timeout=0.3) as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            sock.sendall(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\nabc")
            reply = sock.recv(4096)
            assert reply.startswith(b"HTTP/1.1 408 ")
