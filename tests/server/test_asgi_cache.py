"""The response cache in front of an ASGI application, on every backend.

A FastAPI app counts its own calls; the tests count what reaches it through
real sockets: concurrent misses of one URL make one call, what may not be
shared (private, no-store, Set-Cookie, Authorization) is never stored, Vary
keeps variants apart, and what is outside the cached prefixes or not a GET
goes straight to the app.
"""

from __future__ import annotations

import asyncio
import resource
import socket
from collections import Counter

import pytest
from fastapi import FastAPI, Request, Response
from fastapi.responses import StreamingResponse

from forkloop.server.asgi import AsgiApp
from forkloop.server.asgi_cache import CachedAsgiApp
from forkloop.server.cache import ResponseCache
from tests.server.frontdoor_support import Served, UserFolder
from tests.server.support import RawClient, running_server

CONCURRENT = 1000


def counting_app(calls: Counter) -> FastAPI:
    app = FastAPI()

    @app.get("/api/slow/{key}")
    async def slow(key: str) -> Response:
        calls[key] += 1
        await asyncio.sleep(0.3)  # every request arrives while the one fill runs
        return Response(f"value of {key}", headers={"Cache-Control": "public, max-age=60"})

    @app.get("/api/private")
    async def private() -> Response:
        calls["private"] += 1
        return Response("mine", headers={"Cache-Control": "private, max-age=60"})

    @app.get("/api/no-store")
    async def no_store() -> Response:
        calls["no-store"] += 1
        return Response("fresh", headers={"Cache-Control": "no-store"})

    @app.get("/api/cookie")
    async def cookie() -> Response:
        calls["cookie"] += 1
        response = Response("with a cookie", headers={"Cache-Control": "public, max-age=60"})
        response.set_cookie("session", "secret")
        return response

    @app.get("/api/authorized")
    async def authorized() -> Response:
        calls["authorized"] += 1
        return Response("for you", headers={"Cache-Control": "max-age=60"})

    @app.get("/api/language")
    async def language(request: Request) -> Response:
        calls["language"] += 1
        chosen = request.headers.get("accept-language", "en")
        headers = {"Cache-Control": "public, max-age=60", "Vary": "Accept-Language"}
        return Response(f"in {chosen}", headers=headers)

    @app.get("/api/stream")
    async def stream() -> StreamingResponse:
        calls["stream"] += 1

        async def pieces():
            for piece in (b"one ", b"two ", b"three"):
                yield piece

        return StreamingResponse(pieces(), headers={"Cache-Control": "public, max-age=60"})

    @app.get("/elsewhere")
    async def elsewhere() -> Response:
        calls["elsewhere"] += 1
        return Response("not cached", headers={"Cache-Control": "public, max-age=60"})

    @app.post("/api/slow/{key}")
    async def post(key: str) -> Response:
        calls[f"post {key}"] += 1
        return Response("posted", headers={"Cache-Control": "public, max-age=60"})

    return app


def cached(calls: Counter) -> CachedAsgiApp:
    inner = AsgiApp(counting_app(calls), lifespan="off")
    return CachedAsgiApp(inner, ResponseCache(1024 * 1024), prefixes=("/api/",))


@pytest.fixture
def enough_descriptors():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 2 * CONCURRENT + 256  # the clients' sockets and the server's, in one process
    if hard != resource.RLIM_INFINITY and hard < wanted:
        pytest.fail(f"{wanted} descriptors needed, the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def get(port: int, path: str, *headers: str) -> tuple[int, str | None, bytes]:
    with RawClient(port) as client:
        client.request("GET", path, [tuple(h.split(": ", 1)) for h in headers])
        reply = client.read_reply()
        return reply.status, reply.header("x-cache"), reply.body


def test_a_thousand_concurrent_misses_call_the_app_once(backend, enough_descriptors):
    calls: Counter = Counter()
    with running_server(backend, cached(calls)) as server:
        sockets = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(CONCURRENT)]
        try:
            for sock in sockets:
                sock.sendall(b"GET /api/slow/k HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            answers = []
            for sock in sockets:
                sock.settimeout(20)
                answer = b""
                while chunk := sock.recv(65536):
                    answer += chunk
                answers.append(answer)
        finally:
            for sock in sockets:
                sock.close()
        assert calls["k"] == 1
        assert all(a.startswith(b"HTTP/1.1 200 OK\r\n") for a in answers)
        assert all(a.endswith(b"value of k") for a in answers)
        statuses = Counter(a.split(b"X-Cache: ")[1].split(b"\r\n")[0] for a in answers)
        assert statuses == {b"MISS": 1, b"HIT": CONCURRENT - 1}
        stats = server.call(lambda: server.service.app.cache_stats)
        assert stats["computations"] == 1 and stats["coalesced"] == CONCURRENT - 1


def test_what_may_not_be_shared_is_never_stored(backend):
    calls: Counter = Counter()
    with running_server(backend, cached(calls)) as server:
        for path, headers in (
            ("/api/private", ()),
            ("/api/no-store", ()),
            ("/api/cookie", ()),
            ("/api/authorized", ("Authorization: Bearer abc",)),
        ):
            first = get(server.port, path, *headers)
            second = get(server.port, path, *headers)
            assert first[0] == second[0] == 200
            assert second[1] != "HIT", path
        assert calls == {"private": 2, "no-store": 2, "cookie": 2, "authorized": 2}


def test_vary_keeps_variants_apart_and_streams_are_gathered(backend):
    calls: Counter = Counter()
    with running_server(backend, cached(calls)) as server:
        assert get(server.port, "/api/language", "Accept-Language: fr")[2] == b"in fr"
        assert get(server.port, "/api/language", "Accept-Language: de")[2] == b"in de"
        assert get(server.port, "/api/language", "Accept-Language: fr") == (200, "HIT", b"in fr")
        assert calls["language"] == 2
        assert get(server.port, "/api/stream")[2] == b"one two three"
        assert get(server.port, "/api/stream") == (200, "HIT", b"one two three")
        assert calls["stream"] == 1


def test_outside_the_prefixes_and_other_methods_go_straight_to_the_app(backend):
    calls: Counter = Counter()
    with running_server(backend, cached(calls)) as server:
        for _ in range(2):
            assert get(server.port, "/elsewhere") == (200, None, b"not cached")
            with RawClient(server.port) as client:
                client.request("POST", "/api/slow/p", body=b"x")
                assert client.read_reply().body == b"posted"
        assert calls["elsewhere"] == 2 and calls["post p"] == 2


def test_cache_flag_puts_the_cache_in_front_of_the_cli_served_app(tmp_path):
    folder = UserFolder(tmp_path / "project")
    folder.write(
        "cachedapp.py",
        "calls = 0\n"
        "async def app(scope, receive, send):\n"
        "    global calls\n"
        "    if scope['type'] != 'http':\n"
        "        raise RuntimeError('no lifespan')\n"
        "    calls += 1\n"
        "    headers = [(b'cache-control', b'public, max-age=60')]\n"
        "    await send({'type': 'http.response.start', 'status': 200, 'headers': headers})\n"
        "    await send({'type': 'http.response.body', 'body': b'call %d' % calls})\n",
    )
    served = Served(folder.root, "cachedapp:app", "--workers", "1", "--cache").start()
    try:
        assert served.get("/a") == (200, b"call 1")
        assert served.get("/a") == (200, b"call 1")  # a hit: the app was not called
        assert served.get("/b") == (200, b"call 2")
    finally:
        served.stop()
