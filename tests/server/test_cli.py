"""The command line: `forkloop serve` / `python -m forkloop` as a real process."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import urllib.request

import pytest

from forkloop.loadtest.servers import ServerProcess, free_port, wait_until_answering
from forkloop.server import backends
from tests.server.master_support import parent_of


def _get(port: int, path: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
        return response.status, response.read()


def test_python_dash_m_forkloop_serves_the_default_app_and_stops_on_sigterm(backend):
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "forkloop",
        "--bind",
        f"127.0.0.1:{port}",
        "--loop",
        backend.backend,
        "--workers",
        "2",
    ]
    server = ServerProcess("forkloop", command, port).start()
    try:
        assert _get(port, "/") == (200, b"Hello, World!")
        status, body = _get(port, "/stats")
        snapshot = json.loads(body)
        assert status == 200
        assert parent_of(snapshot["pid"]) == server.process.pid  # a worker of this master
        assert snapshot["server"]["workers"] == 2
        assert snapshot["requests"] >= 1
        assert _get(port, "/healthz") == (200, b"ok\n")
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/echo", data=b"ping", method="POST"
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            assert response.read() == b"ping"
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(10) == 0
    finally:
        server.stop()


def test_forkloop_console_script_serves_with_access_log(tmp_path):
    port = free_port()
    log_path = tmp_path / "access.log"
    command = [
        sys.executable,
        "-c",
        "import sys; from forkloop.server.cli import main; sys.exit(main())",
        "serve",
        "--bind",
        f"127.0.0.1:{port}",
        "--access-log-file",
        str(log_path),
    ]
    process = subprocess.Popen(command, stderr=subprocess.PIPE)
    try:
        wait_until_answering(port, 15, process)
        _get(port, "/healthz")
        process.send_signal(signal.SIGINT)
        assert process.wait(10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    lines = log_path.read_text().splitlines()
    assert any('"GET /healthz HTTP/1.1" 200 3 "-" "Python-urllib/' in line for line in lines), lines


def test_unknown_loop_is_a_clear_error():
    result = subprocess.run(
        [sys.executable, "-m", "forkloop", "--loop", "nonesuch"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "invalid choice: 'nonesuch'" in result.stderr


def test_unimportable_app_is_a_clear_error():
    port = free_port()
    result = subprocess.run(
        [sys.executable, "-m", "forkloop", "no_such_module:app", "--bind", f"127.0.0.1:{port}"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 3
    assert "cannot import app module 'no_such_module'" in result.stderr


def test_bind_address_in_use_is_a_clear_error():
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "forkloop", "--bind", f"127.0.0.1:{port}"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert result.returncode == 3  # the server could not start: a boot failure, not usage
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr


def test_registry_names_the_choices_for_an_unknown_backend():
    with pytest.raises(backends.BackendUnavailable, match="choose one of: asyncio, uvloop"):
        backends.get("nonesuch")


def test_registry_reports_an_unimportable_backend_clearly():
    backends.register("broken-for-test", "no_such_loop_module:new_event_loop")
    try:
        assert not backends.is_available("broken-for-test")
        with pytest.raises(backends.BackendUnavailable, match="not available here"):
            backends.loop_factory("broken-for-test")
    finally:
        backends._REGISTRY.pop("broken-for-test")


def test_every_registered_backend_builds_a_working_loop(backend):
    loop = backend.new_event_loop()
    try:
        assert loop.run_until_complete(_answer()) == 42
    finally:
        loop.close()


async def _answer() -> int:
    return 42
