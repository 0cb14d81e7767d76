"""The fuzzer's harness: an app, a fake transport, and a strict reader of what was sent.

`Harness` keeps one `HttpService` on a loop of the backend under test and
runs one conversation per example: a fresh `HttpConnection` on a
`FakeTransport` (the asyncio transport contract in memory, with a client that
reads only when told to), fed the example's chunks and ended by a half-close,
passing deadlines or a reset. `split_responses` cuts what the server wrote
into responses and checks each with a fresh httptools response parser;
`check_conversation` states what must hold after any conversation.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httptools

from forkloop.server.app import App
from forkloop.server.cache import CachePolicy
from forkloop.server.config import Config, Limits
from forkloop.server.http import Request, Response, error_response, safe_join
from forkloop.server.protocol import HttpConnection
from forkloop.server.service import HttpService

SECRET = b"the-secret-outside-the-root"
PUBLIC = b"public file contents"
STREAM_CHUNK = b"s" * 600  # bigger than the write-buffer mark: streams pause and resume

LIMITS = Limits(
    max_request_line=200,
    max_header_bytes=1024,
    max_header_count=12,
    max_body_size=512,
    max_pipelined=3,
    max_keepalive_requests=8,
    write_buffer_high=1024,
)


# ---------------------------------------------------------------------- the app


def fuzz_app(root: Path) -> App:
    app = App()

    @app.get("/")
    def hello(request: Request) -> Response:
        return Response(b"hello")

    @app.get("/seq")
    def sequence(request: Request) -> Response:
        return Response(request.query_param("i", "-"))

    @app.route("/echo", methods=("POST", "PUT"))
    async def echo(request: Request) -> Response:
        return Response(await request.body(), content_type="application/octet-stream")

    @app.get("/yield")
    async def yielding(request: Request) -> Response:
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        return Response(b"yielded")

    @app.get("/stream")
    def stream(request: Request) -> Response:
        count = min(int(request.query_param("n", "2") or 0), 5)

        async def chunks():
            for _ in range(count):
                yield STREAM_CHUNK

        return Response(stream=chunks())

    @app.get("/big")
    def big(request: Request) -> Response:
        return Response(b"b" * 3000)

    @app.get("/close")
    def close(request: Request) -> Response:
        return Response(b"bye", headers={"Connection": "close"})

    @app.get("/boom")
    def boom(request: Request) -> Response:
        raise RuntimeError("a handler failure on purpose")

    @app.get("/cached/{key}", cache=CachePolicy(ttl=60))
    async def cached(request: Request) -> Response:
        await asyncio.sleep(0)
        return Response(f"cached {request.params['key']}", headers={"Cache-Control": "max-age=60"})

    @app.get("/files/{name:path}")
    def files(request: Request) -> Response:
        path = safe_join(root, request.params["name"])
        if path is None or not os.path.isfile(path):
            return error_response(404, "no such file")
        with open(path, "rb") as file:
            return Response(file.read())

    return app


# ---------------------------------------------------------------------- the fake transport


class FakeTransport:
    """The asyncio transport contract, in memory: the client reads when told to."""

    def __init__(self, loop: asyncio.AbstractEventLoop, protocol: HttpConnection) -> None:
        self.loop = loop
        self.protocol = protocol
        self.high = 64 * 1024
        self.delivered = bytearray()  # what the client has read
        self.buffered = bytearray()  # written, not read yet
        self.closed = False
        self.eof_written = False  # write_eof(): a FIN after what was written
        self.lost = False
        self.writes_after_close = 0
        self.reading_paused = False
        self.writing_paused = False

    def write(self, data: bytes) -> None:
        if self.closed or self.eof_written:
            self.writes_after_close += 1
            return
        self.buffered += data
        if not self.writing_paused and len(self.buffered) > self.high:
            self.writing_paused = True
            self.protocol.pause_writing()

    def client_reads(self) -> None:
        self.delivered += self.buffered
        self.buffered.clear()
        if self.writing_paused and not self.closed:
            self.writing_paused = False
            self.protocol.resume_writing()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.delivered += self.buffered  # close() flushes what was written
            self.buffered.clear()
            self.loop.call_soon(self._lose)

    def abort(self) -> None:
        if not self.closed:
            self.closed = True
            self.buffered.clear()
            self.loop.call_soon(self._lose)

    def _lose(self) -> None:
        self.lost = True
        self.protocol.connection_lost(None)

    def is_closing(self) -> bool:
        return self.closed

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof_written = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 4242) if name == "peername" else default

    def pause_reading(self) -> None:
        self.reading_paused = True

    def resume_reading(self) -> None:
        self.reading_paused = False

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if high is not None:
            self.high = high

    def get_write_buffer_size(self) -> int:
        return len(self.buffered)


# ---------------------------------------------------------------------- the harness


@dataclass
class Conversation:
    delivered: bytes
    dispatched: list[Request]
    rejected: int
    transport: FakeTransport
    reset: bool  # the client reset the connection instead of half-closing it


class ErrorLog(logging.Handler):
    """ERROR records from the server, but a handler's own failure (a 500 by design)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if not str(record.msg).startswith("handler for"):
            self.records.append(self.format(record))


class Harness:
    """One HttpService on a loop of the backend under test; one connection per example."""

    SPINS = 400  # loop turns a conversation may take to settle: bounds every wait

    def __init__(self, loop: asyncio.AbstractEventLoop, root: Path, errors: ErrorLog) -> None:
        self.loop = loop
        self.errors = errors
        self.service = HttpService(fuzz_app(root), Config(limits=LIMITS))
        self.loop_errors: list[dict] = []
        loop.set_exception_handler(lambda _loop, context: self.loop_errors.append(context))
        loop.run_until_complete(self.service.start([]))

    def converse(self, chunks: list[bytes], reads: list[bool], ending: str = "eof") -> Conversation:
        """Feed ``chunks`` (the client reading after those ``reads`` says), then end:
        ``eof`` (half-close), ``deadline`` (every deadline passes, then EOF) or
        ``reset`` (the connection is lost at once, whatever is running)."""
        return self.loop.run_until_complete(self._converse(chunks, reads, ending))

    async def _converse(self, chunks: list[bytes], reads: list[bool], ending: str):
        connection = self.service.create_connection()
        dispatched: list[Request] = []
        resolve = connection.resolve

        def recording_resolve(request: Request) -> Any:
            dispatched.append(request)
            return resolve(request)

        connection.resolve = recording_resolve
        transport = FakeTransport(self.loop, connection)
        rejected_before = self.service.stats.rejected
        connection.connection_made(transport)
        answer_instantly = connection.reader.answer_instantly
        if answer_instantly is not None:  # a cache hit answered from the parser counts too

            def recording_instant_answer(target: bytes, method: bytes) -> bool:
                answered = answer_instantly(target, method)
                if answered:
                    dispatched.append(Request(method.decode(), target, "1.1", [], None, True))
                return answered

            connection.reader.answer_instantly = recording_instant_answer
        for chunk, read in zip(chunks, reads, strict=True):
            await self._spin(transport, 3, read)
            if transport.closed:
                break
            await self._until(lambda: not transport.reading_paused, transport)
            connection.data_received(chunk)
        if ending == "reset":
            await self._spin(transport, 1)
            if not transport.closed:
                transport.closed = transport.lost = True
                connection.connection_lost(ConnectionResetError("connection reset by peer"))
            await self._until(lambda: connection.active_request is None, transport)
            assert connection.active_request is None, "a handler outlived its connection"
            return Conversation(b"", dispatched, 0, transport, reset=True)
        await self._until(lambda: connection.active_request is None or transport.closed, transport)
        if ending == "deadline" and not transport.closed and not connection.flow.send_deadline:
            connection.check_deadlines(self.loop.time() + 1e6)  # the tick, long after
            await self._until(
                lambda: connection.active_request is None or transport.closed, transport
            )
        if not transport.closed:  # the client half-closes
            await self._until(lambda: not transport.reading_paused, transport)
            if not connection.eof_received():
                transport.close()
        await self._until(lambda: transport.lost, transport)
        assert transport.lost, "the server did not close the connection after the client's EOF"
        return Conversation(
            bytes(transport.delivered),
            dispatched,
            self.service.stats.rejected - rejected_before,
            transport,
            reset=False,
        )

    async def _spin(self, transport: FakeTransport, turns: int, read: bool = True) -> None:
        for _ in range(turns):
            if read:
                transport.client_reads()
            await asyncio.sleep(0)

    async def _until(self, condition, transport: FakeTransport) -> None:
        for _ in range(self.SPINS):
            if condition():
                return
            await self._spin(transport, 1)

    def close(self) -> None:
        self.loop.run_until_complete(self.service.shutdown(0))


@contextmanager
def harness_on(backend, tmp_path: Path) -> Iterator[Harness]:
    root = tmp_path / "root"
    root.mkdir()
    (root / "public.txt").write_bytes(PUBLIC)
    (tmp_path / "secret.txt").write_bytes(SECRET)
    errors = ErrorLog()
    server_log = logging.getLogger("forkloop")
    server_log.addHandler(errors)
    server_log.propagate = False  # thousands of /boom tracebacks are not worth keeping
    loop = backend.new_event_loop()
    try:
        harness = Harness(loop, root, errors)
        yield harness
        harness.close()
    finally:
        server_log.propagate = True
        server_log.removeHandler(errors)
        loop.close()


# ---------------------------------------------------------------------- reading the output


@dataclass
class Reply:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    raw: bytes = b""


class _Head:
    def __init__(self) -> None:
        self.headers: dict[str, str] = {}
        self.complete = 0
        self.body = b""

    def on_header(self, name: bytes, value: bytes) -> None:
        key = name.decode("latin-1").lower()
        assert key not in self.headers, f"response repeats {key}"
        self.headers[key] = value.decode("latin-1")

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.complete += 1


def _chunked_length(data: bytes, start: int) -> int:
    """Bytes from ``start`` to the end of a chunked body (its last chunk and trailer)."""
    position = start
    while True:
        line_end = data.find(b"\r\n", position)
        assert line_end >= 0, "chunked body cut short"
        size = int(data[position:line_end].split(b";")[0], 16)
        position = line_end + 2
        if size == 0:
            assert data.startswith(b"\r\n", position), "no empty line after the last chunk"
            return position + 2 - start
        position += size + 2


def split_responses(data: bytes, dispatched: list[Request]) -> list[Reply]:
    """The responses in ``data``, each checked with a fresh httptools response parser.

    HEAD responses have no body, which the parser cannot know, so the split is
    done here from the framing headers; the k-th final response answers the
    k-th dispatched request (a rejection comes after them all)."""
    replies: list[Reply] = []
    finals = 0
    offset = 0
    while offset < len(data):
        head_end = data.find(b"\r\n\r\n", offset)
        assert head_end >= 0, f"response head cut short: {data[offset : offset + 200]!r}"
        body_start = head_end + 4
        head = _Head()
        parser = httptools.HttpResponseParser(head)
        parser.feed_data(data[offset:body_start])
        status = parser.get_status_code()
        headers = head.headers
        if status < 200:
            assert head.complete == 1
            replies.append(Reply(status, headers, raw=data[offset:body_start]))
            offset = body_start
            continue
        answers_head = finals < len(dispatched) and dispatched[finals].method == "HEAD"
        finals += 1
        assert "date" in headers and headers.get("server") == "forkloop", headers
        framings = ("content-length" in headers) + ("transfer-encoding" in headers)
        assert framings <= 1, f"response has both Content-Length and Transfer-Encoding: {headers}"
        if answers_head or status in (204, 304):
            end = body_start
        elif "content-length" in headers:
            end = body_start + int(headers["content-length"])
        elif headers.get("transfer-encoding") == "chunked":
            end = body_start + _chunked_length(data, body_start)
        else:
            assert headers.get("connection") == "close", f"response has no framing: {headers}"
            end = len(data)
        assert end <= len(data), "response body cut short"
        raw = data[offset:end]
        if not framings:  # close-delimited: the body is whatever came before the close
            head.body = data[body_start:]
        elif not answers_head:
            whole = _Head()
            httptools.HttpResponseParser(whole).feed_data(raw)
            assert whole.complete == 1, f"httptools did not read one whole response: {raw[:300]!r}"
            head.body = whole.body
        replies.append(Reply(status, headers, head.body, raw))
        if headers.get("connection") == "close":
            assert end == len(data), "the server wrote after a Connection: close response"
        offset = end
    return replies


def check_conversation(harness: Harness, talk: Conversation) -> list[Reply]:
    assert harness.loop_errors == [], harness.loop_errors
    assert harness.errors.records == [], harness.errors.records
    assert talk.transport.writes_after_close == 0, "the server wrote after closing"
    assert SECRET not in talk.delivered, "a file outside the static root was served"
    if talk.reset:
        return []
    replies = split_responses(talk.delivered, talk.dispatched)
    finals = [reply for reply in replies if reply.status >= 200]
    assert talk.rejected <= 1
    assert len(finals) == len(talk.dispatched) + talk.rejected, (
        f"{len(talk.dispatched)} requests dispatched and {talk.rejected} rejected, "
        f"but {len(finals)} final responses: {talk.delivered[:600]!r}"
    )
    if talk.rejected:
        assert finals[-1].status >= 400 and finals[-1].headers.get("connection") == "close"
    return replies
