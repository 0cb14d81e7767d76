"""Soak: a bounded mixed load on every backend; memory and descriptors must stay flat.

    python -m forkloop.loadtest.soak [--loops asyncio,uvloop] [--duration 600] [--workers 2]
    python -m forkloop.loadtest.soak --short            # 20 s per backend, for CI

For each backend, `forkloop serve --workers 2` (the demo app) runs as a
subprocess under a mixed load from client threads:

* ``hello``: keep-alive ``GET /``;
* ``churn``: a new connection per request (``Connection: close``);
* ``echo``: keep-alive ``POST /echo`` with bodies up to 32 KiB, compared byte
  for byte;
* ``cached``: ``GET /cached/kN?ms=5`` over 64 keys (hits, misses, single-flight
  fills, stale refreshes);
* ``stream``: a chunked ``GET /stream`` of 64 KiB;
* ``abandon``: ``GET /slow?ms=5000`` dropped after 50 ms (half by FIN, half by
  RST), so the server cancels a handler mid-flight.

Every few seconds the resident set (``VmRSS`` in ``/proc/<pid>/status``) and
the open descriptors (``/proc/<pid>/fd``) of the master and each worker are
sampled. After a warm-up (a fifth of the run; half of a run of a minute or
less) the slope of each is fitted by least squares; the table gives the largest slope over the processes, in KiB
and descriptors per minute. When the load stops and the server is idle again,
each process must hold exactly the descriptors it held before the load.

The exit status is 1 on any failed request (an abandoned one is not a
failure), a descriptor left behind, or a slope above ``--max-rss-slope`` /
``--max-fd-slope``. Short runs are noisy, so their thresholds only catch a
steep climb; the 10-minute run is the one whose slope means something.
"""

from __future__ import annotations

import argparse
import http.client
import os
import random
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..server import backends
from .servers import ServerProcess, descendants, free_port, python

HELLO = b"Hello, World!"
TIMEOUT = 15.0  # seconds any one request may take before it counts as failed


# ---------------------------------------------------------------------- counting


@dataclass
class Tally:
    """Requests by kind: succeeded, failed, abandoned on purpose; the first errors."""

    ok: dict[str, int] = field(default_factory=dict)
    failed: dict[str, int] = field(default_factory=dict)
    abandoned: int = 0
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def success(self, kind: str) -> None:
        with self.lock:
            self.ok[kind] = self.ok.get(kind, 0) + 1

    def failure(self, kind: str, error: str) -> None:
        with self.lock:
            self.failed[kind] = self.failed.get(kind, 0) + 1
            if len(self.errors) < 10:
                self.errors.append(f"{kind}: {error}")

    @property
    def requests(self) -> int:
        return sum(self.ok.values()) + sum(self.failed.values()) + self.abandoned

    @property
    def failures(self) -> int:
        return sum(self.failed.values())


# ---------------------------------------------------------------------- the load

Check = Callable[[http.client.HTTPResponse, bytes], bool]


class KeepAliveClient:
    """One http.client connection, reopened after a failure."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.connection: http.client.HTTPConnection | None = None

    def request(
        self, method: str, path: str, body: bytes | None = None, close: bool = False
    ) -> tuple[http.client.HTTPResponse, bytes]:
        if self.connection is None:
            self.connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=TIMEOUT)
        headers = {"Connection": "close"} if close else {}
        try:
            self.connection.request(method, path, body=body, headers=headers)
            response = self.connection.getresponse()
            data = response.read()
        except BaseException:
            self.close()
            raise
        if response.will_close:
            self.close()
        return response, data

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close()
            self.connection = None


def run_kind(kind: str, port: int, stop: threading.Event, tally: Tally, seed: int) -> None:
    """Send requests of one kind until ``stop`` is set."""
    rng = random.Random(seed)
    client = KeepAliveClient(port)
    try:
        while not stop.is_set():
            if kind == "abandon":
                abandon_slow_request(port, rng)
                with tally.lock:
                    tally.abandoned += 1
                continue
            method, path, body, check = next_request(kind, rng)
            try:
                response, data = client.request(method, path, body, close=kind == "churn")
            except (OSError, http.client.HTTPException) as exc:
                tally.failure(kind, f"{method} {path}: {type(exc).__name__}: {exc}")
                continue
            if response.status == 200 and check(data):
                tally.success(kind)
            else:
                tally.failure(kind, f"{method} {path}: {response.status} {data[:60]!r}")
    finally:
        client.close()


def next_request(
    kind: str, rng: random.Random
) -> tuple[str, str, bytes | None, Callable[[bytes], bool]]:
    if kind in ("hello", "churn"):
        return "GET", "/", None, lambda data: data == HELLO
    if kind == "echo":
        body = rng.randbytes(rng.choice((0, 1, 100, 4096, 32768)))
        return "POST", "/echo", body, lambda data: data == body
    if kind == "cached":
        key = f"k{rng.randrange(64)}"
        return "GET", f"/cached/{key}?ms=5", None, lambda data: data == f"value of {key}\n".encode()
    if kind == "stream":
        return "GET", "/stream?chunks=16&size=4096", None, lambda data: len(data) == 65536
    raise ValueError(f"unknown kind of request {kind!r}")


def abandon_slow_request(port: int, rng: random.Random) -> None:
    """Ask for a 5 s answer, then leave after 50 ms: by FIN or, half the time, by RST."""
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    except OSError:
        return
    try:
        sock.sendall(b"GET /slow?ms=5000 HTTP/1.1\r\nHost: soak\r\n\r\n")
        time.sleep(0.05)
        if rng.random() < 0.5:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    finally:
        sock.close()


KINDS = ("hello", "hello", "churn", "echo", "cached", "stream", "abandon")


# ---------------------------------------------------------------------- sampling


def process_rss_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def process_fds(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


@dataclass
class Samples:
    """(seconds since start, RSS KiB, descriptors) per process."""

    by_pid: dict[int, list[tuple[float, int, int]]] = field(default_factory=dict)

    def take(self, root: int, elapsed: float) -> None:
        for pid in descendants(root):
            rss, fds = process_rss_kib(pid), process_fds(pid)
            if rss is not None and fds is not None:
                self.by_pid.setdefault(pid, []).append((elapsed, rss, fds))


def slope_per_minute(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of ``(seconds, value)`` points, per minute."""
    if len(points) < 2:
        return 0.0
    mean_t = sum(t for t, _ in points) / len(points)
    mean_v = sum(v for _, v in points) / len(points)
    spread = sum((t - mean_t) ** 2 for t, _ in points)
    if spread == 0:
        return 0.0
    return 60 * sum((t - mean_t) * (v - mean_v) for t, v in points) / spread


def settled_fds(root: int, timeout: float = 10.0) -> dict[int, int]:
    """Descriptors per process once the server is idle (two equal readings in a row)."""
    deadline = time.monotonic() + timeout
    previous: dict[int, int] = {}
    while True:
        current = {pid: process_fds(pid) or 0 for pid in descendants(root)}
        if current == previous or time.monotonic() > deadline:
            return current
        previous = current
        time.sleep(0.5)


# ---------------------------------------------------------------------- one backend


@dataclass
class SoakResult:
    loop: str
    seconds: float
    tally: Tally
    rss_slope: float  # KiB/min, largest over the processes
    fd_slope: float  # descriptors/min, largest over the processes
    rss_start: int  # KiB, all processes, first sample after the warm-up
    rss_end: int
    fds_before: dict[int, int]
    fds_after: dict[int, int]
    processes: int

    @property
    def leaked_fds(self) -> int:
        return sum(
            max(0, self.fds_after.get(pid, 0) - before) for pid, before in self.fds_before.items()
        )


def soak(loop: str, duration: float, workers: int, interval: float, warm_up: float) -> SoakResult:
    port = free_port()
    command = [python(), "-m", "forkloop", "--bind", f"127.0.0.1:{port}", "--loop", loop]
    command += ["--workers", str(workers), "--log-level", "warning"]
    with ServerProcess(f"forkloop-{loop}", command, port) as server:
        assert server.process is not None  # started by the with statement
        root = server.process.pid
        wait_for_workers(root, workers)
        fds_before = settled_fds(root)
        tally, samples, stop = Tally(), Samples(), threading.Event()
        threads = [
            threading.Thread(target=run_kind, args=(kind, port, stop, tally, n), daemon=True)
            for n, kind in enumerate(KINDS)
        ]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        while (elapsed := time.monotonic() - started) < duration:
            samples.take(root, elapsed)
            time.sleep(min(interval, max(0.0, duration - elapsed)))
        samples.take(root, time.monotonic() - started)
        stop.set()
        for thread in threads:
            thread.join(TIMEOUT + 5)
        seconds = time.monotonic() - started
        fds_after = settled_fds(root)
    rss_slopes, fd_slopes, rss_start, rss_end = [], [], 0, 0
    for points in samples.by_pid.values():
        kept = [point for point in points if point[0] >= warm_up]
        if len(kept) < 2:
            continue
        rss_slopes.append(slope_per_minute([(t, rss) for t, rss, _ in kept]))
        fd_slopes.append(slope_per_minute([(t, fds) for t, _, fds in kept]))
        rss_start += kept[0][1]
        rss_end += kept[-1][1]
    return SoakResult(
        loop,
        seconds,
        tally,
        max(rss_slopes, default=0.0),
        max(fd_slopes, default=0.0),
        rss_start,
        rss_end,
        fds_before,
        fds_after,
        len(samples.by_pid),
    )


def wait_for_workers(root: int, workers: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while len(descendants(root)) < workers + 1:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{workers} workers did not start within {timeout}s")
        time.sleep(0.1)


# ---------------------------------------------------------------------- the report


def report(results: list[SoakResult], args: argparse.Namespace) -> bool:
    """Print the table; True when every backend passed."""
    print(
        f"soak: {args.duration:g} s per backend, {args.workers} workers, "
        f"Python {sys.version.split()[0]}; slopes after a {args.warm_up:g} s warm-up, "
        f"largest over the {results[0].processes if results else 0} processes\n"
    )
    print(
        "| loop | requests | req/s | failed | abandoned | RSS KiB/min | RSS MiB start→end "
        "| fds/min | fds left behind | verdict |"
    )
    print("|---|---:|---:|---:|---:|---:|---|---:|---:|---|")
    passed = True
    for result in results:
        tally = result.tally
        problems = []
        if tally.failures:
            problems.append(f"{tally.failures} failed")
        if result.leaked_fds:
            problems.append(f"{result.leaked_fds} fds left")
        if result.rss_slope > args.max_rss_slope:
            problems.append("RSS grows")
        if result.fd_slope > args.max_fd_slope:
            problems.append("fds grow")
        passed = passed and not problems
        print(
            f"| {result.loop} | {tally.requests} | {tally.requests / result.seconds:,.0f} "
            f"| {tally.failures} | {tally.abandoned} | {result.rss_slope:+.0f} "
            f"| {result.rss_start / 1024:.1f}→{result.rss_end / 1024:.1f} "
            f"| {result.fd_slope:+.1f} | {result.leaked_fds} "
            f"| {'ok' if not problems else ', '.join(problems)} |"
        )
    for result in results:
        for error in result.tally.errors:
            print(f"  {result.loop}: {error}")
    return passed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--loops",
        default=",".join(backends.available()),
        help="comma-separated backends (default: every one available here)",
    )
    parser.add_argument("--duration", type=float, default=600.0, help="seconds per backend")
    parser.add_argument("--short", action="store_true", help="20 s per backend (CI)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--interval", type=float, default=None, help="seconds between samples")
    parser.add_argument(
        "--warm-up", type=float, default=None, help="seconds before slopes are fitted"
    )
    parser.add_argument("--max-rss-slope", type=float, default=None, help="KiB/min per process")
    parser.add_argument("--max-fd-slope", type=float, default=None, help="fds/min per process")
    args = parser.parse_args(argv)
    if args.short:
        args.duration = 20.0
    if args.interval is None:
        args.interval = 1.0 if args.duration <= 60 else 5.0
    if args.warm_up is None:
        args.warm_up = args.duration / 2 if args.duration <= 60 else args.duration / 5
    if args.max_rss_slope is None:
        # Ten seconds of slope say little (proactor's buffer pools fill for up to ~15 s:
        # +16 MiB/min fitted from 4 s, +0.8 from 10 s, +68 KiB/min over 90 s), so a
        # short run flags only a steep climb. Over 10 minutes, 256 KiB/min is 2.5 MiB:
        # a leak, not a cache filling.
        args.max_rss_slope = 16384.0 if args.duration <= 60 else 256.0
    if args.max_fd_slope is None:  # connections in flight at a sample are noise
        args.max_fd_slope = 60.0 if args.duration <= 60 else 2.0
    results = [
        soak(loop, args.duration, args.workers, args.interval, args.warm_up)
        for loop in args.loops.split(",")
        if loop
    ]
    return 0 if report(results, args) else 1


if __name__ == "__main__":
    sys.exit(main())
