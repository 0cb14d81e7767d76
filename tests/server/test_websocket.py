"""WebSockets of ASGI applications, on every backend, over real sockets.

The client is the ``websockets`` library's synchronous client (its own thread,
its own protocol code: nothing of the server's) or, where a test needs a
client that misbehaves (one that never answers a ping, one that sends
faster than the application reads), raw frames on a plain socket.
What the application saw goes through a thread-safe queue; every wait is
bounded.
"""

from __future__ import annotations

import asyncio
import base64
import os
import queue
import socket
import struct
import threading
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from forkloop.server.app import App
from forkloop.server.asgi import AsgiApp
from forkloop.server.config import WebSocketSettings
from forkloop.server.flow import STASH_LIMIT
from forkloop.server.websocket import FEED_SLICE
from tests.server.master_support import wait_for
from tests.server.support import RawClient, running_server, send_raw

TIMEOUT = 5.0


def ws_connect(port: int, path: str = "/", **options: Any) -> ClientConnection:
    options.setdefault("open_timeout", TIMEOUT)
    options.setdefault("compression", None)
    return connect(f"ws://127.0.0.1:{port}{path}", proxy=None, **options)


def asgi(app: Any, **settings: Any) -> AsgiApp:
    """``app`` (which speaks no lifespan) with these WebSocket settings."""
    grace = settings.pop("disconnect_grace", 1.0)
    websocket = WebSocketSettings(**settings)
    return AsgiApp(app, lifespan="off", websocket=websocket, disconnect_grace=grace)


class Seen:
    """What the application saw, told to the test thread."""

    def __init__(self) -> None:
        self.events: queue.Queue[Any] = queue.Queue()

    def put(self, event: Any) -> None:
        self.events.put(event)

    def next(self) -> Any:
        return self.events.get(timeout=TIMEOUT)


def echo_app(seen: Seen | None = None) -> Any:
    async def app(scope, receive, send):
        assert scope["type"] == "websocket"
        if seen is not None:
            seen.put(scope)
        assert (await receive())["type"] == "websocket.connect"
        offered = scope["subprotocols"]
        await send({"type": "websocket.accept", "subprotocol": offered[0] if offered else None})
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                if seen is not None:
                    seen.put(message)
                return
            if message.get("text") is not None:
                await send({"type": "websocket.send", "text": message["text"]})
            else:
                await send({"type": "websocket.send", "bytes": message["bytes"]})

    return app


# ---------------------------------------------------------------------- raw frames


def raw_handshake(port: int, path: str = "/", receive_buffer: int = 0) -> socket.socket:
    """A socket past a successful handshake (the 101 read, nothing after it)."""
    sock = socket.socket()
    if receive_buffer:  # before connecting: it sets the window the client offers
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.settimeout(TIMEOUT)
    sock.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        f"GET {path} HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        byte = sock.recv(1)
        assert byte, f"closed during the handshake: {head!r}"
        head += byte
    assert head.startswith(b"HTTP/1.1 101 "), head
    return sock


def masked_frame(opcode: int, payload: bytes, mask: bytes | None = None) -> bytes:
    """A client's frame (clients mask), FIN set; an all-zero ``mask`` leaves the
    payload as it is (cheap for large ones)."""
    mask = os.urandom(4) if mask is None else mask
    length = len(payload)
    if length < 126:
        header = struct.pack("!BB", 0x80 | opcode, 0x80 | length)
    elif length < 65536:
        header = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, length)
    else:
        header = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, length)
    if mask == bytes(4):
        return header + mask + payload
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return header + mask + masked


def read_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise EOFError(f"closed after {len(data)} of {size} bytes")
        data += chunk
    return data


def read_frame(sock: socket.socket) -> tuple[int, bytes]:
    """The next frame the server sent (servers don't mask): opcode and payload."""
    first, second = read_exactly(sock, 2)
    length = second & 0x7F
    if length == 126:
        (length,) = struct.unpack("!H", read_exactly(sock, 2))
    elif length == 127:
        (length,) = struct.unpack("!Q", read_exactly(sock, 8))
    return first & 0x0F, read_exactly(sock, length)


def close_code(payload: bytes) -> int:
    return int(struct.unpack("!H", payload[:2])[0])


# ---------------------------------------------------------------------- messages


def test_text_and_binary_messages_echo_and_the_scope_is_complete(backend):
    seen = Seen()
    app = AsgiApp(echo_app(seen), root_path="/mount")
    with running_server(backend, app) as server:
        with ws_connect(server.port, "/chat%20room?a=1", additional_headers={"X-Two": "2"}) as ws:
            ws.send("héllo")
            assert ws.recv(TIMEOUT) == "héllo"
            ws.send(b"\x00\xff" * 3)
            assert ws.recv(TIMEOUT) == b"\x00\xff" * 3
            big = "x" * 200_000  # several reads, and several writes back
            ws.send(big)
            assert ws.recv(TIMEOUT) == big
            ws.send(["frag", "mented ", "é"])  # one message in three frames
            assert ws.recv(TIMEOUT) == "fragmented é"
        scope = seen.next()
        assert seen.next() == {"type": "websocket.disconnect", "code": 1000, "reason": ""}
    assert scope["asgi"] == {"version": "3.0", "spec_version": "2.4"}
    assert scope["scheme"] == "ws"
    assert scope["http_version"] == "1.1"
    assert scope["path"] == "/mount/chat room"
    assert scope["raw_path"] == b"/mount/chat%20room"
    assert scope["query_string"] == b"a=1"
    assert scope["root_path"] == "/mount"
    assert (b"x-two", b"2") in scope["headers"]
    assert (b"upgrade", b"websocket") in scope["headers"]
    assert scope["subprotocols"] == []
    assert scope["client"][0] == "127.0.0.1"
    assert scope["server"] == ("127.0.0.1", server.port)
    assert scope["state"] == {}
    assert "websocket.http.response" in scope["extensions"]


def test_the_application_chooses_the_subprotocol_and_adds_headers(backend):
    async def app(scope, receive, send):
        await receive()
        assert scope["subprotocols"] == ["v2.chat", "v1.chat"]
        await send(
            {"type": "websocket.accept", "subprotocol": "v1.chat", "headers": [(b"x-room", b"7")]}
        )
        await receive()

    with running_server(backend, asgi(app)) as server:
        with ws_connect(server.port, subprotocols=["v2.chat", "v1.chat"]) as ws:
            assert ws.subprotocol == "v1.chat"
            assert ws.response.headers["X-Room"] == "7"
            assert ws.response.headers["Server"] == "forkloop"


def test_permessage_deflate_is_negotiated_unless_turned_off(backend):
    text = "compressible " * 10_000
    for enabled in (True, False):
        with running_server(backend, asgi(echo_app(), per_message_deflate=enabled)) as server:
            with ws_connect(server.port, compression="deflate") as ws:
                extensions = ws.response.headers.get("Sec-WebSocket-Extensions") or ""
                assert ("permessage-deflate" in extensions) is enabled
                ws.send(text)
                assert ws.recv(TIMEOUT) == text


# ---------------------------------------------------------------------- closing


def test_the_clients_close_code_and_reason_reach_the_application(backend):
    seen = Seen()
    with running_server(backend, asgi(echo_app(seen))) as server:
        with ws_connect(server.port) as ws:
            seen.next()  # the scope
            ws.close(4001, "bye now")
        assert seen.next() == {"type": "websocket.disconnect", "code": 4001, "reason": "bye now"}


def test_the_applications_close_code_and_reason_reach_the_client(backend):
    seen = Seen()

    async def app(scope, receive, send):
        await receive()
        await send({"type": "websocket.accept"})
        await send({"type": "websocket.close", "code": 4002, "reason": "done here"})
        seen.put(await receive())
        try:
            await send({"type": "websocket.send", "text": "too late"})
        except OSError as exc:
            seen.put(type(exc).__name__)

    with running_server(backend, asgi(app)) as server:
        with ws_connect(server.port) as ws:
            with pytest.raises(ConnectionClosed) as closed:
                ws.recv(TIMEOUT)
        assert closed.value.rcvd is not None
        assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (4002, "done here")
        assert seen.next() == {"type": "websocket.disconnect", "code": 4002, "reason": "done here"}
        assert seen.next() == "WebSocketClosed"


def test_a_client_that_never_answers_the_close_frame_is_cut_after_the_close_timeout(backend):
    """--ws-close-timeout: the socket closes once the client has let it pass (well
    before the default's ten seconds), without the client's close frame."""
    seen = Seen()

    async def app(scope, receive, send):
        await receive()
        await send({"type": "websocket.accept"})
        await send({"type": "websocket.close", "code": 1000})
        seen.put(await receive())

    with running_server(backend, asgi(app, close_timeout=0.2)) as server:
        sock = raw_handshake(server.port)
        with sock:
            opcode, payload = read_frame(sock)
            assert opcode == 0x8 and close_code(payload) == 1000
            assert seen.next()["code"] == 1000
            sock.settimeout(TIMEOUT)
            assert sock.recv(1) == b""  # closed by the server: this client never answered


def test_an_application_that_raises_after_accepting_closes_with_1011(backend):
    async def app(scope, receive, send):
        await receive()
        await send({"type": "websocket.accept"})
        await receive()
        raise RuntimeError("the handler broke")

    with running_server(backend, asgi(app)) as server:
        with ws_connect(server.port) as ws:
            ws.send("boom")
            with pytest.raises(ConnectionClosed) as closed:
                ws.recv(TIMEOUT)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1011


def test_a_client_that_leaves_is_a_disconnect_then_the_app_is_cancelled_after_the_grace(backend):
    seen = Seen()

    async def app(scope, receive, send):
        await receive()
        await send({"type": "websocket.accept"})
        seen.put("accepted")
        seen.put(await receive())
        try:
            await asyncio.sleep(30)  # an app that ignores the disconnect
        except asyncio.CancelledError:
            seen.put("cancelled")
            raise

    with running_server(backend, asgi(app, disconnect_grace=0.2)) as server:
        sock = raw_handshake(server.port)
        assert seen.next() == "accepted"
        sock.close()  # no close frame: the socket just goes
        assert seen.next() == {"type": "websocket.disconnect", "code": 1006, "reason": ""}
        assert seen.next() == "cancelled"
        assert wait_for(lambda: server.service.stats.cancelled["disconnect"] == 1, TIMEOUT)


def test_graceful_shutdown_closes_with_1001(backend):
    seen = Seen()
    codes: list[int | None] = []

    def client(port: int) -> None:
        with ws_connect(port) as ws:
            try:
                ws.recv(TIMEOUT * 2)
            except ConnectionClosed as closed:
                codes.append(closed.rcvd.code if closed.rcvd else None)

    with running_server(backend, asgi(echo_app(seen))) as server:
        reader = threading.Thread(target=client, args=(server.port,))
        reader.start()
        seen.next()  # the scope: the session runs
    reader.join(TIMEOUT)
    assert codes == [1001]
    assert seen.next()["code"] == 1001


# ---------------------------------------------------------------------- limits


def test_a_message_over_max_size_closes_with_1009(backend):
    seen = Seen()
    with running_server(backend, asgi(echo_app(seen), max_size=1000)) as server:
        with ws_connect(server.port) as ws:
            seen.next()
            ws.send("x" * 1000)
            assert ws.recv(TIMEOUT) == "x" * 1000
            ws.send("x" * 1001)
            with pytest.raises(ConnectionClosed) as closed:
                ws.recv(TIMEOUT)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
        assert seen.next()["code"] == 1009


def test_a_client_that_does_not_answer_pings_is_closed_with_1011(backend):
    seen = Seen()
    settings = {"ping_interval": 0.2, "ping_timeout": 0.3}
    with running_server(backend, asgi(echo_app(seen), **settings)) as server:
        sock = raw_handshake(server.port)
        with sock:
            seen.next()
            opcode, payload = read_frame(sock)
            assert opcode == 0x9  # a ping, which this client never answers
            opcode, payload = read_frame(sock)
            assert (opcode, close_code(payload)) == (0x8, 1011)
            assert sock.recv(1) == b""  # and the server closed the socket
        assert seen.next()["code"] == 1011


def test_a_client_that_answers_pings_stays_connected(backend):
    with running_server(backend, asgi(echo_app(), ping_interval=0.1, ping_timeout=0.3)) as server:
        with ws_connect(server.port, ping_interval=None) as ws:  # it still answers pings
            for _ in range(5):
                ws.send("still here")
                assert ws.recv(TIMEOUT) == "still here"
                threading.Event().wait(0.15)


def test_a_slow_application_stops_the_connection_reading(backend):
    """The server holds at most max_queue messages (and the flow control's stash)
    for an application that does not read; nothing is lost once it does."""
    # more than the kernel's buffers on both sides can hold
    max_queue, count, size = 4, 600, 64 * 1024
    release = threading.Event()
    seen = Seen()

    async def app(scope, receive, send):
        await receive()
        await send({"type": "websocket.accept"})
        seen.put("accepted")
        while not release.is_set():
            await asyncio.sleep(0.02)
        received = 0
        while received < count:
            message = await receive()
            assert message["bytes"] == received.to_bytes(4, "big") * (size // 4)
            received += 1
        seen.put(received)
        await send({"type": "websocket.send", "text": "all read"})
        await receive()

    def sessions(server):
        return server.call(lambda: [c.session for c in server.service.connections])

    with running_server(backend, asgi(app, max_queue=max_queue)) as server:
        sock = raw_handshake(server.port)
        with sock:
            assert seen.next() == "accepted"
            payloads = (n.to_bytes(4, "big") * (size // 4) for n in range(count))
            frames = [masked_frame(0x2, payload, mask=bytes(4)) for payload in payloads]
            data = b"".join(frames)
            sock.setblocking(False)
            sent = 0
            stalled = 0
            while sent < len(data) and stalled < 20:  # until the server stops taking bytes
                try:
                    sent += sock.send(data[sent : sent + 65536])
                    stalled = 0
                except BlockingIOError:
                    stalled += 1
                    threading.Event().wait(0.05)
            assert sent < len(data), "the server read everything: nothing held it back"
            (session,) = sessions(server)

            def held() -> tuple[int, int, bool]:
                flow = session.flow
                return len(session.inbox), flow.stash_size, flow.transport_paused

            queued, stashed, paused = server.call(held)
            assert queued <= max_queue + FEED_SLICE // size + 1  # the queue, and one slice
            assert stashed > STASH_LIMIT and paused  # the rest waits in the kernel
            threading.Event().wait(0.3)
            assert server.call(held) == (queued, stashed, paused)  # and stays there
            release.set()
            sock.settimeout(TIMEOUT)
            sock.sendall(data[sent:])
            assert seen.next() == count
            assert read_frame(sock) == (0x1, b"all read")


def test_a_close_frame_before_eof_reaches_a_slow_application_with_its_code(backend):
    """The client closes (1000, "bye") and shuts its side while the application's
    queue is full: the close frame waits in the stash behind the messages, and
    the application hears of it, not of a 1006."""
    release = threading.Event()
    seen = Seen()

    async def app(scope, receive, send):
        await receive()
        await send({"type": "websocket.accept"})
        seen.put("accepted")
        while not release.is_set():
            await asyncio.sleep(0.02)
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                seen.put((message["code"], message.get("reason", "")))
                return
            seen.put(message["bytes"])

    def client_closed(server) -> bool:
        return server.call(lambda: all(c.peer_closed for c in server.service.connections))

    def queue_full(server) -> bool:
        return (
            server.call(lambda: [len(c.session.inbox) for c in server.service.connections])[0] >= 2
        )

    with running_server(backend, asgi(app, max_queue=2)) as server:
        sock = raw_handshake(server.port)
        with sock:
            assert seen.next() == "accepted"
            messages = [b"%d" % n for n in range(5)]
            frames = b"".join(masked_frame(0x2, payload) for payload in messages)
            close = masked_frame(0x8, struct.pack("!H", 1000) + b"bye")
            sock.sendall(frames)
            assert wait_for(lambda: queue_full(server), TIMEOUT)  # reading is paused now
            sock.sendall(close)
            sock.shutdown(socket.SHUT_WR)
            assert wait_for(lambda: client_closed(server), TIMEOUT)
            release.set()
            assert [seen.next() for _ in messages] == messages
            assert seen.next() == (1000, "bye")
            opcode, payload = read_frame(sock)  # the server answers the close
            assert opcode == 0x8 and close_code(payload) == 1000


def test_send_waits_while_the_client_reads_nothing(backend):
    """A client that reads nothing holds the app in send() once the write buffer is
    full: the worker holds one buffer, not everything the app wants to send.
    (The kernel's buffers are made small on both sides, so that they do not
    absorb what the test is about.)"""
    count, size, high = 40, 64 * 1024, 256 * 1024
    sent: list[int] = [0]
    seen = Seen()
    go = threading.Event()

    async def app(scope, receive, send):
        await receive()
        await send({"type": "websocket.accept"})
        while not go.is_set():
            await asyncio.sleep(0.01)
        for n in range(count):
            await send({"type": "websocket.send", "bytes": n.to_bytes(4, "big") * (size // 4)})
            sent[0] = n + 1
        seen.put("all sent")
        await receive()

    def shrink_send_buffer(server) -> None:
        (connection,) = server.service.connections
        sock = connection.transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)

    def buffered(server) -> int:
        (connection,) = server.service.connections
        return int(connection.transport.get_write_buffer_size())

    with running_server(backend, asgi(app, ping_interval=0), write_buffer_high=high) as server:
        sock = raw_handshake(server.port, receive_buffer=64 * 1024)
        with sock:
            server.call(shrink_send_buffer, server)
            go.set()
            assert wait_for(lambda: sent[0] > 0, TIMEOUT)
            stalled_at = -1
            while stalled_at != sent[0]:  # until the app stops getting further
                stalled_at = sent[0]
                threading.Event().wait(0.3)
            assert stalled_at < count, "the app sent everything to a client reading nothing"
            assert server.call(buffered, server) <= high + size + 64
            for n in range(count):
                opcode, payload = read_frame(sock)
                assert (opcode, payload[:4]) == (0x2, n.to_bytes(4, "big"))
            assert seen.next() == "all sent"


def test_websockets_over_tls(backend, certificate):
    import ssl

    seen = Seen()
    context = ssl.create_default_context(cafile=certificate.certfile)
    with running_server(backend, asgi(echo_app(seen)), tls=certificate) as server:
        uri = f"wss://localhost:{server.port}/secure"
        with connect(uri, ssl=context, proxy=None, open_timeout=TIMEOUT) as ws:
            ws.send("over TLS")
            assert ws.recv(TIMEOUT) == "over TLS"
        assert seen.next()["scheme"] == "wss"


# ---------------------------------------------------------------------- refusals


def test_denial_with_an_http_response(backend):
    async def app(scope, receive, send):
        await receive()
        await send(
            {
                "type": "websocket.http.response.start",
                "status": 418,
                "headers": [(b"content-type", b"text/plain"), (b"x-why", b"teapot")],
            }
        )
        await send({"type": "websocket.http.response.body", "body": b"no ", "more_body": True})
        await send({"type": "websocket.http.response.body", "body": b"tea"})

    with running_server(backend, asgi(app)) as server:
        with pytest.raises(InvalidStatus) as refused:
            ws_connect(server.port)
    response = refused.value.response
    assert response.status_code == 418
    assert response.headers["X-Why"] == "teapot"
    assert response.body == b"no tea"


def test_a_close_before_accepting_is_a_403_and_the_connection_closes(backend):
    async def app(scope, receive, send):
        await receive()
        await send({"type": "websocket.close"})

    with running_server(backend, asgi(app)) as server:
        with pytest.raises(InvalidStatus) as refused:
            ws_connect(server.port)
        assert refused.value.response.status_code == 403
        with RawClient(server.port) as client:
            client.request(
                "GET",
                "/",
                [
                    ("Upgrade", "websocket"),
                    ("Connection", "Upgrade"),
                    ("Sec-WebSocket-Key", base64.b64encode(os.urandom(16)).decode()),
                    ("Sec-WebSocket-Version", "13"),
                ],
            )
            assert client.read_reply().status == 403
            assert client.is_closed_by_server()


def test_an_upgrade_with_bad_framing_is_refused_before_the_application_runs(backend):
    called = Seen()

    async def app(scope, receive, send):
        called.put(scope["type"])

    handshake = (
        b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
        b"Sec-WebSocket-Key: " + base64.b64encode(os.urandom(16)) + b"\r\n"
    )
    with running_server(backend, asgi(app)) as server:
        two_hosts = send_raw(
            server.port, b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n" + handshake + b"\r\n"
        )
        bad_key = send_raw(
            server.port,
            b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: short\r\n\r\n",
        )
        old_version = send_raw(
            server.port,
            b"GET / HTTP/1.1\r\nHost: a\r\n" + handshake.replace(b"Version: 13", b"Version: 8")
            + b"\r\n",
        )  # fmt: skip
    assert two_hosts.startswith(b"HTTP/1.1 400 "), two_hosts
    assert b"duplicate Host" in two_hosts
    assert bad_key.startswith(b"HTTP/1.1 400 "), bad_key
    assert old_version.startswith(b"HTTP/1.1 400 "), old_version
    assert called.events.empty()


def test_an_upgrade_without_a_key_is_no_handshake_the_app_sees_http(backend):
    """As for any declined upgrade (the hostile-input table's case): answered as
    HTTP, and the connection goes on."""

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": scope["type"].encode()})

    with running_server(backend, asgi(app)) as server:
        with RawClient(server.port) as client:
            for _ in range(2):
                client.request("GET", "/", [("Upgrade", "websocket"), ("Connection", "Upgrade")])
                reply = client.read_reply()
                assert (reply.status, reply.body) == (200, b"http")


def test_with_ws_none_an_upgrade_request_is_plain_http(backend):
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": scope["type"].encode()})

    with running_server(backend, asgi(app, library="none")) as server:
        with pytest.raises(InvalidStatus) as refused:
            ws_connect(server.port)
    assert refused.value.response.status_code == 200
    assert refused.value.response.body == b"http"


def test_the_native_app_still_declines_upgrades(backend):
    app = App()

    @app.get("/")
    def home(request):
        return "plain"

    with running_server(backend, app) as server:
        with RawClient(server.port) as client:
            for _ in range(2):  # and the connection stays usable
                client.request("GET", "/", [("Upgrade", "websocket"), ("Connection", "Upgrade")])
                reply = client.read_reply()
                assert (reply.status, reply.body) == (200, b"plain")


# ---------------------------------------------------------------------- frameworks


def test_a_starlette_websocket_route(backend):
    seen = Seen()

    async def room(websocket: WebSocket) -> None:
        await websocket.accept(subprotocol="chat")
        try:
            while True:
                text = await websocket.receive_text()
                await websocket.send_json({"room": websocket.path_params["name"], "said": text})
        except WebSocketDisconnect as gone:
            seen.put(gone.code)

    app = Starlette(routes=[WebSocketRoute("/rooms/{name}", room)])
    with running_server(backend, AsgiApp(app)) as server:
        with ws_connect(server.port, "/rooms/blue", subprotocols=["chat"]) as ws:
            assert ws.subprotocol == "chat"
            ws.send("hi")
            assert ws.recv(TIMEOUT) == '{"room":"blue","said":"hi"}'
        assert seen.next() == 1000


# ---------------------------------------------------------------------- settings


def test_the_ws_settings_come_from_flags_environment_and_config_file(tmp_path):
    import argparse

    from forkloop.server import settings

    (tmp_path / "forkloop.toml").write_text("ws-max-queue = 8\nws_ping_timeout = 2.5\n")
    parser = argparse.ArgumentParser()
    settings.add_arguments(parser)
    flags = parser.parse_args(
        [
            "--config", "forkloop.toml", "--ws-max-size", "4096", "--no-ws-per-message-deflate",
            "--ws-close-timeout", "1.5",
        ]
    )  # fmt: skip
    environ = {"FORKLOOP_WS_PING_INTERVAL": "0", "FORKLOOP_WS": "none"}
    websocket = settings.resolve(flags, environ, str(tmp_path)).websocket
    assert websocket == WebSocketSettings(
        library="none",
        max_size=4096,
        max_queue=8,
        ping_interval=0.0,
        ping_timeout=2.5,
        per_message_deflate=False,
        close_timeout=1.5,
    )
    with pytest.raises(SystemExit):
        parser.parse_args(["--ws", "wsproto"])  # one library is served: websockets
