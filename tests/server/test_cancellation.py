"""Per-request cancellation: a client that leaves, a deadline, a shutdown; on every backend."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

from forkloop.server.app import App
from forkloop.server.http import Request, Response
from tests.server.support import RawClient, running_server


class Observed:
    """What the handlers report back to the test thread."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.finished = threading.Event()
        self.finished_at = 0.0
        self.reason: str | None = None
        self.critical_done = threading.Event()

    def finish(self, request: Request) -> None:
        self.reason = request.cancel_reason
        self.finished_at = time.monotonic()
        self.finished.set()


def make_app(observed: Observed) -> App:
    app = App()

    @app.get("/slow")
    async def slow(request: Request) -> Response:
        observed.started.set()
        try:
            await asyncio.sleep(float(request.query_param("s", "10")))
            return Response(b"done")
        finally:
            observed.finish(request)

    @app.get("/critical")
    async def critical(request: Request) -> Response:
        async def section() -> str:
            await asyncio.sleep(0.4)
            observed.critical_done.set()
            return "committed"

        observed.started.set()
        try:
            return Response(await request.shield(section()))
        finally:
            observed.finish(request)

    @app.get("/stream")
    def stream(request: Request) -> Response:
        async def endless():
            observed.started.set()
            try:
                block = b"s" * 65536
                while True:
                    yield block
            finally:
                observed.reason = "stream closed"
                observed.finished_at = time.monotonic()
                observed.finished.set()

        return Response(stream=endless())

    @app.get("/stats")
    def stats(request: Request) -> Response:
        return Response.json(request.server_stats())

    return app


def stats_of(port: int) -> dict:
    with RawClient(port) as client:
        client.request("GET", "/stats")
        return json.loads(client.read_reply().body)


def test_client_disconnect_cancels_the_handler_within_100ms(backend):
    observed = Observed()
    with running_server(backend, make_app(observed)) as server:
        client = RawClient(server.port)
        client.request("GET", "/slow?s=10")
        assert observed.started.wait(5)
        client.sock.setsockopt(
            socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
        )
        closed_at = time.monotonic()
        client.close()
        assert observed.finished.wait(5)
        assert observed.finished_at - closed_at < 0.1
        assert observed.reason == "disconnect"
        assert stats_of(server.port)["cancelled"] == {"disconnect": 1, "deadline": 0, "shutdown": 0}


def test_half_close_with_nothing_pipelined_cancels_the_handler(backend):
    observed = Observed()
    with running_server(backend, make_app(observed)) as server:
        with RawClient(server.port) as client:
            client.request("GET", "/slow?s=10")
            assert observed.started.wait(5)
            client.sock.shutdown(socket.SHUT_WR)
            assert observed.finished.wait(2)
            assert observed.reason == "disconnect"
            assert client.is_closed_by_server(timeout=2)


def test_request_timeout_cancels_the_handler_and_answers_504(backend):
    observed = Observed()
    with running_server(backend, make_app(observed), request_timeout=0.2) as server:
        with RawClient(server.port) as client:
            started = time.monotonic()
            client.request("GET", "/slow?s=10")
            reply = client.read_reply()
            assert reply.status == 504
            assert reply.header("connection") == "close"
            assert 0.2 <= time.monotonic() - started < 2
            assert observed.finished.wait(2)
            assert observed.reason == "deadline"
            assert client.is_closed_by_server(timeout=2)
        assert stats_of(server.port)["cancelled"]["deadline"] == 1


def test_handler_that_answers_in_time_is_not_cancelled(backend):
    observed = Observed()
    with running_server(backend, make_app(observed), request_timeout=2) as server:
        with RawClient(server.port) as client:
            client.request("GET", "/slow?s=0.05")
            assert client.read_reply().body == b"done"
            assert observed.reason is None


def test_shielded_section_completes_before_the_cancellation_lands(backend):
    observed = Observed()
    with running_server(backend, make_app(observed), request_timeout=0.1) as server:
        with RawClient(server.port) as client:
            client.request("GET", "/critical")
            reply = client.read_reply()
            assert observed.critical_done.is_set(), "the shielded section was cut short"
            assert reply.status == 504
            assert observed.reason == "deadline"


def test_shutdown_past_the_grace_cancels_handlers_with_503(backend):
    observed = Observed()
    with running_server(backend, make_app(observed)) as server:
        with RawClient(server.port) as client:
            client.request("GET", "/slow?s=10")
            assert observed.started.wait(5)
            server.loop.call_soon_threadsafe(
                lambda: asyncio.ensure_future(server.service.shutdown(0.2))
            )
            reply = client.read_reply()
            assert reply.status == 503
            assert observed.reason == "shutdown"
            assert client.is_closed_by_server(timeout=2)


def test_disconnect_is_noticed_while_writes_are_paused(backend):
    observed = Observed()
    with running_server(backend, make_app(observed), write_buffer_high=65536) as server:
        client = RawClient(server.port)
        client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        client.request("GET", "/stream")
        assert observed.started.wait(5)
        time.sleep(0.3)  # let the buffers fill: the server is now paused on writing
        assert not observed.finished.is_set()
        client.close()
        assert observed.finished.wait(3), "the stream kept running for a client that left"
