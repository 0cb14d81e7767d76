"""What the master's operations cost under load: reload, upgrade, kill -9, graceful stop.

    python -m forkloop.loadtest.supervision [--loop uvloop] [--workers 2] [--seconds 3]

For each operation a server (`forkloop serve --workers N`, the demo app) runs
under a steady load of keep-alive and new-connection requests
(`loadtest.clients.LoadLoop`), the operation happens mid-load, the load goes
on, and the table says how many requests succeeded, failed, or were retried
because a reused keep-alive connection had been closed under them (the
keep-alive race every HTTP/1.1 client retries). It also times how long the
master takes to replace a worker killed with SIGKILL.
"""

from __future__ import annotations

import argparse
import functools
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from typing import Protocol, TypeVar

from .clients import LoadLoop
from .servers import descendants, free_port, python, wait_until_answering

HELLO = b"Hello, World!"

T = TypeVar("T")


def _hello(body: bytes) -> bool:
    return body == HELLO


class Master(Protocol):
    """The master process a `Server` drives: first its own child (a `subprocess.Popen`),
    after an upgrade the new master it adopts (`_Adopted`)."""

    pid: int

    def wait(self, timeout: float) -> object: ...

    def kill(self) -> None: ...


class Server:
    def __init__(self, loop: str, workers: int, folder: str) -> None:
        self.port = free_port()
        self.pid_file = os.path.join(folder, f"forkloop-{self.port}.pid")
        command = [python(), "-m", "forkloop", "--bind", f"127.0.0.1:{self.port}", "--loop", loop]
        command += [
            "--workers",
            str(workers),
            "--pid-file",
            self.pid_file,
            "--log-level",
            "warning",
        ]
        self.workers_wanted = workers
        process = subprocess.Popen(command)
        self.process: Master = process
        wait_until_answering(self.port, 20, process)
        self.wait(lambda: len(self.workers()) == workers, 10)

    def workers(self, master: int | None = None) -> set[int]:
        master = master or self.process.pid
        return {pid for pid in descendants(master)[1:] if _parent(pid) == master}

    @staticmethod
    def wait(condition: Callable[[], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return True
            time.sleep(0.01)
        return False

    def stop(self) -> None:
        for pid in reversed(descendants(self.process.pid)):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()


def _parent(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return int(stat.read().rpartition(")")[2].split()[1])
    except OSError:
        return -1


def under_load(server: Server, seconds: float, operation: Callable[[], T]) -> tuple[LoadLoop, T]:
    load = LoadLoop(server.port, clients=3, path="/", check=_hello)
    load.start()
    time.sleep(seconds)
    detail = operation()
    time.sleep(seconds)
    load.stop()
    return load, detail


def reload(server: Server) -> str:
    old = server.workers()
    os.kill(server.process.pid, signal.SIGHUP)
    replaced = server.wait(
        lambda: server.workers().isdisjoint(old) and len(server.workers()) == server.workers_wanted,
        15,
    )
    return "all workers replaced" if replaced else "workers NOT replaced"


def upgrade(server: Server) -> str:
    old_master = server.process.pid
    os.kill(old_master, signal.SIGUSR2)
    new_masters: list[int] = []

    def new_master_ready() -> bool:
        for child in server.workers():
            if len(server.workers(child)) == server.workers_wanted:
                new_masters.append(child)
                return True
        return False

    if not server.wait(new_master_ready, 15):
        return "new master did NOT start"
    os.kill(old_master, signal.SIGWINCH)
    time.sleep(1.0)
    os.kill(old_master, signal.SIGQUIT)
    server.process.wait(15)
    server.process = _Adopted(new_masters[0])
    return f"old master {old_master} gone, new master {new_masters[0]} serving"


class _Adopted:
    """The upgraded master: not our child, but it has a pid."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def wait(self, timeout: float) -> None:
        Server.wait(lambda: not os.path.exists(f"/proc/{self.pid}"), timeout)

    def kill(self) -> None:
        os.kill(self.pid, signal.SIGKILL)


def respawn_times(server: Server, rounds: int) -> list[float]:
    times = []
    for _ in range(rounds):
        victim = min(server.workers())
        started = time.monotonic()
        os.kill(victim, signal.SIGKILL)

        def replaced(v: int = victim) -> bool:
            return v not in server.workers() and len(server.workers()) == server.workers_wanted

        server.wait(replaced, 5)
        times.append(time.monotonic() - started)
        time.sleep(0.3)
    return times


def graceful_quit(server: Server) -> tuple[int, int]:
    """Slow requests in flight when QUIT arrives: how many completed with 200."""
    results: list[int] = []

    def slow() -> None:
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{server.port}/slow?ms=1500", timeout=10
            ) as reply:
                results.append(reply.status)
        except OSError:
            results.append(0)

    threads = [threading.Thread(target=slow) for _ in range(10)]
    for thread in threads:
        thread.start()
    time.sleep(0.5)
    os.kill(server.process.pid, signal.SIGQUIT)
    for thread in threads:
        thread.join(15)
    server.process.wait(15)
    return sum(1 for status in results if status == 200), len(threads)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loop", default="uvloop")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--seconds", type=float, default=3.0, help="load before and after each operation"
    )
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name, operation in (
            ("HUP (reload)", reload),
            ("USR2 + WINCH + QUIT (upgrade)", upgrade),
        ):
            server = Server(args.loop, args.workers, folder)
            try:
                load, detail = under_load(
                    server, args.seconds, functools.partial(operation, server)
                )
            finally:
                server.stop()
            rows.append((name, load.ok, load.failed, load.retried, detail))
        server = Server(args.loop, args.workers, folder)
        try:
            load, _ = under_load(server, args.seconds, lambda: None)
            rows.append(("no operation (baseline)", load.ok, load.failed, load.retried, ""))
            times = respawn_times(server, 5)
            completed, in_flight = graceful_quit(server)
        finally:
            server.stop()
    print(
        f"loop {args.loop}, {args.workers} workers, load {args.seconds:g} s before and after each operation\n"
    )
    print("| operation under load | ok | failed | retried (keep-alive race) | note |")
    print("|---|---:|---:|---:|---|")
    for name, ok, failed, retried, detail in rows:
        print(f"| {name} | {ok} | {failed} | {retried} | {detail} |")
    print(
        f"\nkill -9 of a worker -> replacement serving: median {statistics.median(times) * 1000:.0f} ms, "
        f"max {max(times) * 1000:.0f} ms over {len(times)} kills"
    )
    print(f"QUIT with {in_flight} slow requests in flight: {completed} completed with 200")
    return 0 if all(row[2] == 0 for row in rows) and completed == in_flight else 1


if __name__ == "__main__":
    sys.exit(main())
