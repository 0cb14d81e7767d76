"""forkloop's ASGI adapter in one process, for `forkloop bench --asgi`.

    python -m forkloop.loadtest.asgi_server forkloop.loadtest.asgi_apps:hello \\
        --loop reactor --port 8001

It builds what a worker of ``forkloop serve`` builds for an ASGI application,
`HttpService` over `AsgiApp`, on the chosen loop backend, in this one process:
no master, no access log, no ``/metrics`` listener, no health path in front.
It runs the application's lifespan (``auto``) before it accepts, and stops
gracefully on SIGTERM or SIGINT.

The bench runs ``forkloop serve`` itself whenever that command loads the
application (`loadtest.asgi_bench` asks it with ``--check-config``); this
module is its fallback, and the adapter without the worker around it when
asked for (``--forkloop-via runner``): comparing the two shows what the
worker adds per request.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import signal
from typing import Any

from ..server import backends
from ..server.asgi import AsgiApp
from ..server.config import Config
from ..server.listeners import bind, parse_bind
from ..server.logs import configure_logging
from ..server.service import HttpService

SHUTDOWN_TIMEOUT = 5.0


def load(spec: str, factory: bool) -> Any:
    """The object ``module:attribute`` names (called, with ``factory``)."""
    module_name, _, attribute = spec.partition(":")
    target: Any = importlib.import_module(module_name)
    for part in attribute.split("."):
        target = getattr(target, part)
    return target() if factory else target


async def serve(app: Any, name: str, config: Config) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    sockets = [bind(parse_bind(text), config.backlog) for text in config.binds]
    service = HttpService(AsgiApp(app, name=name), config)
    await service.start(sockets)
    try:
        await stop.wait()
    finally:
        await service.shutdown(SHUTDOWN_TIMEOUT)
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("app", help="the ASGI application, module:attribute")
    parser.add_argument("--factory", action="store_true", help="call the attribute for the app")
    parser.add_argument("--loop", default="asyncio", choices=backends.names())
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args(argv)
    configure_logging(args.log_level)
    config = Config(
        app=args.app,
        binds=(f"{args.host}:{args.port}",),
        loop=args.loop,
        workers=1,
        no_master=True,
        log_level=args.log_level,
        access_log=False,
        metrics_bind=None,
    )
    app = load(args.app, args.factory)
    with asyncio.Runner(loop_factory=backends.loop_factory(args.loop)) as runner:
        runner.run(serve(app, args.app, config))


if __name__ == "__main__":
    main()
