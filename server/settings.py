"""Every `forkloop serve` setting, once: its flag, type, default, help and sources.

A setting can come from four places. The first that has it wins:

1. the command line: ``--workers 4``;
2. the environment: ``FORKLOOP_WORKERS=4`` (every option, as ``FORKLOOP_`` and
   its long name in capitals, dashes as underscores), and ``WEB_CONCURRENCY``
   for the worker count, as Heroku, gunicorn and uvicorn read it;
3. the ``--config`` TOML file: ``workers = 4`` (keys are the long names, with
   dashes or underscores; ``bind`` takes a string or a list);
4. the default, which ``--help`` prints beside every option.

`OPTIONS` is the one table: the argument parser, the environment reader and
the file reader are all built from it, so a setting cannot exist in one
source and be missing from another. The `Limits` fields are options too, with
their help text in `LIMIT_HELP`.

Every value is checked where it is read, and a bad one stops the command with
one line that names where it came from and what was expected
(``forkloop.toml: workers must be an integer, not the string 'two'``), as a
`SettingError`; the CLI prints it and exits 2. Nothing here imports the app,
binds a socket or reads a certificate: those are the start-up's checks.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from . import backends
from .config import (
    DEFAULT_BIND,
    DEFAULT_METRICS_BIND,
    Config,
    Limits,
    ProxyRoute,
    WebSocketSettings,
)
from .listeners import parse_bind

ENV_PREFIX = "FORKLOOP_"
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
_APP_SPEC = re.compile(r"^[A-Za-z_][\w.]*(:[A-Za-z_][\w.]*)?$")


class SettingError(ValueError):
    """A setting's value is wrong; the message names its source and what was expected."""


@dataclass(frozen=True)
class Option:
    """One setting. ``name`` is the `Config` field (or `Limits` field, or a CLI-only name)."""

    name: str
    kind: type  # int, float, str, bool or list (of str)
    default: Any
    help: str
    short: str | None = None
    choices: tuple[str, ...] | None = None
    minimum: float | None = None  # the smallest value allowed
    above: float | None = None  # values must be greater than this
    metavar: str | None = None
    env: tuple[str, ...] = ()  # more environment names, after FORKLOOP_<NAME>
    command_line_only: bool = False  # not read from the config file (--config itself)

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env_names(self) -> tuple[str, ...]:
        return (ENV_PREFIX + self.name.upper(), *self.env)


LIMIT_HELP = {
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
# Limits that 0 would make meaningless; the others may be 0 (off, or no limit).
_POSITIVE_LIMITS = {
    "header_timeout",
    "body_timeout",
    "keepalive_timeout",
    "send_timeout",
    "max_keepalive_requests",
    "max_request_line",
    "max_header_bytes",
    "max_header_count",
    "max_pipelined",
    "write_buffer_high",
    "lingering_timeout",
}

_D = Config(workers=1)  # the defaults (the worker count's is the CPU count, said in its help)
_WS = WebSocketSettings()

OPTIONS: tuple[Option, ...] = (
    Option("bind", list, None, f"HOST:PORT, [IPv6]:PORT or unix:PATH; repeat for several "
           f"(default {DEFAULT_BIND})", short="-b", metavar="ADDRESS"),
    Option("host", str, None, "shorthand for --bind HOST:PORT, with --port (default 127.0.0.1)"),
    Option("port", int, None, "shorthand for --bind HOST:PORT, with --host (default 8000)",
           minimum=0),
    Option("uds", str, None, "serve on a Unix domain socket: shorthand for --bind unix:PATH "
           "(default none)",
           metavar="PATH"),
    Option("app_dir", str, _D.app_dir, "put this directory first on the import path before "
           "importing the app (default: the current directory)", metavar="DIR"),
    Option("chdir", str, None, "change to this directory before loading the app (default: stay)",
           metavar="DIR"),
    Option("factory", bool, False, "APP names a function that returns the app: call it "
           "(default off)"),
    Option("lifespan", str, _D.lifespan, "an ASGI app's lifespan startup and shutdown: auto "
           "(run it if the app speaks it), on, off (default auto)",
           choices=("auto", "on", "off")),
    Option("root_path", str, _D.root_path, "an ASGI app's root_path, when a proxy serves it "
           "below a path prefix (default none)", metavar="PATH"),
    Option("interface", str, _D.interface, "what APP is: auto (tell by looking), asgi (an ASGI "
           "application) or native (a forkloop App) (default auto)",
           choices=("auto", "asgi", "native")),
    Option("disconnect_grace", str, "1", "seconds an ASGI app runs on after its client left, "
           "told by http.disconnect, before it is cancelled; 0: cancel at once; off: never "
           "(uvicorn's way) (default 1)", metavar="SECONDS"),
    Option("proxy_headers", bool, False, "trust X-Forwarded-For and X-Forwarded-Proto for an "
           "ASGI app's client and scheme, from --forwarded-allow-ips peers (default off)"),
    Option("forwarded_allow_ips", str, _D.forwarded_allow_ips, "comma-separated peer addresses "
           "whose proxy headers are trusted, or * (default 127.0.0.1)", metavar="IPS",
           env=("FORWARDED_ALLOW_IPS",)),
    Option("upstream", list, None, "proxy every request to this http://HOST:PORT; repeat for "
           "round-robin over several (forkloop proxy URL is the same) (default none)",
           metavar="URL"),
    Option("proxy_connect_timeout", float, _D.proxy_connect_timeout, "seconds to connect to an "
           "upstream; then 504, and the address is skipped for a while (default %(default)s)",
           minimum=0),
    Option("proxy_read_timeout", float, _D.proxy_read_timeout, "seconds between two reads of "
           "an upstream's answer; then 504 (default %(default)s)", minimum=0),
    Option("proxy_send_timeout", float, _D.proxy_send_timeout, "seconds between two writes of "
           "a request to an upstream; then 504 (default %(default)s)", minimum=0),
    Option("proxy_keepalive", int, _D.proxy_keepalive, "idle upstream connections kept per "
           "address, per worker (nginx keepalive) (default %(default)s)", minimum=0),
    Option("cache", bool, False, "put the response cache in front of an ASGI app or the proxy: "
           "what it marks public with a max-age is stored, concurrent misses call it once "
           "(default off)"),
    Option("cache_size", int, _D.cache_size, "bytes the response cache may hold, LRU "
           "(default %(default)s)", minimum=1, metavar="BYTES"),
    Option("cache_prefix", list, None, "cache only paths under this prefix; repeat for several "
           "(default /)", metavar="PREFIX"),
    Option("proxy_cache_use_stale", str, "", "the proxy's cache serves a stale entry, at any "
           "age, when its fill fails this way: comma-separated error, timeout, http_500, "
           "http_502, http_503, http_504, updating (nginx's proxy_cache_use_stale) (default none)",
           metavar="FAILURES"),
    Option("finish_abandoned_fills", bool, False, "a cache fill whose clients all left runs "
           "to its end and is stored (nginx's way), instead of being cancelled (default off)"),
    Option("purge_allow", str, "", "comma-separated addresses or networks that may PURGE a URL "
           "from the proxy's cache (default none: PURGE is refused with 403)", metavar="IPS"),
    Option("shared_cache", str, "off", "on: one fill per key for the whole server, and a cache "
           "tier every worker sees, held by a cache process the master supervises (default off)",
           choices=("on", "off")),
    Option("shared_cache_size", int, _D.shared_cache_size, "bytes the shared cache tier may "
           "hold, LRU (default %(default)s)", minimum=1, metavar="BYTES"),
    Option("cache_url", str, None, "a Redis or Valkey store that several servers share: one "
           "cache and one fill per key for all of them (redis://HOST:PORT/DB, rediss://..., "
           "unix://PATH) (default none)", metavar="URL"),
    Option("cache_key_prefix", str, _D.cache_key_prefix, "prefix of every key forkloop puts "
           "in the --cache-url store, so several sites can share one (default %(default)s)",
           metavar="PREFIX"),
    Option("cache_call_timeout", float, _D.cache_call_timeout, "seconds one call to the "
           "--cache-url store may take; a slower store is bypassed until it answers again "
           "(default %(default)s)", above=0, metavar="SECONDS"),
    Option("cache_max_entry", int, _D.cache_max_entry, "largest entry in bytes put in the "
           "--cache-url store (default %(default)s)", minimum=1, metavar="BYTES"),
    Option("ws", str, _WS.library, "WebSockets for an ASGI app: auto (the websockets library "
           "if installed), none (upgrades are declined: the app sees HTTP), websockets "
           "(default auto)", choices=("auto", "none", "websockets")),
    Option("ws_max_size", int, _WS.max_size, "largest incoming WebSocket message in bytes; a "
           "bigger one closes the connection with 1009 (default %(default)s)", minimum=1,
           metavar="BYTES"),
    Option("ws_max_queue", int, _WS.max_queue, "WebSocket messages received and not yet taken "
           "by the app; beyond it the connection stops reading (default %(default)s)",
           minimum=1, metavar="MESSAGES"),
    Option("ws_ping_interval", float, _WS.ping_interval, "seconds between the server's "
           "WebSocket pings (0: none; default %(default)s)", minimum=0, metavar="SECONDS"),
    Option("ws_ping_timeout", float, _WS.ping_timeout, "seconds a WebSocket ping waits for its "
           "pong before the connection closes with 1011 (0: forever; default %(default)s)",
           minimum=0, metavar="SECONDS"),
    Option("ws_close_timeout", float, _WS.close_timeout, "seconds a WebSocket client gets to "
           "answer the server's close frame before the socket closes (default %(default)s)",
           above=0, metavar="SECONDS"),
    Option("ws_per_message_deflate", bool, _WS.per_message_deflate, "permessage-deflate "
           "compression of WebSocket messages, with small windows (default on)"),
    Option("loop", str, _D.loop, "event loop backend; auto is uvloop if installed, else asyncio "
           "(default auto)", choices=("auto", *backends.names())),
    Option("proactor_engine", str, None, "engine of the proactor loop: io_uring, or completions "
           "emulated on epoll (default auto: io_uring when the kernel allows it)",
           choices=("auto", "uring", "emulated")),
    Option("workers", int, None, "worker processes the master pre-forks (default: the CPU "
           "count, also read from WEB_CONCURRENCY)", short="-w", minimum=1,
           env=("WEB_CONCURRENCY",)),
    Option("no_master", bool, False, "serve from this one process, no master and no workers "
           "(for debugging; default off)"),
    Option("config", str, None, "TOML file of settings (keys are the long options); HUP "
           "re-reads it (default none)", short="-c", metavar="PATH", command_line_only=True),
    Option("pid_file", str, None, "write the master's pid here (default none)", metavar="PATH"),
    Option("certfile", str, None, "PEM certificate chain: serve HTTPS (default none)",
           metavar="PATH"),
    Option("keyfile", str, None, "PEM private key for --certfile (default: in the certfile)",
           metavar="PATH"),
    Option("worker_timeout", float, _D.worker_timeout, "a worker whose event loop is blocked "
           "this long (seconds) is killed and replaced (default %(default)s)", above=0),
    Option("graceful_timeout", float, _D.graceful_timeout, "seconds in-flight requests get to "
           "finish on a graceful stop (default %(default)s)", minimum=0),
    Option("term", str, _D.term, "what SIGTERM means: graceful (drain, as gunicorn, uvicorn, "
           "Kubernetes and Docker expect) or fast (nginx) (default graceful)",
           choices=("graceful", "fast")),
    Option("max_requests", int, _D.max_requests, "a worker retires gracefully after this many "
           "requests (default %(default)s: never)", minimum=0),
    Option("max_requests_jitter", int, _D.max_requests_jitter, "add up to this many to "
           "--max-requests per worker, so they don't retire together (default %(default)s)",
           minimum=0),
    Option("backlog", int, _D.backlog, "listen() backlog per socket (default %(default)s)",
           minimum=1),
    Option("reuse_port", bool, False, "each worker binds its own socket with SO_REUSEPORT "
           "(default off)"),
    Option("health_path", str, _D.health_path, "path every worker answers 200 ok, whatever "
           "the app, once the server is ready (default %(default)s; off: none)"),
    Option("access_log", bool, _D.access_log, "log each request, in --access-log-format "
           "(default on; --no-access-log turns it off)"),
    Option("access_log_file", str, None, "access log file (default stdout)", metavar="PATH"),
    Option("access_log_format", str, _D.access_log_format, "access log line, with {client} "
           "{time} {request} {method} {path} {status} {size} {referer} {user_agent} "
           "{duration_ms} {pid} (default nginx's combined format)", metavar="FORMAT"),
    Option("log_level", str, _D.log_level, "error log level (default %(default)s)",
           choices=LOG_LEVELS),
    Option("metrics_bind", str, DEFAULT_METRICS_BIND, "address of the Prometheus /metrics "
           "endpoint, HOST:PORT, or off (default %(default)s; taken: the server runs without)",
           metavar="ADDRESS"),
    Option("reload", bool, False, "development only: restart the workers when a .py file "
           "under the app's directory changes (needs watchfiles; default off)"),
    *(
        Option(f.name, type(getattr(Limits(), f.name)), getattr(Limits(), f.name),
               f"{LIMIT_HELP[f.name]} (default %(default)s)",
               above=0 if f.name in _POSITIVE_LIMITS else None,
               minimum=None if f.name in _POSITIVE_LIMITS else 0)
        for f in fields(Limits)
    ),
)  # fmt: skip
BY_NAME = {option.name: option for option in OPTIONS}
_LIMIT_NAMES = {f.name for f in fields(Limits)}


# ---------------------------------------------------------------------- the parser


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The serve options on ``parser``; a value not given is absent from the namespace."""
    parser.add_argument(
        "app",
        nargs="?",
        default=argparse.SUPPRESS,
        help="the app to serve, as module:attribute: a forkloop App or an ASGI app "
        "(default: the demo app)",
    )
    for option in OPTIONS:
        names = [option.flag] + ([option.short] if option.short else [])
        common: dict[str, Any] = {"dest": option.name, "default": argparse.SUPPRESS}
        if option.kind is bool and option.name.startswith("no_"):  # --no-master
            parser.add_argument(*names, action="store_true", help=option.help, **common)
        elif option.kind is bool:
            parser.add_argument(*names, action=argparse.BooleanOptionalAction, help=option.help,
                                **common)  # fmt: skip
        elif option.kind is list:
            parser.add_argument(*names, action="append", metavar=option.metavar,
                                help=option.help, **common)  # fmt: skip
        else:
            parser.add_argument(*names, type=_argument_type(option), choices=option.choices,
                                metavar=option.metavar, help=option.help, **common)  # fmt: skip
    parser.set_defaults(**{})  # nothing: defaults are applied by resolve()
    # %(default)s in the help texts: argparse fills it from the action's default,
    # which is SUPPRESS here, so the texts are expanded now.
    for action in parser._actions:
        described = BY_NAME.get(action.dest)
        if described is not None and action.help and "%(default)s" in action.help:
            default = str(described.default)
            action.help = action.help.replace("%(default)s", default).replace("%", "%%")
        elif action.help:
            action.help = action.help.replace("%", "%%").replace("%%(default)s", "%(default)s")


def _argument_type(option: Option) -> Callable[[str], Any]:
    def convert(text: str) -> Any:  # argparse checks the choices itself
        try:
            return _convert_text(option, text, check_choices=False)
        except SettingError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = option.kind.__name__
    return convert


# ---------------------------------------------------------------------- the sources


def read_config_file(path: str) -> dict[str, tuple[Any, str]]:
    """The settings of a TOML file, each with its source (``path: key``)."""
    import tomllib

    try:
        with open(path, "rb") as handle:
            values = tomllib.load(handle)
    except FileNotFoundError:
        raise SettingError(f"cannot read --config {path}: no such file") from None
    except OSError as exc:
        raise SettingError(f"cannot read --config {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingError(f"{path} is not valid TOML: {exc}") from None
    settings: dict[str, tuple[Any, str]] = {}
    for key, value in values.items():
        name = key.replace("-", "_")
        source = f"{path}: {key}"
        if name == "app":
            settings["app"] = (_check_app(_expect(str, value, source), source), source)
            continue
        if name == "proxy":
            settings["proxy_routes"] = (_proxy_sections(value, f"{path}: [[proxy]]"), source)
            continue
        option = BY_NAME.get(name)
        if option is None or option.command_line_only:
            known = [o.name for o in OPTIONS if not o.command_line_only] + ["app"]
            raise SettingError(f"{path}: unknown setting {key!r}{_did_you_mean(name, known)}")
        if option.kind is list and isinstance(value, str):
            value = [value]
        if option.metavar == "BYTES" and isinstance(value, str):  # "256MiB"
            try:
                value = byte_size(value)
            except ValueError:
                raise SettingError(f"{source}: expected {_SIZE_WORDS}, not {value!r}") from None
        settings[name] = (_check(option, _expect(option.kind, value, source), source), source)
    return settings


def read_environment(environ: Mapping[str, str]) -> dict[str, tuple[Any, str]]:
    """``FORKLOOP_<OPTION>`` (and ``WEB_CONCURRENCY``) values, each with its source."""
    settings: dict[str, tuple[Any, str]] = {}
    if environ.get(ENV_PREFIX + "APP"):
        value = environ[ENV_PREFIX + "APP"]
        settings["app"] = (_check_app(value, ENV_PREFIX + "APP"), ENV_PREFIX + "APP")
    for option in OPTIONS:
        for env_name in option.env_names:
            text = environ.get(env_name)
            if text is None or text == "":
                continue
            try:
                value = _convert_text(option, text)
            except SettingError as exc:
                raise SettingError(f"{env_name}={text!r}: {exc}") from None
            settings[option.name] = (value, env_name)
            break
    return settings


def read_command_line(namespace: argparse.Namespace) -> dict[str, tuple[Any, str]]:
    settings: dict[str, tuple[Any, str]] = {}
    for name, value in vars(namespace).items():
        if name == "app":
            settings["app"] = (_check_app(value, "APP"), "the app argument")
            continue
        option = BY_NAME.get(name)
        if option is not None:
            settings[name] = (_check(option, value, option.flag), option.flag)
    return settings


# ---------------------------------------------------------------------- resolving


_PATHS = ("pid_file", "certfile", "keyfile", "access_log_file", "uds")


def resolve(
    namespace: argparse.Namespace,
    environ: Mapping[str, str] | None = None,
    base_dir: str | None = None,
) -> Config:
    """The `Config`: command line over environment over config file over defaults.

    Relative paths are made absolute against ``base_dir`` (where the command
    was started), so that a reload after ``--chdir`` reads the same files."""
    environ = os.environ if environ is None else environ
    base_dir = os.getcwd() if base_dir is None else base_dir
    command_line = read_command_line(namespace)
    environment = read_environment(environ)
    config_path = (command_line.get("config") or environment.get("config") or (None,))[0]
    if config_path:
        config_path = os.path.join(base_dir, config_path)
    from_file = read_config_file(config_path) if config_path else {}
    merged: dict[str, tuple[Any, str]] = {**from_file, **environment, **command_line}
    for name in _PATHS:
        if name in merged and merged[name][0] not in (None, "-"):
            merged[name] = (os.path.join(base_dir, merged[name][0]), merged[name][1])

    def value(name: str) -> Any:
        if name in merged:
            return merged[name][0]
        return BY_NAME[name].default

    workers = value("workers")
    if workers is None:
        workers = os.cpu_count() or 1
    metrics_text = value("metrics_bind")
    metrics_bind = None if metrics_text.lower() in ("off", "none", "") else metrics_text
    if metrics_bind is not None:
        _check_address(metrics_bind, merged.get("metrics_bind", (None, "--metrics-bind"))[1])
    access_log_path = value("access_log_file")
    health_path = value("health_path")
    if health_path.lower() in ("off", "none", ""):
        health_path = ""
    elif not health_path.startswith("/"):
        source = merged.get("health_path", (None, "--health-path"))[1]
        raise SettingError(f"{source}: a path starting with '/' or off, not {health_path!r}")
    _check_format(value("access_log_format"), merged)
    limits = Limits(**{name: value(name) for name in _LIMIT_NAMES})
    return Config(
        app=value("app") if "app" in merged else None,
        factory=value("factory"),
        app_dir=value("app_dir"),
        chdir=value("chdir"),
        health_path=health_path,
        lifespan=value("lifespan"),
        root_path=value("root_path"),
        interface=value("interface"),
        disconnect_grace=_grace(value("disconnect_grace"), merged),
        proxy_headers=value("proxy_headers"),
        forwarded_allow_ips=value("forwarded_allow_ips"),
        upstreams=_upstreams(value("upstream"), merged),
        proxy_connect_timeout=value("proxy_connect_timeout"),
        proxy_read_timeout=value("proxy_read_timeout"),
        proxy_send_timeout=value("proxy_send_timeout"),
        proxy_keepalive=value("proxy_keepalive"),
        cache=value("cache"),
        cache_size=value("cache_size"),
        cache_prefixes=_prefixes(value("cache_prefix"), merged),
        proxy_cache_use_stale=_use_stale(value("proxy_cache_use_stale"), merged),
        finish_abandoned_fills=value("finish_abandoned_fills"),
        purge_allow=_purge_allow(value("purge_allow"), merged),
        proxy_routes=merged["proxy_routes"][0] if "proxy_routes" in merged else (),
        shared_cache=value("shared_cache") == "on",
        shared_cache_size=value("shared_cache_size"),
        cache_url=_cache_url(value("cache_url"), merged),
        cache_key_prefix=value("cache_key_prefix"),
        cache_call_timeout=value("cache_call_timeout"),
        cache_max_entry=value("cache_max_entry"),
        websocket=WebSocketSettings(
            library=value("ws"),
            max_size=value("ws_max_size"),
            max_queue=value("ws_max_queue"),
            ping_interval=value("ws_ping_interval"),
            ping_timeout=value("ws_ping_timeout"),
            close_timeout=value("ws_close_timeout"),
            per_message_deflate=value("ws_per_message_deflate"),
        ),
        binds=_binds(merged),
        backlog=value("backlog"),
        reuse_port=value("reuse_port"),
        certfile=value("certfile"),
        keyfile=value("keyfile"),
        loop=value("loop"),
        proactor_engine=value("proactor_engine"),
        workers=workers,
        no_master=value("no_master"),
        worker_timeout=value("worker_timeout"),
        graceful_timeout=value("graceful_timeout"),
        max_requests=value("max_requests"),
        max_requests_jitter=value("max_requests_jitter"),
        term=value("term"),
        pid_file=value("pid_file"),
        reload=value("reload"),
        log_level=value("log_level"),
        access_log=value("access_log") or "access_log_file" in merged,
        access_log_path=access_log_path,
        access_log_format=value("access_log_format"),
        metrics_bind=metrics_bind,
        metrics_bind_is_default="metrics_bind" not in merged,
        config_path=config_path,
        limits=limits,
    )


def _binds(merged: dict[str, tuple[Any, str]]) -> tuple[str, ...]:
    """--bind, or the --host/--port shorthand, and --uds: the addresses to listen on."""
    binds: list[str] = list(merged["bind"][0]) if "bind" in merged else []
    for text in binds:
        _check_address(text, merged["bind"][1])
    if "host" in merged or "port" in merged:
        if binds:
            raise SettingError(
                f"{merged.get('host', merged.get('port'))[1]} and {merged['bind'][1]} both "  # type: ignore[index]
                "name an address: use --bind HOST:PORT, repeated for several"
            )
        host = merged["host"][0] if "host" in merged else "127.0.0.1"
        port = merged["port"][0] if "port" in merged else 8000
        text = f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"
        _check_address(text, merged.get("host", merged.get("port"))[1])  # type: ignore[index]
        binds.append(text)
    if "uds" in merged:
        binds.append("unix:" + merged["uds"][0])
    return tuple(binds) or (DEFAULT_BIND,)


def _upstreams(urls: list[str] | None, merged: dict[str, tuple[Any, str]]) -> tuple[str, ...]:
    """--upstream: http://HOST:PORT, each checked now (a typo is a usage error)."""
    from .upstream import parse_upstream

    for url in urls or ():
        try:
            parse_upstream(url)
        except ValueError as exc:
            raise SettingError(f"{merged['upstream'][1]}: {exc}") from None
    return tuple(urls or ())


def _cache_url(url: str | None, merged: dict[str, tuple[Any, str]]) -> str | None:
    """--cache-url: a store's URL, checked now (a typo is a usage error)."""
    from .fleet_cache import check_url

    if url is None or url in ("", "off"):
        return None
    problem = check_url(url)
    if problem is not None:
        raise SettingError(f"{merged['cache_url'][1]}: {problem}, not {url!r}")
    return url


def _prefixes(prefixes: list[str] | None, merged: dict[str, tuple[Any, str]]) -> tuple[str, ...]:
    """--cache-prefix: paths starting with '/'."""
    if not prefixes:
        return ("/",)
    for prefix in prefixes:
        if not prefix.startswith("/"):
            source = merged.get("cache_prefix", (None, "--cache-prefix"))[1]
            raise SettingError(f"{source}: a path starting with '/', not {prefix!r}")
    return tuple(prefixes)


def _proxy_sections(value: Any, source: str) -> tuple[ProxyRoute, ...]:
    """``[[proxy]]`` tables: ``prefix``, ``upstream`` (a URL or a list), ``cache``."""
    from .upstream import parse_upstream

    if not isinstance(value, list) or not all(isinstance(table, dict) for table in value):
        raise SettingError(f"{source}: proxy sections are written [[proxy]], each a table")
    routes = []
    for table in value:
        unknown = sorted(set(table) - {"prefix", "upstream", "cache"})
        if unknown:
            raise SettingError(f"{source}: unknown key {unknown[0]!r} (prefix, upstream, cache)")
        prefix = table.get("prefix")
        if not isinstance(prefix, str) or not prefix.startswith("/"):
            raise SettingError(f"{source}: prefix must be a path starting with '/', not {prefix!r}")
        upstreams = table.get("upstream")
        if isinstance(upstreams, str):
            upstreams = [upstreams]
        if not upstreams or not all(isinstance(url, str) for url in upstreams):
            raise SettingError(f"{source}: upstream must be a URL or a list of URLs ({prefix})")
        for url in upstreams:
            try:
                parse_upstream(url)
            except ValueError as exc:
                raise SettingError(f"{source}: {exc}") from None
        cache = table.get("cache", False)
        if not isinstance(cache, bool):
            raise SettingError(f"{source}: cache must be true or false, not {cache!r}")
        routes.append(ProxyRoute(prefix, tuple(upstreams), cache))
    return tuple(routes)


def _use_stale(text: str, merged: dict[str, tuple[Any, str]]) -> frozenset[str]:
    """--proxy-cache-use-stale: nginx's failure names, comma-separated."""
    from .proxy_cache import USE_STALE

    names = frozenset(name.strip() for name in text.split(",") if name.strip())
    unknown = sorted(names - set(USE_STALE))
    if unknown:
        source = merged.get("proxy_cache_use_stale", (None, "--proxy-cache-use-stale"))[1]
        raise SettingError(f"{source}: {unknown[0]!r} is not one of {', '.join(USE_STALE)}")
    return names


def _purge_allow(text: str, merged: dict[str, tuple[Any, str]]) -> str:
    """--purge-allow: addresses or networks, each checked now."""
    from .proxy_cache import purge_networks

    try:
        purge_networks(text)
    except ValueError as exc:
        raise SettingError(f"{merged['purge_allow'][1]}: {exc}") from None
    return text


def _grace(text: str, merged: dict[str, tuple[Any, str]]) -> float | None:
    """--disconnect-grace: seconds (0 or more), or off."""
    if str(text).lower() in ("off", "none", "never"):
        return None
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:  # also refuses nan
        source = merged.get("disconnect_grace", (None, "--disconnect-grace"))[1]
        raise SettingError(f"{source}: seconds (0 or more) or off, not {text!r}")
    return seconds


def _check_address(text: str, source: str) -> None:
    try:
        parse_bind(text)
    except ValueError as exc:
        raise SettingError(f"{source}: {exc}") from None


def _check_format(template: str, merged: dict[str, tuple[Any, str]]) -> None:
    from .logs import check_access_log_format

    problem = check_access_log_format(template)
    if problem:
        source = merged.get("access_log_format", (None, "--access-log-format"))[1]
        raise SettingError(f"{source}: {problem}")


# ---------------------------------------------------------------------- values


_KIND_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
               list: "a list of strings"}  # fmt: skip
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _describe(value: Any) -> str:
    kind = {bool: "the boolean", int: "the integer", float: "the number", str: "the string"}
    for python_type, words in kind.items():
        if type(value) is python_type:
            return f"{words} {value!r}".replace("the boolean True", "true").replace(
                "the boolean False", "false"
            )
    return f"a {type(value).__name__}"


def _expect(kind: type, value: Any, source: str) -> Any:
    """``value`` as ``kind`` (a TOML value), or a SettingError saying what was expected."""
    ok = (
        (kind is int and type(value) is int)
        or (kind is float and type(value) in (int, float))
        or (kind is str and isinstance(value, str))
        or (kind is bool and isinstance(value, bool))
        or (kind is list and isinstance(value, list) and all(isinstance(v, str) for v in value))
    )
    if not ok:
        name = source.rpartition(": ")[2]
        raise SettingError(
            f"{source.rpartition(': ')[0]}: {name} must be {_KIND_NAMES[kind]}, "
            f"not {_describe(value)}"
        )
    return float(value) if kind is float else value


def _convert_text(option: Option, text: str, check_choices: bool = True) -> Any:
    """A value typed on the command line or in the environment."""
    kind = option.kind
    try:
        if kind is bool:
            lowered = text.strip().lower()
            if lowered in _TRUE or lowered in _FALSE:
                value: Any = lowered in _TRUE
            else:
                raise ValueError
        elif kind is list:
            value = [part for part in re.split(r"[,\s]+", text) if part]
        elif kind is int and option.metavar == "BYTES":
            value = byte_size(text)
        elif kind is int:
            if not (text.strip().isascii() and text.strip().lstrip("-").isdigit()):
                raise ValueError
            value = int(text)
        elif kind is float:
            value = float(text)
        else:
            value = text
    except ValueError:
        expected = _SIZE_WORDS if option.metavar == "BYTES" else _KIND_NAMES[kind]
        raise SettingError(f"expected {expected}, not {text!r}") from None
    if not check_choices:  # argparse's conversion: the range is checked with the flag's name
        return value
    return _check(option, value, "")


_SIZE_WORDS = "a size in bytes (4096, 64KiB, 256MiB, 1GiB)"
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def byte_size(text: str) -> int:
    """``"256MiB"`` (or ``256M``, ``256MB``, ``256m``: nginx's sizes, powers of 1024)
    -> bytes; ValueError for anything else."""
    match = re.fullmatch(r"\s*(\d+)\s*([kKmMgG]?)(?:i?[bB])?\s*", text)
    if match is None:
        raise ValueError(text)
    return int(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]


def _check(option: Option, value: Any, source: str) -> Any:
    """Range and choice checks; ``source`` is a flag, ``path: key``, or empty (the flag)."""
    prefix, _, key = source.rpartition(": ")
    label = key if prefix else option.flag
    where = f"{prefix}: " if prefix else ""
    if option.kind in (int, float):
        if option.minimum is not None and value < option.minimum:
            floor = int(option.minimum) if option.kind is int else option.minimum
            raise SettingError(f"{where}{label} must be at least {floor}, not {value}")
        if option.above is not None and value <= option.above:
            raise SettingError(f"{where}{label} must be more than {option.above:g}, not {value}")
    if option.choices is not None and value not in option.choices:
        raise SettingError(
            f"{where}{label} must be one of {', '.join(option.choices)}, not {value!r}"
        )
    return value


def _check_app(spec: str, source: str) -> str:
    if not _APP_SPEC.match(spec):
        hint = ""
        if re.match(r"^[\d.]+$|^\[|localhost", spec) or spec.isdigit():
            hint = f"; to choose the address use --bind {spec}:8000 (or --host/--port)"
        raise SettingError(
            f"{source}: {spec!r} is not an app: write module:attribute, e.g. myapp:app{hint}"
        )
    return spec


def _did_you_mean(name: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def unknown_argument_message(argument: str) -> str:
    """One line for a command-line argument the parser does not know."""
    if argument.startswith("-"):
        flag = argument.split("=", 1)[0]
        flags = [o.flag for o in OPTIONS] + [
            "--no-" + o.flag[2:] for o in OPTIONS if o.kind is bool
        ]
        close = difflib.get_close_matches(flag, flags, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        return f"unknown option {flag}{hint}"
    return f"unexpected argument {argument!r}: give one app (module:attribute) and options"
