"""The peer `forkloop bench` compares against: the same hello world as an ASGI app.

Served by uvicorn with ``--loop uvloop --http httptools``, it answers exactly
what forkloop's default ``/`` answers, so the two do the same work per request.
"""

from __future__ import annotations

from typing import Any

BODY = b"Hello, World!"
HEADERS = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", b"13")]


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": BODY})
