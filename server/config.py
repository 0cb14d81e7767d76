"""Server configuration: one immutable object holding every setting.

`Config` is everything `forkloop serve` was asked to do: what to serve, where,
on which loop, with how many workers, the master's timeouts, logging, metrics
and the per-connection `Limits`. It is built once from the command line, the
environment and the ``--config`` file (`server.settings` does that and says
which wins), and never changed afterwards: the master, each worker and each
connection read the same frozen object. A reload (HUP) builds a new one from
the same sources and the master hands it to the next generation of workers,
so every setting, the master's own timeouts included, follows a reload; the
only ones a reload cannot change are the sockets already bound (``binds``,
``reuse_port``, ``metrics_bind``), which need an upgrade (USR2).

Defaults follow nginx where nginx has an equivalent, so an operator's intuition
carries over (the nginx directive is named beside each limit), and gunicorn or
uvicorn where the setting is theirs (workers, timeouts, access log, app
loading).

Invariants: every value here has been checked (`server.settings` refuses a
zero worker count or a negative timeout with a sentence naming where it came
from), so code that reads a `Config` never validates it again.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

DEFAULT_BIND = "127.0.0.1:8000"
# Loopback, so metrics are not exposed beyond the host unless asked for; a port
# of its own (outside the ranges apps usually take) so that it does not clash
# with the app's. When this default is taken the server starts without metrics
# and says so; an address given explicitly must be bindable.
DEFAULT_METRICS_BIND = "127.0.0.1:9808"
# nginx's "combined" format; the names are AccessLog's fields.
COMBINED_FORMAT = '{client} - - [{time}] "{request}" {status} {size} "{referer}" "{user_agent}"'


@dataclass(frozen=True)
class Limits:
    """Per-connection limits and timeouts (seconds, bytes)."""

    # client_header_timeout 60s: the whole request head must arrive by then
    # (a deadline from its first byte, not reset by each byte: slowloris can't hold on).
    header_timeout: float = 60.0
    # client_body_timeout 60s: longest gap between two reads of the body.
    body_timeout: float = 60.0
    # keepalive_timeout 75s: an idle keep-alive connection is closed after this.
    keepalive_timeout: float = 75.0
    # send_timeout 60s: a client that reads nothing of a full write buffer for this long is cut.
    send_timeout: float = 60.0
    # keepalive_requests 1000: requests served on one connection before it is closed.
    max_keepalive_requests: int = 1000
    # large_client_header_buffers 4 8k: a request line longer than a buffer is 414.
    max_request_line: int = 8192
    # ... and the whole head must fit in the buffers: 431 beyond.
    max_header_bytes: int = 32768
    max_header_count: int = 100
    # client_max_body_size 1m: larger bodies are 413, chunked ones included.
    max_body_size: int = 1024 * 1024
    # A handler still running this long after its request arrived is cancelled: 504
    # (like nginx's proxy_read_timeout 60s). 0 turns it off.
    request_timeout: float = 60.0
    # Complete requests queued behind a busy one before the connection stops reading.
    max_pipelined: int = 32
    # Connections one worker keeps open (nginx worker_connections); beyond it a new
    # connection gets 503 and is closed at once. 0: no limit.
    max_connections: int = 0
    # Write-buffer high-water mark: above it the connection stops reading new requests.
    write_buffer_high: int = 256 * 1024
    # lingering_time 30s, lingering_timeout 5s: a connection closed on a refused request
    # (413, 400, ...) whose client may still be sending is not closed at once, which would
    # reset it and could destroy the answer: the server sends the answer and a FIN, then
    # reads and discards until the client closes, is quiet this long, or lingering_time ends.
    lingering_time: float = 30.0
    lingering_timeout: float = 5.0


@dataclass(frozen=True)
class WebSocketSettings:
    """How an ASGI app's WebSocket connections are served (`server.websocket`)."""

    # the sans-I/O library that speaks the protocol: auto (websockets if installed), none
    # (upgrades are declined: the app sees a plain HTTP request), websockets
    library: str = "auto"
    # a bigger incoming message closes the connection with 1009 (uvicorn's 16 MiB)
    max_size: int = 16 * 1024 * 1024
    # messages received and not yet taken by the app; beyond it the connection stops reading
    max_queue: int = 32
    # a ping every ping_interval seconds; no pong within ping_timeout closes with 1011 (0: off)
    ping_interval: float = 20.0
    ping_timeout: float = 20.0
    # permessage-deflate, with small windows (a bounded memory per connection)
    per_message_deflate: bool = True
    # seconds the client gets to answer the server's close frame before the socket closes
    close_timeout: float = 10.0


@dataclass(frozen=True)
class ProxyRoute:
    """One ``[[proxy]]`` section of a config file (`server.proxy_routes`)."""

    prefix: str
    upstreams: tuple[str, ...]
    cache: bool = False


@dataclass(frozen=True)
class Config:
    """Everything `forkloop serve` was asked to do."""

    # ---- what to serve
    app: str | None = None  # "module:attribute"; None serves the demo app
    factory: bool = False  # the attribute is a function that returns the app
    app_dir: str = "."  # put on sys.path before importing the app (uvicorn's --app-dir)
    chdir: str | None = None  # change to this directory first (gunicorn's --chdir)
    health_path: str = "/healthz"  # answered "ok" by every worker, whatever the app
    lifespan: str = "auto"  # an ASGI app's lifespan protocol: auto, on, off (uvicorn's)
    root_path: str = ""  # an ASGI app's root_path (mounted below a proxy's prefix)
    interface: str = "auto"  # what APP is: auto (tell by looking), asgi, native
    # seconds an ASGI app runs on after its client left (None: to its end, uvicorn's way)
    disconnect_grace: float | None = 1.0
    # trust X-Forwarded-For/-Proto from these peers (uvicorn's --proxy-headers)
    proxy_headers: bool = False
    forwarded_allow_ips: str = "127.0.0.1"  # comma-separated addresses, or *
    # forkloop proxy: every request goes to these upstreams (round-robin, passive health)
    upstreams: tuple[str, ...] = ()
    proxy_connect_timeout: float = 5.0
    proxy_read_timeout: float = 60.0
    proxy_send_timeout: float = 60.0
    proxy_keepalive: int = 32  # idle upstream connections kept per address, per worker
    # the response cache in front of an ASGI app (server.asgi_cache), for these path prefixes
    cache: bool = False
    cache_size: int = 64 * 1024 * 1024  # bytes, an LRU
    cache_prefixes: tuple[str, ...] = ("/",)
    # the proxy's cache (server.proxy_cache): nginx's proxy_cache_use_stale failures,
    # fills finished for nobody, and who may PURGE (comma-separated addresses/networks)
    proxy_cache_use_stale: frozenset[str] = frozenset()
    finish_abandoned_fills: bool = False
    purge_allow: str = ""
    # the config file's [[proxy]] sections: prefixes proxied beside the app's own routes
    proxy_routes: tuple[ProxyRoute, ...] = ()
    # the server-wide cache tier: a cache process the master forks (server.cache_process)
    shared_cache: bool = False
    shared_cache_size: int = 64 * 1024 * 1024  # bytes, an LRU
    # the fleet tier: a Redis/Valkey store shared by several servers (server.fleet_cache)
    cache_url: str | None = None  # redis://HOST:PORT/DB, rediss://..., unix://PATH
    cache_key_prefix: str = "forkloop:"
    cache_call_timeout: float = 0.1  # seconds one call to the store may take
    cache_max_entry: int = 1024 * 1024  # bytes: a bigger entry stays on its machine
    # ---- where
    binds: tuple[str, ...] = (DEFAULT_BIND,)
    backlog: int = 2048
    reuse_port: bool = False
    certfile: str | None = None  # PEM certificate (chain): serve HTTPS
    keyfile: str | None = None
    # ---- how
    loop: str = "auto"
    proactor_engine: str | None = None
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    no_master: bool = False
    # ---- the master's supervision
    worker_timeout: float = 30.0  # a worker whose loop is blocked this long is killed
    graceful_timeout: float = 30.0  # in-flight requests get this long on a graceful stop
    max_requests: int = 0  # a worker retires after this many requests (0: never)
    max_requests_jitter: int = 0
    term: str = "graceful"  # what SIGTERM means: "graceful" (gunicorn, uvicorn) or "fast" (nginx)
    pid_file: str | None = None
    reload: bool = False  # restart the workers when a .py file under app_dir changes
    # ---- logs and metrics
    log_level: str = "info"
    access_log: bool = True
    access_log_path: str | None = None  # None: stdout
    access_log_format: str = COMBINED_FORMAT
    metrics_bind: str | None = DEFAULT_METRICS_BIND  # None: no /metrics
    metrics_bind_is_default: bool = True  # the default address may be taken: then none
    config_path: str | None = None  # the --config file, re-read on HUP
    limits: Limits = field(default_factory=Limits)
    websocket: WebSocketSettings = field(default_factory=WebSocketSettings)
