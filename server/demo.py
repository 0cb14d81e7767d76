"""The default app, served when `forkloop serve` is given none.

/          hello world (a plain handler: runs inline, the benchmark path)
/echo      POST: answers with the request body
/slow      waits ``?ms=N`` milliseconds, then answers
/stream    streams ``?chunks=N`` chunks of ``?size=B`` bytes (chunked encoding)
/cached/K  computes for ``?ms=N`` ms, then answers ``value of K``; cached
           (max-age 10 s, stale-while-revalidate 5 s) with single-flight fills,
           once per key for the whole server under ``--shared-cache on``
/healthz   "ok"
/stats     this process's counters as JSON
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from .app import App
from .cache import CachePolicy
from .http import Request, Response, error_response

app = App()

HELLO = b"Hello, World!"


@app.get("/")
def hello(request: Request) -> Response:
    return Response(HELLO)


@app.post("/echo")
async def echo(request: Request) -> Response:
    content_type = request.headers.get("content-type", "application/octet-stream")
    return Response(await request.body(), content_type=content_type)


@app.get("/slow")
async def slow(request: Request) -> Response:
    milliseconds = _int_param(request, "ms", 100)
    if milliseconds is None:
        return error_response(400, "ms must be a whole number of milliseconds")
    await asyncio.sleep(milliseconds / 1000)
    return Response(f"slept {milliseconds} ms\n")


@app.get("/stream")
def stream(request: Request) -> Response:
    chunks = _int_param(request, "chunks", 10)
    size = _int_param(request, "size", 1024)
    if chunks is None or size is None:
        return error_response(400, "chunks and size must be whole numbers")

    async def generate() -> AsyncIterator[bytes]:
        block = b"x" * size
        for _ in range(chunks):
            yield block

    return Response(stream=generate(), content_type="application/octet-stream")


@app.get("/cached/{key}", cache=CachePolicy(ttl=10, stale_while_revalidate=5))
async def cached(request: Request) -> Response:
    milliseconds = _int_param(request, "ms", 50)
    if milliseconds is None:
        return error_response(400, "ms must be a whole number of milliseconds")
    await asyncio.sleep(milliseconds / 1000)
    return Response(
        f"value of {request.params['key']}\n",
        headers={"Cache-Control": "max-age=10, stale-while-revalidate=5"},
    )


@app.get("/healthz")
def healthz(request: Request) -> Response:
    return Response(b"ok\n")


@app.get("/stats")
def stats(request: Request) -> Response:
    return Response.json(request.server_stats())


def _int_param(request: Request, name: str, default: int) -> int | None:
    value = request.query_param(name)
    if value is None:
        return default
    return int(value) if value.isascii() and value.isdigit() else None
