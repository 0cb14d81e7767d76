"""The ``forkloop`` command.

    forkloop serve [module:app] --bind 127.0.0.1:8000 --loop uvloop --workers 4
    forkloop bench [--raw] [--loops reactor,uvloop] [--duration 5]

``python -m server`` is ``forkloop serve``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import fields

from server import backends
from server.config import Config, Limits
from server.logs import configure_logging

# --flag name for each Limits field, with its help text
_LIMIT_FLAGS = {
    "header_timeout": "seconds for a whole request head to arrive (nginx client_header_timeout)",
    "body_timeout": "longest gap in seconds between two body reads (client_body_timeout)",
    "keepalive_timeout": "seconds an idle keep-alive connection is kept (keepalive_timeout)",
    "send_timeout": "seconds a client may read nothing of a full write buffer (send_timeout)",
    "max_keepalive_requests": "requests per connection before it is closed (keepalive_requests)",
    "max_request_line": "longest request target in bytes; longer is 414",
    "max_header_bytes": "largest request head in bytes; larger is 431",
    "max_header_count": "most header fields in a request; more is 431",
    "max_body_size": "largest request body in bytes, chunked included; larger is 413",
    "max_pipelined": "complete requests queued on a connection before it stops reading",
    "write_buffer_high": "write-buffer bytes above which a connection stops reading",
}


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "app", nargs="?", default=None, help="the App to serve, as module:attribute (default: demo)"
    )
    parser.add_argument(
        "--bind",
        "-b",
        action="append",
        dest="binds",
        metavar="ADDRESS",
        help="HOST:PORT, [IPv6]:PORT or unix:PATH; repeat for several (default 127.0.0.1:8000)",
    )
    parser.add_argument(
        "--loop",
        default="auto",
        choices=["auto", *backends.names()],
        help="event loop backend (default auto: uvloop if installed, else asyncio)",
    )
    parser.add_argument(
        "--workers",
        "-w",
        type=int,
        default=os.cpu_count() or 1,
        help="worker processes the master pre-forks (default: CPU count). Until the master "
        "process lands this release serves from a single process and ignores larger values.",
    )
    parser.add_argument("--backlog", type=int, default=2048, help="listen() backlog per socket")
    parser.add_argument(
        "--reuse-port", action="store_true", help="set SO_REUSEPORT on listening sockets"
    )
    parser.add_argument(
        "--access-log",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="log each request in nginx's combined format (default off)",
    )
    parser.add_argument(
        "--access-log-file", default=None, metavar="PATH", help="access log file (default stdout)"
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error", "critical"],
        help="error log level",
    )
    parser.add_argument(
        "--graceful-timeout",
        type=float,
        default=30.0,
        help="seconds in-flight requests get to finish on SIGQUIT",
    )
    defaults = Limits()
    for field in fields(Limits):
        kind = type(getattr(defaults, field.name))
        parser.add_argument(
            "--" + field.name.replace("_", "-"),
            type=kind,
            default=getattr(defaults, field.name),
            help=f"{_LIMIT_FLAGS[field.name]} (default %(default)s)",
        )


def config_from_args(args: argparse.Namespace) -> Config:
    limits = Limits(**{field.name: getattr(args, field.name) for field in fields(Limits)})
    return Config(
        app=args.app,
        binds=tuple(args.binds or ("127.0.0.1:8000",)),
        loop=args.loop,
        workers=args.workers,
        backlog=args.backlog,
        reuse_port=args.reuse_port,
        access_log=args.access_log or args.access_log_file is not None,
        access_log_path=args.access_log_file,
        log_level=args.log_level,
        limits=limits,
    )


def serve(args: argparse.Namespace) -> int:
    from server.worker import Worker, bind_all

    config = config_from_args(args)
    configure_logging(config.log_level)
    log = logging.getLogger("forkloop")
    try:
        backend = backends.resolve(config.loop)
        backend.loop_factory()
        sockets = bind_all(config)
    except (backends.BackendUnavailable, OSError, ValueError) as exc:
        log.error("%s", exc)
        return 2
    try:
        Worker(config, sockets, graceful_timeout=args.graceful_timeout).run()
    except ImportError as exc:
        log.error("%s", exc)
        return 3
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="forkloop", description="HTTP/1.1 server and event-loop toolkit"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    add_serve_arguments(commands.add_parser("serve", help="run the HTTP server"))
    from loadtest import bench

    bench.add_arguments(commands.add_parser("bench", help="CPU-per-request benchmark vs uvicorn"))
    args = parser.parse_args(argv)
    if args.command == "serve":
        return serve(args)
    return bench.main(args)


def serve_main(argv: Sequence[str] | None = None) -> int:
    """``python -m server``: the same as ``forkloop serve``."""
    return main(["serve", *(sys.argv[1:] if argv is None else argv)])
