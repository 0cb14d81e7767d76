"""Hostile input: one table of raw requests, each with its answer and what happens next.

Every case is sent as raw bytes on a fresh connection to one server per
backend, the same server for the whole table, so damage would carry over.
Each case states the statuses the server answers with, in order (a pipelined
good request followed by garbage is ``(200, 400)``), and whether the
connection is then closed or kept. After every case that same server answers
a normal request: on the same connection when it was kept, on a new one when
it was closed. A case answered only with an error and a close must not have
started a handler: handlers run only for requests whose framing is sound.

The cases follow what nginx and gunicorn (after CVE-2024-1135 and
CVE-2024-6827) refuse: request smuggling through Content-Length and
Transfer-Encoding in every combination, obs-fold, bare CR and LF, control
bytes, oversized and malformed heads, HTTP/0.9 and HTTP/2-3 request lines,
pipelined garbage; plus what a server must still accept (absolute-form
targets, percent-encoding, leading empty lines, obs-text) and what it must
never do (serve a file outside the static root, merge trailer fields into the
headers, read an Upgrade request's body as a new request, send a header a
handler broke).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs

import pytest

from forkloop.server.app import App
from forkloop.server.asgi import AsgiApp
from forkloop.server.cache import ResponseCache
from forkloop.server.http import Request, Response, error_response, safe_join
from forkloop.server.proxy import ProxyFrontDoor
from forkloop.server.proxy_cache import CachingProxy
from forkloop.server.upstream import UpstreamPool
from tests.server.support import HttpReply, RawClient, running_server

LIMITS = dict(
    max_request_line=256,
    max_header_bytes=2048,
    max_header_count=20,
    max_body_size=1000,
)
SECRET = b"the-secret-next-to-the-root"
PUBLIC = b"a public file"

started: list[str] = []  # the handlers that ran, in order


def hostile_app(root: Path) -> App:
    app = App()

    @app.route("/", methods=("GET", "POST"))
    def index(request: Request) -> Response:
        started.append("index")
        return Response(b"ok")

    @app.get("/seq")
    def sequence(request: Request) -> Response:
        started.append("seq")
        return Response(request.query_param("i", "-"))

    @app.post("/echo")
    async def echo(request: Request) -> Response:
        started.append("echo")
        return Response(await request.body(), content_type="application/octet-stream")

    @app.route("/headers", methods=("GET", "POST"))
    def headers(request: Request) -> Response:
        started.append("headers")
        names = sorted({name.lower() for name, _ in request.headers.items()})
        return Response.json({"host": request.headers.get_all("host"), "names": names})

    @app.get("/smuggled")
    def smuggled(request: Request) -> Response:
        started.append("smuggled")
        return Response(b"smuggled")

    @app.get("/files/{name:path}")
    def files(request: Request) -> Response:
        started.append("files")
        path = safe_join(root, request.params["name"])
        if path is None:
            return error_response(404, "no such file")
        try:
            with open(path, "rb") as file:
                return Response(file.read())
        except (FileNotFoundError, IsADirectoryError):
            return error_response(404, "no such file")

    @app.get("/inject")
    def inject(request: Request) -> Response:
        started.append("inject")
        return Response(b"x", headers=[("X-Evil", "a\r\nSet-Cookie: stolen=1")])

    @app.get("/inject-content-type")
    def inject_content_type(request: Request) -> Response:
        started.append("inject-content-type")
        return Response(b"x", content_type="text/html\r\nSet-Cookie: stolen=1")

    @app.get("/not-latin-1")
    def not_latin_1(request: Request) -> Response:
        started.append("not-latin-1")
        return Response(b"x", headers={"X-Price": "10 \u20ac"})

    @app.get("/bad-status")
    def bad_status(request: Request) -> Response:
        started.append("bad-status")
        return Response(b"x", status=1000)

    @app.get("/informational")
    def informational(request: Request) -> Response:
        started.append("informational")
        return Response(b"", status=101, headers={"Upgrade": "h2c"})

    return app


def hostile_asgi_app(root: Path) -> AsgiApp:
    """The same routes as `hostile_app`, as an ASGI application. Like most
    applications, each reads its whole body before it acts (records that it
    started): with bodies streamed into ``receive()``, a request whose body turns
    out malformed reaches the application, which then sees ``http.disconnect``."""

    async def app(scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        path, method = scope["path"], scope["method"]
        headers: list = [(b"content-type", b"text/plain")]
        status, answer = 200, b""
        if path == "/" and method in ("GET", "POST"):
            started.append("index")
            answer = b"ok"
        elif path == "/seq":
            started.append("seq")
            query = parse_qs(scope["query_string"].decode("latin-1"))
            answer = query.get("i", ["-"])[0].encode()
        elif path == "/echo" and method == "POST":
            started.append("echo")
            answer = body
        elif path == "/headers":
            started.append("headers")
            names = sorted({name.decode("latin-1") for name, _ in scope["headers"]})
            hosts = [value.decode("latin-1") for name, value in scope["headers"] if name == b"host"]
            answer = json.dumps({"host": hosts, "names": names}).encode()
        elif path == "/smuggled":
            started.append("smuggled")
            answer = b"smuggled"
        elif path.startswith("/files/"):
            started.append("files")
            file = safe_join(root, path[len("/files/") :])
            try:
                answer = Path(file).read_bytes() if file is not None else b""
            except (FileNotFoundError, IsADirectoryError):
                file = None
            if file is None:
                status, answer = 404, b"no such file"
        elif path == "/inject":
            started.append("inject")
            headers.append((b"x-evil", b"a\r\nSet-Cookie: stolen=1"))
        elif path == "/inject-content-type":
            started.append("inject-content-type")
            headers = [(b"content-type", b"text/html\r\nSet-Cookie: stolen=1")]
        elif path == "/not-latin-1":
            started.append("not-latin-1")
            headers.append((b"x-price", "10 \u20ac"))  # a str: not a byte pair
        elif path == "/bad-status":
            started.append("bad-status")
            status = 1000
        elif path == "/informational":
            started.append("informational")
            status = 101
        else:
            status, answer = 404, b"no route"
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": answer})

    return AsgiApp(app, lifespan="off")


@dataclass(frozen=True)
class Case:
    name: str
    raw: bytes
    statuses: tuple[int, ...]  # what the server answers, in order
    closed: bool  # the connection is closed after the answers (else kept for the next request)
    check: Callable[[list[HttpReply]], object] | None = None  # more to say about the answers


H = b"Host: t\r\n"
POST = b"POST / HTTP/1.1\r\n" + H
CHUNKED = POST + b"Transfer-Encoding: chunked\r\n\r\n"
KEPT, CLOSED = False, True


def get(target: bytes, *headers: bytes) -> bytes:
    return b"GET " + target + b" HTTP/1.1\r\n" + H + b"".join(headers) + b"\r\n"


def body_is(expected: bytes, index: int = 0) -> Callable[[list[HttpReply]], None]:
    def check(replies: list[HttpReply]) -> None:
        assert replies[index].body == expected, replies[index].body

    return check


def never_a_secret(replies: list[HttpReply]) -> None:
    assert all(SECRET not in reply.body and b"root:" not in reply.body for reply in replies)


def no_injected_header(replies: list[HttpReply]) -> None:
    assert "set-cookie" not in replies[0].headers and "x-evil" not in replies[0].headers


def headers_seen(host: list[str], absent: str) -> Callable[[list[HttpReply]], None]:
    def check(replies: list[HttpReply]) -> None:
        seen = json.loads(replies[0].body)
        assert seen["host"] == host and absent not in seen["names"], seen

    return check


SMUGGLED = b"GET /smuggled HTTP/1.1\r\n" + H + b"\r\n"

# fmt: off
CASES = [
    # ------------------------------------------------------------ request smuggling
    Case("content-length with chunked", POST + b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", (400,), CLOSED),
    Case("chunked with content-length", POST + b"Transfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n", (400,), CLOSED),
    Case("duplicate content-length", POST + b"Content-Length: 1\r\nContent-Length: 1\r\n\r\na", (400,), CLOSED),
    Case("conflicting content-length", POST + b"Content-Length: 1\r\nContent-Length: 2\r\n\r\nab", (400,), CLOSED),
    Case("content-length +1", POST + b"Content-Length: +1\r\n\r\na", (400,), CLOSED),
    Case("content-length -1", POST + b"Content-Length: -1\r\n\r\na", (400,), CLOSED),
    Case("content-length list", POST + b"Content-Length: 1, 1\r\n\r\na", (400,), CLOSED),
    Case("content-length in hex", POST + b"Content-Length: 0x1\r\n\r\na", (400,), CLOSED),
    Case("content-length past 64 bits", POST + b"Content-Length: 99999999999999999999999\r\n\r\n", (400,), CLOSED),
    Case("content-length with leading zeros is a number", b"POST /echo HTTP/1.1\r\n" + H + b"Content-Length: 003\r\n\r\nabc", (200,), KEPT, body_is(b"abc")),
    Case("chunked, gzip", POST + b"Transfer-Encoding: chunked, gzip\r\n\r\n", (400,), CLOSED),
    Case("gzip, chunked", POST + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", (501,), CLOSED),
    Case("xchunked", POST + b"Transfer-Encoding: xchunked\r\n\r\n", (501,), CLOSED),
    Case("identity", POST + b"Transfer-Encoding: identity\r\n\r\n", (501,), CLOSED),
    Case("empty transfer-encoding", POST + b"Transfer-Encoding: \r\n\r\n", (400,), CLOSED),
    Case("chunked twice", POST + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n", (400,), CLOSED),
    Case("transfer-encoding on HTTP/1.0", b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", (400,), CLOSED),
    Case("Transfer_Encoding is no framing header: its body is the next request", POST + b"Transfer_Encoding: chunked\r\n\r\n0\r\n\r\n", (200, 400), CLOSED),
    Case("GET with a body: the body is a body, not a request", b"GET /seq?i=1 HTTP/1.1\r\n" + H + b"Content-Length: %d\r\n\r\n" % len(SMUGGLED) + SMUGGLED, (200,), KEPT, body_is(b"1")),
    Case("Upgrade with a body: the body is a body, not a request", b"POST /echo HTTP/1.1\r\n" + H + b"Connection: Upgrade\r\nUpgrade: h2c\r\nContent-Length: %d\r\n\r\n" % len(SMUGGLED) + SMUGGLED, (200,), KEPT, body_is(SMUGGLED)),
    Case("Upgrade with a chunked body", b"POST /echo HTTP/1.1\r\n" + H + b"Connection: Upgrade\r\nUpgrade: h2c\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(SMUGGLED), SMUGGLED), (200,), KEPT, body_is(SMUGGLED)),
    Case("declined websocket upgrade, then a request", get(b"/seq?i=1", b"Connection: Upgrade\r\nUpgrade: websocket\r\n") + get(b"/seq?i=2"), (200, 200), KEPT, body_is(b"2", 1)),
    Case("trailer fields are not merged into the headers", b"POST /headers HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n1\r\na\r\n0\r\nHost: evil\r\nX-Trailer: t\r\n\r\n", (200,), KEPT, headers_seen(["t"], "x-trailer")),
    Case("content-length in a trailer", CHUNKED + b"1\r\na\r\n0\r\nContent-Length: 5\r\n\r\n", (400,), CLOSED),
    # ------------------------------------------------------------ header syntax
    Case("obs-fold", get(b"/", b"X-A: a\r\n b\r\n"), (400,), CLOSED),
    Case("obs-fold on the first header", b"GET / HTTP/1.1\r\n Host: t\r\n\r\n", (400,), CLOSED),
    Case("space before colon", b"GET / HTTP/1.1\r\nHost : t\r\n\r\n", (400,), CLOSED),
    Case("tab before colon", get(b"/", b"X-A\t: a\r\n"), (400,), CLOSED),
    Case("header without a colon", get(b"/", b"X-A\r\n"), (400,), CLOSED),
    Case("empty header name", get(b"/", b": a\r\n"), (400,), CLOSED),
    Case("header name that is no token", get(b"/", b"X@A: a\r\n"), (400,), CLOSED),
    Case("bare LF line ends", b"GET / HTTP/1.1\nHost: t\n\n", (400,), CLOSED),
    Case("bare LF ending one header", b"GET / HTTP/1.1\r\nHost: t\nX-A: a\r\n\r\n", (400,), CLOSED),
    Case("bare CR in the request line", b"GET / HTTP/1.1\rHost: t\r\n\r\n", (400,), CLOSED),
    Case("bare CR in a header value", get(b"/", b"X-A: a\rb\r\n"), (400,), CLOSED),
    Case("NUL in a header value", get(b"/", b"X-A: a\x00b\r\n"), (400,), CLOSED),
    Case("control byte in a header value", get(b"/", b"X-A: a\x01b\r\n"), (400,), CLOSED),
    Case("DEL in a header value", get(b"/", b"X-A: a\x7fb\r\n"), (400,), CLOSED),
    Case("obs-text in a header value is accepted", get(b"/", b"X-A: caf\xe9\r\n"), (200,), KEPT),
    Case("tab inside a header value is accepted", get(b"/", b"X-A: a\tb\r\n"), (200,), KEPT),
    # ------------------------------------------------------------ size limits
    Case("request target too long", get(b"/" + b"a" * 300), (414,), CLOSED),
    Case("one huge header", get(b"/", b"X-Big: " + b"v" * 3000 + b"\r\n"), (431,), CLOSED),
    Case("too many headers", get(b"/", *(b"X-%d: 1\r\n" % i for i in range(25))), (431,), CLOSED),
    Case("head too large in many small headers", get(b"/", *(b"X-%d: %s\r\n" % (i, b"v" * 150) for i in range(15))), (431,), CLOSED),
    Case("body over the limit", POST + b"Content-Length: 1001\r\n\r\n", (413,), CLOSED),
    Case("chunked body over the limit", CHUNKED + (b"200\r\n" + b"a" * 512 + b"\r\n") * 2 + b"0\r\n\r\n", (413,), CLOSED),
    Case("trailer over the head limit", CHUNKED + b"1\r\na\r\n0\r\nX-T: " + b"v" * 3000 + b"\r\n\r\n", (431,), CLOSED),
    # ------------------------------------------------------------ chunk framing
    Case("chunk size overflow", CHUNKED + b"FFFFFFFFFFFFFFFFFF\r\n", (400,), CLOSED),
    Case("negative chunk size", CHUNKED + b"-1\r\na\r\n0\r\n\r\n", (400,), CLOSED),
    Case("chunk size in 0x form", CHUNKED + b"0x1\r\na\r\n0\r\n\r\n", (400,), CLOSED),
    Case("space after the chunk size", CHUNKED + b"1 \r\na\r\n0\r\n\r\n", (400,), CLOSED),
    Case("chunk data longer than its size", CHUNKED + b"3\r\nabcX\r\n0\r\n\r\n", (400,), CLOSED),
    Case("bare LF after the chunk size", CHUNKED + b"1\na\r\n0\r\n\r\n", (400,), CLOSED),
    Case("bare LF in a chunk extension", CHUNKED + b"1;a\nb\r\na\r\n0\r\n\r\n", (400,), CLOSED),
    Case("bare CR in a quoted chunk extension", CHUNKED + b'1;a="b\rc"\r\na\r\n0\r\n\r\n', (400,), CLOSED),
    Case("bare LF after the last chunk", CHUNKED + b"1\r\na\r\n0\r\n\n", (400,), CLOSED),
    Case("chunk extensions are accepted", b"POST /echo HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n2;x=1\r\nab\r\n0\r\n\r\n", (200,), KEPT, body_is(b"ab")),
    # ------------------------------------------------------------ request line and Host
    Case("missing host", b"GET / HTTP/1.1\r\n\r\n", (400,), CLOSED),
    Case("duplicate host", b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", (400,), CLOSED),
    Case("duplicate host in HTTP/1.0", b"GET / HTTP/1.0\r\nHost: a\r\nHost: b\r\n\r\n", (400,), CLOSED),
    Case("host with a space", b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n", (400,), CLOSED),
    Case("host with a slash", b"GET / HTTP/1.1\r\nHost: a/b\r\n\r\n", (400,), CLOSED),
    Case("IPv6 host and port are accepted", b"GET / HTTP/1.1\r\nHost: [::1]:8080\r\n\r\n", (200,), KEPT),
    Case("HTTP/1.0 without host is accepted and closed", b"GET / HTTP/1.0\r\n\r\n", (200,), CLOSED),
    Case("HTTP/0.9 request line", b"GET /\r\n\r\n", (400,), CLOSED),
    Case("HTTP/1.2 request line", b"GET / HTTP/1.2\r\n" + H + b"\r\n", (505,), CLOSED),
    Case("HTTP/2.0 request line", b"GET / HTTP/2.0\r\n" + H + b"\r\n", (505,), CLOSED),
    Case("HTTP/3.0 request line", b"GET / HTTP/3.0\r\n" + H + b"\r\n", (505,), CLOSED),
    Case("HTTP/2 connection preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", (400,), CLOSED),
    Case("lower-case version", b"GET / http/1.1\r\n" + H + b"\r\n", (400,), CLOSED),
    Case("space after the version", b"GET / HTTP/1.1 \r\n" + H + b"\r\n", (400,), CLOSED),
    Case("invalid method", b"G@T / HTTP/1.1\r\n" + H + b"\r\n", (400,), CLOSED),
    Case("lower-case method", b"get / HTTP/1.1\r\n" + H + b"\r\n", (400,), CLOSED),
    Case("unknown method", b"BREW / HTTP/1.1\r\n" + H + b"\r\n", (400,), CLOSED),
    Case("tab between method and target", b"GET\t/ HTTP/1.1\r\n" + H + b"\r\n", (400,), CLOSED),
    Case("control byte in the target", get(b"/\x01"), (400,), CLOSED),
    Case("NUL in the target", get(b"/a\x00"), (400,), CLOSED),
    Case("raw non-ASCII byte in the target", get(b"/caf\xe9"), (400,), CLOSED),
    Case("authority-form target on GET", get(b"t:80"), (400,), CLOSED),
    Case("CONNECT is answered, then the tunnel bytes are not read", b"CONNECT t:443 HTTP/1.1\r\nHost: t:443\r\n\r\n\x16\x03\x01garbage", (404,), CLOSED),
    Case("unsupported Expect", POST + b"Expect: magic\r\nContent-Length: 1\r\n\r\na", (417,), CLOSED),
    Case("Expect 100-continue is ignored in HTTP/1.0", b"POST /echo HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nhi", (200,), CLOSED, body_is(b"hi")),
    Case("empty lines before the request line are skipped", b"\r\n\r\n" + get(b"/seq?i=4"), (200,), KEPT, body_is(b"4")),
    Case("absolute-form target", get(b"http://other.example/seq?i=5"), (200,), KEPT, body_is(b"5")),
    Case("asterisk-form target on OPTIONS", b"OPTIONS * HTTP/1.1\r\n" + H + b"\r\n", (404,), KEPT),
    Case("percent-encoded path is decoded", get(b"/s%65q?i=3"), (200,), KEPT, body_is(b"3")),
    # ------------------------------------------------------------ pipelining and close
    Case("pipelined garbage after a good request", get(b"/seq?i=7") + b"xyz garbage\r\n\r\n", (200, 400), CLOSED, body_is(b"7")),
    Case("pipelined bad framing after a good request", get(b"/seq?i=8") + POST + b"Content-Length: 1\r\nContent-Length: 2\r\n\r\n", (200, 400), CLOSED),
    Case("data after Connection: close is not read", get(b"/seq?i=1", b"Connection: close\r\n") + get(b"/seq?i=2"), (200,), CLOSED, body_is(b"1")),
    Case("a request after a rejection is not read", POST + b"Content-Length: +1\r\n\r\na" + get(b"/seq?i=2"), (400,), CLOSED),
    # ------------------------------------------------------------ paths and files
    Case("a file inside the root is served", get(b"/files/public.txt"), (200,), KEPT, body_is(PUBLIC)),
    Case("../ out of the root", get(b"/files/../secret.txt"), (404,), KEPT, never_a_secret),
    Case("%2e%2e/ out of the root", get(b"/files/%2e%2e/secret.txt"), (404,), KEPT, never_a_secret),
    Case("..%2f out of the root", get(b"/files/..%2fsecret.txt"), (404,), KEPT, never_a_secret),
    Case("%2e%2e%2f out of the root", get(b"/files/%2e%2e%2fsecret.txt"), (404,), KEPT, never_a_secret),
    Case("double-encoded ..", get(b"/files/%252e%252e%252fsecret.txt"), (404,), KEPT, never_a_secret),
    Case("backslash ..", get(b"/files/..\\secret.txt"), (404,), KEPT, never_a_secret),
    Case("absolute path through //", get(b"/files//etc/passwd"), (404,), KEPT, never_a_secret),
    Case("encoded NUL in a file name", get(b"/files/public.txt%00.png"), (404,), KEPT),
    Case("../ before the route", get(b"/../../etc/passwd"), (404,), KEPT),
    # ------------------------------------------------------------ what a handler sends
    Case("CR/LF in a response header", get(b"/inject"), (500,), KEPT, no_injected_header),
    Case("CR/LF in a response content type", get(b"/inject-content-type"), (500,), KEPT, no_injected_header),
    Case("non-Latin-1 response header", get(b"/not-latin-1"), (500,), KEPT),
    Case("response status out of range", get(b"/bad-status"), (500,), KEPT),
    Case("1xx as a final response", get(b"/informational"), (500,), KEPT),
]
# fmt: on


@pytest.fixture(scope="module")
def server_for(tmp_path_factory) -> Iterator[Callable]:
    """One server per backend and app kind for the whole table: every case hits
    the same one."""
    folder = tmp_path_factory.mktemp("hostile")
    (folder / "root").mkdir()
    (folder / "root" / "public.txt").write_bytes(PUBLIC)
    (folder / "secret.txt").write_bytes(SECRET)
    apps = {"native": hostile_app(folder / "root"), "asgi": hostile_asgi_app(folder / "root")}
    servers: dict[tuple[str, str], object] = {}
    with contextlib.ExitStack() as stack:

        def serve(backend, kind):
            if (backend.id, kind) not in servers:
                if kind == "proxy":  # the caching proxy in front of the native app
                    origin = serve(backend, "native")
                    front = caching_proxy_to(origin.port)
                    server = running_server(backend, front, **LIMITS)
                else:
                    server = running_server(backend, apps[kind], **LIMITS)
                servers[backend.id, kind] = stack.enter_context(server)
            return servers[backend.id, kind]

        yield serve


def caching_proxy_to(port: int) -> CachingProxy:
    pool = UpstreamPool([f"http://127.0.0.1:{port}"])
    return CachingProxy(ProxyFrontDoor(pool), ResponseCache())


@pytest.mark.parametrize("kind", ["native", "asgi", "proxy"])
@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_hostile_request_gets_its_answer_and_the_server_goes_on(backend, server_for, case, kind):
    server = server_for(backend, kind)
    started.clear()
    with RawClient(server.port) as client:
        client.send(case.raw)
        replies = client.read_replies(len(case.statuses))
        assert [reply.status for reply in replies] == list(case.statuses), replies
        if case.check is not None:
            case.check(replies)
        if case.closed:
            assert replies[-1].header("connection") == "close"
            assert client.is_closed_by_server(timeout=5), "connection left open"
            assert client.collector.replies == [], "answers after the last expected one"
            if all(status >= 400 for status in case.statuses):
                assert started == [], "a handler started for a request whose framing was bad"
        else:
            assert replies[-1].header("connection") is None
            client.request("GET", "/seq?i=next")  # the same connection goes on
            assert client.read_reply().body == b"next"
    assert "smuggled" not in started, "a request smuggled in a body was answered"
    if case.closed:
        with RawClient(server.port) as client:
            client.request("GET", "/seq?i=next")
            assert client.read_reply().body == b"next"


def test_the_table_covers_at_least_forty_cases_and_names_each_once():
    assert len(CASES) >= 40
    assert len({case.name for case in CASES}) == len(CASES)
    assert len({case.raw for case in CASES}) == len(CASES)


# ---------------------------------------------------------------------- safe_join


@pytest.mark.parametrize(
    ("path", "inside"),
    [
        ("public.txt", "public.txt"),
        ("sub/page.html", "sub/page.html"),
        ("./a//b", "a/b"),
        ("...", "..."),
        ("%2e%2e/x", "%2e%2e/x"),  # already decoded once: a literal name
    ],
)
def test_safe_join_keeps_plain_relative_paths_inside_the_root(tmp_path, path, inside):
    assert safe_join(tmp_path, path) == str(tmp_path / inside)


@pytest.mark.parametrize(
    "path", ["..", "../x", "a/../b", "a/..", "/etc/passwd", "a\\..\\b", "a\x00b", "sub/../../x"]
)
def test_safe_join_refuses_anything_that_could_leave_the_root(tmp_path, path):
    assert safe_join(tmp_path, path) is None
