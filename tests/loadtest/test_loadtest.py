"""``forkloop loadtest``: short real runs of every scenario, the verdict, locust's modes.

Each run is the real thing, shortened: ``python -m forkloop.loadtest`` starts the
server on 127.0.0.1 and runs locust as a subprocess, one second per scenario
with a few users, then the test reads ``results.json``. Stampede bursts come
twice a second here so that a one-second run holds at least one. Locust is
never imported into this process (it would patch the standard library with
gevent under the test suite); one test checks that the runner does not
import it either.

The cache and cancellation assertions need the demo app's ``/cached/{key}``
and the ``cache`` and ``cancelled`` counters of ``/stats``.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from forkloop.loadtest import runner
from forkloop.loadtest.report import percentile, rate_by_second
from forkloop.loadtest.runner import server_counters
from forkloop.server import backends

# found, never imported: importing locust would patch this process with gevent
pytestmark = pytest.mark.skipif(
    not (importlib.util.find_spec("locust") and importlib.util.find_spec("matplotlib")),
    reason="the load tests need locust and matplotlib: pip install -e '.[test]'",
)

SHORT = ["--duration", "1", "--users", "4", "--spawn-rate", "4"]
FAST_BURSTS = ["--locust-args", "--stampede-every 0.5"]


def run_loadtest(*arguments: str, timeout: float = 50) -> tuple[int, dict, str]:
    """``python -m forkloop.loadtest ARGUMENTS``: its exit status, its results.json, its stderr."""
    output = arguments[arguments.index("--output") + 1]
    process = subprocess.Popen(
        [sys.executable, "-m", "forkloop.loadtest", *arguments],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.terminate()  # the runner stops its server and locust on SIGTERM
        _, stderr = process.communicate(timeout=20)
        pytest.fail(f"forkloop loadtest took more than {timeout} s:\n{stderr[-3000:]}")
    results_path = Path(output) / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    return process.returncode, results, stderr


def runs_by_scenario(results: dict) -> dict[str, dict]:
    return {run["scenario"]: run for run in results["runs"]}


def first_available_backend() -> str:
    return backends.available()[0]


# --------------------------------------------------------------- one run per backend


@pytest.mark.timeout(90)
def test_every_scenario_runs_clean_and_moves_the_server_counters(backend, tmp_path):
    status, results, stderr = run_loadtest(
        "--loops", backend.backend, *SHORT, *FAST_BURSTS, "--output", str(tmp_path)
    )
    assert status == 0, stderr
    assert results["violations"] == []
    runs = runs_by_scenario(results)
    assert list(runs) == list(runner.SCENARIOS)
    for scenario, run in runs.items():
        assert run["error"] is None, (scenario, run["error"])
        assert run["requests"] > 0, f"{scenario} made no request"
        assert run["failures"] == 0, (scenario, run["failure_messages"])
        assert run["server_counters"]["requests"] >= run["requests"], scenario
        assert run["server_cpu_seconds"] is not None

    hello, churn = runs["hello"]["server_counters"], runs["churn"]["server_counters"]
    # one connection per user, renewed every 1,000 requests (--max-keepalive-requests), + /stats
    reuse_bound = 4 + runs["hello"]["requests"] // 1000 + 2
    assert hello["connections_total"] <= reuse_bound, "keep-alive users should reuse connections"
    assert churn["connections_total"] >= runs["churn"]["requests"], "one connection per request"

    cached = runs["cached"]["server_counters"]
    assert cached["cache_hits"] > 0 and cached["cache_misses"] > 0
    assert 0 < runs["cached"]["cache_hit_ratio"] < 1
    stampede = runs["stampede"]["server_counters"]
    assert stampede["cache_coalesced"] > 0, "users of one burst should share one computation"
    assert stampede["cache_computations"] < runs["stampede"]["requests"]
    cancel = runs["cancel"]["server_counters"]
    assert cancel["cancelled_disconnect"] >= runs["cancel"]["requests"] - 4  # a burst in flight

    report = (tmp_path / "report.md").read_text()
    for scenario in runner.SCENARIOS:
        assert f"## {scenario}\n" in report
    assert f"| {backend.backend} | 1 |" in report
    assert (tmp_path / "report.png").stat().st_size > 10_000
    assert (tmp_path / "locust" / f"{backend.backend}-w1-hello.html").stat().st_size > 0
    assert (tmp_path / "locust" / f"{backend.backend}-w1-hello_stats.csv").stat().st_size > 0


# ------------------------------------------------------------------------ verdicts


def test_a_missed_p99_slo_exits_nonzero(tmp_path):
    # a cache miss computes for 20 ms and a fifth of the lookups miss: p99 >= 20 ms
    status, results, stderr = run_loadtest(
        "--loops", first_available_backend(), "--scenarios", "cached", *SHORT,
        "--max-p99-ms", "hello=100,cached=5", "--output", str(tmp_path),
    )  # fmt: skip
    assert status == 1, stderr
    assert runs_by_scenario(results)["cached"]["failures"] == 0
    assert any("above --max-p99-ms 5" in line for line in results["violations"])
    assert "**Failed:**" in (tmp_path / "report.md").read_text()


class WrongHello(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        body = b"Goodbye, World!" if self.path == "/" else b"not here"
        self.send_response(200 if self.path == "/" else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_a_wrong_body_is_a_failure_even_with_status_200(tmp_path):
    server = ThreadingHTTPServer(("127.0.0.1", 0), WrongHello)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        host = f"http://127.0.0.1:{server.server_address[1]}"
        status, results, stderr = run_loadtest(
            "--host", host, "--scenarios", "hello", *SHORT, "--output", str(tmp_path)
        )
    finally:
        server.shutdown()
    assert status == 1, stderr
    hello = runs_by_scenario(results)["hello"]
    assert hello["backend"] == "remote" and hello["server_cpu_seconds"] is None
    assert hello["requests"] > 0 and hello["failures"] == hello["requests"]
    assert any("expected b'Hello, World!'" in message for message in hello["failure_messages"])
    assert any("requests failed" in line for line in results["violations"])


def test_a_bad_command_line_exits_2_before_running_anything(tmp_path, capsys):
    assert runner.command_line(["--scenarios", "nonesuch", "--output", str(tmp_path)]) == 2
    assert "unknown scenario nonesuch" in capsys.readouterr().err
    assert runner.command_line(["--master", "--output", str(tmp_path)]) == 2
    assert "--master needs --host" in capsys.readouterr().err
    assert runner.command_line(["--max-p99-ms", "helo=5", "--output", str(tmp_path)]) == 2
    assert "unknown scenario 'helo'" in capsys.readouterr().err
    assert not (tmp_path / "report.md").exists()


# ------------------------------------------------------------------- locust's modes


def test_locust_distributed_over_local_processes(tmp_path):
    status, results, stderr = run_loadtest(
        "--loops", first_available_backend(), "--scenarios", "hello", *SHORT,
        "--processes", "2", "--output", str(tmp_path),
    )  # fmt: skip
    assert status == 0, stderr
    hello = runs_by_scenario(results)["hello"]
    assert hello["requests"] > 0 and hello["failures"] == 0
    assert hello["server_counters"]["requests"] >= hello["requests"]
    log = (tmp_path / "locust" / f"{first_available_backend()}-w1-hello.log").read_text()
    assert "2 workers connected" in log  # the master counted both worker processes


@pytest.mark.timeout(90)
def test_counters_are_summed_over_the_workers_of_a_master(tmp_path):
    status, results, stderr = run_loadtest(
        "--loops", first_available_backend(), "--workers", "2", "--scenarios", "cached,cancel",
        *SHORT, "--output", str(tmp_path),
    )  # fmt: skip
    assert status == 0, stderr
    runs = runs_by_scenario(results)
    assert runs["cached"]["workers"] == 2
    assert runs["cached"]["server_counters"]["cache_hits"] > 0
    assert runs["cancel"]["server_counters"]["cancelled_disconnect"] > 0


@pytest.mark.timeout(120)
def test_the_cache_scenarios_run_against_four_workers_and_the_shared_cache(tmp_path):
    status, results, stderr = run_loadtest(
        "--loops", first_available_backend(), "--workers", "4", "--shared-cache", "on",
        "--scenarios", "cached,stampede", *SHORT, *FAST_BURSTS, "--output", str(tmp_path),
        timeout=100,
    )  # fmt: skip
    assert status == 0, stderr
    runs = runs_by_scenario(results)
    for scenario, run in runs.items():
        assert run["error"] is None and run["failures"] == 0, (scenario, run["failure_messages"])
        assert (run["workers"], run["shared_cache"]) == (4, True)
    stampede = runs["stampede"]["server_counters"]
    assert stampede["cache_fallbacks"] == 0
    # every burst is one request per user (4) for one key: one computation for the server,
    # wherever the kernel put each user's connection (a burst cut by the run's end aside)
    assert stampede["cache_computations"] <= runs["stampede"]["requests"] // 4 + 1
    report = (tmp_path / "report.md").read_text()
    assert "| 4 + shared cache |" in report
    assert (tmp_path / "locust" / f"{first_available_backend()}-w4-shared-stampede.html").exists()


def test_the_ramp_shape_raises_users_in_steps(tmp_path):
    status, results, stderr = run_loadtest(
        "--loops", first_available_backend(), "--scenarios", "hello", "--duration", "2",
        "--users", "4", "--ramp", "2", "--output", str(tmp_path),
    )  # fmt: skip
    assert status == 0, stderr
    assert runs_by_scenario(results)["hello"]["requests"] > 0
    log = (tmp_path / "locust" / f"{first_available_backend()}-w1-hello.log").read_text()
    # locust's own log of the shape's steps: half the users, then all of them
    assert "Shape test updating to 2 users" in log
    assert "Shape test updating to 4 users" in log
    assert log.index("updating to 2 users") < log.index("updating to 4 users")


# ------------------------------------------------------------------- no processes


def test_the_runner_never_imports_locust():
    probe = "import sys, forkloop.server.cli, forkloop.loadtest.runner; print('gevent' in sys.modules, 'locust' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert result.stdout.split() == ["False", "False"], result.stderr


def test_every_scenario_names_a_user_class_of_the_locustfile():
    listed = subprocess.run(
        [sys.executable, "-m", "locust", "-f", str(runner.LOCUSTFILE), "--list"],
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout.split()
    assert [runner.user_class(name) for name in runner.SCENARIOS] == listed[2:]


def test_server_counters_reads_the_scoreboard_totals_flat_or_nested():
    flat = {"cache": {"hits": 1}, "server": {"requests": 9, "cache_hits": 7, "workers": 2}}
    assert server_counters(flat)["cache_hits"] == 7
    assert server_counters(flat)["requests"] == 9
    nested = {"requests": 3, "server": {"cache": {"hits": 5}, "cancelled": {"deadline": 2}}}
    assert server_counters(nested)["cache_hits"] == 5
    assert server_counters(nested)["cancelled_deadline"] == 2
    assert server_counters(nested)["requests"] == 3  # missing from the totals: the process's
    assert server_counters({"requests": 1})["cancelled_disconnect"] == 0  # absent: 0
    assert server_counters(None) == {}


def test_p99_limits_are_one_for_all_but_cancel_or_one_per_scenario():
    scenarios = list(runner.SCENARIOS)
    assert runner.p99_limits("50", scenarios) == {s: 50.0 for s in scenarios if s != "cancel"}
    assert runner.p99_limits("hello=5, stampede=400", scenarios) == {"hello": 5, "stampede": 400}
    assert runner.p99_limits(None, scenarios) == {}


def test_percentile_is_the_one_locust_prints():
    histograms = [{1.0: 90, 20.0: 9, 300.0: 1}, {0.0: 5000, 1.0: 37, 2.0: 2, 110.0: 1}, {7.0: 1}]
    fractions = [0.5, 0.9, 0.95, 0.99, 0.999]
    probe = (
        "import json, sys; from locust.stats import calculate_response_time_percentile as p; "
        "print(json.dumps([[p({float(t): n for t, n in h.items()}, sum(h.values()), f) "
        "for f in json.loads(sys.argv[2])] for h in json.loads(sys.argv[1])]))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe, json.dumps(histograms), json.dumps(fractions)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    locusts = json.loads(result.stdout)
    ours = [[percentile(histogram, fraction) for fraction in fractions] for histogram in histograms]
    assert ours == locusts
    assert percentile({}, 0.5) != percentile({}, 0.5)  # NaN: nothing measured


def test_rate_by_second_scales_the_partial_first_and_last_seconds():
    # a run from 100.5 to 102.25: half of second 100, all of 101, a quarter of 102
    history = rate_by_second({100: 50, 101: 120, 102: 40}, 100.5, 102.25)
    assert history == [(0.0, 100.0), (1.0, 120.0), (2.0, 160.0)]


WRK_OUTPUT = """Running 2s test @ http://127.0.0.1:18092/
  1 threads and 50 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   632.34us  506.81us   6.15ms   82.09%
    Req/Sec   573.08k   117.45k  840.96k    75.00%
  Latency Distribution
     50%  616.00us
     75%    1.00ms
     90%    1.52ms
     99%    {p99}
  1140272 requests in 2.00s, 115.27MB read
  Socket errors: connect 0, read 3, write 0, timeout 1
Requests/sec: 568962.23
Transfer/sec:     57.52MB
"""


def test_bench_reads_wrk_and_takes_its_zero_percentile_for_missing():
    from forkloop.loadtest.bench import median_ms, parse_wrk

    run = parse_wrk(WRK_OUTPUT.format(p99="3.05ms"))
    assert run["requests"] == 1_140_272 and run["seconds"] == 2.0 and run["errors"] == 4
    assert (run["p50_ms"], run["p99_ms"]) == (pytest.approx(0.616), 3.05)
    # wrk prints this now and then with pipelining; no request takes 0 µs
    missing = parse_wrk(WRK_OUTPUT.format(p99="0.00us"))["p99_ms"]
    assert median_ms([missing, 2.0, 4.0]) == "3.00"
    assert median_ms([missing]) == "-"


CALLGRIND_DUMP = """# callgrind format
events: Ir
fn=(1) _PyEval_EvalFrameDefault
0 700
cfn=(2) llhttp__internal__run
calls=3 0
0 900
fn=(2)
0 300
fn=(3) take_gil
0 50
fn=(4) _PyEval_EvalFrameDefault'2
0 100
fn=(5) os_read
0 20
cfn=(3)
calls=1 0
0 50
"""


def test_instructions_counts_each_function_itself_and_groups_them(tmp_path):
    from forkloop.loadtest.instructions import grouped, self_costs, table

    dump = tmp_path / "callgrind.reactor.1"
    dump.write_text(CALLGRIND_DUMP)
    costs = self_costs(dump)  # a call's inclusive cost (the line after calls=) is not counted
    assert costs == {
        "_PyEval_EvalFrameDefault": 700,
        "llhttp__internal__run": 300,
        "take_gil": 50,
        "_PyEval_EvalFrameDefault'2": 100,
        "os_read": 20,
    }
    groups = grouped(costs)
    assert (groups["interpreter"], groups["parser"], groups["GIL"]) == (800, 300, 50)
    assert groups["call wrappers"] == 20 and sum(groups.values()) == 1170
    text = table({"reactor": {group: cost / 10 for group, cost in groups.items()}})
    assert "| interpreter | 80 |" in text and "| **total** | **117** |" in text
    assert "libuv" not in text  # a group that is empty everywhere is left out


def test_instructions_drives_a_raw_server_in_lock_step():
    from forkloop.loadtest.instructions import drive
    from forkloop.loadtest.servers import ServerProcess, free_port, python

    port = free_port()
    command = [python(), "-m", "forkloop.loadtest.raw", "--loop", "reactor", "--port", str(port)]
    with ServerProcess("raw reactor", command, port).start() as server:
        drive(server.port, 200)  # raises unless every request got its answer


def test_instructions_cached_hello_is_a_cache_hit():
    """The app the README counts a cache hit with: its page is stored, and hit."""
    from forkloop.loadtest.instructions import drive, server_command
    from forkloop.loadtest.servers import ServerProcess, free_port

    port = free_port()
    command = server_command("reactor", port, True, "forkloop.loadtest.instructions:cached_hello")
    with ServerProcess("cached reactor", command, port).start() as server:
        drive(server.port, 200)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/") as answer:
            assert answer.headers["X-Cache"] == "HIT"


def test_bench_table_has_the_peer_columns_only_when_the_peer_ran():
    import argparse

    from forkloop.loadtest.bench import PEER, Measurement, format_table
    from forkloop.loadtest.servers import CpuTime

    args = argparse.Namespace(threads=1, connections=50, duration=4, rounds=1, pipeline=1)
    args.workers, args.path = 1, "/"

    def measured(requests: int, user: float) -> Measurement:
        result = Measurement()
        run = {"requests": requests, "seconds": 4.0, "rate": requests / 4.0}
        result.add({**run, "p50_ms": 0.5, "p99_ms": 1.0, "errors": 0}, CpuTime(user, 0.5))
        return result

    alone = format_table({"forkloop reactor": measured(400_000, 1.6)}, args)
    assert "vs" not in alone
    assert "| forkloop reactor | 100,000 | 0.50 | 1.00 | 4.00 | 1.25 | 5.25 | 0 |" in alone
    both = format_table(
        {"forkloop reactor": measured(400_000, 1.6), PEER: measured(200_000, 2.0)}, args
    )
    assert f"| user vs {PEER} | req/s vs {PEER} |" in both
    assert "| 4.00 | 1.25 | 5.25 | 0.40x | 2.00x | 0 |" in both
