"""Support for the master/worker tests: a supervised server process and a load loop.

`MasterUnderTest` starts ``python -m forkloop`` with a master and workers and
tells the test which processes are its workers (children of the master, read
from ``/proc``). The load that runs meanwhile is `loadtest.clients.LoadLoop`.
"""

from __future__ import annotations

import http.client
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from forkloop.loadtest.clients import LoadLoop  # noqa: F401 - the tests import it from here
from forkloop.loadtest.servers import descendants, free_port, wait_until_answering


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
    except OSError:  # gone, or going: ESRCH between open and read
        return False


class MasterUnderTest:
    def __init__(
        self,
        backend: str,
        tmp_path: Path,
        *options: str,
        app: str = "tests.server.apps.supervised:app",
        env: dict | None = None,
    ):
        self.port = free_port()
        self.pid_file = tmp_path / "forkloop.pid"
        self.log_path = tmp_path / "server.log"
        self.command = [
            sys.executable,
            "-m",
            "forkloop",
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
        return {
            pid for pid in descendants(self.pid)[1:] if parent_of(pid) == self.pid and alive(pid)
        }

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
        stop_tree(self.process, signal.SIGTERM)
        self.log.close()


def stop_tree(process: subprocess.Popen, signum: int) -> None:
    """Send ``signum`` to a server's master, give it 10 s, then SIGKILL whatever is
    left of the tree it had when asked to stop."""
    tree = descendants(process.pid)
    if process.poll() is None:
        process.send_signal(signum)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            pass
    for pid in tree:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)
    if process.poll() is None:
        process.wait(5)


def parent_of(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return int(stat.read().rpartition(")")[2].split()[1])
    except OSError:
        return -1
