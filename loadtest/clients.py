"""Load that keeps flowing while a server is reloaded, upgraded or has workers killed.

`LoadLoop` is a thread that keeps requests going without pause: a few
keep-alive clients and one that opens a new connection per request. It counts
what succeeded and what failed, and which worker pids answered.

It behaves as HTTP clients do (RFC 9112 9.3.1, urllib3, browsers): when a
*reused* keep-alive connection turns out closed before any byte of the
response arrived, an idempotent request is sent again once on a new
connection. That is HTTP/1.1's keep-alive race, not a lost request; it is
counted separately as ``retried``.
"""

from __future__ import annotations

import http.client
import socket
import threading
from collections.abc import Callable


def _is_pid(body: bytes) -> bool:
    return body.isdigit()


class LoadLoop(threading.Thread):
    """Requests without pause until stopped: ``clients`` keep-alive loops and one churn loop."""

    def __init__(
        self,
        port: int,
        clients: int = 3,
        path: str = "/pid",
        check: Callable[[bytes], bool] = _is_pid,
    ) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.clients = clients
        self.path = path
        self.check = check
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
            if status == 200 and self.check(body):
                self.ok += 1
                if body.isdigit():
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
