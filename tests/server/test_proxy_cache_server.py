"""`forkloop proxy URL --cache` under the master: 4 workers, real processes.

A stampede of cold requests spread by the kernel over every worker costs the
upstream one request (the server-wide tier, ``--shared-cache on``), for a
missing entry and for an expired one alike; a PURGE that lands on one worker
reaches every worker's copy; a bad flag is a one-line usage error.
"""

from __future__ import annotations

import re
import time
from collections import Counter

import pytest

from forkloop.loadtest.servers import free_port
from tests.server.frontdoor_support import Served, UserFolder, last_error_line, run_forkloop
from tests.server.master_support import wait_for
from tests.server.stampede_support import stampede
from tests.server.support import RawClient
from tests.server.upstream_support import Upstream

pytestmark = pytest.mark.timeout(120)

WORKERS = "4"


def serve_proxy(
    tmp_path, upstream: Upstream, backend, *options: str, metrics: str = "off"
) -> Served:
    folder = UserFolder(tmp_path / "project")
    arguments = ("proxy", f"http://127.0.0.1:{upstream.port}", "--workers", WORKERS, "--cache")
    served = Served(folder.root, *arguments, "--loop", backend.backend, *options, metrics=metrics)
    return served.start()


def proxy_events(served: Served, metrics_port: int) -> dict[str, float]:
    """The forkloop_proxy_cache_events_total series from /metrics, by event."""
    status, text = served.get("/metrics", port=metrics_port)
    assert status == 200
    found = re.findall(rb'forkloop_proxy_cache_events_total\{event="(\w+)"\} ([\d.e+]+)', text)
    return {event.decode(): float(value) for event, value in found}


def test_a_stampede_over_four_workers_costs_the_upstream_one_request(tmp_path, backend):
    with Upstream() as upstream:
        metrics_port = free_port()
        served = serve_proxy(
            tmp_path, upstream, backend, "--shared-cache", "on", metrics=f"127.0.0.1:{metrics_port}"
        )
        try:
            cold = stampede(served.port, "/cache/k?max_age=1&ms=200", 1000)
            assert wait_for(lambda: proxy_events(served, metrics_port).get("fill") == 1, 5)
            fills_when_cold = upstream.seen.counts[b"/cache/k"]
            time.sleep(1.05)  # the entry expires (max-age=1) in every worker and the tier
            expired = stampede(served.port, "/cache/k?max_age=1&ms=200", 1000)
        finally:
            served.stop()
    assert fills_when_cold == 1
    assert Counter(status for status, _, _ in cold) == {200: 1000}
    assert {body for _, _, body in cold} == {b"k #1"}
    assert Counter(cache for _, cache, _ in cold)["MISS"] == 1
    assert upstream.seen.counts[b"/cache/k"] == 2  # one refill for the expired entry
    assert Counter(status for status, _, _ in expired) == {200: 1000}
    assert {body for _, _, body in expired} == {b"k #2"}


def test_a_purge_on_one_worker_reaches_every_worker(tmp_path, backend):
    with Upstream() as upstream:
        served = serve_proxy(tmp_path, upstream, backend, "--purge-allow", "127.0.0.1")
        try:
            before = {body for _, _, body in stampede(served.port, "/cache/p?max_age=60", 200)}
            with RawClient(served.port) as client:
                client.request("PURGE", "/cache/p?max_age=60")
                assert client.read_reply().status in (200, 404)
            after = {body for _, _, body in stampede(served.port, "/cache/p?max_age=60", 200)}
        finally:
            served.stop()
    assert before and not before & after  # no worker serves a copy from before the purge


@pytest.mark.parametrize(
    ("flag", "value", "said"),
    [
        (
            "--proxy-cache-use-stale",
            "error,sometimes",
            "'sometimes' is not one of error, timeout, http_500, http_502, http_503, "
            "http_504, updating",
        ),
        ("--purge-allow", "127.0.0.1,nowhere", "'nowhere' is not an address or a network"),
    ],
)
def test_a_bad_proxy_cache_flag_is_a_one_line_usage_error(tmp_path, flag, value, said):
    result = run_forkloop(
        "proxy", "http://127.0.0.1:9", "--cache", flag, value, "--check-config", cwd=tmp_path
    )
    assert result.returncode == 2
    assert last_error_line(result) == f"forkloop: {flag}: {said}"


def test_use_stale_answers_from_every_worker_when_the_upstream_is_down(tmp_path, backend):
    # each worker its own listening socket: the kernel spreads connections by their
    # addresses, not by which worker is quickest, so 200 of them reach all 4
    options = ("--shared-cache", "on", "--proxy-cache-use-stale", "error", "--reuse-port")
    with Upstream() as upstream:
        served = serve_proxy(tmp_path, upstream, backend, *options)
        try:
            warm = stampede(served.port, "/cache/u?max_age=1", 200)  # a copy in every worker
            upstream.stop()
            time.sleep(1.05)
            down = stampede(served.port, "/cache/u?max_age=1", 200)
        finally:
            served.stop()
    assert {(status, body) for status, _, body in warm} == {(200, b"u #1")}
    assert {(status, body) for status, _, body in down} == {(200, b"u #1")}
    assert {cache for _, cache, _ in down} <= {"STALE", "UPDATING"}
