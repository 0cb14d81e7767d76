"""An app for the master/worker tests: it says which worker answered, and can misbehave."""

from __future__ import annotations

import asyncio
import os
import time

from forkloop.server import App, Request, Response

app = App()


@app.get("/")
def hello(request: Request) -> Response:
    return Response(b"Hello, World!")


@app.get("/pid")
def pid(request: Request) -> Response:
    return Response(str(os.getpid()))


@app.get("/slow")
async def slow(request: Request) -> Response:
    await asyncio.sleep(int(request.query_param("ms", "1000")) / 1000)
    return Response(f"slow {os.getpid()}")


@app.get("/block")
def block(request: Request) -> Response:
    time.sleep(float(request.query_param("s", "30")))  # blocks the event loop on purpose
    return Response(b"unblocked")
