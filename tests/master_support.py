"""Support for the master/worker tests: a supervised server process and a load loop.

`MasterUnderTest` starts ``python -m server`` with a master and workers and
tells the test which processes are its workers (children of the master, read
from ``/proc``). `LoadLoop` is a thread that keeps requests flowing, keep-alive
and new-connection alike, and counts what failed.

The load loop behaves as HTTP clients do (RFC 9112 9.3.1, urllib3, browsers):
when a *reused* keep-alive connection turns out closed before any byte of the
response arrived, an idempotent request is sent again once on a new
connection. That is the unavoidable keep-alive race, not a lost request; it is
counted separately as ``retried``.
"""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from loadtest.servers import descendants, free_port, wait_until_answering


def wait_for(condition: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    """Poll ``condition`` until it holds or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return condition()


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


class MasterUnderTest:
    def __init__(
        self,
        backend: str,
        tmp_path: Path,
        *options: str,
        app: str = "tests.apps.supervised:app",
        env: dict | None = None,
    ):
        self.port = free_port()
        self.pid_file = tmp_path / "forkloop.pid"
        self.log_path = tmp_path / "server.log"
        self.command = [
            sys.executable,
            "-m",
            "server",
            app,
            "--bind",
            f"127.0.0.1:{self.port}",
            "--loop",
            backend,
            "--pid-file",
            str(self.pid_file),
            *options,
        ]
        self.env = {**os.environ, **(env or {})}
        self.process: subprocess.Popen | None = None

    def start(self, workers: int | None = None) -> MasterUnderTest:
        self.log = open(self.log_path, "ab")  # noqa: SIM115
        self.process = subprocess.Popen(
            self.command, stdout=self.log, stderr=self.log, env=self.env
        )
        wait_until_answering(self.port, 20, self.process)
        if workers is not None:
            assert wait_for(lambda: len(self.ready_workers()) == workers, 10), self.tail()
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def workers(self) -> set[int]:
        """Live worker processes: the master's children (an upgraded master's excluded)."""
        return {pid for pid in descendants(self.pid)[1:] if _parent(pid) == self.pid and alive(pid)}

    def ready_workers(self) -> set[int]:
        return self.workers()

    def signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def get(self, path: str, timeout: float = 10) -> tuple[int, bytes]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            connection.request("GET", path)
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    def tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        if self.process is None:
            return
        tree = descendants(self.pid)
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                pass
        for pid in tree:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        if self.process.poll() is None:
            self.process.wait(5)
        self.log.close()


def _parent(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return int(stat.read().rpartition(")")[2].split()[1])
    except FileNotFoundError:
        return -1


class LoadLoop(threading.Thread):
    """Requests without pause until stopped: ``clients`` keep-alive loops and one churn loop."""

    def __init__(self, port: int, clients: int = 3, path: str = "/pid") -> None:
        super().__init__(daemon=True)
        self.port = port
        self.clients = clients
        self.path = path
        self.stopped = threading.Event()
        self.lock = threading.Lock()
        self.ok = 0
        self.failed = 0
        self.retried = 0
        self.errors: list[str] = []
        self.pids: set[int] = set()

    def run(self) -> None:
        threads = [
            threading.Thread(target=self._keep_alive_loop, daemon=True) for _ in range(self.clients)
        ]
        threads.append(threading.Thread(target=self._churn_loop, daemon=True))
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    def stop(self) -> LoadLoop:
        self.stopped.set()
        self.join(30)
        return self

    def _record(self, status: int | None, body: bytes, error: str = "") -> None:
        with self.lock:
            if status == 200 and body.isdigit():
                self.ok += 1
                self.pids.add(int(body))
            else:
                self.failed += 1
                self.errors.append(error or f"status {status} body {body[:80]!r}")

    def _keep_alive_loop(self) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=15)
        reused = False
        while not self.stopped.is_set():
            try:
                connection.request("GET", self.path)
                response = connection.getresponse()
                body = response.read()
                self._record(response.status, body)
                reused = not response.will_close
                if response.will_close:
                    connection.close()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as exc:
                connection.close()
                if reused:  # the keep-alive race: retry once on a new connection
                    with self.lock:
                        self.retried += 1
                    reused = False
                    continue
                self._record(None, b"", f"{type(exc).__name__}: {exc}")
            except OSError as exc:
                connection.close()
                reused = False
                self._record(None, b"", f"{type(exc).__name__}: {exc}")

    def _churn_loop(self) -> None:
        while not self.stopped.is_set():
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=15) as sock:
                    sock.sendall(
                        f"GET {self.path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode()
                    )
                    data = b""
                    while chunk := sock.recv(65536):
                        data += chunk
                head, _, body = data.partition(b"\r\n\r\n")
                status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/1.1 ") else None
                self._record(status, body)
            except OSError as exc:
                self._record(None, b"", f"{type(exc).__name__}: {exc}")
