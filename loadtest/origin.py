"""The origin behind the proxies of ``forkloop bench --proxy``: a small HTTP/1.1
server (stdlib asyncio streams, uvloop when installed) that counts what
reaches it.

    python -m forkloop.loadtest.origin --port 9000

- ``/hit?size=N``: N bytes (1 KiB by default), ``Cache-Control: public,
  max-age=3600`` (stored by a cache);
- ``/pass?size=N``: the same, ``Cache-Control: no-store`` (relayed every time);
- ``/cold/KEY?ms=N``: the same as ``/hit``, answered after ``N`` ms (a slow
  origin, for a stampede on a cold key);
- ``/count/PATH``: how many requests for ``/PATH`` reached the origin, asked
  of the origin directly (never through a proxy).
"""

from __future__ import annotations

import argparse
import asyncio
from collections import Counter
from urllib.parse import parse_qs

BODY = b"x" * 1024
CACHEABLE = b"Cache-Control: public, max-age=3600\r\n"
NOT_STORED = b"Cache-Control: no-store\r\n"


class Origin:
    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                target = head.split(b" ", 2)[1].decode("latin-1")
                writer.write(await self.answer(target))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    async def answer(self, target: str) -> bytes:
        path, _, query = target.partition("?")
        if path.startswith("/count/"):
            body = str(self.counts[path.removeprefix("/count")]).encode()
            return _response(body, NOT_STORED)
        self.counts[path] += 1
        asked = parse_qs(query)
        body = b"x" * int(asked["size"][0]) if "size" in asked else BODY
        if path.startswith("/cold/"):
            milliseconds = int(asked.get("ms", ["0"])[0])
            await asyncio.sleep(milliseconds / 1000)
            return _response(body, CACHEABLE)
        if path == "/pass":
            return _response(body, NOT_STORED)
        return _response(body, CACHEABLE)


def _response(body: bytes, control: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), control, body)


async def main(port: int) -> None:
    origin = Origin()
    server = await asyncio.start_server(origin.serve, "127.0.0.1", port, backlog=4096)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    port = parser.parse_args().port
    try:
        import uvloop
    except ImportError:
        asyncio.run(main(port))
    else:
        uvloop.run(main(port))
