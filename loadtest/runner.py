"""``forkloop loadtest``: locust's scenarios against each backend, then a report.

    forkloop loadtest                                   # every scenario, every backend here
    forkloop loadtest --loops uvloop,reactor --workers 1,2 --duration 30 --users 50
    forkloop loadtest --scenarios hello,cached --max-p99-ms hello=5,cached=50
    forkloop loadtest --scenarios cached,stampede --workers 4 --shared-cache off,on
    forkloop loadtest --host http://10.0.0.5:8000       # a server that runs elsewhere

**Processes.** Locust patches the standard library with gevent the moment it
is imported; a server running in such a process would run on gevent's sockets
and clock, not on the loop under test. So nothing here imports locust: the
runner shells out to ``python -m locust`` (headless, ``--json-file``, ``--csv``,
``--csv-full-history``, ``--html``) and starts the server as another
subprocess (`loadtest.servers.forkloop_server`). Three processes, each with one
job: the runner measures, the server serves, locust loads.

**The plan.** For each backend (``--loops``, default: every backend available
here), each worker count (``--workers 1,4``) and each ``--shared-cache``
setting (``off,on``: one server without the server-wide cache tier, one with
it, so a stampede computes once per worker or once per server, and the report's
*computations* column shows which): start the server, wait until
it answers, then run the scenarios one after another against it, each as its
own locust run of ``--duration`` seconds with ``--users`` users started at
``--spawn-rate`` per second. Around each run the runner reads the server's CPU
time (its whole process tree, from ``/proc``) and its ``/stats`` counters, so
that a row's server-side figures (CPU µs per request, cache hits, coalesced
requests, cancellations) belong to that scenario alone. The price is time:
backends × worker counts × scenarios × duration, printed before it starts.
Then the server is stopped and the next one started.

**Counters.** ``/stats`` is read from whichever worker answers it; its
``server`` object holds the totals over all workers, either flat
(``cache_hits``, ``cancelled_disconnect``) as the scoreboard publishes them,
or nested like a process's own (``cache.hits``); `server_counters` accepts
both and reads a missing counter as 0. Workers publish their counters on their
heartbeat (once a second by default), so with several workers the runner
waits one heartbeat after a run before it reads the totals.

**Verdict.** The exit status is 1 when any request failed (more than
``--max-fail-ratio``, 0 by default), a scenario made no request at all, a run
could not be made, or a p99 exceeded ``--max-p99-ms`` (one limit for every
scenario but ``cancel``, whose latency is the client's own timeout, or one per
scenario: ``hello=5,stampede=400``); 2 when the test could
not start (locust or matplotlib missing, an unknown backend). The report says
which rule was broken, by which run.

**More load than one machine makes.** ``--processes N`` runs locust's
distributed mode locally: a master and N worker processes, each on its own
core. Across machines, start this command with ``--master --expect-workers N
--host URL`` on one machine and ``forkloop loadtest --worker --master-host
HOST`` on each of the others; each scenario is then one distributed locust
run, and the workers are restarted for the next one.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import resource
import shlex
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..server import backends
from ..server.scoreboard import CACHE_COUNTERS, CANCEL_COUNTERS, SHARED_CACHE_COUNTERS
from .report import ScenarioRun, markdown, read_locust_results, write_plot
from .servers import ServerProcess, forkloop_server, python

SCENARIOS = {
    "hello": "Keep-alive GETs of `/`.",
    "cached": "GETs of `/cached/{key}`, keys drawn from a Zipf distribution: hot keys hit, "
    "the long tail misses and computes.",
    "stampede": "Bursts: every user asks for the same cold key at the same instant "
    "(once a second by default).",
    "cancel": "GETs of `/slow` abandoned by the client (after 0.1 s by default); the server must "
    "cancel each handler. Latency here is the client's timeout.",
    "upload": "POSTs of `/echo`, bodies of 0 B to 256 KiB, half with Content-Length, half chunked.",
    "churn": "GETs of `/` with `Connection: close`: a new connection per request.",
}
LOCUSTFILE = Path(__file__).with_name("locustfile.py")
RAMP_LOCUSTFILE = Path(__file__).with_name("ramp.py")
# The server's counters a run reports, by the names the scoreboard gives them (it
# lists every counter once): requests, connections, the cache and cancellations.
COUNTERS = (
    "requests",
    "connections_total",
    *CACHE_COUNTERS,
    *SHARED_CACHE_COUNTERS,
    *CANCEL_COUNTERS,
)
HEARTBEAT_SECONDS = 1.0  # how often a worker publishes its counters (the master's default)
STOP_TIMEOUT = 5  # seconds locust lets a user finish its request at the end of a run
VERSIONED = ("forkloop", "locust", "uvloop", "httptools", "matplotlib")


def user_class(scenario: str) -> str:
    """The locustfile's user class for a scenario: ``hello`` → ``HelloUser``."""
    return scenario.capitalize() + "User"


def _comma_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    load = parser.add_argument_group("load")
    load.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        help=f"comma-separated scenarios, run in this order (default: {','.join(SCENARIOS)})",
    )
    load.add_argument("--users", type=int, default=10, help="locust users (default 10)")
    load.add_argument(
        "--spawn-rate", type=float, default=10.0, help="users started per second (default 10)"
    )
    load.add_argument(
        "--duration",
        type=int,
        default=10,
        help="seconds each scenario runs, per backend and worker count (default 10)",
    )
    load.add_argument(
        "--ramp",
        type=int,
        default=0,
        metavar="STEPS",
        help="users rise in this many equal steps over each run (loadtest/ramp.py)",
    )
    load.add_argument(
        "--locust-args",
        default="",
        help="more locust options, as one string: '--zipf-keys 100 --abandon-after 0.05'",
    )
    servers = parser.add_argument_group("servers")
    servers.add_argument(
        "--loops",
        default=",".join(backends.available()),
        help="comma-separated loop backends (default: all available here)",
    )
    servers.add_argument(
        "--workers", default="1", help="comma-separated worker counts per server (default 1)"
    )
    servers.add_argument(
        "--shared-cache",
        default="off",
        help="the servers' --shared-cache: off, on, or off,on for both (default off)",
    )
    servers.add_argument(
        "--host",
        default=None,
        metavar="URL",
        help="load a server already running elsewhere instead of starting one per backend",
    )
    verdict = parser.add_argument_group("verdict")
    verdict.add_argument(
        "--max-p99-ms",
        default=None,
        metavar="MS",
        help="fail when a p99 is above MS: '50' for every scenario but cancel, "
        "or per scenario: 'hello=5,cached=50,stampede=400'",
    )
    verdict.add_argument(
        "--max-fail-ratio",
        type=float,
        default=0.0,
        help="fail when more than this share of a run's requests failed (default 0: any)",
    )
    verdict.add_argument(
        "--output", default="loadtest-report", help="report folder (default loadtest-report/)"
    )
    distributed = parser.add_argument_group("distributed locust")
    distributed.add_argument(
        "--processes", type=int, default=0, help="locust worker processes on this machine"
    )
    distributed.add_argument(
        "--master",
        action="store_true",
        help="be the locust master of workers on other machines (needs --host)",
    )
    distributed.add_argument(
        "--expect-workers", type=int, default=1, help="--master: workers to wait for (default 1)"
    )
    distributed.add_argument(
        "--master-bind-port", type=int, default=5557, help="--master: port workers connect to"
    )
    distributed.add_argument(
        "--worker",
        action="store_true",
        help="only run a locust worker for a --master elsewhere, run after run, until Ctrl-C",
    )
    distributed.add_argument("--master-host", default="127.0.0.1", help="--worker: the master")
    distributed.add_argument(
        "--master-port", type=int, default=5557, help="--worker: the master's port"
    )


# ---------------------------------------------------------------------- counters


def fetch_stats(base_url: str) -> dict[str, Any] | None:
    """The server's ``/stats`` JSON, or None when it has none or cannot be reached."""
    try:
        with urllib.request.urlopen(base_url.rstrip("/") + "/stats", timeout=5) as response:
            stats = json.load(response)
    except (OSError, ValueError):
        return None
    return stats if isinstance(stats, dict) else None


def server_counters(stats: dict[str, Any] | None) -> dict[str, int]:
    """The server-wide counters in ``/stats``, in any of its shapes; a missing one is 0."""
    if stats is None:
        return {}
    places = [stats["server"], stats] if isinstance(stats.get("server"), dict) else [stats]
    counters = {}
    for name in COUNTERS:
        group, _, field = name.partition("_")
        value = None
        for place in places:
            nested = place.get(group)
            value = place.get(name, nested.get(field) if isinstance(nested, dict) else None)
            if isinstance(value, int):
                break
        counters[name] = value if isinstance(value, int) else 0
    return counters


def counter_deltas(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {name: after.get(name, 0) - before.get(name, 0) for name in after}


# ------------------------------------------------------------------------ locust


def locust_command(args: argparse.Namespace, scenario: str, host: str, prefix: Path) -> list[str]:
    files = str(LOCUSTFILE) + (f",{RAMP_LOCUSTFILE}" if args.ramp else "")
    command = [python(), "-m", "locust", "-f", files, "--headless", "--host", host]
    command += ["--users", str(args.users), "--spawn-rate", f"{args.spawn_rate:g}"]
    command += ["--run-time", f"{args.duration}s", "--stop-timeout", str(STOP_TIMEOUT)]
    command += ["--csv", str(prefix), "--csv-full-history", "--html", f"{prefix}.html"]
    command += ["--json-file", str(prefix)]  # locust adds .json
    command += ["--only-summary"]
    if args.ramp:
        command += ["--ramp-steps", str(args.ramp)]
    if args.processes:
        command += ["--processes", str(args.processes)]
    if args.master:
        command += ["--master", "--expect-workers", str(args.expect_workers)]
        command += ["--master-bind-port", str(args.master_bind_port)]
    command += shlex.split(args.locust_args)
    return [*command, user_class(scenario)]


def run_locust(command: list[str], log_path: Path, timeout: float) -> tuple[int, float, float]:
    """Run locust to its end: its exit status, wall seconds and CPU seconds (with its workers)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            status = process.wait(timeout)
        except subprocess.TimeoutExpired:
            status = None
        finally:  # timed out, or the runner interrupted: locust and the workers it forked
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)  # its own session: Ctrl-C missed it
                process.wait()
    wall = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if status is None:
        raise RuntimeError(f"locust did not finish within {timeout:.0f} s (log: {log_path})")
    return status, wall, cpu


# ------------------------------------------------------------------------ the plan


def measure_scenario(
    args: argparse.Namespace,
    run: ScenarioRun,
    base_url: str,
    server: ServerProcess | None,
    output: Path,
) -> None:
    """One locust run of ``run.scenario`` against ``base_url``, with the server's side of it."""
    prefix = output / run.files
    Path(f"{prefix}.json").unlink(missing_ok=True)  # a previous report's, in the same folder
    counters_before = server_counters(fetch_stats(base_url))
    cpu_before = server.cpu() if server else None
    timeout = args.duration + STOP_TIMEOUT + (600 if args.master else 60)
    command = locust_command(args, run.scenario, base_url, prefix)
    status, run.wall_seconds, run.load_generator_cpu_seconds = run_locust(
        command, Path(f"{prefix}.log"), timeout
    )
    if server is not None and cpu_before is not None:
        spent = server.cpu() - cpu_before
        run.server_cpu_seconds = spent.user + spent.system
        if not server_running(server):
            assert server.process is not None  # started: its CPU was read above
            run.error = f"the server exited with {server.process.returncode} during the run"
            run.failure_messages.append(server.stderr_tail().strip()[-500:])
            return
        if run.workers and run.workers > 1:
            time.sleep(HEARTBEAT_SECONDS + 0.2)  # every worker's last counters are in
    after = server_counters(fetch_stats(base_url))
    run.server_counters = counter_deltas(counters_before, after) if after else {}
    if not Path(f"{prefix}.json").exists():
        log_tail = Path(f"{prefix}.log").read_text(errors="replace")[-1500:]
        run.error = f"locust exited with {status} and wrote no statistics"
        run.failure_messages.append(log_tail)
        return
    read_locust_results(run, prefix)


def server_running(server: ServerProcess) -> bool:
    return server.process is not None and server.process.poll() is None


def servers_to_test(args: argparse.Namespace) -> list[tuple[str, int | None, bool]]:
    """(backend, workers, shared cache) of each server to load, in order; ("remote",
    None, False) for --host."""
    if args.host:
        return [("remote", None, False)]
    worker_counts = [int(count) for count in _comma_list(args.workers)]
    shared = [setting == "on" for setting in _comma_list(args.shared_cache)]
    return [
        (loop, count, on)
        for loop in _comma_list(args.loops)
        for count in worker_counts
        for on in shared
    ]


def run_plan(args: argparse.Namespace, scenarios: list[str], output: Path) -> list[ScenarioRun]:
    """Every scenario against every server, one server at a time; Ctrl-C ends it early."""
    (output / "locust").mkdir(parents=True, exist_ok=True)
    runs: list[ScenarioRun] = []
    for backend, workers, shared in servers_to_test(args):
        label = backend if workers is None else f"{backend}-w{workers}"
        label += "-shared" if shared else ""
        batch = [
            ScenarioRun(
                scenario,
                backend,
                workers,
                args.users,
                args.duration,
                files=f"locust/{label}-{scenario}",
                shared_cache=shared,
            )
            for scenario in scenarios
        ]
        runs += batch
        try:
            run_batch(args, batch, output)
        except KeyboardInterrupt:
            say("interrupted: writing the report of what ran")
            for run in batch:
                if run.error is None and not run.requests:
                    run.error = "interrupted"
            break
        finally:
            for run in batch:
                if run.error is None and not run.wall_seconds:
                    run.error = "not run"
    return runs


def run_batch(args: argparse.Namespace, batch: list[ScenarioRun], output: Path) -> None:
    """Start one server (unless --host), run each scenario of ``batch`` against it, stop it."""
    first = batch[0]
    extra = ["--shared-cache", "on"] if first.shared_cache else []
    server = None if args.host else forkloop_server(first.backend, first.workers or 1, extra)
    try:
        if server is not None:
            server.start()
            base_url = f"http://127.0.0.1:{server.port}"
        else:
            base_url = args.host
        for run in batch:
            measure_scenario(args, run, base_url, server, output)
            say(progress_line(run))
            if server is not None and not server_running(server):
                break
    except (RuntimeError, OSError) as exc:
        reason, _, details = str(exc).partition("\n")
        unmade = [run for run in batch if not run.wall_seconds]
        for run in unmade:
            run.error = reason
        if unmade and details.strip():
            unmade[0].failure_messages.append(details.strip()[-500:])
        say(f"{first.series}: {exc}")
    finally:
        if server is not None:
            server.stop()


def progress_line(run: ScenarioRun) -> str:
    if run.error:
        return f"{run.series} {run.scenario}: {run.error}"
    return (
        f"{run.series} {run.scenario}: {run.requests:,} requests, "
        f"{run.requests_per_second:,.0f}/s, p99 {run.p99_ms:g} ms, {run.failures} failed"
    )


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------ verdict


def p99_limits(text: str | None, scenarios: list[str]) -> dict[str, float]:
    """``--max-p99-ms``: ``50`` for every scenario but cancel, or ``hello=5,stampede=400``."""
    if not text:
        return {}
    if "=" not in text:
        return {scenario: float(text) for scenario in scenarios if scenario != "cancel"}
    limits = {}
    for item in _comma_list(text):
        scenario, _, limit = item.partition("=")
        if scenario.strip() not in SCENARIOS:
            raise ValueError(f"--max-p99-ms names an unknown scenario {scenario.strip()!r}")
        limits[scenario.strip()] = float(limit)
    return limits


def violations(runs: list[ScenarioRun], args: argparse.Namespace) -> list[str]:
    """Each broken rule as a sentence naming the run that broke it."""
    limits = p99_limits(args.max_p99_ms, list(SCENARIOS))
    found = []
    for run in runs:
        where = f"{run.scenario} on {run.series}"
        if run.error is not None:
            found.append(f"{where}: {run.error}")
        elif not run.requests:
            found.append(f"{where} made no request in {run.duration} s")
        elif run.failure_ratio > args.max_fail_ratio:
            found.append(
                f"{where}: {run.failures:,} of {run.requests:,} requests failed "
                f"({run.failure_ratio:.2%}), more than --max-fail-ratio {args.max_fail_ratio:g}"
            )
        limit = limits.get(run.scenario)
        if limit is not None and run.p99_ms > limit:
            found.append(f"{where}: p99 {run.p99_ms:g} ms is above --max-p99-ms {limit:g}")
    return found


def invocation() -> str:
    """This command line as typed: ``forkloop loadtest ...`` or ``python -m forkloop.loadtest ...``."""
    program = Path(sys.argv[0]).name
    if program == "__main__.py":
        return shlex.join(["python", "-m", "forkloop.loadtest", *sys.argv[1:]])
    return shlex.join([program, *sys.argv[1:]])


def metadata(args: argparse.Namespace, started: datetime, seconds: float) -> dict[str, str]:
    versions = []
    for package in VERSIONED:
        try:
            versions.append(f"{package} {importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    cpu_model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            cpu_model = next(
                line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")
            )
    except (OSError, StopIteration):
        pass
    where = f"server at {args.host}" if args.host else "server and locust on this machine"
    load = f"{args.users} users, {args.spawn_rate:g}/s spawn rate, {args.duration} s per scenario"
    if args.ramp:
        load += f", rising in {args.ramp} steps"
    if args.processes:
        load += f", {args.processes} locust worker processes"
    if args.master:
        load += f", {args.expect_workers} remote locust workers"
    return {
        "date": started.strftime("%Y-%m-%d %H:%M UTC") + f", {seconds:.0f} s in all",
        "command": invocation(),
        "load": load + (f", locust {args.locust_args}" if args.locust_args else ""),
        "machine": f"{os.cpu_count()} cores, {cpu_model}, Linux {platform.release()}; {where}",
        "versions": f"Python {platform.python_version()}, " + ", ".join(versions),
        "files": "results.json (every figure), locust/ (locust's CSV, HTML and log per run)",
    }


# --------------------------------------------------------------------------- main


def check_ready(args: argparse.Namespace, scenarios: list[str]) -> str | None:
    """Why the test cannot start, or None."""
    for module in ("locust", "matplotlib"):
        if importlib.util.find_spec(module) is None:  # found, not imported
            return f"forkloop loadtest needs {module}: pip install -e '.[loadtest]'"
    unknown = [scenario for scenario in scenarios if scenario not in SCENARIOS]
    if unknown or not scenarios:
        return (
            f"unknown scenario {', '.join(unknown) or '(none)'}; choose from {', '.join(SCENARIOS)}"
        )
    if args.master and not args.host:
        return "--master needs --host: workers on other machines cannot reach 127.0.0.1 here"
    try:
        p99_limits(args.max_p99_ms, scenarios)
    except ValueError as exc:
        return f"--max-p99-ms takes MS or SCENARIO=MS,...: {exc}"
    if args.duration < 1 or args.users < 1:
        return "--duration and --users must be at least 1"
    if not args.host:
        try:
            counts = [int(count) for count in _comma_list(args.workers)]
            if not counts or min(counts) < 1:
                return f"--workers takes counts of 1 or more, not {args.workers!r}"
            for loop in _comma_list(args.loops) or [""]:
                backends.loop_factory(loop)
        except ValueError:
            return f"--workers takes whole numbers, not {args.workers!r}"
        except backends.BackendUnavailable as exc:
            return str(exc)
        settings = _comma_list(args.shared_cache)
        if not settings or set(settings) - {"on", "off"}:
            return f"--shared-cache takes off, on or off,on, not {args.shared_cache!r}"
    return None


def run_worker(args: argparse.Namespace) -> int:
    """``--worker``: a locust worker for a master elsewhere, started again after each run.

    Each scenario is a new locust run whose master tells its workers to quit
    at the end, so the worker is started again, until Ctrl-C or SIGTERM.
    """
    command = [python(), "-m", "locust", "-f", str(LOCUSTFILE), "--worker"]
    command += ["--master-host", args.master_host, "--master-port", str(args.master_port)]
    if args.processes:
        command += ["--processes", str(args.processes)]
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stops it as Ctrl-C does
    say(f"locust worker for {args.master_host}:{args.master_port}; Ctrl-C to stop")
    worker: subprocess.Popen[bytes] | None = None
    try:
        while True:
            worker = subprocess.Popen(command)
            status = worker.wait()
            say(f"locust worker exited with {status}; starting it again for the next run")
            time.sleep(1)  # a master that is not up yet: don't spin
    except KeyboardInterrupt:
        if worker is not None and worker.poll() is None:
            worker.terminate()
            worker.wait(10)
        return 0


def main(args: argparse.Namespace) -> int:
    if args.worker:
        return run_worker(args)
    scenarios = _comma_list(args.scenarios)
    problem = check_ready(args, scenarios)
    if problem is not None:
        print(f"forkloop loadtest: {problem}", file=sys.stderr)
        return 2
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.default_int_handler)  # clean up as on Ctrl-C
    output = Path(args.output)
    planned = len(servers_to_test(args)) * len(scenarios)
    say(
        f"{planned} locust runs of {args.duration} s: about "
        f"{planned * (args.duration + 2) / 60:.1f} min; report in {output}/"
    )
    started, clock = datetime.now(UTC), time.monotonic()
    runs = run_plan(args, scenarios, output)
    found = violations(runs, args)
    facts = metadata(args, started, time.monotonic() - clock)
    described = {name: SCENARIOS[name] for name in scenarios}
    (output / "report.md").write_text(markdown(runs, described, facts, found))
    title = f"forkloop load test, {facts['date']}: {facts['load']}"
    write_plot(runs, str(output / "report.png"), title)
    results = {"metadata": facts, "violations": found, "runs": [run.to_json() for run in runs]}
    (output / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    for line in found:
        say(f"FAILED: {line}")
    say(f"report: {output / 'report.md'}")
    return 1 if found else 0


def command_line(argv: list[str] | None = None) -> int:
    """``python -m forkloop.loadtest``: the same as ``forkloop loadtest``."""
    parser = argparse.ArgumentParser(
        prog="python -m forkloop.loadtest",
        description="locust scenarios on each backend, with a report",
    )
    add_arguments(parser)
    return main(parser.parse_args(argv))
