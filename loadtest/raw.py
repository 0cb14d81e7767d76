"""A bare httptools hello-world protocol, for telling loop cost from server cost.

``forkloop bench --raw`` serves this on each loop: no routing, no limits, no
request objects, one canned response per request. Whatever it costs per
request is the loop plus the parser; what forkloop costs above it is the
server's own work.

    python -m forkloop.loadtest.raw --loop reactor --port 8001
"""

from __future__ import annotations

import argparse
import asyncio
from typing import cast

import httptools

from ..server import backends

RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: raw\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Content-Length: 13\r\n\r\nHello, World!"
)


class RawHello(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # a stream transport (uvloop's do not subclass asyncio.Transport, so no isinstance)
        self.transport = cast(asyncio.Transport, transport)
        self.parser = httptools.HttpRequestParser(self)
        self.out: list[bytes] = []

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.close()
            return
        if self.out:
            self.transport.write(b"".join(self.out))
            self.out.clear()

    def on_message_complete(self) -> None:
        self.out.append(RESPONSE)


async def serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(RawHello, "127.0.0.1", port, backlog=2048)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loop", default="asyncio", choices=backends.names())
    parser.add_argument("--port", type=int, default=8001)
    args = parser.parse_args()
    with asyncio.Runner(loop_factory=backends.loop_factory(args.loop)) as runner:
        try:
            runner.run(serve(args.port))
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
