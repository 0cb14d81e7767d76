"""--reload for development, HUP re-applying every setting, and the access log's defaults."""

from __future__ import annotations

import re
import signal
import time

import pytest

from tests.server.frontdoor_support import HELLO_APP, InFlight, Served, UserFolder, wait_for_line
from tests.server.master_support import wait_for

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def folder(tmp_path):
    return UserFolder(tmp_path / "project")


def body(served: Served) -> bytes:
    try:
        return served.get("/")[1]
    except OSError:
        return b""


def test_reload_restarts_workers_when_a_py_file_changes_and_survives_a_syntax_error(folder):
    served = Served(folder.root, "myapp:app", "--reload", "--workers", "1").start()
    try:
        assert body(served) == b"hello from the user's app"
        assert wait_for_line(served, "watching the .py files under", 15), served.log()
        folder.write("myapp.py", HELLO_APP.replace("hello from", "second version of"))
        assert wait_for(lambda: body(served) == b"second version of the user's app", 20), (
            served.log()
        )
        folder.write("myapp.py", "def broken(:\n")
        assert wait_for_line(served, "reload failed", 20), served.log()
        assert "myapp.py:1: SyntaxError" in served.log()
        assert body(served) == b"second version of the user's app"  # the old workers serve
        folder.write("myapp.py", HELLO_APP.replace("hello from", "third version of"))
        assert wait_for(lambda: body(served) == b"third version of the user's app", 20), (
            served.log()
        )
    finally:
        served.stop()


def test_no_reload_by_default(folder):
    served = Served(folder.root, "myapp:app", "--workers", "1").start()
    try:
        assert "watching" not in served.log()
    finally:
        served.stop()


def test_hup_reapplies_the_masters_own_settings(folder):
    config = folder.write("forkloop.toml", 'app = "myapp:app"\nworkers = 1\n')
    served = Served(folder.root, "--config", str(config)).start()
    try:
        first = served.workers()
        config.write_text(
            'app = "myapp:app"\nworkers = 1\nmax_requests = 20\ngraceful_timeout = 0.5\n'
        )
        served.signal(signal.SIGHUP)
        assert wait_for(lambda: served.workers() and served.workers().isdisjoint(first), 15)
        assert wait_for_line(served, "generation 2 serving", 15)
        for _ in range(60):  # --max-requests 20, now in force: the worker retires
            assert served.get("/")[0] == 200
        assert wait_for_line(served, "retired (--max-requests)", 15), served.log()
        request = InFlight(served, 30000)
        assert request.running()
        started = time.monotonic()
        served.signal(signal.SIGTERM)  # graceful, but --graceful-timeout is 0.5 s now
        reply = request.result()
        assert isinstance(reply, tuple) and reply[0] == 503, reply
        assert served.wait(20) == 0
        assert time.monotonic() - started < 8
    finally:
        served.stop()


def test_access_log_is_on_by_default(folder):
    served = Served(folder.root, "myapp:app", "--workers", "1").start()
    try:
        served.get("/")
        assert wait_for(lambda: '"GET / HTTP/1.1" 200 25 "-"' in served.access_path.read_text(), 5)
    finally:
        served.stop()


def test_no_access_log_turns_it_off(folder):
    served = Served(folder.root, "myapp:app", "--workers", "1", "--no-access-log").start()
    try:
        served.get("/")
        served.get("/missing")
    finally:
        served.stop()
    assert served.access_path.read_text() == ""


def test_access_log_format_chooses_the_fields(folder):
    served = Served(
        folder.root, "myapp:app", "--workers", "1",
        "--access-log-format", "{method} {path} {status} {duration_ms}ms pid={pid}",
    ).start()  # fmt: skip
    try:
        served.get("/missing?x=1")
        pattern = re.compile(r"^GET /missing\?x=1 404 \d+\.\d{3}ms pid=\d+$", re.M)
        assert wait_for(lambda: pattern.search(served.access_path.read_text()), 5), (
            served.access_path.read_text()
        )
    finally:
        served.stop()
