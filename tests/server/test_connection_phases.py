"""The connection's phases, driven through a fake transport.

Each test builds one `HttpConnection` on a `ConnectionContext` (no service, no
socket), feeds it bytes and checks the phase of the connection and of its
reader at each step; every transition the connection takes is recorded and
must be one that `TRANSITIONS` allows. The real-socket suites check the same
behaviour end to end.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from forkloop.server.app import App
from forkloop.server.config import Limits
from forkloop.server.context import ConnectionContext
from forkloop.server.http import Request, Response
from forkloop.server.parsing import BODY, HEAD, IDLE, LINGER
from forkloop.server.protocol import (
    CLOSED,
    CLOSING,
    OPEN,
    RUNNING,
    STREAMING,
    TRANSITIONS,
    UPGRADED,
    HttpConnection,
)
from tests.server.fuzz_support import FakeTransport

GET = b"GET / HTTP/1.1\r\nHost: t\r\n\r\n"
CANCELLED_HANDLERS: list[str] = []  # the paths of handlers that saw their cancellation


class RecordedConnection(HttpConnection):
    """An HttpConnection that remembers every phase it entered."""

    def __init__(self, context: ConnectionContext) -> None:
        super().__init__(context)
        self.phases = [self.phase]

    def _enter(self, phase: str) -> None:
        before = self.phase
        super()._enter(phase)
        if self.phase is not before:
            assert self.phase in TRANSITIONS[before], f"{before} -> {self.phase} is not allowed"
            self.phases.append(self.phase)


def phases_app(release: asyncio.Event) -> App:
    app = App()

    @app.get("/")
    def hello(request: Request) -> Response:
        return Response(b"hello")

    @app.get("/wait")
    async def wait(request: Request) -> Response:
        try:
            await release.wait()
        except asyncio.CancelledError:
            CANCELLED_HANDLERS.append(request.path)
            raise
        return Response(b"released")

    @app.get("/stream")
    def stream(request: Request) -> Response:
        async def pieces() -> AsyncIterator[bytes]:
            await release.wait()
            yield b"one"
            yield b"two"

        return Response(stream=pieces())

    @app.post("/upload")
    async def upload(request: Request) -> Response:
        return Response(b"%d" % len(await request.body()))

    return app


def run(
    test: Callable[[RecordedConnection, FakeTransport, asyncio.Event], Awaitable[None]],
    **limits: Any,
) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        release = asyncio.Event()
        context = ConnectionContext(loop, Limits(**limits), phases_app(release).resolve)
        connection = RecordedConnection(context)
        transport = FakeTransport(loop, connection)
        connection.connection_made(transport)  # type: ignore[arg-type]
        await test(connection, transport, release)

    asyncio.run(asyncio.wait_for(main(), 10))


async def settle() -> None:
    """Let scheduled callbacks and task steps run (a few loop turns)."""
    for _ in range(5):
        await asyncio.sleep(0)


def test_new_connection_is_open_and_waits_for_a_head_under_the_header_timeout():
    async def check(connection, transport, release):
        assert connection.phase is OPEN
        assert connection.reader.phase is HEAD
        assert connection.reader.deadline == connection.context.clock + 60.0

    run(check)


def test_plain_handler_answers_inline_and_the_keepalive_timeout_starts():
    async def check(connection, transport, release):
        connection.data_received(GET)
        transport.client_reads()
        assert transport.delivered.startswith(b"HTTP/1.1 200 OK\r\n")
        assert connection.phases == [OPEN]
        assert connection.reader.phase is IDLE
        assert connection.reader.deadline == connection.context.clock + 75.0

    run(check)


def test_a_head_in_pieces_keeps_the_deadline_of_its_first_byte():
    async def check(connection, transport, release):
        connection.data_received(GET)  # the first request: now IDLE
        connection.context.clock += 10
        connection.data_received(b"GET / HT")
        assert connection.reader.phase is HEAD
        first_byte_deadline = connection.reader.deadline
        assert first_byte_deadline == connection.context.clock + 60.0
        connection.context.clock += 10
        connection.data_received(b"TP/1.1\r\n")
        assert connection.reader.deadline == first_byte_deadline

    run(check)


def test_async_handler_runs_while_the_next_request_waits_in_order():
    async def check(connection, transport, release):
        connection.data_received(b"GET /wait HTTP/1.1\r\nHost: t\r\n\r\n" + GET)
        assert connection.phase is RUNNING
        assert len(connection.reader.pending) == 1  # the pipelined GET / waits
        release.set()
        await settle()
        transport.client_reads()
        assert connection.phases == [OPEN, RUNNING, OPEN]
        first, second = transport.delivered.split(b"HTTP/1.1 200 OK")[1:]
        assert first.endswith(b"released") and second.endswith(b"hello")
        assert not connection.reader.pending

    run(check)


def test_streaming_response_moves_through_streaming_and_back_to_open():
    async def check(connection, transport, release):
        connection.data_received(b"GET /stream HTTP/1.1\r\nHost: t\r\n\r\n")
        await settle()
        assert connection.phase is STREAMING
        release.set()
        await settle()
        transport.client_reads()
        assert connection.phases == [OPEN, RUNNING, STREAMING, OPEN]
        assert transport.delivered.endswith(b"3\r\none\r\n3\r\ntwo\r\n0\r\n\r\n")

    run(check)


def test_body_phase_extends_its_deadline_with_each_piece():
    async def check(connection, transport, release):
        head = b"POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: 6\r\n\r\n"
        connection.data_received(head + b"abc")
        assert connection.reader.phase is BODY
        connection.context.clock += 30
        connection.data_received(b"de")
        assert connection.reader.deadline == connection.context.clock + 60.0
        connection.data_received(b"f")
        await settle()
        transport.client_reads()
        assert transport.delivered.endswith(b"6")
        assert connection.reader.phase is IDLE

    run(check)


def test_framing_error_answers_then_closes_and_lingers():
    async def check(connection, transport, release):
        connection.data_received(b"GET / HTTP/1.1\r\nHost: t\r\nContent-Length: x\r\n\r\n")
        transport.client_reads()
        assert transport.delivered.startswith(b"HTTP/1.1 400 Bad Request\r\n")
        assert connection.phase is CLOSING
        assert connection.reader.phase is LINGER
        assert transport.eof_written and not transport.closed
        connection.data_received(b"more of the body")  # read and thrown away
        connection.check_deadlines(connection.context.clock + 5.0)
        assert transport.closed
        await settle()
        assert connection.phases == [OPEN, CLOSING, CLOSED]

    run(check)


def test_connection_close_request_closes_after_its_answer():
    async def check(connection, transport, release):
        connection.data_received(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        assert connection.phase is CLOSING
        assert transport.closed
        await settle()
        assert connection.phase is CLOSED
        assert b"Connection: close\r\n" in transport.delivered

    run(check)


def test_client_gone_while_running_cancels_the_handler_and_closes():
    async def check(connection, transport, release):
        CANCELLED_HANDLERS.clear()
        connection.data_received(b"GET /wait HTTP/1.1\r\nHost: t\r\n\r\n")
        assert connection.phase is RUNNING
        assert connection.task is not None
        connection.connection_lost(ConnectionResetError("reset by peer"))
        await settle()
        assert CANCELLED_HANDLERS == ["/wait"]
        assert connection.task is None
        assert connection.phase is CLOSED
        assert connection.active_request is None
        assert connection.context.stats.cancelled["disconnect"] == 1

    run(check)


def test_head_timeout_answers_408_and_closes():
    async def check(connection, transport, release):
        connection.data_received(b"GET / HTTP/1.1\r\nHost")
        connection.check_deadlines(connection.context.clock + 61.0)
        assert transport.delivered.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
        assert connection.phase is CLOSING
        assert transport.closed  # a timed-out client is not lingered for
        assert connection.context.stats.timeouts == 1

    run(check)


def test_idle_keepalive_timeout_closes_quietly():
    async def check(connection, transport, release):
        connection.data_received(GET)
        transport.client_reads()
        answered = bytes(transport.delivered)
        connection.check_deadlines(connection.context.clock + 76.0)
        assert transport.closed
        assert transport.delivered == answered  # nothing more is said
        assert connection.phase is CLOSING

    run(check)


def test_every_phase_has_a_transition_table_entry():
    assert set(TRANSITIONS) == {OPEN, RUNNING, STREAMING, CLOSING, UPGRADED, CLOSED}
    assert TRANSITIONS[CLOSED] == frozenset()
