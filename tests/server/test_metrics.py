"""``/metrics``: Prometheus' text format on its own address, summed over the whole server.

Scrapes are parsed with the ``prometheus_client`` parser, as a Prometheus
server would read them. Workers publish their counters on their heartbeat, so
each check polls the scrape until the expected value shows (bounded).
"""

from __future__ import annotations

import http.client
import os
import signal
import socket

import pytest
from prometheus_client.parser import text_string_to_metric_families

from forkloop.loadtest.servers import free_port
from forkloop.server.config import DEFAULT_METRICS_BIND
from tests.server.frontdoor_support import (
    ASGI_APP,
    Served,
    UserFolder,
    last_error_line,
    run_forkloop,
)
from tests.server.master_support import wait_for

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def folder(tmp_path):
    return UserFolder(tmp_path / "project")


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a scrape: (name, sorted labels) -> value."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", "/metrics")
        response = connection.getresponse()
        assert response.status == 200
        assert response.getheader("Content-Type", "").startswith("text/plain; version=")
        text = response.read().decode()
    finally:
        connection.close()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def eventually(port: int, check, timeout: float = 10) -> dict:
    """The first scrape for which ``check(samples)`` holds; fails after ``timeout``."""
    seen: list[dict] = []

    def holds() -> bool:
        seen.append(scrape(port))
        return bool(check(seen[-1]))

    assert wait_for(holds, timeout, interval=0.2), sorted(seen[-1].items())[:40]
    return seen[-1]


def test_metrics_count_responses_by_method_and_status_over_every_worker(folder):
    metrics_port = free_port()
    served = Served(
        folder.root, "myapp:app", "--workers", "2", metrics=f"127.0.0.1:{metrics_port}"
    ).start()
    try:
        assert f"metrics on http://127.0.0.1:{metrics_port}/metrics" in served.log()
        for _ in range(20):
            assert served.get("/")[0] == 200
        for _ in range(3):
            assert served.get("/missing")[0] == 404
        connection = http.client.HTTPConnection("127.0.0.1", served.port, timeout=10)
        connection.request("POST", "/")
        assert connection.getresponse().status == 405
        connection.close()
        samples = eventually(
            metrics_port,
            lambda s: (
                value(s, "forkloop_http_responses_total", method="GET", status="200") >= 20
                and value(s, "forkloop_http_responses_total", method="POST", status="405") == 1
            ),
        )
        assert value(samples, "forkloop_http_responses_total", method="GET", status="404") == 3
        assert value(samples, "forkloop_workers") == 2
        assert value(samples, "forkloop_http_requests_total") >= 24
        count = value(samples, "forkloop_http_request_duration_seconds_count")
        assert count >= 24
        assert value(samples, "forkloop_http_request_duration_seconds_bucket", le="+Inf") == count
        assert value(samples, "forkloop_http_request_duration_seconds_sum") > 0
        assert value(samples, "forkloop_connections_total") >= 24
        assert ("forkloop_open_connections", ()) in samples
        for reason in ("disconnect", "deadline", "shutdown"):
            assert ("forkloop_cancelled_handlers_total", (("reason", reason),)) in samples
        assert not served.get("/metrics")[0] == 200  # not on the app's port
    finally:
        served.stop()


def test_cancellations_and_worker_restarts_are_counted_and_never_go_back(folder):
    metrics_port = free_port()
    served = Served(
        folder.root, "myapp:app", "--workers", "2", metrics=f"127.0.0.1:{metrics_port}"
    ).start()
    try:
        mark = folder.root / "slow-running"
        client = socket.create_connection(("127.0.0.1", served.port), timeout=10)
        client.sendall(f"GET /slow?ms=30000&mark={mark} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
        assert wait_for(mark.exists, 10)
        client.close()  # the client gives up: the server cancels the handler
        eventually(
            metrics_port,
            lambda s: value(s, "forkloop_cancelled_handlers_total", reason="disconnect") == 1,
        )
        for _ in range(10):
            served.get("/")
        before = eventually(
            metrics_port,
            lambda s: value(s, "forkloop_http_responses_total", method="GET", status="200") >= 10,
        )
        victim = min(served.workers())
        os.kill(victim, signal.SIGKILL)
        after = eventually(
            metrics_port,
            lambda s: (
                value(s, "forkloop_worker_restarts_total", reason="died") == 1
                and value(s, "forkloop_workers") == 2
            ),
        )
        name = "forkloop_http_responses_total"
        assert value(after, name, method="GET", status="200") >= value(
            before, name, method="GET", status="200"
        )
        assert value(after, "forkloop_cancelled_handlers_total", reason="disconnect") == 1
    finally:
        served.stop()


def test_cache_lookups_are_counted_by_result(folder):
    metrics_port = free_port()
    served = Served(folder.root, "--workers", "1", metrics=f"127.0.0.1:{metrics_port}").start()
    try:
        assert served.get("/cached/k?ms=1")[0] == 200
        assert served.get("/cached/k?ms=1")[0] == 200
        samples = eventually(
            metrics_port,
            lambda s: value(s, "forkloop_cache_lookups_total", result="hits") >= 1,
        )
        assert value(samples, "forkloop_cache_lookups_total", result="misses") >= 1
        assert ("forkloop_cache_lookups_total", (("result", "coalesced"),)) in samples
    finally:
        served.stop()


def test_metrics_bind_off_serves_no_metrics(folder):
    served = Served(folder.root, "myapp:app", "--workers", "1", metrics="off").start()
    try:
        assert "metrics on" not in served.log()
        assert served.get("/")[0] == 200
    finally:
        served.stop()


def test_taken_default_metrics_address_only_warns(folder):
    host, _, port = DEFAULT_METRICS_BIND.rpartition(":")
    holder = socket.socket()
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        holder.bind((host, int(port)))
        holder.listen()
    except OSError:
        pass  # already taken by something else: the same case
    served = Served(folder.root, "myapp:app", "--workers", "1", metrics=None)
    try:
        served.start()
        assert "no /metrics" in served.log() and "--metrics-bind" in served.log()
        assert served.get("/")[0] == 200
    finally:
        served.stop()
        holder.close()


def test_taken_explicit_metrics_address_is_a_boot_failure(folder):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = run_forkloop(
            "myapp:app", "--bind", f"127.0.0.1:{free_port()}",
            "--metrics-bind", f"127.0.0.1:{port}", cwd=folder.root,
        )  # fmt: skip
    assert result.returncode == 3
    assert f"cannot listen on 127.0.0.1:{port}" in last_error_line(result)
    assert "Traceback" not in result.stderr


def test_an_asgi_apps_responses_are_counted_too(folder):
    folder.write("asgiapp.py", ASGI_APP)
    metrics_port = free_port()
    served = Served(
        folder.root, "asgiapp:app", "--workers", "1", metrics=f"127.0.0.1:{metrics_port}"
    ).start()
    try:
        for _ in range(5):
            assert served.get("/x")[0] == 200
        samples = eventually(
            metrics_port,
            lambda s: value(s, "forkloop_http_responses_total", method="GET", status="200") == 5,
        )
        assert value(samples, "forkloop_http_request_duration_seconds_count") == 5
    finally:
        served.stop()
