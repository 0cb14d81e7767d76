"""Slow and greedy clients: each is cut at its deadline or bounded, and the server goes on.

Slowloris (a head one byte at a time) is cut at the header deadline, which runs
from the first byte and is not extended by later ones; a body is cut when a
gap between its reads passes the body timeout, but a slow and steady one is
served. A client that reads nothing of a large response costs at most the
write-buffer mark (the handler stops producing) and is cut after the send
timeout, and one that pipelines without reading is bounded the same way.
Thousands of short connections leave no descriptor behind; five thousand idle
keep-alive connections cost a bounded amount of memory each, and beyond
``--max-connections`` new ones are answered 503 and closed.

The deadline tests use short timeouts and measure only that the cut comes
after the deadline and within a generous bound; the idle-connection test runs
the server as its own process so its memory is measured alone.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import socket
import struct
import time

import pytest

from forkloop.loadtest.servers import ServerProcess, free_port, python
from forkloop.server.app import App
from forkloop.server.http import Request, Response
from tests.server.master_support import wait_for
from tests.server.support import RawClient, running_server

app = App()
produced = {"bytes": 0}
BLOCK = b"z" * 65536


@app.route("/", methods=("GET", "POST"))
def index(request: Request) -> Response:
    return Response(b"ok")


@app.post("/echo")
async def echo(request: Request) -> Response:
    return Response(await request.body())


@app.get("/big")
def big(request: Request) -> Response:
    """64 KiB blocks (1024 of them unless ``?blocks=N``), made only as fast as the client reads."""
    count = int(request.query_param("blocks", "1024"))

    async def blocks():
        for _ in range(count):
            produced["bytes"] += len(BLOCK)
            yield BLOCK

    return Response(stream=blocks(), content_type="application/octet-stream")


@app.get("/bytes")
def bytes_body(request: Request) -> Response:
    return Response(b"y" * 200_000)


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def server_connections(server) -> int:
    return server.call(lambda: len(server.service.connections))


def buffered_for_clients(server) -> int:
    """Bytes the server holds in write buffers, over all its connections."""

    def total() -> int:
        return sum(
            connection.transport.get_write_buffer_size()
            for connection in server.service.connections
            if connection.transport is not None
        )

    return server.call(total)


def stream_waits_for_its_client(server) -> bool:
    """True once a streaming response is held back by a full write buffer."""
    return server.call(lambda: any(c.flow.draining for c in server.service.connections))


def reset(sock: socket.socket) -> None:
    """Close with an RST, as a client that crashed would."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


# ---------------------------------------------------------------------- slow heads and bodies


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
        with RawClient(server.port) as client:
            client.request("GET", "/")
            assert client.read_reply().status == 200


def test_slow_but_steady_body_is_served_the_timeout_bounds_each_gap(backend):
    with running_server(backend, app, body_timeout=1.0) as server:
        with RawClient(server.port) as client:
            client.send(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 6\r\n\r\n")
            for byte in b"steady":  # 0.6 s in all, more than half the timeout
                time.sleep(0.1)
                client.send(bytes([byte]))
            reply = client.read_reply()
            assert reply.status == 200
            assert reply.body == b"steady"


# ---------------------------------------------------------------------- lingering close
#
# A body refused at its head (413) is still on its way: closing with it unread
# would make the kernel answer it with a reset, which can destroy the 413 before
# the client reads it. Like nginx's lingering_close, the server sends its answer
# and its FIN, then reads and discards until the client is done, for at most
# lingering_timeout between reads and lingering_time in all.


def send_body_while_refused(port: int, size: int) -> tuple[bytes, int]:
    """POST a body of ``size`` bytes over the limit, sending all of it, then read the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % size)
        sent = 0
        for _ in range(size // len(BLOCK)):
            sock.sendall(BLOCK)  # a reset would fail here with EPIPE or ECONNRESET
            sent += len(BLOCK)
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(65536):  # ... or here, before the 413 is read
            answer += chunk
        return answer, sent


def test_refused_upload_gets_its_413_and_the_rest_of_the_body_is_drained(backend):
    with running_server(backend, app, max_body_size=1000) as server:
        answer, sent = send_body_while_refused(server.port, 4 * 1024 * 1024)
        assert sent == 4 * 1024 * 1024
        assert answer.startswith(b"HTTP/1.1 413 ") and b"Connection: close" in answer
        with RawClient(server.port) as client:
            client.request("GET", "/")
            assert client.read_reply().status == 200


def test_lingering_ends_lingering_timeout_after_the_client_goes_quiet(backend):
    with running_server(backend, app, max_body_size=1000, lingering_timeout=0.3) as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            sock.sendall(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 99999\r\n\r\nabc")
            assert sock.recv(4096).startswith(b"HTTP/1.1 413 ")
            started = time.monotonic()
            assert sock.recv(4096) == b""  # the server's FIN came with its answer
            assert wait_for(lambda: server_connections(server) == 0, timeout=3)
            assert time.monotonic() - started >= 0.25


def test_lingering_time_bounds_a_client_that_never_stops_sending(backend):
    limits = dict(max_body_size=1000, lingering_time=0.6, lingering_timeout=0.3)
    with running_server(backend, app, **limits) as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            sock.sendall(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 999999999\r\n\r\n")
            started = time.monotonic()
            with pytest.raises(OSError):  # EPIPE or ECONNRESET once the server gives up
                while time.monotonic() - started < 5:
                    sock.sendall(b"x" * 1024)
                    time.sleep(0.05)
            assert 0.5 <= time.monotonic() - started < 3
        assert wait_for(lambda: server_connections(server) == 0, timeout=3)


# ---------------------------------------------------------------------- readers that don't read


def test_client_that_reads_nothing_costs_one_write_buffer_and_is_cut_after_send_timeout(backend):
    high = 64 * 1024
    with running_server(backend, app, send_timeout=0.5, write_buffer_high=high) as server:
        with RawClient(server.port, timeout=10) as client:
            client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            produced["bytes"] = 0
            started_at = time.monotonic()
            client.send(b"GET /big HTTP/1.1\r\nHost: t\r\n\r\n")
            assert wait_for(lambda: produced["bytes"] > 0, 5)
            assert wait_for(lambda: server_connections(server) == 0, 10), "never cut"
            elapsed = time.monotonic() - started_at
            # what was made is what the kernel buffers hold plus at most one mark and a block
            assert produced["bytes"] < 16 * 1024 * 1024, produced
            assert 0.5 <= elapsed < 5.0
            # now the client reads: the reply's start, cut short; what the server still
            # held in its write buffer at the cut was dropped, not sent after it
            assert client.is_closed_by_server(timeout=5)
            cut = client.unfinished_reply()
            assert cut is not None and cut.status == 200, "no reply began, or it ended whole"
            delivered, made = len(cut.body), produced["bytes"]
            assert delivered < made, "the server's buffer was sent after the cut"
        with RawClient(server.port) as client:
            client.request("GET", "/")
            assert client.read_reply().status == 200


def test_stalled_stream_holds_at_most_the_write_buffer_mark_and_a_block(backend):
    high = 64 * 1024
    with running_server(backend, app, write_buffer_high=high) as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            produced["bytes"] = 0
            sock.sendall(b"GET /big HTTP/1.1\r\nHost: t\r\n\r\n")
            assert wait_for(lambda: stream_waits_for_its_client(server), 10)
            made = produced["bytes"]
            assert buffered_for_clients(server) <= high + len(BLOCK)
            time.sleep(0.3)
            assert produced["bytes"] == made, "the stream went on producing"


def test_pipelining_client_that_never_reads_is_bounded_and_cut(backend):
    high = 256 * 1024
    with running_server(backend, app, send_timeout=0.5, write_buffer_high=high) as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            sock.setblocking(False)
            burst = b"GET /bytes HTTP/1.1\r\nHost: t\r\n\r\n" * 64
            sent, stalled_since = 0, None
            while sent < 64 * 1024 * 1024:  # until the server stops taking requests
                try:
                    sent += sock.send(burst)
                    stalled_since = None
                except BlockingIOError:
                    stalled_since = stalled_since or time.monotonic()
                    if time.monotonic() - stalled_since > 0.3:
                        break
                    time.sleep(0.01)
                except (BrokenPipeError, ConnectionResetError):
                    break
            assert sent < 64 * 1024 * 1024, "the server kept reading requests it could not answer"
            # each answer is 200 kB; what waits for the client is one buffer and one answer
            assert buffered_for_clients(server) <= high + 200_000 + 32 * 4096
            assert wait_for(lambda: server_connections(server) == 0, 10), "never cut"
        with RawClient(server.port) as client:
            client.request("GET", "/")
            assert client.read_reply().status == 200


def test_half_closed_client_behind_a_full_write_buffer_still_gets_every_answer(backend):
    with running_server(backend, app, write_buffer_high=64 * 1024) as server:
        with RawClient(server.port, timeout=10) as client:
            client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            produced["bytes"] = 0
            client.send(b"GET /big?blocks=256 HTTP/1.1\r\nHost: t\r\n\r\n")
            assert wait_for(lambda: stream_waits_for_its_client(server), 10)
            client.send(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")  # read into the stash
            client.sock.shutdown(socket.SHUT_WR)
            stream, hello = client.read_replies(2)
            assert len(stream.body) == 256 * len(BLOCK)
            assert hello.body == b"ok"
            assert client.is_closed_by_server(timeout=5)


# ---------------------------------------------------------------------- many connections


def test_connection_churn_leaves_no_descriptor_behind(backend):
    with running_server(backend, app) as server:
        with RawClient(server.port) as client:
            client.request("GET", "/")
            assert client.read_reply().status == 200
        assert wait_for(lambda: server_connections(server) == 0, 5)
        gc.collect()  # sockets of earlier tests waiting for a collection would skew the count
        before = open_descriptors()
        request = b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
        for round_ in range(1500):
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
            kind = round_ % 3
            if kind == 0:  # a whole request, read to the end
                sock.sendall(request)
                while sock.recv(65536):
                    pass
                sock.close()
            elif kind == 1:  # half a request, then gone
                sock.sendall(request[:20])
                sock.close()
            else:  # a request, then reset before the answer is read
                sock.sendall(request)
                reset(sock)
        assert wait_for(lambda: server_connections(server) == 0, 10)
        assert wait_for(lambda: open_descriptors() == before, 5), (open_descriptors(), before)
        # a connection reset in the accept queue may never reach the server; the others did
        assert server.call(lambda: server.service.stats.connections_total) >= 1 + 1000
        with RawClient(server.port) as client:
            client.request("GET", "/")
            assert client.read_reply().status == 200


def test_connections_beyond_max_connections_are_answered_503_and_closed(backend):
    with running_server(backend, app, max_connections=100) as server:
        held = []
        try:
            for _ in range(100):
                client = RawClient(server.port)
                held.append(client)
                client.request("GET", "/")
                assert client.read_reply().status == 200
            refused = 0
            for _ in range(200):
                with socket.create_connection(("127.0.0.1", server.port), timeout=5) as extra:
                    answer = b""
                    while chunk := extra.recv(4096):  # closed at once, after the 503
                        answer += chunk
                    refused += answer.startswith(b"HTTP/1.1 503 ")
            assert refused == 200
            assert server_connections(server) == 100
            assert server.call(lambda: server.service.stats.connections_refused) == 200
            held[-1].request("GET", "/")  # the connections within the limit are untouched
            assert held[-1].read_reply().status == 200
        finally:
            for client in held:
                client.close()
        assert wait_for(lambda: server_connections(server) == 0, 5)
        with RawClient(server.port) as client:
            client.request("GET", "/")
            assert client.read_reply().status == 200


IDLE_CONNECTIONS = 5000
RSS_PER_IDLE_CONNECTION = 16 * 1024  # bytes; measured 4.7-8.3 KiB over the backends


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def _raise_descriptor_limit(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        if hard != resource.RLIM_INFINITY and hard < wanted:
            pytest.skip(f"{wanted} descriptors needed, the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


@pytest.mark.timeout(180)
def test_five_thousand_idle_keep_alive_connections_cost_bounded_memory(backend):
    _raise_descriptor_limit(IDLE_CONNECTIONS + 512)
    port = free_port()
    command = [python(), "-m", "forkloop", "--no-master", "--bind", f"127.0.0.1:{port}"]
    command += ["--loop", backend.backend, "--log-level", "warning"]
    request = b"GET / HTTP/1.1\r\nHost: t\r\n\r\n"
    idle: list[socket.socket] = []
    with ServerProcess(f"forkloop-{backend.id}", command, port) as server:
        pid = server.process.pid
        try:
            for _warm_up in range(200):  # allocator pools and caches reach their working size
                idle.append(_request_on_new_connection(port, request))
            baseline = _rss(pid)
            for _ in range(IDLE_CONNECTIONS - len(idle)):
                idle.append(_request_on_new_connection(port, request))
            grown = _rss(pid) - baseline
            per_connection = grown / (IDLE_CONNECTIONS - 200)
            assert per_connection < RSS_PER_IDLE_CONNECTION, (
                f"{per_connection / 1024:.1f} KiB per idle connection"
            )
            stats = json.loads(_get(port, b"/stats"))
            assert stats["open_connections"] >= IDLE_CONNECTIONS
            for sock in (idle[0], idle[len(idle) // 2], idle[-1]):  # idle ones still work
                sock.sendall(request)
                assert sock.recv(4096).startswith(b"HTTP/1.1 200 ")
        finally:
            for sock in idle:
                sock.close()


def _request_on_new_connection(port: int, request: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(request)
    answer = sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 200 "), answer
    return sock


def _get(port: int, path: bytes) -> bytes:
    with RawClient(port) as client:
        client.send(b"GET %s HTTP/1.1\r\nHost: t\r\n\r\n" % path)
        return client.read_reply().body


def test_stream_stops_producing_once_its_client_is_gone(backend):
    with running_server(backend, app) as server:
        for _ in range(5):
            produced["bytes"] = 0
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            sock.sendall(b"GET /big HTTP/1.1\r\nHost: t\r\n\r\n")
            received = 0
            while received < 1024 * 1024:  # a reader, until it crashes
                received += len(sock.recv(1 << 20))
            reset(sock)
            assert wait_for(lambda: server_connections(server) == 0, 5)
            assert produced["bytes"] < 32 * 1024 * 1024, "kept producing for a client that left"
        with RawClient(server.port) as client:
            client.request("GET", "/")
            assert client.read_reply().status == 200
