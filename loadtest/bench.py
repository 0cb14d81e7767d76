"""``forkloop bench``: CPU per request, forkloop on each loop against uvicorn.

Every server answers the same hello world. Each is started once, warmed up,
then driven by ``wrk`` in rounds whose order alternates (A B C, C B A, ...)
so drift on a shared machine hits every server alike. For each run the
server's user and system CPU time is read from ``/proc`` for its whole process
tree; the table reports CPU microseconds per request, which is what survives
a noisy machine, next to requests/s and latency, and ratios against the peer
(uvicorn with uvloop and httptools) measured in the same run.

``--asgi`` runs the ASGI benchmark instead: the same ASGI applications on
forkloop and on uvicorn, granian and hypercorn (`loadtest.asgi_bench`).

``--proxy`` runs the proxy benchmark instead: ``forkloop proxy --cache`` on
each loop against nginx's ``proxy_cache`` (`loadtest.proxy_bench`).

``--raw`` adds a bare httptools protocol on each loop (`loadtest.raw`), so the
loop's own cost can be told apart from the server's. ``--pipeline 16`` sends
16 requests per write (wrk with a Lua script).

``--connections 1,50,256,1000`` measures at each of those connection counts in
the same run, and prints a table per count. Each round runs every count on
every server, in an order that alternates from round to round (servers and
counts alike), so the comparison at one count is made in the same stretch of
time as at the others.

wrk is not a Python package: ``apt-get install wrk`` (Debian/Ubuntu) or
``brew install wrk``.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

from ..server import backends
from .servers import CpuTime, ServerProcess, forkloop_server, free_port, python

PEER = "uvicorn"

_PIPELINE_SCRIPT = """
local depth = tonumber(os.getenv("FORKLOOP_PIPELINE") or "16")
init = function(args)
  local batch = {}
  for i = 1, depth do batch[i] = wrk.format(nil, wrk.path) end
  pipelined = table.concat(batch)
end
request = function() return pipelined end
"""


@dataclass
class Measurement:
    requests: int = 0
    seconds: float = 0.0
    cpu: CpuTime = field(default_factory=lambda: CpuTime(0.0, 0.0))
    rates: list[float] = field(default_factory=list)
    p50_ms: list[float] = field(default_factory=list)
    p99_ms: list[float] = field(default_factory=list)
    errors: int = 0

    def add(self, run: dict[str, float], cpu: CpuTime) -> None:
        self.requests += int(run["requests"])
        self.seconds += run["seconds"]
        self.cpu = CpuTime(self.cpu.user + cpu.user, self.cpu.system + cpu.system)
        self.rates.append(run["rate"])
        self.p50_ms.append(run["p50_ms"])
        self.p99_ms.append(run["p99_ms"])
        self.errors += int(run["errors"])

    def user_us(self) -> float:
        return self.cpu.user / self.requests * 1e6 if self.requests else float("nan")

    def system_us(self) -> float:
        return self.cpu.system / self.requests * 1e6 if self.requests else float("nan")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--loops",
        default=",".join(backends.available()),
        help="comma-separated loop backends (default: all available here)",
    )
    parser.add_argument(
        "--asgi",
        action="store_true",
        help="ASGI apps (hello, FastAPI JSON, 10 KiB echo, WebSocket echo) on forkloop "
        "vs uvicorn, granian and hypercorn",
    )
    parser.add_argument("--raw", action="store_true", help="also bench a bare httptools protocol")
    parser.add_argument(
        "--no-peer",
        action="store_true",
        help=f"leave out the {PEER} peer (with --asgi: every peer)",
    )
    parser.add_argument("--workers", type=int, default=1, help="worker processes per server")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per wrk run")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds")
    parser.add_argument(
        "--connections",
        dest="connection_counts",
        type=connection_counts,
        default=[50],
        metavar="LIST",
        help="wrk connections, or a comma-separated list of counts: a table for each (default: 50)",
    )
    parser.add_argument("--threads", type=int, default=1, help="wrk threads")
    parser.add_argument("--pipeline", type=int, default=1, help="requests per write (wrk Lua)")
    parser.add_argument("--path", default="/", help="URL path to request")
    parser.add_argument("--output", default=None, help="also write the table to this file")
    from . import asgi_bench, proxy_bench  # they build on this module's measurements

    asgi_bench.add_arguments(parser)
    proxy_bench.add_arguments(parser)


def connection_counts(text: str) -> list[int]:
    """``"1,50,256"`` -> ``[1, 50, 256]``; each a positive count, none twice."""
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"connection counts are whole numbers separated by commas, not {text!r}"
        ) from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"connection counts must be 1 or more, not {text!r}")
    if len(set(counts)) != len(counts):
        raise argparse.ArgumentTypeError(f"a connection count is listed twice in {text!r}")
    return counts


def allow_open_files(needed: int) -> None:
    """Raise this process's soft RLIMIT_NOFILE (and its children's: the servers, wrk)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def server_commands(args: argparse.Namespace) -> list[ServerProcess]:
    servers = []
    loops = [name for name in args.loops.split(",") if name]
    for loop in loops:
        backends.loop_factory(loop)  # fail early, with the registry's message
        servers.append(forkloop_server(loop, args.workers))
    if not args.no_peer:
        port = free_port()
        command = [python(), "-m", "uvicorn", "forkloop.loadtest.peer:app", "--port", str(port)]
        command += ["--loop", "uvloop", "--http", "httptools", "--no-access-log"]
        command += ["--log-level", "warning"]
        if args.workers > 1:
            command += ["--workers", str(args.workers)]
        servers.append(ServerProcess(PEER, command, port))
    if args.raw:
        for loop in loops:
            port = free_port()
            command = [python(), "-m", "forkloop.loadtest.raw", "--loop", loop, "--port", str(port)]
            servers.append(ServerProcess(f"raw httptools {loop}", command, port))
    return servers


def run_wrk(
    args: argparse.Namespace,
    port: int,
    duration: float,
    script: str | None,
    connections: int | None = None,
) -> dict[str, float]:
    connections = args.connections if connections is None else connections
    threads = min(args.threads, connections)  # wrk wants a connection per thread at least
    command = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{duration:g}s", "--latency"]
    if script is not None:
        command += ["-s", script]
    command.append(f"http://127.0.0.1:{port}{args.path}")
    env = {**os.environ, "FORKLOOP_PIPELINE": str(args.pipeline)}
    output = subprocess.run(command, capture_output=True, text=True, env=env, check=True).stdout
    return parse_wrk(output)


def parse_wrk(output: str) -> dict[str, float]:
    def latency(percent: str) -> float:
        """A percentile in ms; NaN when wrk has none (it sometimes prints ``99%  0.00us``,
        a latency no request can have, with pipelining: its histogram's bug, not a figure)."""
        match = re.search(rf"^\s+{percent}%\s+([\d.]+)(us|ms|s)\s*$", output, re.M)
        if match is None or float(match.group(1)) == 0:
            return float("nan")
        scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[match.group(2)]
        return float(match.group(1)) * scale

    totals = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", output)
    rate = re.search(r"Requests/sec:\s+([\d.]+)", output)
    if totals is None or rate is None:
        raise RuntimeError(f"cannot read wrk's output:\n{output}")
    seconds = (
        float(totals.group(2)) * {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}[totals.group(3)]
    )
    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", output)) + sum(
        int(n) for n in re.findall(r"Non-2xx or 3xx responses: (\d+)", output)
    )
    return {
        "requests": int(totals.group(1)),
        "seconds": seconds,
        "rate": float(rate.group(1)),
        "p50_ms": latency("50"),
        "p99_ms": latency("99"),
        "errors": errors,
    }


def format_table(
    results: dict[str, Measurement], args: argparse.Namespace, connections: int | None = None
) -> str:
    """The results as a Markdown table; the columns against the peer only when it ran."""
    connections = args.connections if connections is None else connections
    threads = min(args.threads, connections)
    peer = results.get(PEER)
    compared = peer is not None and peer.requests > 0 and bool(peer.rates)
    against = f" user vs {PEER} | req/s vs {PEER} |" if compared else ""
    lines = [
        f"wrk -t{threads} -c{connections} -d{args.duration:g}s x {args.rounds} rounds, "
        f"pipeline {args.pipeline}, {args.workers} worker(s), path {args.path}, "
        f"{os.cpu_count()} cores, Python {sys.version.split()[0]}",
        "",
        f"| server | req/s | p50 ms | p99 ms | user µs/req | sys µs/req | total µs/req |{against}"
        " errors |",
        "|---|" + "---:|" * (9 if compared else 7),
    ]
    for name, result in results.items():
        rate = statistics.median(result.rates)
        user, system = result.user_us(), result.system_us()
        ratios = ""
        if compared and peer is not None:
            ratios = (
                f" {user / peer.user_us():.2f}x | {rate / statistics.median(peer.rates):.2f}x |"
            )
        lines.append(
            f"| {name} | {rate:,.0f} | {median_ms(result.p50_ms)} "
            f"| {median_ms(result.p99_ms)} | {user:.2f} | {system:.2f} "
            f"| {user + system:.2f} |{ratios} {result.errors} |"
        )
    return "\n".join(lines)


def median_ms(values: list[float]) -> str:
    """The median of the rounds that have the figure; ``-`` when none has."""
    known = [value for value in values if not math.isnan(value)]
    return f"{statistics.median(known):.2f}" if known else "-"


def main(args: argparse.Namespace) -> int:
    counts: list[int] = args.connection_counts
    args.connections = counts[0]  # the one count of a single table, and of --asgi
    if args.asgi:
        if len(counts) > 1:
            print("forkloop bench --asgi takes one connection count", file=sys.stderr)
            return 2
        from . import asgi_bench

        return asgi_bench.main(args)
    if args.proxy:
        from . import proxy_bench

        return proxy_bench.main(args)
    if shutil.which("wrk") is None:
        print(
            "forkloop bench needs wrk: apt-get install wrk (or brew install wrk)", file=sys.stderr
        )
        return 2
    script = None
    if args.pipeline > 1:
        handle = tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False)
        handle.write(_PIPELINE_SCRIPT)
        handle.close()
        script = handle.name
    allow_open_files(2 * max(counts) + 256)  # wrk's and the server's ends, and then some
    servers = server_commands(args)
    results = {count: {server.name: Measurement() for server in servers} for count in counts}
    try:
        for server in servers:
            server.start()
            for count in counts:
                run_wrk(args, server.port, 1.0, script, count)  # warm-up, not counted
        for round_number in range(args.rounds):
            forward = round_number % 2 == 0
            for count in counts if forward else counts[::-1]:
                for server in servers if forward else servers[::-1]:
                    before = server.cpu()
                    run = run_wrk(args, server.port, args.duration, script, count)
                    results[count][server.name].add(run, server.cpu() - before)
                    print(
                        f"round {round_number + 1}, {count} connections: {server.name}: "
                        f"{run['rate']:,.0f} req/s",
                        file=sys.stderr,
                    )
    finally:
        for server in servers:
            server.stop()
        if script is not None:
            os.unlink(script)
    table = "\n\n".join(format_table(results[count], args, count) for count in counts)
    print(table)
    if args.output:
        with open(args.output, "w") as output:
            output.write(table + "\n")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
