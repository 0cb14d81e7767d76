"""Requests and responses: what a handler sees and what it gives back.

A `Request` is built by the connection layer (`server.protocol`) once a whole
request has arrived and its framing has been checked; its body is already
buffered (bounded by ``--max-body-size``), so a handler never starts for a
request whose framing turns out to be bad. Headers stay as the raw bytes the
parser produced until a handler asks for them.

A `Response` is plain data: status, headers, and either a bytes body or an
async iterator of bytes (streamed, chunked when its length is unknown). The
head is encoded here, with every header name and value checked: a handler
cannot inject CR/LF into the stream. `HeaderError` is what it raises instead,
and the connection answers 500.

`safe_join` is for handlers that serve files: ``request.path`` and route
parameters are percent-decoded, so ``/files/..%2fsecret`` reaches a handler as
``../secret``; safe_join refuses any path that could leave its root.
"""

from __future__ import annotations

import asyncio
import contextlib
import json as jsonlib
import os
import re
from collections.abc import AsyncIterable, Awaitable, Iterable, Iterator, Mapping
from http import HTTPStatus
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import parse_qs, unquote_to_bytes

if TYPE_CHECKING:
    from .context import ConnectionContext
    from .request_body import StreamedBody

HeaderItems = Mapping[str, str] | Iterable[tuple[str, str]]
T = TypeVar("T")

SERVER_NAME = "forkloop"

STATUS_LINES: dict[int, bytes] = {
    status.value: f"HTTP/1.1 {status.value} {status.phrase}\r\n".encode() for status in HTTPStatus
}

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# control characters but HTAB (RFC 9110 5.5): CR and LF would split the response
_FORBIDDEN_IN_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
# Framing headers belong to the server: it computes them from the body.
_SERVER_OWNED = frozenset({"content-length", "transfer-encoding", "date", "server"})


class HeaderError(ValueError):
    """A handler set a header that cannot be sent safely."""


def status_line(status: int) -> bytes:
    line = STATUS_LINES.get(status)
    if line is None:
        if status.__class__ is not int or not 100 <= status <= 599:  # RFC 9110 15
            raise HeaderError(f"status {status!r} is not an HTTP status (100-599)")
        line = STATUS_LINES[status] = f"HTTP/1.1 {status} Unknown\r\n".encode()
    return line


def encode_header(name: str, value: str) -> bytes:
    """``name: value\\r\\n``, refusing anything that would break the framing."""
    if not isinstance(name, str) or not _TOKEN.fullmatch(name):
        raise HeaderError(f"header name {name!r} is not an HTTP token")
    value = str(value)
    if _FORBIDDEN_IN_VALUE.search(value):
        raise HeaderError(f"header {name} has CR, LF or NUL (or another control) in its value")
    try:
        return f"{name}: {value}\r\n".encode("latin-1")
    except UnicodeEncodeError:
        raise HeaderError(f"header {name} has a character outside Latin-1 in its value") from None


class Headers:
    """Case-insensitive, multi-valued view of a request's raw headers."""

    __slots__ = ("raw", "_index")

    def __init__(self, raw: list[tuple[bytes, bytes]]) -> None:
        self.raw = raw
        self._index: dict[str, list[str]] | None = None

    def _build_index(self) -> dict[str, list[str]]:
        index: dict[str, list[str]] = {}
        for name, value in self.raw:
            index.setdefault(name.decode("latin-1").lower(), []).append(value.decode("latin-1"))
        self._index = index
        return index

    def get(self, name: str, default: str | None = None) -> str | None:
        """The value of ``name``; several values are joined with ", " (RFC 9110 5.3)."""
        values = (self._index or self._build_index()).get(name.lower())
        return ", ".join(values) if values else default

    def get_all(self, name: str) -> list[str]:
        return list((self._index or self._build_index()).get(name.lower(), ()))

    def __getitem__(self, name: str) -> str:
        value = self.get(name)
        if value is None:
            raise KeyError(name)
        return value

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in (self._index or self._build_index())

    def __iter__(self) -> Iterator[str]:
        return iter(self._index or self._build_index())

    def __len__(self) -> int:
        return len(self.raw)

    def items(self) -> list[tuple[str, str]]:
        return [(n.decode("latin-1"), v.decode("latin-1")) for n, v in self.raw]

    def __repr__(self) -> str:
        return f"Headers({self.items()!r})"


class Request:
    """One HTTP request, complete and well-framed.

    ``path`` is percent-decoded (UTF-8); ``raw_path`` is what the client sent.
    ``params`` holds the values of the route's ``{placeholders}``.
    """

    # Filled in on first use; immutable defaults keep __init__ to the eight fields
    # every request has.
    params: Mapping[str, str] = MappingProxyType({})
    # why the handler was cancelled: "disconnect", "deadline", "shutdown" (None: it wasn't)
    cancel_reason: str | None = None
    # for front doors that read bodies as they arrive (ASGI): the body, still arriving
    streamed_body: StreamedBody | None = None
    # the protocol this request asks to switch to, when the front door can switch
    # ("websocket"); nothing after its head was parsed (server.parsing)
    upgrade: str | None = None
    # it carries If-None-Match or If-Modified-Since: a cache hit may be a 304 (set by
    # server.parsing; server.freshness.not_modified reads the headers themselves)
    conditional: bool = False
    _headers: Headers | None = None
    _path: str | None = None
    _query: bytes = b""

    def __init__(
        self,
        method: str,
        target: bytes,
        version: str,
        raw_headers: list[tuple[bytes, bytes]],
        client: tuple[str, int] | None,
        keep_alive: bool,
        body: bytes = b"",
        context: ConnectionContext | None = None,
    ) -> None:
        self.method = method
        self.target = target
        self.version = version
        self.raw_headers = raw_headers
        self.client = client
        self.keep_alive = keep_alive
        self._context = context
        self._body = body

    @property
    def headers(self) -> Headers:
        """The request headers, case-insensitive (built on first use)."""
        headers = self._headers
        if headers is None:
            headers = self._headers = Headers(self.raw_headers)
        return headers

    def _split_target(self) -> str:
        target = self.target
        if b"?" not in target and b"%" not in target and target[:1] == b"/":
            path = self._path = target.decode("utf-8", "replace")  # the common case
            return path
        if target[:1] != b"/" and target != b"*":
            # absolute-form (RFC 9112 3.2.2): keep only the path and query
            scheme_end = target.find(b"://")
            if scheme_end >= 0:
                slash = target.find(b"/", scheme_end + 3)
                target = target[slash:] if slash >= 0 else b"/"
        raw_path, _, self._query = target.partition(b"?")
        if b"%" in raw_path:
            path = unquote_to_bytes(raw_path).decode("utf-8", "replace")
        else:
            path = raw_path.decode("utf-8", "replace")
        self._path = path
        return path

    @property
    def path(self) -> str:
        return self._path if self._path is not None else self._split_target()

    @property
    def raw_path(self) -> bytes:
        return self.target.partition(b"?")[0]

    @property
    def query_string(self) -> str:
        if self._path is None:
            self._split_target()
        return self._query.decode("latin-1")

    def split_target(self) -> tuple[str, bytes, bytes]:
        """The decoded path, the raw path and the raw query, in one call (an
        absolute-form target gives its path only)."""
        path = self._path if self._path is not None else self._split_target()
        target = self.target
        if target[:1] != b"/":
            return path, path.encode(), self._query
        raw_path = target.partition(b"?")[0] if b"?" in target else target
        return path, raw_path, self._query

    @property
    def query(self) -> dict[str, list[str]]:
        """Query parameters, each name mapped to the list of its values."""
        return parse_qs(self.query_string, keep_blank_values=True)

    def query_param(self, name: str, default: str | None = None) -> str | None:
        values = self.query.get(name)
        return values[0] if values else default

    def server_stats(self) -> dict[str, Any]:
        """The serving worker's counters (the ``/stats`` document), server-wide
        totals included when a master supervises it."""
        if self._context is None:
            raise RuntimeError("this request was not received by a server")
        return self._context.snapshot()

    async def body(self) -> bytes:
        """The whole body (already received and bounded by the body-size limit)."""
        return self._body

    async def stream(self, chunk_size: int = 65536) -> AsyncIterable[bytes]:
        """The body in chunks of at most ``chunk_size`` bytes."""
        body = memoryview(self._body)
        for start in range(0, len(body), chunk_size):
            yield bytes(body[start : start + chunk_size])

    async def shield(self, awaitable: Awaitable[T]) -> T:
        """Run a critical section to its end even if the request is cancelled meanwhile.

        The cancellation is not lost: it is raised once the section is done, and
        ``cancel_reason`` says why it came."""
        inner = asyncio.ensure_future(awaitable)
        try:
            return await asyncio.shield(inner)
        except asyncio.CancelledError:
            while not inner.done():
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.wait({inner})
            raise

    async def text(self, encoding: str = "utf-8") -> str:
        return self._body.decode(encoding)

    async def json(self) -> Any:
        return jsonlib.loads(self._body)

    def __repr__(self) -> str:
        return f"<Request {self.method} {self.target.decode('latin-1')} HTTP/{self.version}>"


class Response:
    """Status, headers and a body: ``bytes`` or an async iterator of ``bytes``.

    ``Response("hi")``, ``Response.json({...}, status=201)``,
    ``Response(stream=generate(), content_type="text/csv")``.
    """

    __slots__ = ("status", "headers", "body", "stream", "content_type", "encoded_headers")

    def __init__(
        self,
        body: bytes | str = b"",
        status: int = 200,
        headers: HeaderItems | None = None,
        content_type: str | None = "text/plain; charset=utf-8",
        stream: AsyncIterable[bytes] | None = None,
    ) -> None:
        self.status = status
        self.body = body if body.__class__ is bytes else _encode_body(body)
        self.stream = stream
        self.content_type = content_type
        # Header lines already validated and encoded (Content-Type included); set by
        # the cache, whose entries are checked once when stored, not on every hit.
        self.encoded_headers: bytes | None = None
        if headers is None:
            self.headers: list[tuple[str, str]] = []
        elif isinstance(headers, Mapping):
            self.headers = list(headers.items())
        else:
            self.headers = list(headers)

    @classmethod
    def text(cls, text: str, status: int = 200, headers: HeaderItems | None = None) -> Response:
        return cls(text.encode(), status, headers)

    @classmethod
    def json(cls, data: Any, status: int = 200, headers: HeaderItems | None = None) -> Response:
        body = jsonlib.dumps(data, separators=(",", ":")).encode()
        return cls(body, status, headers, content_type="application/json")

    @classmethod
    def html(cls, html: str, status: int = 200, headers: HeaderItems | None = None) -> Response:
        return cls(html.encode(), status, headers, content_type="text/html; charset=utf-8")

    def header(self, name: str, default: str | None = None) -> str | None:
        lowered = name.lower()
        for key, value in self.headers:
            if key.lower() == lowered:
                return value
        if self.encoded_headers is not None:
            for line in self.encoded_headers.decode("latin-1").split("\r\n"):
                key, _, value = line.partition(": ")
                if key.lower() == lowered:
                    return value
        if lowered == "content-type" and self.content_type is not None:
            return self.content_type
        return default

    def wants_close(self) -> bool:
        """True when the handler asked for ``Connection: close``."""
        value = self.header("connection")
        return value is not None and "close" in value.lower()

    def encode_headers(self) -> bytes:
        """The handler's own header lines, validated; framing headers are the server's."""
        if self.encoded_headers is not None:
            return self.encoded_headers
        lines = []
        content_type = self.content_type
        for name, value in self.headers:
            lowered = name.lower()
            if lowered in _SERVER_OWNED or lowered == "connection":
                continue
            if lowered == "content-type":
                content_type = None
            lines.append(encode_header(name, value))
        if content_type is not None:
            lines.append(content_type_line(content_type))
        return b"".join(lines)

    def declared_length(self) -> int | None:
        """Content-Length a streaming handler promised, if any."""
        value = self.header("content-length")
        if value is None:
            return None
        if not (value.isascii() and value.isdigit()):
            raise HeaderError(f"Content-Length {value!r} set by the handler is not a number")
        return int(value)

    def __repr__(self) -> str:
        kind = "stream" if self.stream is not None else f"{len(self.body)} bytes"
        return f"<Response {self.status} {kind}>"


_CONTENT_TYPE_LINES: dict[str, bytes] = {}


def _encode_body(body: bytes | bytearray | memoryview | str) -> bytes:
    if isinstance(body, str):
        return body.encode()
    if isinstance(body, bytes | bytearray | memoryview):
        return bytes(body)
    raise TypeError(f"response body must be bytes or str, not {type(body).__name__}")


def content_type_line(content_type: str) -> bytes:
    line = _CONTENT_TYPE_LINES.get(content_type)
    if line is None:
        line = encode_header("Content-Type", content_type)
        if len(_CONTENT_TYPE_LINES) < 256:
            _CONTENT_TYPE_LINES[content_type] = line
    return line


def as_response(result: Any) -> Response:
    """What a handler returned, as a Response (str, bytes, dict and list are accepted)."""
    if result.__class__ is Response or isinstance(result, Response):
        return result
    if isinstance(result, bytes | str):
        return Response(result)
    if isinstance(result, dict | list):
        return Response.json(result)
    raise TypeError(f"handler returned {type(result).__name__}; expected a Response")


def safe_join(root: str | os.PathLike[str], path: str) -> str | None:
    """``root/path`` for a file server, or None when ``path`` could name anything
    outside ``root``.

    ``path`` is a decoded request path or route parameter: refused are a ``..``
    segment anywhere (even one that would stay inside), an absolute path, a
    backslash (a separator to some clients and file systems) and NUL. Symbolic
    links inside ``root`` are followed: they are the operator's to place."""
    if not isinstance(path, str) or "\x00" in path or "\\" in path or path.startswith("/"):
        return None
    parts = [part for part in path.split("/") if part not in ("", ".")]
    if ".." in parts:
        return None
    base = os.path.abspath(root)
    joined = os.path.join(base, *parts)
    if os.path.commonpath((base, joined)) != base:  # cannot happen after the checks above
        return None
    return joined


def error_response(status: int, reason: str) -> Response:
    """A short plain-text error page: ``400 Bad Request: duplicate Content-Length``."""
    phrase = HTTPStatus(status).phrase if status in STATUS_LINES else "Error"
    return Response(f"{status} {phrase}: {reason}\n".encode(), status)
