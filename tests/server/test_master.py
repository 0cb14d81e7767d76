"""The master and its workers: real processes, real signals, on every loop backend."""

from __future__ import annotations

import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.server.master_support import LoadLoop, MasterUnderTest, alive, parent_of, wait_for

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def start_master(backend, tmp_path):
    masters: list[MasterUnderTest] = []

    def start(*options: str, workers: int = 2, **kwargs) -> MasterUnderTest:
        master = MasterUnderTest(
            backend.backend, tmp_path, "--workers", str(workers), *options, **kwargs
        )
        masters.append(master)
        return master.start(workers=workers)

    yield start
    for master in masters:
        master.stop()


def test_workers_serve_and_requests_spread_over_more_than_one_pid(start_master):
    master = start_master(workers=2)
    assert master.pid_file.read_text().strip() == str(master.pid)

    def ask(_: int) -> bytes:
        return master.get("/slow?ms=100")[1]

    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(ask, range(40)))
    pids = {int(answer.split()[1]) for answer in answers}
    assert pids <= master.workers()
    assert len(pids) == 2


def test_killed_worker_is_replaced_within_a_second(start_master):
    master = start_master(workers=2)
    victim = min(master.workers())
    started = time.monotonic()
    signal_worker(victim, signal.SIGKILL)
    assert wait_for(lambda: victim not in master.workers() and len(master.workers()) == 2, 1.5)
    respawn = time.monotonic() - started
    assert respawn < 1.0, f"respawn took {respawn:.2f}s"
    assert master.get("/")[0] == 200


def test_reload_under_load_fails_nothing_and_replaces_every_worker(start_master):
    master = start_master(workers=2)
    old = master.workers()
    load = LoadLoop(master.port)
    load.start()
    assert wait_for(lambda: load.ok > 200, 10)
    master.signal(signal.SIGHUP)
    assert wait_for(lambda: master.workers().isdisjoint(old) and len(master.workers()) == 2, 15), (
        master.tail()
    )
    seen_before = load.ok
    assert wait_for(lambda: load.ok > seen_before + 200, 10)
    load.stop()
    assert load.failed == 0, load.errors[:5]
    assert load.ok > 400
    assert master.workers().isdisjoint(old)


def test_reload_with_a_broken_app_keeps_the_old_workers(backend, tmp_path):
    module = tmp_path / "reloadable_app.py"
    module.write_text(GOOD_APP)
    master = MasterUnderTest(
        backend.backend,
        tmp_path,
        "--workers",
        "2",
        app="reloadable_app:app",
        env={"PYTHONPATH": str(tmp_path), "PYTHONDONTWRITEBYTECODE": "1"},
    )
    try:
        master.start(workers=2)
        # both workers must have imported the module before it is broken
        assert wait_for(lambda: master.tail().count("serving on") >= 2, 10), master.tail()
        old = master.workers()
        module.write_text("this is not python (\n")
        master.signal(signal.SIGHUP)
        assert wait_for(lambda: "reload failed" in master.tail(), 10), master.tail()
        time.sleep(0.3)  # let any stray new worker be reaped before checking
        assert master.workers() == old
        assert master.get("/")[1] == b"version 1"
        module.write_text(GOOD_APP.replace("version 1", "version 2"))
        master.signal(signal.SIGHUP)
        assert wait_for(lambda: master.workers().isdisjoint(old) and len(master.workers()) == 2, 15)
        assert master.get("/")[1] == b"version 2"
    finally:
        master.stop()


GOOD_APP = """
from forkloop.server import App, Response
app = App()
app.get("/")(lambda request: Response("version 1"))
"""


def test_quit_lets_the_slow_request_finish_then_refuses_and_exits(start_master):
    master = start_master(workers=1)
    result: dict = {}

    def slow() -> None:
        result["reply"] = master.get("/slow?ms=1500")

    thread = threading.Thread(target=slow)
    thread.start()
    time.sleep(0.3)  # the request must be in flight when QUIT arrives
    master.signal(signal.SIGQUIT)
    assert wait_for(lambda: _refused(master.port), 3), "listeners still open after QUIT"
    thread.join(10)
    assert result["reply"][0] == 200
    assert master.process.wait(10) == 0
    assert not master.pid_file.exists()


def test_term_stops_the_whole_tree_within_the_grace(start_master):
    master = start_master(workers=2)
    tree = {master.pid, *master.workers()}
    started = time.monotonic()
    master.signal(signal.SIGTERM)
    assert master.process.wait(10) == 0
    assert time.monotonic() - started < 6
    assert wait_for(lambda: not any(alive(pid) for pid in tree), 2)


def test_blocked_worker_is_killed_and_replaced_after_the_worker_timeout(start_master):
    master = start_master("--worker-timeout", "1", workers=1)
    (blocked,) = master.workers()
    threading.Thread(target=lambda: _swallow(master.get, "/block?s=30", 40), daemon=True).start()
    assert wait_for(lambda: blocked not in master.workers() and len(master.workers()) == 1, 6), (
        master.tail()
    )
    assert "missed its heartbeat" in master.tail()
    assert master.get("/")[0] == 200


def test_ttin_and_ttou_change_the_worker_count(start_master):
    master = start_master(workers=1)
    master.signal(signal.SIGTTIN)
    assert wait_for(lambda: len(master.workers()) == 2, 5)
    master.signal(signal.SIGTTIN)
    assert wait_for(lambda: len(master.workers()) == 3, 5)
    master.signal(signal.SIGTTOU)
    assert wait_for(lambda: len(master.workers()) == 2, 5)


def test_max_requests_recycles_workers_without_failing_requests(start_master):
    master = start_master("--max-requests", "300", "--max-requests-jitter", "50", workers=2)
    first = master.workers()
    load = LoadLoop(master.port)
    load.start()
    assert wait_for(lambda: len(load.pids - first) >= 2, 30), "workers were not recycled"
    load.stop()
    assert load.failed == 0, load.errors[:5]
    assert len(master.workers()) == 2


def test_binary_upgrade_keeps_serving_without_failures(start_master):
    master = start_master(workers=2)
    old_workers = master.workers()
    load = LoadLoop(master.port)
    load.start()
    assert wait_for(lambda: load.ok > 200, 10)
    master.signal(signal.SIGUSR2)
    new_master = wait_for_new_master(master)
    assert wait_for(lambda: len(children_of(new_master)) == 2, 15), master.tail()
    assert master.pid_file.read_text().strip() == str(new_master)
    master.signal(signal.SIGWINCH)
    assert wait_for(lambda: not (master.workers() & old_workers), 10)
    before = load.ok
    assert wait_for(lambda: load.ok > before + 200, 10)
    master.signal(signal.SIGQUIT)
    assert master.process.wait(10) == 0
    before = load.ok
    assert wait_for(lambda: load.ok > before + 200, 10)
    load.stop()
    assert load.failed == 0, load.errors[:5]
    assert load.pids & children_of(new_master)
    signal_worker(new_master, signal.SIGTERM)
    assert wait_for(lambda: not alive(new_master), 10)


def test_workers_exit_when_the_master_is_killed(start_master):
    master = start_master(workers=2)
    workers = master.workers()
    master.signal(signal.SIGKILL)
    master.process.wait(5)
    assert wait_for(lambda: not any(alive(pid) for pid in workers), 5)


def test_reload_command_signals_the_master_in_the_pid_file(start_master):
    import subprocess
    import sys

    master = start_master(workers=1)
    old = master.workers()
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from forkloop.server.cli import main; sys.exit(main())",
            "reload",
            "--pid-file",
            str(master.pid_file),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert wait_for(lambda: master.workers() and master.workers().isdisjoint(old), 10)


def test_process_titles_name_master_and_workers(start_master):
    pytest.importorskip("setproctitle")
    master = start_master(workers=1)
    (worker,) = master.workers()
    assert _cmdline(master.pid).startswith("forkloop: master process")
    assert _cmdline(worker) == "forkloop: worker process #1"


# ---------------------------------------------------------------------- helpers


def signal_worker(pid: int, signum: int) -> None:
    import os

    os.kill(pid, signum)


def children_of(pid: int) -> set[int]:
    from forkloop.loadtest.servers import descendants

    return {child for child in descendants(pid)[1:] if alive(child) and parent_of(child) == pid}


def wait_for_new_master(master: MasterUnderTest) -> int:
    found: list[int] = []

    def new_master_running() -> bool:
        for child in children_of(master.pid):
            if _cmdline(child).startswith("forkloop: master process") or "-m server" in _cmdline(
                child
            ):
                if children_of(child):
                    found.append(child)
                    return True
        return False

    assert wait_for(new_master_running, 15), master.tail()
    return found[0]


def _cmdline(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as handle:
        return handle.read().replace(b"\0", b" ").decode().strip()


def _refused(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return False
    except ConnectionRefusedError:
        return True


def _swallow(fn, *args) -> None:
    try:
        fn(*args)
    except Exception:
        pass


def test_serves_ipv4_ipv6_and_unix_binds_at_once(start_master, tmp_path):
    from forkloop.loadtest.servers import free_port

    v6_port = free_port()
    unix_path = tmp_path / "forkloop.sock"
    master = start_master("--bind", f"[::1]:{v6_port}", "--bind", f"unix:{unix_path}", workers=1)
    assert master.get("/")[1] == b"Hello, World!"
    with socket.create_connection(("::1", v6_port), timeout=5) as sock:
        assert _exchange(sock).endswith(b"Hello, World!")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(5)
        sock.connect(str(unix_path))
        assert _exchange(sock).endswith(b"Hello, World!")


def test_reuse_port_workers_each_bind_and_serve(start_master):
    master = start_master("--reuse-port", workers=2)

    def ask(_: int) -> int:
        return int(master.get("/slow?ms=100")[1].split()[1])

    with ThreadPoolExecutor(20) as pool:
        pids = set(pool.map(ask, range(40)))
    assert pids <= master.workers()
    assert master.get("/")[0] == 200


def _exchange(sock: socket.socket) -> bytes:
    sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_reload_rereads_the_config_file(backend, tmp_path):
    config = tmp_path / "forkloop.toml"
    config.write_text("workers = 1\n")
    master = MasterUnderTest(backend.backend, tmp_path, "--config", str(config))
    try:
        master.start(workers=1)
        first = master.workers()
        config.write_text("workers = 2\nmax_body_size = 10\n")
        master.signal(signal.SIGHUP)
        assert wait_for(
            lambda: master.workers().isdisjoint(first) and len(master.workers()) == 2, 10
        ), master.tail()
        import http.client

        connection = http.client.HTTPConnection("127.0.0.1", master.port, timeout=5)
        connection.request("POST", "/echo", body=b"x" * 11)
        assert connection.getresponse().status == 413  # the new limit is in force
        config.write_text("workers = [not toml\n")
        old = master.workers()
        master.signal(signal.SIGHUP)
        assert wait_for(lambda: "cannot read the configuration" in master.tail(), 10)
        assert master.workers() == old
    finally:
        master.stop()


def test_usr1_reopens_the_access_log_after_rotation(backend, tmp_path):
    log_path = tmp_path / "access.log"
    master = MasterUnderTest(
        backend.backend, tmp_path, "--workers", "1", "--access-log-file", str(log_path)
    )
    try:
        master.start(workers=1)
        master.get("/")
        assert wait_for(lambda: log_path.exists() and "GET / " in log_path.read_text(), 5)
        log_path.rename(tmp_path / "access.log.1")
        master.signal(signal.SIGUSR1)
        assert wait_for(lambda: log_path.exists(), 5), "USR1 did not reopen the access log"
        master.get("/healthz")
        assert wait_for(lambda: "GET /healthz" in log_path.read_text(), 5)
        assert "GET /healthz" not in (tmp_path / "access.log.1").read_text()
    finally:
        master.stop()
