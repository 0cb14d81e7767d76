"""An app for the fleet-cache tests: the shared-cache tests' app (each computation
appends "pid key" to the file named by ``FORKLOOP_TEST_FILLS``), plus ``/slow/{key}``,
whose waiters wait up to 30 s for a fill elsewhere (a filler killed mid-fill is
replaced only when its lease expires, which the default 5 s lock timeout may not
cover on a loaded machine)."""

from __future__ import annotations

import asyncio
import os

from forkloop.server import Request, Response
from forkloop.server.cache import CachePolicy
from tests.server.apps.fills import app


@app.get("/slow/{key}", cache=CachePolicy(ttl=60, lock_timeout=30))
async def slow(request: Request) -> Response:
    key = request.params["key"]
    with open(os.environ["FORKLOOP_TEST_FILLS"], "a") as fills:
        fills.write(f"{os.getpid()} {key}\n")
    await asyncio.sleep(int(request.query_param("ms", "200")) / 1000)
    return Response(f"value of {key}\n", headers={"Cache-Control": "max-age=60"})


__all__ = ["app"]
