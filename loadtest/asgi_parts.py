"""Where an ASGI request's cost goes: instructions per part, counted by callgrind.

    apt-get install valgrind
    python -m forkloop.loadtest.asgi_parts                  # every part
    python -m forkloop.loadtest.asgi_parts --parts scope,app --requests 50000

`loadtest.instructions` counts the whole server (loop, sockets and all) per
request; this splits the Python side of one ASGI hello-world request
(`loadtest.asgi_apps.hello`, ``GET /`` with one header) into the parts a
request passes through, each run alone in one process, in a loop, on one
`HttpConnection` over an in-memory transport that throws its writes away:

========== ===============================================================
parse      the bytes fed to the reader: httptools and its callbacks, up to
           a queued `Request`
scope      an `HttpCycle` made and its ``http`` scope built
app        the application called with that scope: its two ``send()``
           calls, the response's head encoded, written to the output and
           flushed
writer     of ``app``: the response written to the output and flushed
           (`ResponseWriter.respond`, the flush)
request    all of one request through ``data_received``: the parts above
           and the connection's own (dispatch, the inline start of the
           handler, its frames, the keep-alive bookkeeping)
native     the same request answered by a plain ``def`` handler of a
           forkloop `App`, for comparison; ``native-async``: an ``async
           def`` one
========== ===============================================================

Each part is counted twice, over ``--requests`` iterations and over none, and
the difference divided: start-up and imports cancel out. Counts do not depend
on the machine's load. The connection's own share is ``request`` minus
``parse``, ``scope`` and ``app``; the loop's and the kernel calls' share is
what `loadtest.instructions` counts for the whole server minus ``request``.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, cast

from ..server.app import App
from ..server.asgi import AsgiApp, HttpCycle
from ..server.config import Limits
from ..server.context import ConnectionContext
from ..server.http import Request, Response
from ..server.protocol import HttpConnection
from .asgi_apps import hello
from .servers import python

PARTS = ("parse", "scope", "app", "writer", "request", "native", "native-async")
REQUEST = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"
ASYNC_REQUEST = b"GET /async HTTP/1.1\r\nHost: bench\r\n\r\n"


class DiscardingTransport:
    """The transport calls a connection makes, answered in memory; writes are dropped."""

    def write(self, data: bytes) -> None:
        pass

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 50000), "sockname": ("127.0.0.1", 8000)}.get(
            name, default
        )

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def can_write_eof(self) -> bool:
        return True


def native_app() -> App:
    app = App()

    @app.get("/")
    def index(request: Request) -> Response:
        return Response(b"Hello, World!")

    @app.get("/async")
    async def index_async(request: Request) -> Response:
        return Response(b"Hello, World!")

    return app


async def run_in_callback(part: str, iterations: int) -> None:
    """`run_part` from a loop callback, as a transport calls ``data_received``: no
    task is running (a handler's first step runs as it does in a server)."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def run() -> None:
        try:
            run_part(loop, part, iterations)
        except BaseException as error:
            done.set_exception(error)
        else:
            done.set_result(None)

    loop.call_soon(run)
    await done


def run_part(loop: asyncio.AbstractEventLoop, part: str, iterations: int) -> HttpConnection:
    """``part`` ``iterations`` times, on one connection (see the module's docstring);
    the connection, whose counters say what it answered."""
    front = AsgiApp(hello, lifespan="off")
    native = part.startswith("native")
    resolve = native_app().resolve if native else front.resolve
    limits = Limits(max_keepalive_requests=iterations + 10)  # never closes on the way
    context = ConnectionContext(loop, limits, resolve, stream_bodies=not native)
    connection = HttpConnection(context)
    connection.connection_made(DiscardingTransport())  # type: ignore[arg-type]
    if part in ("request", "native", "native-async"):
        data = ASYNC_REQUEST if part == "native-async" else REQUEST
        for _ in range(iterations):
            connection.data_received(data)
        return connection
    reader = connection.reader
    if part == "parse":
        for _ in range(iterations):
            reader.feed(REQUEST)
            reader.pending.clear()
        return connection
    reader.feed(REQUEST)
    request = reader.pending.popleft()
    if part == "scope":
        for _ in range(iterations):
            HttpCycle(front, request, connection).scope()
    elif part == "app":
        scope = HttpCycle(front, request, connection).scope()
        for _ in range(iterations):
            cycle = HttpCycle(front, request, connection)
            try:
                hello(cast(dict[str, Any], scope), cycle.receive, cycle.send).send(None)
            except StopIteration:
                pass
            connection._flush()
    elif part == "writer":
        response = Response(b"Hello, World!", 200, None, content_type=None)
        response.encoded_headers = b"content-type: text/plain; charset=utf-8\r\n"
        for _ in range(iterations):
            connection.writer.respond(request, response)
            connection._flush()
    else:
        raise ValueError(f"no part {part!r}: one of {', '.join(PARTS)}")
    return connection


def instructions(part: str, iterations: int, workdir: Path) -> int:
    """All the instructions of one process running ``part`` ``iterations`` times."""
    dump = workdir / f"callgrind.{part}.{iterations}"
    command = [
        "valgrind", "--tool=callgrind", f"--callgrind-out-file={dump}",
        python(), "-m", "forkloop.loadtest.asgi_parts", "--run", part, str(iterations),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    match = re.search(r"Collected : (\d+)", done.stderr)
    if match is None:
        raise RuntimeError(f"callgrind counted nothing for {part}: {done.stderr[-500:]}")
    return int(match.group(1))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default=",".join(PARTS))
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--run", nargs=2, metavar=("PART", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.run:
        asyncio.run(run_in_callback(args.run[0], int(args.run[1])))
        return
    if shutil.which("valgrind") is None:
        sys.exit("valgrind not found: apt-get install valgrind")
    parts = args.parts.split(",")
    for part in parts:
        if part not in PARTS:
            parser.error(f"no part {part!r}: one of {', '.join(PARTS)}")
    print("| part | instructions per request |\n|---|---:|")
    with tempfile.TemporaryDirectory(prefix="forkloop-parts-") as workdir:
        for part in parts:
            spent = instructions(part, args.requests, Path(workdir))
            spent -= instructions(part, 0, Path(workdir))
            print(f"| {part} | {spent / args.requests:,.0f} |", flush=True)


if __name__ == "__main__":
    main()
