"""An app for the shared-cache tests: each computation appends "pid key" to the file
named by ``FORKLOOP_TEST_FILLS``, so a test knows how many fills ran and where."""

from __future__ import annotations

import asyncio
import os

from forkloop.server import App, Request, Response
from forkloop.server.cache import CachePolicy

app = App()


@app.get("/")
def hello(request: Request) -> Response:
    return Response(b"Hello, World!")


@app.get("/fill/{key}", cache=CachePolicy(ttl=60))
async def fill(request: Request) -> Response:
    key = request.params["key"]
    with open(os.environ["FORKLOOP_TEST_FILLS"], "a") as fills:
        fills.write(f"{os.getpid()} {key}\n")
    await asyncio.sleep(int(request.query_param("ms", "200")) / 1000)
    return Response(f"value of {key}\n", headers={"Cache-Control": "max-age=60"})


@app.get("/swr/{key}", cache=CachePolicy(ttl=1, stale_while_revalidate=60))
async def refreshed(request: Request) -> Response:
    key = request.params["key"]
    with open(os.environ["FORKLOOP_TEST_FILLS"], "a") as fills:
        fills.write(f"{os.getpid()} {key}\n")
    await asyncio.sleep(int(request.query_param("ms", "200")) / 1000)
    return Response(
        f"value of {key}\n", headers={"Cache-Control": "max-age=1, stale-while-revalidate=60"}
    )


@app.get("/stats")
def stats(request: Request) -> Response:
    return Response.json(request.server_stats())


@app.get("/broken/{key}", cache=CachePolicy(ttl=60))
async def broken(request: Request) -> Response:
    """A failing origin: 503 after ``ms``, or an exception with ``?raise=1``."""
    key = request.params["key"]
    with open(os.environ["FORKLOOP_TEST_FILLS"], "a") as fills:
        fills.write(f"{os.getpid()} {key}\n")
    await asyncio.sleep(int(request.query_param("ms", "200")) / 1000)
    if request.query_param("raise", ""):
        raise RuntimeError(f"the origin of {key} is down")
    return Response(f"{key} is down\n", 503)
