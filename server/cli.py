"""The ``forkloop`` command.

    forkloop serve [module:app] --bind 127.0.0.1:8000 --loop uvloop --workers 4
    forkloop serve myapp:app --host 0.0.0.0 --port 8080 --reload
    forkloop serve --check-config -c forkloop.toml
    forkloop reload|stop|quit|reopen --pid-file PATH
    forkloop bench [--raw] [--loops reactor,uvloop] [--duration 5]
    forkloop loadtest [--loops uvloop,reactor] [--scenarios hello,cached] [--duration 10]

``python -m forkloop`` is ``forkloop serve``.

What the command promises a user, and where each promise is kept:

* Settings come from the command line, then ``FORKLOOP_*`` environment
  variables, then the ``--config`` file, then the defaults (`server.settings`
  holds the one table of options and says how each is read and checked).
* A bad input stops the command with one line on stderr that names the flag,
  variable or file key and what was expected, never a traceback. The exit
  status says whose problem it is: 2 for a usage or configuration error (fix
  the command or the file), 3 when the server could not start (the app does
  not import, the port is taken: fix the code or the machine).
* ``--check-config`` reads and checks every setting, imports the app and
  loads the certificate, as ``nginx -t`` does, then exits: 0 when the server
  would start.
* The app is found the way uvicorn and gunicorn find it: the current
  directory (or ``--app-dir``) is importable, ``--chdir`` moves first
  (`server.apploader`).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import platform
import signal
import socket
import ssl
import sys
from collections.abc import Sequence
from typing import NoReturn

from . import backends, settings
from .apploader import AppLoadError, check_importable, load_app, prepare_import_path
from .config import Config
from .listeners import (
    bind,
    check_port_free,
    describe,
    inherited_metrics_socket,
    inherited_sockets,
    is_upgrade,
    parse_bind,
    remove_unix_sockets,
)
from .logs import configure_logging
from .settings import SettingError

USAGE_ERROR = 2
BOOT_ERROR = 3

log = logging.getLogger("forkloop")


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, not the whole usage."""

    def error(self, message: str) -> NoReturn:
        raise SettingError(message)


def serve_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="forkloop serve",
        description="Serve a forkloop App with a pre-forking master and workers.",
        epilog="Every option can also be set in the environment as FORKLOOP_<OPTION> "
        "(FORKLOOP_WORKERS=4, FORKLOOP_ACCESS_LOG=false), WEB_CONCURRENCY sets --workers, "
        "and a --config TOML file takes the long names as keys (workers = 4). The command "
        "line wins, then the environment, then the file. Signals to the master: TERM "
        "graceful stop (a second TERM or INT: fast), INT fast stop, QUIT graceful stop, "
        "HUP reload, USR1 reopen logs, USR2 upgrade, WINCH stop workers, TTIN/TTOU one "
        "worker more/fewer.",
    )
    settings.add_arguments(parser)
    parser.add_argument(
        "--check-config",
        action="store_true",
        default=argparse.SUPPRESS,
        help="check the settings, import the app, load the certificate, then exit (nginx -t)",
    )
    parser.add_argument("--version", action="store_true", default=argparse.SUPPRESS,
                        help="print forkloop's version and exit")  # fmt: skip
    return parser


def parse_serve_args(serve_argv: Sequence[str]) -> argparse.Namespace:
    """The options given on the command line (only those: absent ones are not set)."""
    args, unknown = serve_parser().parse_known_args(list(serve_argv))
    if unknown:
        raise SettingError(settings.unknown_argument_message(unknown[0]))
    return args


def load_config(serve_argv: Sequence[str], base_dir: str | None = None) -> Config:
    """The `Config` for these arguments: command line, environment, config file, defaults."""
    return resolve_config(parse_serve_args(serve_argv), base_dir or os.getcwd())


def resolve_config(args: argparse.Namespace, base_dir: str) -> Config:
    """`settings.resolve`, with ``--proactor-engine`` turned into the ``--loop`` it names.

    ``--proactor-engine`` is an alias of the proactor's engine backends
    (``proactor-uring``, ``proactor-emulated``): the loop is chosen through the
    backend registry like any other, not through an environment variable.
    """
    config = settings.resolve(args, os.environ, base_dir)
    loop = backends.with_proactor_engine(config.loop, config.proactor_engine)
    return config if loop == config.loop else dataclasses.replace(config, loop=loop)


def version() -> str:
    from .. import __version__

    return f"forkloop {__version__} (Python {platform.python_version()})"


def run_serve(serve_argv: list[str]) -> int:
    """``forkloop serve ...``: check everything that can be checked, then serve."""
    launch_dir = os.getcwd()
    try:
        args = parse_serve_args(serve_argv)
        if getattr(args, "version", False):
            print(version())
            return 0
        config = resolve_config(args, launch_dir)
    except SettingError as exc:
        return _usage_error(exc)
    if getattr(args, "check_config", False):
        return check_config(config, launch_dir)
    return serve(config, serve_argv, launch_dir)


def _usage_error(exc: BaseException | str) -> int:
    print(f"forkloop: {exc}", file=sys.stderr)
    return USAGE_ERROR


def _boot_error(message: str) -> int:
    log.critical("cannot start: %s", message)
    return BOOT_ERROR


def preflight(config: Config, launch_dir: str) -> int:
    """Checks before binding or forking; 0, or the exit status after a one-line error."""
    try:
        backends.resolve(config.loop).loop_factory()
    except backends.BackendUnavailable as exc:
        return _usage_error(exc)
    problem = certificate_problem(config)
    if problem:
        return _usage_error(problem)
    if config.reload:
        try:
            import watchfiles  # noqa: F401
        except ImportError:
            return _usage_error(
                "--reload needs the watchfiles package: pip install 'forkloop[reload]'"
            )
    try:
        prepare_import_path(config, launch_dir)
    except AppLoadError as exc:
        return _usage_error(exc)
    try:
        check_importable(config)
    except AppLoadError as exc:
        return _boot_error(str(exc))
    return 0


def certificate_problem(config: Config) -> str | None:
    """What is wrong with --certfile/--keyfile, in a sentence naming the file, or None."""
    if config.certfile is None:
        if config.keyfile is not None:
            return "--keyfile needs --certfile (the certificate it belongs to)"
        return None
    for flag, path in (("--certfile", config.certfile), ("--keyfile", config.keyfile)):
        if path is not None and not os.access(path, os.R_OK):
            reason = "no such file" if not os.path.exists(path) else "not readable"
            return f"cannot read {flag} {path}: {reason}"
    from .service import tls_context

    try:
        tls_context(config)
    except ssl.SSLError as exc:
        files = config.certfile + (f" and {config.keyfile}" if config.keyfile else "")
        return f"cannot use {files} for TLS: {exc.reason or exc} (expected PEM certificate and key)"
    return None


def check_config(config: Config, launch_dir: str) -> int:
    """``--check-config``: every check a start makes, short of binding; exit 0 if all pass."""
    configure_logging(config.log_level)
    status = preflight(config, launch_dir)
    if status:
        return status
    try:
        load_app(config)
    except AppLoadError as exc:
        return _boot_error(str(exc))
    where = ", ".join(config.binds)
    what = f"proxy to {', '.join(config.upstreams)}" if config.upstreams else None
    what = what or f"app {config.app or 'demo'}"
    print(
        f"forkloop: configuration OK: {what}, "
        f"{config.workers} worker{'s' if config.workers != 1 else ''}, {where}"
        + (f", config {config.config_path}" if config.config_path else "")
    )
    return 0


def serve(config: Config, serve_argv: list[str], launch_dir: str) -> int:
    configure_logging(config.log_level)
    status = preflight(config, launch_dir)
    if status:
        return status
    try:
        sockets, metrics_socket = open_listeners(config)
    except OSError as exc:
        return _boot_error(exc.strerror or str(exc))
    if config.no_master:
        return serve_without_master(config, sockets, metrics_socket)
    from .master import Master, _set_process_title

    _set_process_title("forkloop: master process " + " ".join(["forkloop", "serve", *serve_argv]))
    master = Master(
        config,
        sockets,
        reload_config=lambda: load_config(serve_argv, launch_dir),
        upgrade_argv=serve_argv,
        metrics_socket=metrics_socket,
        launch_dir=launch_dir,
    )
    if config.reload:
        from .reloader import start_reloader

        start_reloader(config, launch_dir)
    return master.run()


def open_listeners(config: Config) -> tuple[list[socket.socket], socket.socket | None]:
    """The app's sockets (bound, not yet listening) and the metrics socket, if any."""
    sockets = inherited_sockets()
    upgrade = is_upgrade()
    if not sockets:
        addresses = [parse_bind(text) for text in config.binds]
        if config.reuse_port and not upgrade:
            for address in addresses:
                check_port_free(address)
        if not (config.reuse_port and not config.no_master):  # else: each worker binds
            sockets = [bind(a, config.backlog, config.reuse_port, listen=False) for a in addresses]
    metrics_socket = inherited_metrics_socket()
    if metrics_socket is None and config.metrics_bind is not None:
        try:
            metrics_socket = bind(parse_bind(config.metrics_bind), config.backlog, listen=False)
        except OSError as exc:
            if not config.metrics_bind_is_default:
                for sock in sockets:
                    sock.close()
                raise
            log.warning(
                "no /metrics: %s; choose a free address with --metrics-bind, or say off",
                exc.strerror,
            )
    return sockets, metrics_socket


def serve_without_master(
    config: Config, sockets: list[socket.socket], metrics_socket: socket.socket | None
) -> int:
    from .worker import Worker

    try:
        return Worker(config, sockets, metrics_socket=metrics_socket).run()
    except AppLoadError as exc:
        if exc.details:
            log.debug("%s", exc.details)
        return _boot_error(str(exc))
    finally:
        remove_unix_sockets([parse_bind(text) for text in config.binds])
        if metrics_socket is not None:
            log.debug("metrics were on %s", describe(metrics_socket))


SIGNAL_COMMANDS = {
    "reload": (signal.SIGHUP, "re-read the configuration, replace the workers"),
    "stop": (signal.SIGINT, "fast shutdown"),
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
    if argv[:1] == ["serve"]:
        return run_serve(argv[1:])
    if is_proxy_command(argv):
        return run_serve(proxy_argv(argv))
    parser = argparse.ArgumentParser(
        prog="forkloop", description="HTTP/1.1 server and event-loop toolkit"
    )
    parser.add_argument("--version", action="version", version=version())
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("serve", help="run the HTTP server (forkloop serve --help)")
    commands.add_parser(
        "proxy", help="forkloop proxy URL [serve options]: a reverse proxy to URL"
    ).add_argument("url", help="the upstream, http://HOST:PORT")
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
    if args.command in SIGNAL_COMMANDS:
        return send_signal(args)
    if args.command == "loadtest":
        return runner.main(args)
    return bench.main(args)


def serve_main(argv: Sequence[str] | None = None) -> int:
    """``python -m forkloop``: the same as ``forkloop serve`` (and ``... proxy URL``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return run_serve(proxy_argv(argv) if is_proxy_command(argv) else argv)


def is_proxy_command(argv: list[str]) -> bool:
    return argv[:1] == ["proxy"] and len(argv) > 1 and not argv[1].startswith("-")


def proxy_argv(argv: list[str]) -> list[str]:
    """``proxy URL OPTIONS`` is ``serve --upstream URL OPTIONS``."""
    return ["--upstream", argv[1], *argv[2:]]
