"""``forkloop bench --proxy``: forkloop's caching proxy against nginx's, side by side.

One origin (`loadtest.origin`) stands behind every proxy: nginx from the
system package, started with its own configuration (``proxy_cache`` with
``proxy_cache_lock on``, a keep-alive ``upstream`` block, no access log), and
``forkloop proxy ORIGIN --cache`` on each loop backend, the same number of
workers each. Three workloads, in rounds whose order alternates:

- **hit**: ``wrk`` on a stored page (1 KiB): requests/s, and the proxy's CPU
  per request (user and system, its whole process tree from ``/proc``);
- **pass**: ``wrk`` on a page the origin marks ``no-store``: every request
  goes through to the origin; the proxy's CPU per request;
- **stampede**: ``--stampede`` clients (300) at once on a cold key whose
  origin answer takes ``--origin-ms`` (200 ms): how many requests reached the
  origin, and the clients' p50/p99 latency. nginx's lock waiters poll the
  cache every 500 ms; forkloop's are told when the fill ends.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from .bench import Measurement, run_wrk
from .servers import ServerProcess, free_port, python

NGINX_CONFIG = """\
{user}worker_processes {workers};
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {root}/body;
    proxy_temp_path {root}/proxy;
    fastcgi_temp_path {root}/fastcgi;
    uwsgi_temp_path {root}/uwsgi;
    scgi_temp_path {root}/scgi;
    proxy_cache_path {root}/cache levels=1:2 keys_zone=bench:16m max_size=256m
                     inactive=60m use_temp_path=off;
    upstream origin {{ server 127.0.0.1:{origin}; keepalive {keepalive}; }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://origin;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_cache bench;
            proxy_cache_lock on;
            proxy_cache_lock_timeout 5s;
            add_header X-Cache $upstream_cache_status;
        }}
    }}
}}
"""


# idle upstream connections kept per worker, both proxies: more than wrk's
# connections, so neither opens a connection per request in the steady state
KEEPALIVE = 256


@dataclass
class Stampede:
    origin_requests: list[int] = field(default_factory=list)
    latencies_ms: list[float] = field(default_factory=list)
    failures: int = 0


@dataclass
class Contender:
    name: str
    server: ServerProcess
    hit: Measurement = field(default_factory=Measurement)
    passed: Measurement = field(default_factory=Measurement)
    stampede: Stampede = field(default_factory=Stampede)


def nginx_contender(origin: int, workers: int, root: Path) -> Contender:
    port = free_port()
    user = "user root;\n" if os.geteuid() == 0 else ""  # its workers write the cache here
    config = NGINX_CONFIG.format(
        user=user, workers=workers, root=root, origin=origin, port=port, keepalive=KEEPALIVE
    )
    (root / "nginx.conf").write_text(config)
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    command = [
        nginx,
        "-p",
        str(root),
        "-e",
        str(root / "error.log"),
        "-c",
        str(root / "nginx.conf"),
    ]
    command += ["-g", "daemon off;"]
    return Contender("nginx", ServerProcess("nginx", command, port))


def forkloop_contender(loop: str, origin: int, workers: int) -> Contender:
    port = free_port()
    command = [python(), "-m", "forkloop", "proxy", f"http://127.0.0.1:{origin}", "--cache"]
    command += ["--bind", f"127.0.0.1:{port}", "--loop", loop, "--workers", str(workers)]
    command += ["--no-access-log", "--metrics-bind", "off", "--log-level", "warning"]
    command += ["--proxy-keepalive", str(KEEPALIVE)]
    if workers > 1:
        command += ["--shared-cache", "on"]
    name = f"forkloop {loop}"
    return Contender(name, ServerProcess(name, command, port))


def origin_count(origin: int, path: str) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{origin}/count{path}", timeout=10) as answer:
        return int(answer.read())


async def _client(port: int, request: bytes, go: asyncio.Event) -> float | None:
    """One client of a stampede: its own connection, its request sent at ``go``;
    the milliseconds until its whole answer came (the head and the Content-Length
    bytes of body, as an HTTP client reads it: not the close that follows, which
    every server sends a moment later), or None if it failed."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return None
    try:
        await go.wait()
        started = time.perf_counter()
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        length = _content_length(head)
        body = await reader.readexactly(length) if length is not None else b""
        elapsed = (time.perf_counter() - started) * 1000
        if not head.startswith(b"HTTP/1.1 200 ") or not body.endswith(b"x" * 64):
            return None
        return elapsed
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        return None
    finally:
        writer.close()


def _content_length(head: bytes) -> int | None:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return None


def run_stampede(port: int, path: str, clients: int) -> list[float | None]:
    request = f"GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n".encode()

    async def stampede() -> list[float | None]:
        go = asyncio.Event()
        tasks = [asyncio.create_task(_client(port, request, go)) for _ in range(clients)]
        await asyncio.sleep(0.5)  # every connection open before anyone asks
        go.set()
        async with asyncio.timeout(30):
            return list(await asyncio.gather(*tasks))

    return asyncio.run(stampede())


def measure(args: argparse.Namespace, origin: int, contenders: list[Contender]) -> None:
    size = f"?size={args.page_size}"
    wrk = argparse.Namespace(**{**vars(args), "path": "/hit" + size, "pipeline": 1})
    passing = argparse.Namespace(**{**vars(args), "path": "/pass" + size, "pipeline": 1})
    for contender in contenders:
        run_wrk(wrk, contender.server.port, 1.0, None)  # warm-up: the page is stored
        run_wrk(passing, contender.server.port, 1.0, None)
    for round_number in range(args.rounds):
        order = contenders if round_number % 2 == 0 else contenders[::-1]
        for contender in order:
            server = contender.server
            for options, into in ((wrk, contender.hit), (passing, contender.passed)):
                before = server.cpu()
                run = run_wrk(options, server.port, args.duration, None)
                into.add(run, server.cpu() - before)
            key = f"/cold/{contender.name.replace(' ', '-')}-{round_number}"
            latencies = run_stampede(server.port, f"{key}?ms={args.origin_ms}", args.stampede)
            contender.stampede.origin_requests.append(origin_count(origin, key))
            contender.stampede.latencies_ms += [ms for ms in latencies if ms is not None]
            contender.stampede.failures += sum(ms is None for ms in latencies)
            print(
                f"round {round_number + 1}: {contender.name}: hit "
                f"{contender.hit.rates[-1]:,.0f} req/s, stampede origin requests "
                f"{contender.stampede.origin_requests[-1]}",
                file=sys.stderr,
            )


def format_tables(args: argparse.Namespace, contenders: list[Contender]) -> str:
    peer = next((c for c in contenders if c.name == "nginx"), None)
    lines = [
        f"wrk -t{args.threads} -c{args.connections} -d{args.duration:g}s x {args.rounds} rounds, "
        f"{args.workers} worker(s) each, pages of {args.page_size:,} bytes, {os.cpu_count()} cores, "
        f"Python {sys.version.split()[0]}",
        "",
        "| proxy | hit req/s | hit user µs/req | hit sys µs/req | hit total µs/req | total vs nginx "
        "| pass req/s | pass total µs/req | pass vs nginx | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for contender in contenders:
        hit, passed = contender.hit, contender.passed
        hit_total = hit.user_us() + hit.system_us()
        pass_total = passed.user_us() + passed.system_us()
        versus_hit = versus_pass = "-"
        if peer is not None:
            versus_hit = f"{hit_total / (peer.hit.user_us() + peer.hit.system_us()):.2f}x"
            peer_pass = peer.passed.user_us() + peer.passed.system_us()
            versus_pass = f"{pass_total / peer_pass:.2f}x"
        lines.append(
            f"| {contender.name} | {statistics.median(hit.rates):,.0f} | {hit.user_us():.2f} "
            f"| {hit.system_us():.2f} | {hit_total:.2f} | {versus_hit} "
            f"| {statistics.median(passed.rates):,.0f} | {pass_total:.2f} | {versus_pass} "
            f"| {hit.errors + passed.errors} |"
        )
    lines += [
        "",
        f"Stampede: {args.stampede} clients at once on a cold key, origin answer "
        f"{args.origin_ms} ms, {args.rounds} rounds (a new key each)",
        "",
        "| proxy | origin requests per stampede | p50 ms | p99 ms | max ms | p99 - origin ms "
        "| failed |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for contender in contenders:
        stampede = contender.stampede
        latencies = sorted(stampede.latencies_ms) or [float("nan")]
        p50 = latencies[len(latencies) // 2]
        p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
        requests = ", ".join(str(n) for n in stampede.origin_requests)
        lines.append(
            f"| {contender.name} | {requests} | {p50:.0f} | {p99:.0f} | {latencies[-1]:.0f} "
            f"| {p99 - args.origin_ms:.0f} | {stampede.failures} |"
        )
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--proxy",
        action="store_true",
        help="forkloop proxy --cache vs nginx proxy_cache: a cache hit, a pass-through, "
        "a stampede on a cold key",
    )
    group = parser.add_argument_group("--proxy", "the proxy benchmark (forkloop bench --proxy)")
    group.add_argument(
        "--stampede", type=int, default=300, help="clients of a stampede (default 300)"
    )
    group.add_argument(
        "--origin-ms",
        type=int,
        default=200,
        help="milliseconds the origin takes to answer a cold key (default 200)",
    )
    group.add_argument(
        "--page-size",
        type=int,
        default=1024,
        help="bytes of the page hit and passed through (default 1024)",
    )


def main(args: argparse.Namespace) -> int:
    if args.stampede < 1:
        print("forkloop bench --proxy: --stampede must be 1 or more", file=sys.stderr)
        return 2
    if shutil.which("wrk") is None:
        print("forkloop bench --proxy needs wrk: apt-get install wrk", file=sys.stderr)
        return 2
    with_nginx = not args.no_peer
    if with_nginx and shutil.which("nginx") is None and not os.path.exists("/usr/sbin/nginx"):
        print("forkloop bench --proxy needs nginx: apt-get install nginx", file=sys.stderr)
        return 2
    from .bench import allow_open_files

    allow_open_files(2 * max(args.stampede, args.connections) + 256)
    origin_port = free_port()
    origin = ServerProcess(
        "origin",
        [python(), "-m", "forkloop.loadtest.origin", "--port", str(origin_port)],
        origin_port,
    )
    with tempfile.TemporaryDirectory(prefix="forkloop-bench-nginx-") as root:
        contenders = [
            forkloop_contender(loop, origin_port, args.workers) for loop in args.loops.split(",")
        ]
        if with_nginx:
            contenders.append(nginx_contender(origin_port, args.workers, Path(root)))
        started: list[Contender] = []
        try:
            origin.start()
            for contender in contenders:
                contender.server.start()
                started.append(contender)
            measure(args, origin_port, contenders)
        finally:
            for contender in started:
                contender.server.stop()
            origin.stop()
    table = format_tables(args, contenders)
    print(table)
    if args.output:
        with open(args.output, "w") as output:
            output.write(table + "\n")
    return 0
