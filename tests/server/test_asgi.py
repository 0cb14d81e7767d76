"""ASGI applications served by forkloop's connection layer, on every backend.

Raw ASGI callables check the protocol itself (scope, receive, send, errors,
disconnect, cancellation, lifespan); Starlette and FastAPI apps check that
real frameworks run unchanged. Every test talks to a real socket.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
from typing import Any

import pytest
from fastapi import FastAPI
from pydantic import BaseModel
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request as StarletteRequest
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route

from forkloop.server.app import App
from forkloop.server.asgi import AsgiApp, LifespanFailed, as_asgi3, looks_like_asgi
from tests.server.master_support import wait_for
from tests.server.support import RawClient, running_server, send_raw


async def read_body(receive) -> bytes:
    body = b""
    while True:
        message = await receive()
        assert message["type"] == "http.request"
        body += message.get("body", b"")
        if not message.get("more_body"):
            return body


async def answer(send, status: int, body: bytes, headers=()) -> None:
    await send({"type": "http.response.start", "status": status, "headers": list(headers)})
    await send({"type": "http.response.body", "body": body})


async def scope_echo(scope, receive, send) -> None:
    if scope["type"] != "http":
        raise RuntimeError("only http")
    body = await read_body(receive)
    shown = {
        key: value.decode("latin-1") if isinstance(value, bytes) else value
        for key, value in scope.items()
        if key not in ("headers", "state")
    }
    shown["headers"] = [[n.decode(), v.decode()] for n, v in scope["headers"]]
    shown["body"] = body.decode()
    payload = json.dumps(shown).encode()
    await answer(send, 200, payload, [(b"content-type", b"application/json")])


def test_http_scope_is_complete(backend):
    with running_server(backend, AsgiApp(scope_echo, root_path="/mount")) as server:
        with RawClient(server.port) as client:
            client.request(
                "POST", "/caf%C3%A9/x?a=1&b=%20", [("X-Two", "2"), ("x-one", "1")], b"hi"
            )
            reply = client.read_reply()
    assert reply.status == 200, reply.body
    scope = json.loads(reply.body)
    assert scope["type"] == "http"
    assert scope["asgi"] == {"version": "3.0", "spec_version": "2.4"}
    assert scope["http_version"] == "1.1"
    assert scope["method"] == "POST"
    assert scope["scheme"] == "http"
    assert scope["path"] == "/mount/café/x"
    assert scope["raw_path"] == "/mount/caf%C3%A9/x"
    assert scope["query_string"] == "a=1&b=%20"
    assert scope["root_path"] == "/mount"
    assert scope["headers"][:3] == [["host", "test"], ["x-two", "2"], ["x-one", "1"]]
    assert scope["client"][0] == "127.0.0.1"
    assert scope["server"] == ["127.0.0.1", server.port]
    assert scope["body"] == "hi"


def test_head_gets_headers_and_no_body_and_pipelined_requests_stay_in_order(backend):
    async def app(scope, receive, send):
        await answer(send, 200, scope["path"].encode(), [(b"x-path", scope["path"].encode())])

    with running_server(backend, AsgiApp(app)) as server:
        raw = send_raw(
            server.port,
            b"HEAD /a HTTP/1.1\r\nHost: t\r\n\r\n"
            b"GET /bb HTTP/1.1\r\nHost: t\r\n\r\n"
            b"GET /ccc HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
        )
    head, _, rest = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK") and b"x-path: /a" in head
    assert b"Content-Length: 2" in head
    assert rest.startswith(b"HTTP/1.1 200 OK")  # no body bytes between the two
    assert b"x-path: /bb" in rest and b"\r\n\r\n/bbHTTP/1.1 200 OK" in rest
    assert rest.endswith(b"\r\n\r\n/ccc")


def test_streamed_body_is_chunked_or_uses_the_declared_length(backend):
    async def app(scope, receive, send):
        headers = [(b"content-length", b"6")] if scope["path"] == "/declared" else []
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        for piece in (b"ab", b"cd", b"ef"):
            await send({"type": "http.response.body", "body": piece, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    with running_server(backend, AsgiApp(app)) as server:
        with RawClient(server.port) as client:
            client.request("GET", "/chunked")
            chunked = client.read_reply()
            client.request("GET", "/declared")
            declared = client.read_reply()
    assert chunked.chunked and chunked.body == b"abcdef"
    assert not declared.chunked and declared.header("content-length") == "6"
    assert declared.body == b"abcdef"


def test_app_errors_become_500_or_a_closed_connection_and_the_server_keeps_serving(backend, caplog):
    async def app(scope, receive, send):
        path = scope["path"]
        if path == "/raise":
            raise ValueError("boom")
        if path == "/silent":
            return
        if path == "/twice":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.start", "status": 200, "headers": []})
        if path == "/midway":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"part", "more_body": True})
            raise ValueError("after the start")
        if path == "/bad-header":
            await answer(send, 200, b"x", [(b"x-evil", b"a\r\nInjected: yes")])
            return
        await answer(send, 200, b"fine")

    caplog.set_level(logging.INFO, logger="forkloop")
    with running_server(backend, AsgiApp(app, name="demoapp")) as server:
        with RawClient(server.port) as client:
            for path in ("/raise", "/silent", "/twice", "/bad-header"):
                client.request("GET", path)
                reply = client.read_reply()
                assert reply.status == 500, (path, reply.body)
                assert b"Injected" not in reply.body
            client.request("GET", "/ok")
            assert client.read_reply().body == b"fine"
        with RawClient(server.port) as client:
            client.request("GET", "/midway")
            assert client.is_closed_by_server(5)
            cut = client.unfinished_reply()
            assert cut is not None and cut.status == 200 and cut.body == b"part"
    messages = "\n".join(record.getMessage() for record in caplog.records)
    assert "ASGI app demoapp raised on GET /raise" in messages
    assert "ASGI app demoapp returned without answering GET /silent" in messages
    assert "ASGI app demoapp sent http.response.start twice (GET /twice)" in messages


def test_disconnect_is_delivered_at_once_and_the_app_is_cancelled_after_the_grace(backend):
    seen: list[str] = []

    async def app(scope, receive, send):
        await receive()  # the (empty) body
        message = await receive()  # blocks until the client leaves
        seen.append(message["type"])
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise

    with running_server(backend, AsgiApp(app, lifespan="off", disconnect_grace=0.2)) as server:
        client = RawClient(server.port)
        client.request("GET", "/wait")
        time.sleep(0.1)
        client.close()
        assert wait_for(lambda: seen == ["http.disconnect", "cancelled"], 5), seen
        assert server.call(lambda: server.service.stats.cancelled["disconnect"]) == 1


def test_without_a_grace_the_app_runs_on_after_its_client_left(backend):
    seen: list[str] = []

    async def app(scope, receive, send):
        await receive()
        seen.append((await receive())["type"])
        await asyncio.sleep(0.3)  # not cancelled: it finishes its work
        seen.append("finished")

    with running_server(backend, AsgiApp(app, lifespan="off", disconnect_grace=None)) as server:
        client = RawClient(server.port)
        client.request("GET", "/")
        time.sleep(0.1)
        client.close()
        assert wait_for(lambda: seen == ["http.disconnect", "finished"], 5), seen


def test_request_timeout_answers_504(backend):
    async def app(scope, receive, send):
        await asyncio.sleep(30)

    with running_server(backend, AsgiApp(app, lifespan="off"), request_timeout=0.2) as server:
        with RawClient(server.port) as client:
            client.request("GET", "/slow")
            reply = client.read_reply()
        assert reply.status == 504
        assert server.call(lambda: server.service.stats.cancelled["deadline"]) == 1


def test_send_waits_while_the_client_does_not_read(backend):
    produced = []

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for _ in range(2000):  # 128 MiB if nothing held it back
            await send({"type": "http.response.body", "body": b"x" * 65536, "more_body": True})
            produced.append(1)
        await send({"type": "http.response.body", "body": b""})

    with running_server(
        backend, AsgiApp(app, lifespan="off"), write_buffer_high=64 * 1024
    ) as server:
        sock = socket.create_connection(("127.0.0.1", server.port))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        time.sleep(1.0)
        assert len(produced) < 200, f"{len(produced)} pieces produced for a client reading nothing"
        sock.close()


def test_lifespan_startup_state_and_shutdown(backend):
    events: list[str] = []

    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    scope["state"]["greeting"] = "hello from startup"
                    events.append("startup")
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    events.append("shutdown")
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        await answer(send, 200, scope["state"]["greeting"].encode())

    with running_server(backend, AsgiApp(app, lifespan="on")) as server:
        assert events == ["startup"]
        with RawClient(server.port) as client:
            client.request("GET", "/")
            assert client.read_reply().body == b"hello from startup"
    assert events == ["startup", "shutdown"]


def test_lifespan_startup_failure_stops_the_boot_with_the_apps_message(backend):
    async def app(scope, receive, send):
        await receive()
        await send({"type": "lifespan.startup.failed", "message": "database unreachable"})

    with pytest.raises(LifespanFailed, match="lifespan startup failed: database unreachable"):
        with running_server(backend, AsgiApp(app)):
            pass


def test_lifespan_auto_serves_an_app_that_does_not_support_it(backend):
    with running_server(backend, AsgiApp(scope_echo, lifespan="auto")) as server:
        with RawClient(server.port) as client:
            client.request("GET", "/")
            assert client.read_reply().status == 200


def test_asgi2_double_callable_is_served(backend):
    class Asgi2:
        def __init__(self, scope):
            self.scope = scope

        async def __call__(self, receive, send):
            await answer(send, 200, b"asgi2 " + self.scope["path"].encode())

    assert looks_like_asgi(Asgi2)
    with running_server(backend, AsgiApp(Asgi2, lifespan="off")) as server:
        with RawClient(server.port) as client:
            client.request("GET", "/x")
            assert client.read_reply().body == b"asgi2 /x"


def test_detection_tells_asgi_apps_from_native_ones():
    async def asgi3(scope, receive, send): ...

    class WithCall:
        async def __call__(self, scope, receive, send): ...

    assert looks_like_asgi(asgi3) and looks_like_asgi(WithCall())
    assert looks_like_asgi(Starlette()) and looks_like_asgi(FastAPI())
    assert not looks_like_asgi(App())
    assert as_asgi3(asgi3) is asgi3


# ---------------------------------------------------------------------- frameworks


def starlette_app(tmp_path) -> Starlette:
    (tmp_path / "file.txt").write_bytes(b"file contents\n")
    done: list[str] = []

    async def hello(request: StarletteRequest) -> PlainTextResponse:
        return PlainTextResponse(f"hello {request.path_params['name']}")

    async def echo_json(request: StarletteRequest) -> JSONResponse:
        return JSONResponse({"got": await request.json()})

    async def form(request: StarletteRequest) -> JSONResponse:
        data = await request.form()
        upload = data["upload"]
        content = await upload.read()  # type: ignore[union-attr]
        return JSONResponse({"field": data["field"], "upload": len(content)})

    async def stream(request: StarletteRequest) -> StreamingResponse:
        async def numbers():
            for number in range(5):
                yield f"{number}\n".encode()

        return StreamingResponse(numbers(), media_type="text/plain")

    async def file(request: StarletteRequest) -> FileResponse:
        return FileResponse(tmp_path / "file.txt")

    async def background(request: StarletteRequest) -> PlainTextResponse:
        return PlainTextResponse("queued", background=BackgroundTask(done.append, "ran"))

    async def background_done(request: StarletteRequest) -> JSONResponse:
        return JSONResponse(done)

    return Starlette(
        routes=[
            Route("/hello/{name}", hello),
            Route("/json", echo_json, methods=["POST"]),
            Route("/form", form, methods=["POST"]),
            Route("/stream", stream),
            Route("/file", file),
            Route("/background", background),
            Route("/background-done", background_done),
        ]
    )


def test_starlette_routing_json_forms_streams_files_and_background_tasks(backend, tmp_path):
    boundary = "xyzzy"
    multipart = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="field"\r\n\r\nvalue\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="upload"; filename="a.bin"\r\n'
        f"Content-Type: application/octet-stream\r\n\r\n{'z' * 5000}\r\n--{boundary}--\r\n"
    ).encode()
    with running_server(backend, AsgiApp(starlette_app(tmp_path))) as server:
        with RawClient(server.port) as client:
            client.request("GET", "/hello/world")
            assert client.read_reply().body == b"hello world"
            client.request("POST", "/json", [("Content-Type", "application/json")], b'{"a": [1]}')
            assert json.loads(client.read_reply().body) == {"got": {"a": [1]}}
            content_type = f"multipart/form-data; boundary={boundary}"
            client.request("POST", "/form", [("Content-Type", content_type)], multipart)
            assert json.loads(client.read_reply().body) == {"field": "value", "upload": 5000}
            client.request("GET", "/stream")
            streamed = client.read_reply()
            assert streamed.chunked and streamed.body == b"0\n1\n2\n3\n4\n"
            client.request("GET", "/file")
            file_reply = client.read_reply()
            assert file_reply.body == b"file contents\n"
            assert file_reply.header("content-length") == "14"
            client.request("GET", "/background")
            assert client.read_reply().body == b"queued"
            client.request("GET", "/background-done")
            assert json.loads(client.read_reply().body) == ["ran"]
            client.request("GET", "/nowhere")
            assert client.read_reply().status == 404


class Item(BaseModel):
    name: str
    price: float


def fastapi_app() -> FastAPI:
    app = FastAPI()

    @app.get("/items/{item_id}")
    async def read_item(item_id: int, q: str | None = None) -> dict[str, Any]:
        return {"item_id": item_id, "q": q}

    @app.post("/items")
    async def create_item(item: Item) -> dict[str, Any]:
        return {"name": item.name, "price_with_tax": round(item.price * 1.2, 2)}

    return app


def test_fastapi_json_endpoints_and_validation_errors(backend):
    with running_server(backend, AsgiApp(fastapi_app())) as server:
        with RawClient(server.port) as client:
            client.request("GET", "/items/42?q=find")
            assert json.loads(client.read_reply().body) == {"item_id": 42, "q": "find"}
            body = json.dumps({"name": "lamp", "price": 10}).encode()
            client.request("POST", "/items", [("Content-Type", "application/json")], body)
            assert json.loads(client.read_reply().body) == {"name": "lamp", "price_with_tax": 12.0}
            client.request("GET", "/items/not-a-number")
            assert client.read_reply().status == 422


# ---------------------------------------------------------------------- request bodies


def body_recorder(events: list, ready: threading.Event | None = None):
    async def app(scope, receive, send):
        if ready is not None:
            await asyncio.get_running_loop().run_in_executor(None, ready.wait, 5)
        total = 0
        while True:
            message = await receive()
            events.append(
                (message["type"], len(message.get("body", b"")), message.get("more_body"))
            )
            if message["type"] != "http.request":
                return
            total += len(message.get("body", b""))
            if not message.get("more_body"):
                break
        await answer(send, 200, str(total).encode())

    return AsgiApp(app, lifespan="off")


def test_request_body_reaches_the_app_as_it_arrives(backend):
    events: list = []
    with running_server(backend, body_recorder(events)) as server:
        with RawClient(server.port) as client:
            client.send(
                b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 30000\r\n\r\n" + b"a" * 10000
            )
            assert wait_for(lambda: len(events) >= 1, 5)  # before the rest was even sent
            client.send(b"b" * 10000)
            assert wait_for(lambda: len(events) >= 2, 5)
            client.send(b"c" * 10000)
            assert client.read_reply().body == b"30000"
    assert all(more for _, _, more in events[:-1]) and events[-1][2] is False
    assert sum(size for _, size, _ in events) == 30000


def test_an_app_that_does_not_read_holds_back_the_client_with_bounded_memory(backend):
    reading = threading.Event()
    events: list = []
    size = 16 * 1024 * 1024
    with running_server(
        backend, body_recorder(events, ready=reading), max_body_size=size
    ) as server:
        sock = socket.create_connection(("127.0.0.1", server.port))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
        sock.sendall(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % size)
        sock.setblocking(False)
        pushed = 0
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            try:
                pushed += sock.send(b"x" * 65536)
            except BlockingIOError:
                time.sleep(0.01)
        held = server.call(
            lambda: max(
                (
                    c.active_request.streamed_body.waiting
                    for c in server.service.connections
                    if c.active_request is not None and c.active_request.streamed_body is not None
                ),
                default=0,
            )
        )
        assert pushed < size // 2, (
            f"the client pushed {pushed} bytes into an app that reads nothing"
        )
        assert held <= 512 * 1024, f"the worker holds {held} bytes of unread body"
        reading.set()
        sock.setblocking(True)
        sock.sendall(b"x" * (size - pushed))
        sock.settimeout(10)
        reply = b""
        while not reply.endswith(str(size).encode()):
            reply += sock.recv(65536)
        sock.close()


def test_100_continue_is_sent_when_the_app_first_reads(backend):
    reading = threading.Event()
    events: list = []
    with running_server(backend, body_recorder(events, ready=reading)) as server:
        with RawClient(server.port, timeout=0.5) as client:
            client.send(
                b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n"
            )
            with pytest.raises(TimeoutError):
                client.read_raw()  # nothing yet: the app has not asked for the body
            reading.set()
            client.sock.settimeout(5)
            assert client.read_raw().startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
            client.send(b"ping")
            assert client.read_reply().body == b"4"


def test_bad_chunk_framing_mid_body_is_refused_with_400_and_the_app_sees_a_disconnect(backend):
    events: list = []
    with running_server(backend, body_recorder(events)) as server:
        raw = send_raw(
            server.port,
            b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\nZZ\r\nnot a chunk\r\n",
        )
    assert raw.startswith(b"HTTP/1.1 400 Bad Request\r\n"), raw[:200]
    assert events[0] == ("http.request", 5, True)
    assert events[-1][0] == "http.disconnect"


def test_client_leaving_mid_body_gives_the_app_a_disconnect(backend):
    events: list = []
    with running_server(backend, body_recorder(events)) as server:
        client = RawClient(server.port)
        client.send(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n" + b"a" * 10)
        assert wait_for(lambda: len(events) >= 1, 5)
        client.close()
        assert wait_for(lambda: events[-1][0] == "http.disconnect", 5), events


def test_whole_responses_honour_list_pairs_declared_lengths_and_connection_close(backend):
    async def app(scope, receive, send):
        path = scope["path"]
        if path == "/list-pairs":
            await answer(send, 200, b"ok", [[b"x-list", b"yes"]])
        elif path == "/wrong-length":
            await answer(send, 200, b"four", [(b"content-length", b"10")])
        elif path == "/close":
            await answer(send, 200, b"bye", [(b"connection", b"close")])
        else:
            size = path.strip("/").encode()
            await answer(send, 200, b"x" * int(size), [(b"content-length", size)])

    with running_server(backend, AsgiApp(app, lifespan="off")) as server:
        with RawClient(server.port) as client:
            client.request("GET", "/list-pairs")
            assert client.read_reply().header("x-list") == "yes"
            for size in ("3", "5", "3"):  # the same pair twice: each length its own
                client.request("GET", f"/{size}")
                reply = client.read_reply()
                assert reply.header("content-length") == size and len(reply.body) == int(size)
            client.request("GET", "/wrong-length")
            assert client.read_reply().status == 500
            client.request("GET", "/close")
            reply = client.read_reply()
            assert reply.body == b"bye" and reply.header("connection") == "close"
            assert client.is_closed_by_server(5)
