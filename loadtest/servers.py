"""Servers under test, run as subprocesses, and what they cost in CPU.

`ServerProcess` starts a command, waits until it answers HTTP on its port,
and stops it (SIGTERM, then SIGKILL); its stderr is read all along and the
last lines kept for error messages. `forkloop_server()` is forkloop's demo app
on a loop backend. `tree_cpu()` reads user and system CPU
seconds from ``/proc/<pid>/stat`` for a process and every descendant, so a
pre-forking server is measured whole.
"""

from __future__ import annotations

import collections
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class CpuTime:
    user: float
    system: float

    def __sub__(self, other: CpuTime) -> CpuTime:
        return CpuTime(self.user - other.user, self.system - other.system)


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            text = stat.read().decode()
    except OSError:
        return None
    # the command name may hold spaces and parentheses: split after the last ')'
    return text[text.rindex(")") + 2 :].split()


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields is not None:
                children.setdefault(int(fields[1]), []).append(int(entry))
    found, queue = [], [pid]
    while queue:
        current = queue.pop()
        found.append(current)
        queue.extend(children.get(current, ()))
    return found


def tree_cpu(pid: int) -> CpuTime:
    user = system = 0
    for member in descendants(pid):
        fields = _stat_fields(member)
        if fields is not None:
            # fields[11], [12] are utime and stime (stat fields 14 and 15)
            user += int(fields[11])
            system += int(fields[12])
    return CpuTime(user / CLOCK_TICKS, system / CLOCK_TICKS)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]  # an AF_INET address: (host, port)
        return port


def wait_until_answering(
    port: int, timeout: float, process: subprocess.Popen[Any] | None = None
) -> None:
    """Poll until ``GET /`` on ``port`` answers, the process dies, or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    request = b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode} before answering")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                sock.sendall(request)
                if sock.recv(64).startswith(b"HTTP/1."):
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"server on port {port} did not answer within {timeout}s")


class ServerProcess:
    """A server command on a port: ``with ServerProcess(name, cmd, port) as server: ...``."""

    def __init__(self, name: str, command: list[str], port: int, env: dict[str, str] | None = None):
        self.name = name
        self.command = command
        self.port = port
        self.env = {**os.environ, **(env or {})}
        self.process: subprocess.Popen[bytes] | None = None
        self._stderr_lines: collections.deque[bytes] = collections.deque(maxlen=50)
        self._stderr_reader: threading.Thread | None = None

    def start(self, timeout: float = 20.0) -> ServerProcess:
        self.process = subprocess.Popen(
            self.command, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        # drained all along: a server that logs more than a pipe holds must not block on it
        self._stderr_reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._stderr_reader.start()
        try:
            wait_until_answering(self.port, timeout, self.process)
        except (RuntimeError, TimeoutError) as exc:
            self.stop()
            raise RuntimeError(f"{self.name}: {exc}\n{self.stderr_tail()}") from None
        return self

    def _read_stderr(self) -> None:
        assert self.process is not None and self.process.stderr is not None
        for line in self.process.stderr:
            self._stderr_lines.append(line)

    def stderr_tail(self) -> str:
        """The last lines the server wrote to stderr (all of them once it has exited)."""
        if self._stderr_reader is not None and self.process and self.process.poll() is not None:
            self._stderr_reader.join(2.0)
        return b"".join(self._stderr_lines).decode(errors="replace")[-2000:]

    def cpu(self) -> CpuTime:
        assert self.process is not None
        return tree_cpu(self.process.pid)

    def stop(self, grace: float = 5.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(grace)
        except subprocess.TimeoutExpired:
            for pid in reversed(descendants(self.process.pid)):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.process.wait(grace)

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def python() -> str:
    return sys.executable


def forkloop_server(loop: str, workers: int, extra: list[str] | None = None) -> ServerProcess:
    """forkloop serving its demo app with ``loop`` on a free port of 127.0.0.1."""
    port = free_port()
    command = [python(), "-m", "forkloop", "--bind", f"127.0.0.1:{port}", "--loop", loop]
    command += ["--workers", str(workers), "--log-level", "warning"]
    # as the peers run: no access log, no metrics listener (unless ``extra`` asks)
    command += ["--no-access-log", "--metrics-bind", "off", *(extra or [])]
    return ServerProcess(f"forkloop {loop}", command, port)
