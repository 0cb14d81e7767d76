"""The ASGI applications `forkloop bench --asgi` serves on every server.

Each workload is one application, served alone by its own server process, so
the bench measures exactly that work and nothing routes in front of it:

* `hello`: a bare ASGI hello world (no framework), the floor of what a server
  costs per request;
* `make_fastapi_json`: a FastAPI application with one ``async def`` endpoint
  returning a small JSON object, the work a typical API request carries. It
  is a factory, so FastAPI is imported only by the servers of that workload
  (every server here can call a factory: uvicorn and granian with
  ``--factory``, hypercorn with ``module:factory()``);
* `echo`: reads a POST body however it arrives (one ``http.request`` event or
  several) and sends it back whole, with its length;
* `websocket_echo`: accepts a WebSocket and sends every message back as it
  came, text as text and bytes as bytes, until the client closes.

Every application also answers a plain ``GET /`` (the bench's readiness probe
sends one before any load): `websocket_echo` with 426 Upgrade Required.
"""

from __future__ import annotations

from typing import Any

HELLO_BODY = b"Hello, World!"
JSON_MESSAGE = {"message": "Hello, World!"}

_HELLO_HEADERS = [
    (b"content-type", b"text/plain; charset=utf-8"),
    (b"content-length", str(len(HELLO_BODY)).encode()),
]


async def hello(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": _HELLO_HEADERS})
    await send({"type": "http.response.body", "body": HELLO_BODY})


async def echo(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    pieces = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return  # the client left before its body arrived
        pieces.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    body = b"".join(pieces)
    headers = [
        (b"content-type", b"application/octet-stream"),
        (b"content-length", str(len(body)).encode()),
    ]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def websocket_echo(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "http":
        headers = [(b"content-type", b"text/plain"), (b"content-length", b"0")]
        await send({"type": "http.response.start", "status": 426, "headers": headers})
        await send({"type": "http.response.body", "body": b""})
        return
    if scope["type"] != "websocket":
        return
    message = await receive()
    if message["type"] != "websocket.connect":
        return
    await send({"type": "websocket.accept"})
    while True:
        message = await receive()
        if message["type"] != "websocket.receive":
            return  # websocket.disconnect
        text = message.get("text")
        if text is not None:
            await send({"type": "websocket.send", "text": text})
        else:
            await send({"type": "websocket.send", "bytes": message.get("bytes") or b""})


def make_fastapi_json() -> Any:
    """A FastAPI application: ``GET /`` answers `JSON_MESSAGE` from an ``async def``
    endpoint (a plain ``def`` would run in a thread pool, a different workload)."""
    from fastapi import FastAPI

    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)

    @app.get("/")
    async def message() -> dict[str, str]:
        return JSON_MESSAGE

    return app
