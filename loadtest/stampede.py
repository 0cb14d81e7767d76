"""Stampede benchmark: 1,000 concurrent cold requests for one key, single-flight on and off.

    python -m forkloop.loadtest.stampede [--requests 1000] [--compute-ms 200] [--loop uvloop]
                                         [--workers 1,4] [--shared-cache off,on]
    python -m forkloop.loadtest.stampede --servers 2 [--cache-url redis://...] [...]

With ``--servers`` or ``--cache-url`` it is the fleet's benchmark instead:
several servers sharing one Redis store (`loadtest.fleet_stampede`, which
takes the rest of the options).

For each worker count and shared-cache setting, a server runs this module's
app (with ``--shared-cache on`` a cache process makes one fill per key for
the whole server, `server.shared_cache`). For each mode, the script opens
``--requests`` connections, sends one request for the same cold key on each
at once, and reports how many computations the server ran (from ``/stats``,
summed over the workers) and the latency every client saw. With single-flight on, the handler runs
once and everyone waits for it; off, every request computes.

Where a waiter's time goes: each worker writes down, for every answer of the
single-flight stampede, when its request reached the handler and when its
answer was ready to write, both counted from the moment the fill ended
(``CLOCK_MONOTONIC`` is one clock for every process of the machine; the fill
writes its end time and its pid into the value). A *waiter* arrived before the
fill ended: its delay after the fill's end is the wake-up (notification across
processes, then this worker's pass over its followers). A *late arrival* came
after: its delay is the server accepting and answering the rest of the 1,000
connections, which no notification scheme removes. The client's own latency
adds its loop's share (it runs on the same cores).

Then it compares the server's CPU per request for a cache hit against the
plain hello-world handler, with ``wrk`` (user + system µs per request, for
the whole server process tree, read from ``/proc``).
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

from ..server import App, Request, Response, cache_process
from ..server.cache import CachePolicy, ResponseCache
from ..server.shared_cache import SharedTier
from .servers import ServerProcess, free_port, python

app = App()


WAKE_ENV = "FORKLOOP_STAMPEDE_WAKE"  # a folder: each worker writes its answers' timings there


async def _compute(request: Request) -> Response:
    ms = request.query_param("ms", "200")
    assert ms is not None  # a default is given
    await asyncio.sleep(int(ms) / 1000)
    return Response(
        f"value of {request.params['key']} filled {time.monotonic():.6f} by {os.getpid()}\n",
        headers={"Cache-Control": "max-age=3600"},
    )


class WakeRecorder:
    """One worker's timings, written to its file in the ``WAKE_ENV`` folder half a
    second after the first (after the burst: no file write while it lasts)."""

    def __init__(self, folder: str) -> None:
        self.path = os.path.join(folder, f"{os.getpid()}.wake")
        self.lines: list[str] = []

    def record(self, arrived: float, request: Request, response: Response) -> None:
        ready = time.monotonic()
        words = response.body.split()  # b"value of KEY filled T by PID"
        filled, filler = words[4].decode(), words[6].decode()
        number = request.headers.get("x-request-number", "-")
        if not self.lines:
            asyncio.get_running_loop().call_later(0.5, self.flush)
        self.lines.append(f"{os.getpid()} {filler} {number} {filled} {arrived:.6f} {ready:.6f}\n")

    def flush(self) -> None:
        with open(self.path, "a") as timings:
            timings.writelines(self.lines)
        self.lines.clear()


def _route(path: str, policy: CachePolicy) -> None:
    folder = os.environ.get(WAKE_ENV)
    if not folder:
        app.get(path, cache=policy)(_compute)  # hits answered inline, as in any app
        return
    cached = app.cache.wrap(_compute, policy)
    recorder = WakeRecorder(folder)

    async def measured(request: Request) -> Response:
        arrived = time.monotonic()
        answer = cached(request)
        response: Response = await answer if inspect.isawaitable(answer) else answer
        recorder.record(arrived, request, response)
        return response

    app.get(path)(measured)


_route("/sf/{key}", CachePolicy(ttl=3600))
_route("/nosf/{key}", CachePolicy(ttl=3600, single_flight=False))


@app.get("/")
def hello(request: Request) -> Response:
    return Response(b"Hello, World!")


@app.get("/stats")
def stats(request: Request) -> Response:
    return Response.json(request.server_stats())


Sent = dict[int, tuple[float, float]]  # request number -> (sent, received), CLOCK_MONOTONIC


async def _one_request(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    path: str,
    number: int = 0,
    sent: Sent | None = None,
) -> float:
    started = time.monotonic()
    writer.write(
        f"GET {path} HTTP/1.1\r\nHost: bench\r\nX-Request-Number: {number}\r\n\r\n".encode()
    )
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
    body = await reader.readexactly(length)
    received = time.monotonic()
    if not head.startswith(b"HTTP/1.1 200") or not body.startswith(b"value of"):
        raise RuntimeError(f"bad answer: {head[:40]!r} {body[:40]!r}")
    if sent is not None:
        sent[number] = (started, received)
    return received - started


async def stampede(port: int, path: str, count: int, sent: Sent | None = None) -> list[float]:
    """Open ``count`` connections, then send one request for ``path`` on each at once:
    the latencies (and, into ``sent``, when each request went and its answer came)."""
    connections = await asyncio.gather(
        *(asyncio.open_connection("127.0.0.1", port) for _ in range(count))
    )
    try:
        return list(
            await asyncio.gather(
                *(_one_request(r, w, path, n, sent) for n, (r, w) in enumerate(connections))
            )
        )
    finally:
        for _, writer in connections:
            writer.close()


def get_json(port: int, path: str) -> dict[str, Any]:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
        document: dict[str, Any] = json.loads(response.read())  # /stats: a JSON object
        return document


def wrk_cpu(server: ServerProcess, path: str, seconds: int) -> tuple[float, float, float]:
    before = server.cpu()
    output = subprocess.run(
        ["wrk", "-t1", "-c50", f"-d{seconds}s", f"http://127.0.0.1:{server.port}{path}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    spent = server.cpu() - before
    requests = int(output.split(" requests in ")[0].split()[-1])
    rate = float(output.split("Requests/sec:")[1].split()[0])
    return spent.user / requests * 1e6, spent.system / requests * 1e6, rate


def server_command(port: int, loop: str, workers: int, shared: str) -> list[str]:
    return [
        python(),
        "-m",
        "forkloop",
        "forkloop.loadtest.stampede:app",
        "--bind",
        f"127.0.0.1:{port}",
        "--workers",
        str(workers),
        "--shared-cache",
        shared,
        "--loop",
        loop,
        "--log-level",
        "warning",
        "--backlog",
        "4096",
        "--no-access-log",
    ]


def settled_totals(port: int, answered: int, timeout: float = 5.0) -> dict[str, int]:
    """The server's cache counters once every worker has published the stampede's."""
    deadline = time.monotonic() + timeout
    while True:
        stats = get_json(port, "/stats")
        totals: dict[str, int] = stats.get("server") or {
            f"cache_{name}": value for name, value in stats["cache"].items()
        }
        if totals.get("cache_hits", 0) + totals.get("cache_misses", 0) >= answered:
            return totals
        if time.monotonic() > deadline:
            return totals
        time.sleep(0.1)  # workers publish their counters on their heartbeat


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, int(len(ordered) * fraction) - 1)] if ordered else float("nan")


def wake_split(folder: str, sent: Sent, workers: int, shared: str, fill_ms: int) -> tuple[Any, ...]:
    """Where each single-flight request's time went, in ms, from the workers' timings and
    the client's (one clock): sent -> reached the handler (accepting and reading, on
    busy cores), the fill's end -> its answer ready (the wake-up: for a waiter in another
    worker, the notification first), answer ready -> received (writing it, and the
    client's own loop)."""
    to_handler: list[float] = []
    wake: list[float] = []
    wake_elsewhere: list[float] = []
    to_client: list[float] = []
    late = 0
    for name in os.listdir(folder):
        with open(os.path.join(folder, name)) as timings:
            for line in timings:
                worker, filler, number, filled, arrived, ready = line.split()
                times = sent.get(int(number)) if number.isdigit() else None
                if times is None:
                    continue
                if float(arrived) >= float(filled):
                    late += 1  # reached the handler after the fill had ended: a plain hit
                to_handler.append((float(arrived) - times[0]) * 1000)
                to_client.append((times[1] - float(ready)) * 1000)
                if float(arrived) < float(filled):
                    wake.append((float(ready) - float(filled)) * 1000)
                    if worker != filler:
                        wake_elsewhere.append(wake[-1])
    latencies = [(received - started) * 1000 for started, received in sent.values()]
    return (
        workers,
        shared,
        len(wake),
        len(wake_elsewhere),
        late,
        percentile(to_handler, 0.5),
        percentile(to_handler, 0.99),
        min(wake_elsewhere, default=float("nan")),  # the notification's own delay
        percentile(wake, 0.5),
        percentile(wake, 0.99),
        percentile(to_client, 0.5),
        percentile(to_client, 0.99),
        percentile(latencies, 0.99) - fill_ms,
    )


def run_stampedes(
    args: argparse.Namespace, workers: int, shared: str
) -> tuple[list[tuple[Any, ...]], tuple[Any, ...] | None]:
    rows: list[tuple[Any, ...]] = []
    split = None
    port = free_port()
    modes = (("on", "/sf"), ("off", "/nosf")) if shared == "off" else (("on", "/sf"),)
    folder = tempfile.mkdtemp(prefix="forkloop-wake-")
    command = server_command(port, args.loop, workers, shared)
    try:
        with ServerProcess("stampede", command, port, env={WAKE_ENV: folder}):
            answered = 0
            for mode, prefix in modes:
                before = settled_totals(port, answered).get("cache_computations", 0)
                path = f"{prefix}/cold-{mode}?ms={args.compute_ms}"
                sent: Sent = {}
                latencies = sorted(asyncio.run(stampede(port, path, args.requests, sent)))
                answered += len(latencies)
                computations = settled_totals(port, answered)["cache_computations"] - before
                p99 = percentile(latencies, 0.99) * 1000
                if mode == "on":
                    time.sleep(1.0)  # each worker writes its timings after the burst
                    split = wake_split(folder, sent, workers, shared, args.compute_ms)
                rows.append(
                    (
                        workers,
                        shared,
                        mode,
                        len(latencies),
                        computations,
                        statistics.median(latencies) * 1000,
                        p99,
                        latencies[-1] * 1000,
                    )
                )
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return rows, split


def hit_costs(args: argparse.Namespace) -> str:
    """CPU per request of a cache hit against the hello-world handler (1 worker, wrk)."""
    port = free_port()
    with ServerProcess("stampede", server_command(port, args.loop, 1, "off"), port) as server:
        asyncio.run(stampede(port, "/sf/warm?ms=0", 1))
        hit = wrk_cpu(server, "/sf/warm?ms=0", args.wrk_seconds)
        hello_cost = wrk_cpu(server, "/", args.wrk_seconds)
    return (
        "\n| path | user µs/req | sys µs/req | req/s |\n|---|---:|---:|---:|\n"
        f"| cache hit `/sf/warm` | {hit[0]:.2f} | {hit[1]:.2f} | {hit[2]:,.0f} |\n"
        f"| hello `/` | {hello_cost[0]:.2f} | {hello_cost[1]:.2f} | {hello_cost[2]:,.0f} |"
    )


def _cpu_seconds(pid: int) -> float:
    """User + system CPU a process has used, from /proc (clock ticks)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _serve_many(cache: ResponseCache, targets: list[str]) -> None:
    policy = CachePolicy(ttl=3600)
    for target in targets:
        request = Request("GET", target.encode(), "1.1", [], ("127.0.0.1", 1), True)
        answer = cache.serve(request, _instant, policy)
        if inspect.isawaitable(answer):
            await answer


async def _instant(request: Request) -> Response:
    return Response(b"x" * 100, headers={"Cache-Control": "max-age=3600"})


def lookup_costs(count: int) -> str:
    """CPU per request (this process plus the cache process) of a local hit, a shared
    hit (another worker filled it) and a miss, shared tier off and on."""
    directory = tempfile.mkdtemp(prefix="forkloop-costs-")
    keeper_socket = cache_process.listen(os.path.join(directory, "cache.sock"))
    heartbeat = cache_process.Heartbeat(os.path.join(directory, "board"))
    pid = os.fork()
    if pid == 0:
        os._exit(cache_process.run(keeper_socket, 1 << 30, heartbeat))
    keeper_socket.close()
    path = os.path.join(directory, "cache.sock")

    async def measure() -> list[tuple[str, float]]:
        rows = []

        async def cost(name: str, cache: ResponseCache, targets: list[str]) -> None:
            cpu = time.process_time(), _cpu_seconds(pid)
            await _serve_many(cache, targets)
            spent = time.process_time() - cpu[0] + _cpu_seconds(pid) - cpu[1]
            rows.append((name, spent / len(targets) * 1e6))

        filler_tier, reader_tier = SharedTier(path, 1 << 20), SharedTier(path, 1 << 20)
        assert await filler_tier.connect() and await reader_tier.connect()
        local = ResponseCache(shared_tier=lambda: None)
        await _serve_many(local, ["/hot"])
        await cost("local hit", local, ["/hot"] * count)
        await cost("miss, shared tier off", local, [f"/off/{n}" for n in range(count)])
        filler = ResponseCache(shared_tier=lambda: filler_tier)
        reader = ResponseCache(shared_tier=lambda: reader_tier)
        await cost("miss, shared tier on", filler, [f"/on/{n}" for n in range(count)])
        await cost("shared hit (local miss)", reader, [f"/on/{n}" for n in range(count)])
        return rows

    try:
        rows = asyncio.run(measure())
    finally:
        os.kill(pid, signal.SIGTERM)
        os.waitpid(pid, 0)
        shutil.rmtree(directory, ignore_errors=True)
    lines = ["| lookup | CPU µs/request (worker + cache process) |", "|---|---:|"]
    lines += [f"| {name} | {micros:.1f} |" for name, micros in rows]
    return "\n".join(lines)


def main() -> int:
    if any(arg.startswith(("--servers", "--cache-url")) for arg in sys.argv[1:]):
        from .fleet_stampede import main as fleet_main

        return fleet_main()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--compute-ms", type=int, default=200)
    parser.add_argument("--loop", default="uvloop")
    parser.add_argument("--workers", default="1,4", help="worker counts to run, comma-separated")
    parser.add_argument("--shared-cache", default="off,on", help="off, on or off,on")
    parser.add_argument("--wrk-seconds", type=int, default=5)
    parser.add_argument("--lookups", type=int, default=20000, help="per row of the CPU table")
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(
        resource.RLIMIT_NOFILE, (max(soft, min(hard, 4 * args.requests + 256)), hard)
    )
    rows = []
    splits = []
    for workers in (int(n) for n in args.workers.split(",")):
        for shared in args.shared_cache.split(","):
            more, split = run_stampedes(args, workers, shared)
            rows += more
            if split is not None:
                splits.append(split)
    hit_note = hit_costs(args) if shutil.which("wrk") else ""
    hit_note += "\n\n" + lookup_costs(args.lookups)
    print(
        f"{args.requests} concurrent cold requests for one key, compute {args.compute_ms} ms, "
        f"loop {args.loop}, Python {sys.version.split()[0]}\n"
    )
    print(
        "| workers | shared cache | single-flight | requests | computations "
        "| p50 ms | p99 ms | max ms |"
    )
    print("|---:|---|---|---:|---:|---:|---:|---:|")
    for workers, shared, mode, count, computations, p50, p99, worst in rows:
        print(
            f"| {workers} | {shared} | {mode} | {count} | {computations} "
            f"| {p50:.0f} | {p99:.0f} | {worst:.0f} |"
        )
    print(
        "\nWhere a single-flight request's time went, ms (see the module's essay): "
        "sent → handler = accepting and reading it; wake = the fill's end → its answer "
        "ready (waiters only; in another worker, after the notification); ready → client "
        "= writing it and the client's loop reading it\n"
    )
    print(
        "| workers | shared cache | waiters | in other workers | late | sent → handler p50 "
        "| p99 | first answer in another worker | wake p50 | wake p99 | ready → client p50 "
        "| p99 | client p99 − fill |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for workers, shared, *figures in splits:
        counts = " | ".join(str(n) for n in figures[:3])
        times = " | ".join(f"{ms:.1f}" for ms in figures[3:])
        print(f"| {workers} | {shared} | {counts} | {times} |")
    print(hit_note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
