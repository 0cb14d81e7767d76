"""The ``forkloop`` command.

    forkloop serve [module:app] --bind 127.0.0.1:8000 --loop uvloop --workers 4
    forkloop bench [--raw] [--loops reactor,uvloop] [--duration 5]
    forkloop loadtest [--loops uvloop,reactor] [--scenarios hello,cached] [--duration 10]

``python -m forkloop`` is ``forkloop serve``.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import ssl
import sys
from collections.abc import Sequence
from dataclasses import fields

from . import backends
from .config import Config, Limits
from .logs import configure_logging

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
    "request_timeout": "seconds a handler may run before it is cancelled and 504 sent (0: off)",
    "write_buffer_high": "write-buffer bytes above which a connection stops reading",
    "max_connections": "open connections per worker; beyond it 503 and close (0: no limit)",
    "lingering_time": "most seconds spent draining a refused request before closing (lingering_time)",
    "lingering_timeout": "seconds of client silence that end the draining (lingering_timeout)",
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
        "--proactor-engine",
        choices=list(backends.PROACTOR_ENGINE_BACKENDS),
        default=None,
        help="engine of a proactor loop, an alias of --loop proactor (auto: io_uring when the "
        "kernel allows it), proactor-uring or proactor-emulated (completions over epoll)",
    )
    parser.add_argument(
        "--workers",
        "-w",
        type=int,
        default=os.cpu_count() or 1,
        help="worker processes the master pre-forks (default: CPU count)",
    )
    parser.add_argument(
        "--no-master",
        action="store_true",
        help="serve from this one process, no master and no workers (for debugging)",
    )
    parser.add_argument(
        "--config", "-c", default=None, help="TOML file of settings; HUP re-reads it"
    )
    parser.add_argument("--pid-file", default=None, help="write the master's pid here")
    parser.add_argument("--certfile", default=None, help="PEM certificate chain: serve HTTPS")
    parser.add_argument("--keyfile", default=None, help="PEM private key for --certfile")
    parser.add_argument(
        "--worker-timeout",
        type=float,
        default=30.0,
        help="a worker whose event loop is blocked this long is killed and replaced",
    )
    parser.add_argument(
        "--max-requests",
        type=int,
        default=0,
        help="a worker retires gracefully after this many requests (0: never)",
    )
    parser.add_argument(
        "--max-requests-jitter",
        type=int,
        default=0,
        help="add up to this many to --max-requests per worker, so they don't retire together",
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
        loop=backends.with_proactor_engine(args.loop, args.proactor_engine),
        workers=args.workers,
        backlog=args.backlog,
        reuse_port=args.reuse_port,
        access_log=args.access_log or args.access_log_file is not None,
        access_log_path=args.access_log_file,
        log_level=args.log_level,
        certfile=args.certfile,
        keyfile=args.keyfile,
        limits=limits,
    )


def serve(args: argparse.Namespace, serve_argv: list[str]) -> int:
    from .listeners import inherited_sockets
    from .master import Master
    from .service import tls_context
    from .worker import Worker, bind_all

    config = config_from_args(args)
    configure_logging(config.log_level)
    log = logging.getLogger("forkloop")
    try:
        backends.resolve(config.loop).loop_factory()
        tls_context(config)  # a bad certificate is a start-up error, not a worker crash loop
        sockets = inherited_sockets()
        if not sockets and not (config.reuse_port and not args.no_master):
            sockets = bind_all(config)
    except ssl.SSLError as exc:
        log.error("cannot use --certfile/--keyfile: %s", exc)
        return 2
    except (backends.BackendUnavailable, OSError, ValueError) as exc:
        log.error("%s", exc)
        return 2
    if args.no_master:
        try:
            return Worker(config, sockets, graceful_timeout=args.graceful_timeout).run()
        except ImportError as exc:
            log.error("%s", exc)
            return 3
    from .master import _set_process_title

    _set_process_title("forkloop: master process " + " ".join(["forkloop", "serve", *serve_argv]))
    master = Master(
        config,
        sockets,
        reload_config=lambda: config_from_args(parse_serve_args(serve_argv)),
        upgrade_argv=serve_argv,
        pid_file=args.pid_file,
        worker_timeout=args.worker_timeout,
        graceful_timeout=args.graceful_timeout,
        max_requests=args.max_requests,
        max_requests_jitter=args.max_requests_jitter,
    )
    return master.run()


def parse_serve_args(serve_argv: Sequence[str]) -> argparse.Namespace:
    """The serve options: the command line over the ``--config`` file over the defaults."""
    parser = argparse.ArgumentParser(prog="forkloop serve")
    add_serve_arguments(parser)
    args = parser.parse_args(serve_argv)
    if args.config:
        parser.set_defaults(**read_config_file(args.config, parser))
        args = parser.parse_args(serve_argv)
    return args


def read_config_file(path: str, parser: argparse.ArgumentParser) -> dict[str, object]:
    """A TOML file whose keys are the long options: ``workers = 4``, ``bind = ["..."]``."""
    import tomllib

    with open(path, "rb") as handle:
        values = tomllib.load(handle)
    known = {action.dest for action in parser._actions}
    settings: dict[str, object] = {}
    for key, value in values.items():
        dest = {"bind": "binds"}.get(key.replace("-", "_"), key.replace("-", "_"))
        if dest not in known or dest in ("config", "help"):
            raise ValueError(f"{path}: unknown setting {key!r}")
        if dest == "binds" and isinstance(value, str):
            value = [value]
        settings[dest] = value
    return settings


SIGNAL_COMMANDS = {
    "reload": (signal.SIGHUP, "re-read the configuration, replace the workers"),
    "stop": (signal.SIGTERM, "fast shutdown"),
    "quit": (signal.SIGQUIT, "graceful shutdown"),
    "reopen": (signal.SIGUSR1, "reopen log files"),
}


def send_signal(args: argparse.Namespace) -> int:
    """``forkloop reload`` and friends: signal the master named in the pid file."""
    signum = SIGNAL_COMMANDS[args.command][0]
    try:
        with open(args.pid_file) as handle:
            pid = int(handle.read().strip())
        os.kill(pid, signum)
    except FileNotFoundError:
        print(f"forkloop {args.command}: no pid file at {args.pid_file}", file=sys.stderr)
        return 1
    except ValueError:
        print(f"forkloop {args.command}: {args.pid_file} holds no process id", file=sys.stderr)
        return 1
    except ProcessLookupError:
        print(f"forkloop {args.command}: no process {pid} (stale {args.pid_file})", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="forkloop", description="HTTP/1.1 server and event-loop toolkit"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    add_serve_arguments(commands.add_parser("serve", help="run the HTTP server"))
    for name, (signum, description) in SIGNAL_COMMANDS.items():
        command = commands.add_parser(
            name, help=f"send {signal.Signals(signum).name} to the master: {description}"
        )
        command.add_argument("--pid-file", required=True, help="the master's pid file")
    from ..loadtest import bench, runner

    bench.add_arguments(commands.add_parser("bench", help="CPU-per-request benchmark vs uvicorn"))
    runner.add_arguments(
        commands.add_parser("loadtest", help="locust scenarios on each backend, with a report")
    )
    args = parser.parse_args(argv)
    if args.command == "serve":
        serve_argv = argv[argv.index("serve") + 1 :]
        return serve(parse_serve_args(serve_argv), serve_argv)
    if args.command in SIGNAL_COMMANDS:
        return send_signal(args)
    if args.command == "loadtest":
        return runner.main(args)
    return bench.main(args)


def serve_main(argv: Sequence[str] | None = None) -> int:
    """``python -m forkloop``: the same as ``forkloop serve``."""
    return main(["serve", *(sys.argv[1:] if argv is None else argv)])
