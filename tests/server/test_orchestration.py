"""Signals and readiness as Kubernetes, Docker and systemd use them.

An orchestrator sends SIGTERM and waits; it routes traffic once a health
check answers. These tests do the same to ``python -m forkloop`` run from a
user's folder: SIGTERM drains (a second one, or SIGINT, is fast), a rolling
stop under load loses no request, the server answers nothing until every
worker has booted, and the health path answers for any app.
"""

from __future__ import annotations

import http.client
import os
import signal
import threading
import time

import pytest

from tests.server.frontdoor_support import InFlight, Served, UserFolder, refused, wait_for_line
from tests.server.master_support import wait_for

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def folder(tmp_path):
    return UserFolder(tmp_path / "project")


@pytest.fixture
def serve(folder):
    started: list[Served] = []

    def start(*arguments: str, ready: bool = True, **options) -> Served:
        served = Served(folder.root, "myapp:app", *arguments, **options)
        started.append(served)
        return served.start(ready=ready)

    yield start
    for served in started:
        served.stop()


def test_sigterm_lets_in_flight_requests_finish_then_exits_0(serve):
    served = serve("--workers", "1", "--graceful-timeout", "20")
    request = InFlight(served, 1500)
    assert request.running()
    served.signal(signal.SIGTERM)
    assert wait_for(lambda: refused(served.port), 5), "still accepting after SIGTERM"
    reply = request.result()
    assert isinstance(reply, tuple) and reply[0] == 200 and reply[1].startswith(b"slow "), reply
    assert served.wait(20) == 0
    log = served.log()
    assert "graceful shutdown requested (SIGTERM)" in log
    assert "exited (signal" not in log


def test_second_sigterm_makes_the_stop_fast(serve):
    served = serve("--workers", "1", "--graceful-timeout", "60")
    request = InFlight(served, 30000)
    assert request.running()
    served.signal(signal.SIGTERM)
    assert wait_for_line(served, "got SIGTERM: graceful shutdown")
    started = time.monotonic()
    served.signal(signal.SIGTERM)
    reply = request.result()
    assert isinstance(reply, tuple) and reply[0] == 503, reply
    assert served.wait(20) == 0
    assert time.monotonic() - started < 10
    assert "fast shutdown requested (SIGTERM during the graceful one)" in served.log()


def test_sigint_is_fast_and_the_log_says_so_from_the_operators_side(serve):
    served = serve("--workers", "2")
    request = InFlight(served, 30000)
    assert request.running()
    served.signal(signal.SIGINT)
    reply = request.result()
    assert isinstance(reply, tuple) and reply[0] == 503, reply
    assert served.wait(20) == 0
    log = served.log()
    assert log.count("stopped: fast shutdown requested (SIGINT)") == 2, log
    assert "exited (signal" not in log and "died" not in log, log


def test_term_fast_keeps_nginx_meaning(serve):
    served = serve("--workers", "1", "--term", "fast")
    request = InFlight(served, 30000)
    assert request.running()
    served.signal(signal.SIGTERM)
    reply = request.result()
    assert isinstance(reply, tuple) and reply[0] == 503, reply
    assert served.wait(20) == 0


def test_rolling_stop_under_load_loses_no_request(folder, backend):
    """Two servers behind a client that moves on when a connection is refused, as a load
    balancer does; one gets SIGTERM and is waited for. Every request sent gets its 200."""
    options = ("--workers", "2", "--loop", backend.backend, "--no-access-log")
    first = Served(folder.root, "myapp:app", *options).start()
    second = Served(folder.root, "myapp:app", *options).start()
    load = RoundRobinLoad([first.port, second.port])
    try:
        load.start()
        assert wait_for(lambda: load.ok[first.port] > 100, 20), load.summary()
        first.signal(signal.SIGTERM)
        assert first.wait(30) == 0, first.log()
        after = load.ok[second.port]
        assert wait_for(lambda: load.ok[second.port] > after + 100, 20), load.summary()
    finally:
        load.stop()
        first.stop()
        second.stop()
    assert load.lost == [], load.summary()
    assert load.refused > 0  # the stopped server refused connections: none were reset


class RoundRobinLoad:
    """Threads sending GETs (a new connection each) to the ports in turn."""

    def __init__(self, ports: list[int], threads: int = 6) -> None:
        self.ports = ports
        self.ok = dict.fromkeys(ports, 0)
        self.lost: list[str] = []
        self.refused = 0
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(i,)) for i in range(threads)]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def stop(self) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(30)

    def summary(self) -> str:
        return f"ok={self.ok} refused={self.refused} lost={self.lost[:5]}"

    def _run(self, index: int) -> None:
        turn = index
        while not self.stopping.is_set():
            port = self.ports[turn % len(self.ports)]
            turn += 1
            path = "/slow?ms=20" if turn % 3 == 0 else "/"
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
            try:
                connection.connect()
            except ConnectionRefusedError:
                with self.lock:
                    self.refused += 1
                continue  # as a balancer does: this backend is gone, try the next
            try:
                connection.request("GET", path)
                response = connection.getresponse()
                body = response.read()
                if response.status != 200:
                    raise RuntimeError(f"{response.status} {body[:60]!r}")
                with self.lock:
                    self.ok[port] += 1
            except Exception as exc:  # noqa: BLE001 - every failure after connecting is a loss
                with self.lock:
                    self.lost.append(f"{port} {path}: {exc!r}")
            finally:
                connection.close()


def test_server_answers_only_once_every_worker_has_booted(folder, tmp_path):
    release = tmp_path / "release"
    folder.write(
        "slowboot.py",
        "import os, time, pathlib\n"
        f"pathlib.Path({str(tmp_path)!r}, f'booting-{{os.getpid()}}').touch()\n"
        f"while not pathlib.Path({str(release)!r}).exists():\n"
        "    time.sleep(0.01)\n"
        "from myapp import app\n",
    )
    served = Served(folder.root, "slowboot:app", "--workers", "2").start(ready=False)
    try:
        assert wait_for(lambda: len(list(tmp_path.glob("booting-*"))) == 2, 20), served.log()
        assert refused(served.port), "answering before the workers have booted"
        release.touch()
        assert wait_for_line(served, "ready: 2 workers serving on", 20), served.log()
        assert served.get("/") == (200, b"hello from the user's app")
    finally:
        served.stop()


def test_health_path_is_answered_for_an_app_without_one(serve):
    served = serve("--workers", "1")
    assert served.get("/healthz") == (200, b"ok\n")
    assert served.get("/nothing")[0] == 404


def test_health_path_can_be_moved_or_turned_off(serve):
    moved = serve("--workers", "1", "--health-path", "/ready")
    assert moved.get("/ready") == (200, b"ok\n")
    assert moved.get("/healthz")[0] == 404
    off = serve("--workers", "1", "--health-path", "off")
    assert off.get("/healthz")[0] == 404


@pytest.mark.parametrize("mode", [[], ["--no-master"]], ids=["master", "no-master"])
def test_unix_socket_file_is_removed_on_exit(serve, tmp_path, mode):
    path = tmp_path / "app.sock"
    served = serve("--workers", "1", "--uds", str(path), *mode, ready=not mode)
    assert wait_for(lambda: path.exists() and "serving on" in served.log(), 20), served.log()
    served.signal(signal.SIGTERM)
    assert served.wait(20) == 0
    assert not path.exists()


def test_master_log_names_the_loop_and_counts_workers_in_words(serve):
    served = serve("--workers", "1", "--loop", "asyncio")
    log = served.log()
    assert "starting 1 worker on" in log and "loop asyncio" in log, log
    assert "ready: 1 worker serving on" in log


def test_upgrade_with_reuse_port_takes_over_its_own_port(serve, tmp_path):
    pid_file = tmp_path / "forkloop.pid"
    served = serve("--workers", "1", "--reuse-port", "--pid-file", str(pid_file))
    served.signal(signal.SIGUSR2)
    assert wait_for(lambda: served.log().count("ready: 1 worker serving") == 2, 20), served.log()
    assert "another process already serves" not in served.log()
    new_master = int(pid_file.read_text())
    assert new_master != served.pid
    served.signal(signal.SIGQUIT)  # the old master leaves; the new one serves on
    assert served.wait(20) == 0
    assert served.get("/") == (200, b"hello from the user's app")
    os.kill(new_master, signal.SIGTERM)
    assert wait_for(lambda: refused(served.port), 20)
