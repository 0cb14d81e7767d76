"""A real upstream for the proxy's tests: a raw-socket HTTP/1.1 server (stdlib
asyncio, in a thread of its own) that records what reaches it and answers by
path: slow, closing its keep-alive connections, framing badly, streaming a
large body, or (under ``/cache/``) with the caching headers its query asks for.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from dataclasses import dataclass, field
from email.utils import formatdate
from urllib.parse import parse_qs


@dataclass
class Seen:
    """What reached the upstream."""

    heads: list[bytes] = field(default_factory=list)
    bodies: dict[bytes, bytes] = field(default_factory=dict)
    connections: int = 0
    aborted: list[bytes] = field(default_factory=list)  # /slow requests whose client closed
    huge_written: int = 0
    counts: dict[bytes, int] = field(default_factory=dict)  # requests per path


class Upstream:
    """A raw HTTP/1.1 server for the proxy to talk to; behaviour by path."""

    def __init__(self) -> None:
        self.seen = Seen()
        self.failing = False  # /cache/ paths answer 503 while set
        self.loop = asyncio.new_event_loop()
        self.port = 0
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Upstream:
        self._thread.start()
        assert self._ready.wait(5)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop answering (new connections are refused); once is enough."""
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(5)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        server = self.loop.run_until_complete(
            asyncio.start_server(self._serve, "127.0.0.1", 0, limit=1 << 20)
        )
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        self.loop.run_forever()
        server.close()
        handlers = asyncio.all_tasks(self.loop)
        for handler in handlers:  # connections still open: end them before the loop closes
            handler.cancel()
        self.loop.run_until_complete(asyncio.gather(*handlers, return_exceptions=True))
        self.loop.run_until_complete(server.wait_closed())
        self.loop.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.seen.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.seen.heads.append(head)
                target = head.split(b" ")[1]
                lowered = head.lower()
                body = b""
                if b"transfer-encoding: chunked" in lowered:
                    while True:
                        size = int((await reader.readuntil(b"\r\n")).strip(), 16)
                        chunk = await reader.readexactly(size + 2)
                        if size == 0:
                            break
                        body += chunk[:-2]
                elif b"content-length:" in lowered:
                    length = int(lowered.split(b"content-length:")[1].split(b"\r\n")[0])
                    body = await reader.readexactly(length)
                self.seen.bodies[target] = body
                if not await self._answer(target, body, reader, writer):
                    break
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def _answer(self, target: bytes, body: bytes, reader, writer) -> bool:
        """Write the answer to ``target``; False to close the connection after it."""
        path = target.split(b"?")[0]
        self.seen.counts[path] = self.seen.counts.get(path, 0) + 1
        if path.startswith(b"/cache/"):
            return await self._cached(target, reader, writer)
        if path == b"/slow":
            try:
                await asyncio.wait_for(reader.read(1), 5)  # the proxy closes: EOF
                self.seen.aborted.append(target)
            except TimeoutError:
                pass
            return False
        if path == b"/both-framing":
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"5\r\nhello\r\n0\r\n\r\n"
            )
            return False
        if path == b"/bad-chunk":
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nZZ\r\nbad\r\n")
            return False
        if path == b"/close":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\nConnection: close\r\n\r\nclosed")
            return False
        if path == b"/huge":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (100 << 20))
            for _ in range(1600):  # 100 MiB
                writer.write(b"x" * 65536)
                self.seen.huge_written += 65536
                await writer.drain()
            return False
        if path == b"/echo":
            answer = body
        else:
            answer = b"hello from upstream"
        to_head = self.seen.heads[-1].startswith(b"HEAD ")
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: keep-alive, X-Hop\r\n"
            b"Keep-Alive: timeout=5\r\nX-Hop: secret\r\nX-Kept: yes\r\n\r\n%b"
            % (len(answer), b"" if to_head else answer)
        )
        await writer.drain()
        return True

    async def _cached(
        self, target: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        """``/cache/NAME?...``: an answer with the caching headers the query asks
        for: ``max_age``, ``swr``, ``sie``, ``public``, ``private``, ``no_store``,
        ``cookie``, ``expires`` (seconds from now), ``etag``, ``last_modified``,
        ``vary``, ``status``, ``ms`` (answer after that delay), ``size`` (the body's
        length). The body says which request of the path it answers:
        ``NAME #COUNT``. A request whose If-None-Match names the ETag gets a 304."""
        path, _, query = target.decode().partition("?")
        asked = {k: v[-1] for k, v in parse_qs(query, keep_blank_values=True).items()}
        head = self.seen.heads[-1].decode("latin-1").lower()
        count = self.seen.counts[path.encode()]
        if "ms" in asked:  # the proxy closing meanwhile is an abort: recorded
            try:
                await asyncio.wait_for(reader.read(1), int(asked["ms"]) / 1000)
                self.seen.aborted.append(target)
                return False
            except TimeoutError:
                pass
        if self.failing:
            writer.write(b"HTTP/1.1 503 Unavailable\r\nContent-Length: 4\r\n\r\ndown")
            await writer.drain()
            return True
        control = [
            f"{name.replace('_', '-')}={asked[name]}"
            for name in ("max_age", "s_maxage", "swr", "sie")
            if name in asked
        ]
        control = [c.replace("swr=", "stale-while-revalidate=") for c in control]
        control = [c.replace("sie=", "stale-if-error=") for c in control]
        control += [
            name.replace("_", "-")
            for name in ("public", "private", "no_store", "no_cache")
            if name in asked
        ]
        fields = []
        if control:
            fields.append("Cache-Control: " + ", ".join(control))
        if "expires" in asked:
            fields.append(
                "Expires: " + formatdate(time.time() + int(asked["expires"]), usegmt=True)
            )
            fields.append("Date: " + formatdate(time.time(), usegmt=True))
        if "cookie" in asked:
            fields.append("Set-Cookie: session=secret")
        if "vary" in asked:
            fields.append("Vary: " + asked["vary"])
        etag = f'"{asked["etag"]}"' if "etag" in asked else None
        if etag:
            fields.append("ETag: " + etag)
        if "last_modified" in asked:
            fields.append("Last-Modified: Mon, 07 Dec 2026 00:00:00 GMT")
        validated = etag is not None and f"if-none-match: {etag}" in head
        if validated:
            writer.write(
                (
                    "HTTP/1.1 304 Not Modified\r\n" + "".join(f + "\r\n" for f in fields) + "\r\n"
                ).encode()
            )
            await writer.drain()
            return True
        body = f"{path.removeprefix('/cache/')} #{count}".encode()
        if "vary" in asked:
            body += b" " + self._varied(head, asked["vary"])
        if "size" in asked:
            body = body.ljust(int(asked["size"]), b".")
        status = int(asked.get("status", 200))
        fields.append(f"Content-Length: {len(body)}")
        writer.write(
            (f"HTTP/1.1 {status} X\r\n" + "".join(f + "\r\n" for f in fields) + "\r\n").encode()
            + body
        )
        await writer.drain()
        return True

    @staticmethod
    def _varied(head: str, name: str) -> bytes:
        for line in head.split("\r\n"):
            key, _, value = line.partition(":")
            if key == name.lower():
                return value.strip().encode()
        return b"-"


def check_a_slow_client_holds_the_upstream_back(upstream: Upstream, proxy, pool) -> None:
    """A client that reads nothing of ``/huge`` (100 MiB): after a second, the proxy
    (``proxy``, a running server; ``pool``, its upstream pool) holds at most about
    two high-water marks and a read or two on each side, and the upstream has
    written far less than the answer (kernel socket buffers hold some megabytes)."""
    from tests.server.master_support import wait_for

    sock = socket.create_connection(("127.0.0.1", proxy.port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    sock.sendall(b"GET /huge HTTP/1.1\r\nHost: t\r\n\r\n")
    assert wait_for(lambda: upstream.seen.huge_written > 0, 5)
    wait_for(lambda: False, 1.0)  # the client reads nothing for a second

    def held_by_the_proxy() -> int:
        upstream_side = sum(c.waiting for c in pool.busy)
        client_side = sum(
            c.transport.get_write_buffer_size()
            for c in proxy.service.connections
            if c.transport is not None
        )
        return upstream_side + client_side

    held = proxy.call(held_by_the_proxy)
    assert held <= 2 << 20, f"the proxy holds {held} bytes"
    assert upstream.seen.huge_written < 32 << 20, upstream.seen.huge_written
    sock.close()
