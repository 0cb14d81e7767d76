"""Server configuration: one immutable object, built from the command line.

Defaults follow nginx where nginx has an equivalent, so an operator's intuition
carries over (the nginx directive is named beside each limit).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field


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
class Config:
    """Everything `forkloop serve` was asked to do."""

    app: str | None = None
    binds: tuple[str, ...] = ("127.0.0.1:8000",)
    loop: str = "auto"
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    backlog: int = 2048
    reuse_port: bool = False
    access_log: bool = False
    access_log_path: str | None = None
    log_level: str = "info"
    certfile: str | None = None  # PEM certificate (chain): serve HTTPS
    keyfile: str | None = None
    limits: Limits = field(default_factory=Limits)
