"""Fleet stampede benchmark: several servers sharing one Redis store (`server.fleet_cache`).

    python -m forkloop.loadtest.fleet_stampede [--servers 2] [--workers 2]
        [--cache-url redis://127.0.0.1:6379/0] [--requests 1000] [--compute-ms 200]
        [--rounds 3] [--loop uvloop] [--lookups 5000]

Without ``--cache-url`` it starts a private ``redis-server`` on a free port
(and reads its CPU from ``/proc``). Then:

1. *Stampedes*: ``--servers`` forkloop servers (``--workers`` each, with
   ``--shared-cache on --cache-url``) run the stampede benchmark's app
   (`loadtest.stampede`); each round sends ``--requests`` concurrent requests
   for one cold key, dealt round-robin over the servers, and reports the
   computations (``/stats``, summed over every server) and the latency every
   client saw against the fill time. The goal is one computation per round
   and waiters on every server answered within a few ms of the fill's end.
2. *Lookup CPU*: in this process, on the chosen loop, CPU per request of a
   hit in the worker's own cache against a *fleet hit* (a local miss answered
   by the store: the round trip, the script, the decoding), and the store's
   own CPU per fleet hit, from which the rate one store's core sustains follows.
3. *Client round trip*: CPU per ``GET`` on the loop for redis-py (the client
   forkloop uses) and, when it is installed, coredis: how the client was chosen.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

from ..server import backends
from ..server.cache import CachePolicy, ResponseCache
from ..server.fleet_cache import FleetTier
from ..server.http import Request, Response
from .servers import ServerProcess, free_port, python
from .stampede import get_json, stampede


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, int(len(ordered) * fraction) - 1)] if ordered else float("nan")


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class PrivateStore:
    """A redis-server of this run's own, on a free port, persistence off."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server") or shutil.which("valkey-server")
        if binary is None:
            raise SystemExit("no redis-server or valkey-server: run ./setup.sh, or --cache-url")
        self.port = free_port()
        self.folder = tempfile.mkdtemp(prefix="forkloop-store-")
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
            + ["--appendonly", "no", "--dir", self.folder, "--logfile", ""],
            stdout=subprocess.DEVNULL,
        )
        self.url = f"redis://127.0.0.1:{self.port}/0"
        deadline = time.monotonic() + 10
        while not self._answers():
            if time.monotonic() > deadline:
                raise SystemExit("redis-server did not start")
            time.sleep(0.05)

    def _answers(self) -> bool:
        import socket

        try:
            with socket.create_connection(("127.0.0.1", self.port), 0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def cpu(self) -> float:
        return _cpu_seconds(self.process.pid)

    def stop(self) -> None:
        self.process.kill()
        self.process.wait(5)
        shutil.rmtree(self.folder, ignore_errors=True)


def server_command(port: int, args: argparse.Namespace, url: str, prefix: str) -> list[str]:
    return [
        python(),
        "-m",
        "forkloop",
        "forkloop.loadtest.stampede:app",
        "--bind",
        f"127.0.0.1:{port}",
        "--workers",
        str(args.workers),
        "--shared-cache",
        "on",
        "--cache-url",
        url,
        "--cache-key-prefix",
        prefix,
        "--loop",
        args.loop,
        "--log-level",
        "warning",
        "--backlog",
        "4096",
        "--no-access-log",
    ]


def fleet_totals(ports: list[int]) -> dict[str, int]:
    totals: dict[str, int] = {}
    for port in ports:
        for name, value in get_json(port, "/stats").get("server", {}).items():
            totals[name] = totals.get(name, 0) + value
    return totals


async def _spread(ports: list[int], path: str, count: int) -> list[float]:
    shares = [count // len(ports) + (i < count % len(ports)) for i in range(len(ports))]
    parts = await asyncio.gather(
        *(stampede(port, path, n) for port, n in zip(ports, shares, strict=True))
    )
    return [latency for part in parts for latency in part]


def run_stampedes(args: argparse.Namespace, url: str) -> list[tuple[Any, ...]]:
    prefix = f"bench-{os.getpid()}-{time.time_ns()}:"
    servers = []
    for _ in range(args.servers):
        port = free_port()
        servers.append(ServerProcess("fleet", server_command(port, args, url, prefix), port))
    rows = []
    try:
        for server in servers:
            server.start()
        ports = [server.port for server in servers]
        for round_number in range(args.rounds):
            before = fleet_totals(ports)
            path = f"/sf/fleet-{round_number}?ms={args.compute_ms}"
            latencies = sorted(asyncio.run(_spread(ports, path, args.requests)))
            time.sleep(1.0)  # the workers publish their counters on their heartbeat
            after = fleet_totals(ports)
            rows.append(
                (
                    round_number + 1,
                    len(latencies),
                    after.get("cache_computations", 0) - before.get("cache_computations", 0),
                    after.get("cache_fleet_notifications", 0)
                    - before.get("cache_fleet_notifications", 0),
                    statistics.median(latencies) * 1000 - args.compute_ms,
                    percentile(latencies, 0.99) * 1000 - args.compute_ms,
                    latencies[-1] * 1000 - args.compute_ms,
                )
            )
    finally:
        for server in servers:
            server.stop()
    return rows


async def _instant(request: Request) -> Response:
    return Response(b"x" * 1000, headers={"Cache-Control": "max-age=3600"})


async def _serve_all(cache: ResponseCache, targets: list[str]) -> None:
    policy = CachePolicy(ttl=3600)
    for target in targets:
        request = Request("GET", target.encode(), "1.1", [], ("127.0.0.1", 1), True)
        answer = cache.serve(request, _instant, policy)
        if inspect.isawaitable(answer):
            await answer


def lookup_costs(url: str, count: int, loop: str, store: PrivateStore | None) -> list[str]:
    async def measure() -> list[tuple[str, float, float | None]]:
        tier = FleetTier(url, prefix=f"costs-{os.getpid()}:", call_timeout=1.0)
        assert await tier.connect(), "the store did not answer"
        filler = ResponseCache(shared_tier=lambda: tier)
        targets = [f"/fleet/{n}" for n in range(count)]
        await _serve_all(filler, targets)  # filled: now every one is in the store
        await asyncio.sleep(0.2)  # the stores run as tasks of their own
        rows: list[tuple[str, float, float | None]] = []
        local = ResponseCache(shared_tier=lambda: None)
        await _serve_all(local, ["/hot"])
        started = time.process_time()
        await _serve_all(local, ["/hot"] * count)
        rows.append(("local hit", (time.process_time() - started) / count * 1e6, None))
        reader = ResponseCache(shared_tier=lambda: tier)
        started, store_started = time.process_time(), store.cpu() if store else 0.0
        await _serve_all(reader, targets)
        spent = (time.process_time() - started) / count * 1e6
        store_spent = (store.cpu() - store_started) / count * 1e6 if store else None
        assert tier.stats.fleet_hits >= count, tier.stats
        rows.append(("fleet hit (a local miss the store answers)", spent, store_spent))
        await tier.close()
        return rows

    with asyncio.Runner(loop_factory=backends.get(loop).new_event_loop) as runner:
        rows = runner.run(measure())
    lines = ["| lookup | worker CPU µs/request | store CPU µs/request |", "|---|---:|---:|"]
    for name, micros, store_micros in rows:
        lines.append(
            f"| {name} | {micros:.1f} | {'' if store_micros is None else f'{store_micros:.1f}'} |"
        )
    store_cost = rows[-1][2]
    if store_cost:
        lines.append(
            f"\nOne store core sustains about {1e6 / store_cost:,.0f} fleet lookups/s "
            "(1 s of its CPU over its CPU per lookup)."
        )
    return lines


def client_costs(url: str, count: int, loop: str) -> list[str]:
    """CPU per GET round trip on the loop, redis-py and (if installed) coredis."""
    host_port = url.split("://", 1)[1].split("/", 1)[0]
    host, _, port = host_port.rpartition(":")

    async def redis_py() -> float:
        import redis.asyncio

        client = redis.asyncio.from_url(url)
        await client.set("client-cost", b"x" * 1000)
        started = time.process_time()
        for _ in range(count):
            await client.get("client-cost")
        spent = time.process_time() - started
        await client.aclose()
        return spent

    async def coredis_client() -> float:
        import coredis  # type: ignore[import-not-found, unused-ignore]

        async with coredis.Redis(host=host, port=int(port)) as client:  # coredis 5+: a context
            await client.set("client-cost", b"x" * 1000)
            started = time.process_time()
            for _ in range(count):
                await client.get("client-cost")
            return time.process_time() - started

    candidates = [("redis-py (asyncio, hiredis)", redis_py)]
    try:
        import coredis  # type: ignore[import-not-found, unused-ignore]  # noqa: F401

        candidates.append(("coredis", coredis_client))
    except ImportError:
        pass
    lines = [f"| client, on the {loop} loop | CPU µs per GET |", "|---|---:|"]
    for name, measure in candidates:
        with asyncio.Runner(loop_factory=backends.get(loop).new_event_loop) as runner:
            spent = runner.run(measure())
        lines.append(f"| {name} | {spent / count * 1e6:.1f} |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--servers", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2, help="workers per server")
    parser.add_argument("--cache-url", help="the store (default: a private redis-server)")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--compute-ms", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3, help="stampedes, one cold key each")
    parser.add_argument("--loop", default="uvloop")
    parser.add_argument("--lookups", type=int, default=5000, help="per row of the CPU tables")
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(
        resource.RLIMIT_NOFILE, (max(soft, min(hard, 4 * args.requests + 256)), hard)
    )
    store = None if args.cache_url else PrivateStore()
    url = args.cache_url or (store.url if store else "")
    try:
        rows = run_stampedes(args, url)
        costs = lookup_costs(url, args.lookups, args.loop, store)
        clients = client_costs(url, args.lookups, args.loop)
    finally:
        if store is not None:
            store.stop()
    print(
        f"{args.requests} concurrent cold requests per round over {args.servers} servers of "
        f"{args.workers} workers (--shared-cache on --cache-url), compute {args.compute_ms} ms, "
        f"loop {args.loop}, Python {sys.version.split()[0]}\n"
    )
    print(
        "| round | requests | computations | notifications | p50 − fill ms | p99 − fill ms "
        "| max − fill ms |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for number, count, computations, notified, p50, p99, worst in rows:
        print(
            f"| {number} | {count} | {computations} | {notified} | {p50:.0f} | {p99:.0f} "
            f"| {worst:.0f} |"
        )
    print()
    print("\n".join(costs))
    print()
    print("\n".join(clients))
    return 0


if __name__ == "__main__":
    sys.exit(main())
