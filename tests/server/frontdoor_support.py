"""Support for the front-door tests: forkloop run as a user runs it.

`UserFolder` is a temporary folder holding the user's module and a
``server.py`` of the user's own that fails loudly if anything imports it, so
every test run from it also proves that nothing forkloop installs collides
with a user's ``server.py``. `Served` starts ``python -m forkloop`` in such a
folder, with the error log in a file, and waits for the master's ``ready``
line (or for the process to exit), always within a bound. `run_forkloop` runs
a command that is expected to end (a bad input, ``--check-config``).
"""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

from forkloop.loadtest.servers import descendants, free_port
from tests.server.master_support import alive, parent_of, stop_tree, wait_for

USER_SERVER_PY = (
    'raise SystemExit("the user\'s own server.py was imported: forkloop collided with it")\n'
)

HELLO_APP = """
import os
from forkloop.server import App, Response

app = App()


@app.get("/")
def hello(request):
    return Response("hello from the user's app")


@app.get("/pid")
def pid(request):
    return Response(str(os.getpid()))


@app.get("/slow")
async def slow(request):
    import asyncio
    import pathlib

    mark = request.query_param("mark")
    if mark:  # tells the test the handler runs
        pathlib.Path(mark).touch()
    await asyncio.sleep(int(request.query_param("ms", "1000")) / 1000)
    return Response(f"slow {os.getpid()}")
"""

ASGI_APP = """
import json

started = []


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                started.append(True)
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    body = json.dumps({"path": scope["path"], "lifespan": bool(started)}).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})
"""


def clean_environment(**extra: str) -> dict[str, str]:
    """The test's environment without FORKLOOP_* or WEB_CONCURRENCY from outside."""
    environment = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("FORKLOOP_") or key == "FORKLOOP_PROACTOR_ENGINE"
    }
    environment.pop("WEB_CONCURRENCY", None)
    environment.pop("PYTHONPATH", None)
    environment["PYTHONDONTWRITEBYTECODE"] = "1"
    environment.update(extra)
    return environment


class UserFolder:
    """A user's project folder: their modules, and a ``server.py`` that must not be imported."""

    def __init__(self, root: Path, app_source: str = HELLO_APP, module: str = "myapp") -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        (root / "server.py").write_text(USER_SERVER_PY)
        self.write(f"{module}.py", app_source)

    def write(self, name: str, text: str) -> Path:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path


def run_forkloop(
    *arguments: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    """``python -m forkloop ARGUMENTS`` in ``cwd``, expected to end by itself."""
    return subprocess.run(
        [sys.executable, "-m", "forkloop", *arguments],
        cwd=cwd,
        env=env or clean_environment(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def last_error_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    return lines[-1] if lines else ""


class Served:
    """``python -m forkloop`` serving from a user's folder, until stopped."""

    def __init__(
        self,
        folder: Path,
        *arguments: str,
        port: int | None = None,
        metrics: str = "off",
        env: dict[str, str] | None = None,
        bind: bool = True,
    ) -> None:
        self.folder = folder
        self.port = port or free_port()
        self.log_path = folder / f"forkloop-{self.port}.log"
        self.access_path = folder / f"access-{self.port}.log"
        command = [sys.executable, "-m", "forkloop", *arguments]
        if bind:
            command += ["--bind", f"127.0.0.1:{self.port}"]
        if metrics is not None and "--metrics-bind" not in arguments:
            command += ["--metrics-bind", metrics]
        self.command = command
        self.env = env or clean_environment()
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, ready: bool = True, timeout: float = 30) -> Served:
        with open(self.log_path, "ab") as log, open(self.access_path, "ab") as access:
            self.process = subprocess.Popen(
                self.command, cwd=self.folder, env=self.env, stdout=access, stderr=log
            )
        if ready:
            assert wait_for(lambda: "ready:" in self.log() or self.exited(), timeout), self.log()
            assert not self.exited(), self.log()
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def exited(self) -> bool:
        return self.process is not None and self.process.poll() is not None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def workers(self) -> set[int]:
        return {
            pid for pid in descendants(self.pid)[1:] if alive(pid) and parent_of(pid) == self.pid
        }

    def signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def wait(self, timeout: float = 20) -> int:
        assert self.process is not None
        return self.process.wait(timeout)

    def get(self, path: str, port: int | None = None, timeout: float = 10) -> tuple[int, bytes]:
        connection = http.client.HTTPConnection("127.0.0.1", port or self.port, timeout=timeout)
        try:
            connection.request("GET", path)
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    def stop(self) -> None:
        if self.process is not None:
            stop_tree(self.process, signal.SIGINT)


class InFlight:
    """A /slow request sent in a thread; ``running()`` once its handler has started,
    ``result()`` then holds (status, body) or the exception."""

    count = 0

    def __init__(self, served: Served, milliseconds: int) -> None:
        InFlight.count += 1
        self.mark = served.folder / f"handler-running-{served.port}-{InFlight.count}"
        path = f"/slow?ms={milliseconds}&mark={self.mark}"
        self.reply: object = None
        self.sent = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(served.port, path), daemon=True)
        self.thread.start()

    def running(self, timeout: float = 10) -> bool:
        return wait_for(self.mark.exists, timeout)

    def _run(self, port: int, path: str) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            connection.request("GET", path)
            self.sent.set()
            response = connection.getresponse()
            self.reply = (response.status, response.read())
        except Exception as exc:  # noqa: BLE001 - the test asserts on it
            self.reply = exc
        finally:
            connection.close()

    def result(self, timeout: float = 30) -> object:
        self.thread.join(timeout)
        return self.reply


def refused(port: int) -> bool:
    """True when nothing listens on the port (connection refused)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return False
    except ConnectionRefusedError:
        return True


def wait_for_line(served: Served, text: str, timeout: float = 15) -> bool:
    return wait_for(lambda: text in served.log(), timeout)
