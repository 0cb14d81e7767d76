"""``forkloop bench --asgi``: the same ASGI applications on forkloop and its peers.

Which servers
-------------
forkloop on each loop backend (``--loops``), and the ASGI servers a user
would otherwise choose (``--peers``): uvicorn (``--loop uvloop --http
httptools``), granian (``--interface asgi``, on uvloop) and hypercorn (its
uvloop worker). Each runs ``--workers`` worker processes (one by default),
with no access log; every server's whole process tree is measured, so a
server that keeps a supervising process beside its worker (granian,
hypercorn) pays for it, as it would in production.

forkloop is started through ``forkloop serve`` (one process, ``--no-master``,
no access log, no ``/metrics``, no health path) when the command line loads
the application, which the bench asks it with ``--check-config``; otherwise
through `loadtest.asgi_server`, which builds the same `HttpService` over
`AsgiApp`. Each table says which (``forkloop via cli`` or ``via runner``).

What runs
---------
Four workloads, one application each (`loadtest.asgi_apps`), every server
started afresh for each workload:

* ``hello``: a bare ASGI hello world: what the server itself costs;
* ``fastapi``: a FastAPI ``async def`` endpoint answering a small JSON object;
* ``echo``: a 10 KiB POST body sent back (wrk with a Lua script);
* ``websocket``: one WebSocket connection echoing messages
  (`loadtest.websocket_client`); forkloop's rows say "not supported yet"
  until ``server/websocket.py`` exists.

Before any load, each server's answer is checked once (the body echoed, the
JSON parsed); a server that answers wrongly is left out and its row says why.
Then each is warmed up (``--warmup`` seconds) and the rounds alternate their
order (A B C, C B A, ...) so drift on a shared machine hits every server
alike, as in the plain ``forkloop bench`` (`loadtest.bench`).

What it prints
--------------
One Markdown table per workload: requests (or messages) per second, latency,
and the server's user, system and total CPU microseconds per request, read
from ``/proc`` for its process tree over each run, with ratios against
uvicorn and granian measured in the same run. After the hello table, the
issue's two targets are judged on the figures just measured: forkloop's best
backend at no more than 0.5x uvicorn's user CPU per request, and no more than
1.0x granian's total CPU per request.
"""

from __future__ import annotations

import argparse
import http.client
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Collection
from dataclasses import dataclass

from ..server import backends
from . import asgi_apps, websocket_client
from .bench import Measurement, median_ms, parse_wrk
from .servers import ServerProcess, free_port, python

APPS = "forkloop.loadtest.asgi_apps"
ECHO_BYTES = 10 * 1024
REFERENCES = ("uvicorn", "granian")  # the peers every table is compared against
# The targets on the bare hello: (peer, "user" or "total", the most forkloop may cost).
TARGETS = (("uvicorn", "user", 0.5), ("granian", "total", 1.0))


@dataclass(frozen=True)
class Workload:
    name: str
    title: str
    app: str  # attribute of loadtest.asgi_apps
    factory: bool = False  # the attribute builds the app when called
    method: str = "GET"
    body_bytes: int = 0
    websocket: bool = False
    needs: str | None = None  # a module the application imports

    @property
    def spec(self) -> str:
        return f"{APPS}:{self.app}"


WORKLOADS = {
    workload.name: workload
    for workload in (
        Workload("hello", "Bare ASGI hello world", "hello"),
        Workload(
            "fastapi", "FastAPI JSON endpoint", "make_fastapi_json", factory=True, needs="fastapi"
        ),
        Workload("echo", "10 KiB POST echo", "echo", method="POST", body_bytes=ECHO_BYTES),
        Workload("websocket", "WebSocket echo", "websocket_echo", websocket=True),
    )
}

# --------------------------------------------------------------------- servers

Command = Callable[[Workload, int, int], list[str]]  # (workload, port, workers) -> argv


@dataclass(frozen=True)
class Contender:
    """One server of the comparison, and why it cannot run here, if it cannot."""

    name: str
    command: Command
    missing: str | None = None
    serves_websockets: bool = True

    def unavailable(self, workload: Workload) -> str | None:
        if self.missing is not None:
            return self.missing
        if workload.websocket and not self.serves_websockets:
            return "not supported yet (no server/websocket.py)"
        if workload.needs is not None and importlib.util.find_spec(workload.needs) is None:
            return f"{workload.needs} is not installed: pip install -e '.[loadtest]'"
        return None


def forkloop_contender(loop: str, launch: str) -> Contender:
    def via_cli(workload: Workload, port: int, workers: int) -> list[str]:
        command = [python(), "-m", "forkloop", workload.spec, "--bind", f"127.0.0.1:{port}"]
        command += ["--loop", loop, "--workers", str(workers)]
        command += ["--no-master"] if workers == 1 else []
        command += ["--no-access-log", "--metrics-bind", "off", "--health-path", "off"]
        return command + ["--log-level", "warning"] + (["--factory"] if workload.factory else [])

    def via_runner(workload: Workload, port: int, workers: int) -> list[str]:
        command = [python(), "-m", "forkloop.loadtest.asgi_server", workload.spec]
        command += ["--loop", loop, "--port", str(port), "--log-level", "warning"]
        return command + (["--factory"] if workload.factory else [])

    websockets = importlib.util.find_spec("forkloop.server.websocket") is not None
    command = via_cli if launch == "cli" else via_runner
    return Contender(f"forkloop {loop}", command, serves_websockets=websockets)


def _uvicorn(workload: Workload, port: int, workers: int) -> list[str]:
    command = [python(), "-m", "uvicorn", workload.spec, "--host", "127.0.0.1", "--port", str(port)]
    command += ["--loop", "uvloop", "--http", "httptools", "--no-access-log"]
    command += ["--log-level", "warning", "--workers", str(workers)]
    return command + (["--factory"] if workload.factory else [])


def _granian(workload: Workload, port: int, workers: int) -> list[str]:
    command = [python(), "-m", "granian", "--interface", "asgi", "--host", "127.0.0.1"]
    command += ["--port", str(port), "--workers", str(workers), "--loop", "uvloop"]
    command += ["--no-access-log", "--log-level", "warning"]
    return command + (["--factory"] if workload.factory else []) + [workload.spec]


def _hypercorn(workload: Workload, port: int, workers: int) -> list[str]:
    command = [python(), "-m", "hypercorn", "--bind", f"127.0.0.1:{port}"]
    command += ["--workers", str(workers), "--worker-class", "uvloop", "--log-level", "warning"]
    return command + [workload.spec + ("()" if workload.factory else "")]  # hypercorn evaluates it


PEERS: dict[str, Command] = {"uvicorn": _uvicorn, "granian": _granian, "hypercorn": _hypercorn}


def peer_contender(name: str) -> Contender:
    missing = None
    if importlib.util.find_spec(name) is None:
        missing = f"{name} is not installed: pip install -e '.[loadtest]'"
    return Contender(name, PEERS[name], missing)


def forkloop_launch(requested: str) -> str:
    """``cli`` when ``forkloop serve`` loads an ASGI application, else ``runner``."""
    if requested != "auto":
        return requested
    check = [python(), "-m", "forkloop", f"{APPS}:hello", "--check-config", "--workers", "1"]
    check += ["--no-master", "--metrics-bind", "off"]
    answered = subprocess.run(check, capture_output=True, timeout=60)
    return "cli" if answered.returncode == 0 else "runner"


# --------------------------------------------------------------------- load


class Load:
    """How one workload is driven: wrk for HTTP, the WebSocket client for echoes."""

    def __init__(self, workload: Workload, args: argparse.Namespace, scripts: str) -> None:
        self.workload = workload
        self.args = args
        self.message = "x" * args.ws_message_size
        self.script: str | None = None
        if workload.method != "GET" or args.pipeline > 1:
            self.script = os.path.join(scripts, f"{workload.name}.lua")
            with open(self.script, "w") as handle:
                handle.write(wrk_script(workload, args.pipeline))

    def check(self, port: int) -> str | None:
        """None if the server answers this workload correctly; else what it did."""
        if self.workload.websocket:
            return websocket_client.check_echo(port, self.message)
        return check_http_answer(self.workload, port)

    def run(self, port: int, seconds: int) -> dict[str, float]:
        if self.workload.websocket:
            return websocket_client.echo_for(port, seconds, self.message, self.args.ws_in_flight)
        args = self.args
        command = ["wrk", f"-t{args.threads}", f"-c{args.connections}", f"-d{seconds}s"]
        command += ["--latency"] + (["-s", self.script] if self.script else [])
        command.append(f"http://127.0.0.1:{port}/")
        output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        return parse_wrk(output)

    def describe(self) -> str:
        args, seconds = self.args, wrk_seconds(self.args)
        if self.workload.websocket:
            return (
                f"1 WebSocket connection, {args.ws_message_size}-byte text messages, "
                f"{args.ws_in_flight} in flight, {seconds}s x {args.rounds} rounds"
            )
        text = f"wrk -t{args.threads} -c{args.connections} -d{seconds}s x {args.rounds} rounds"
        text += f", pipeline {args.pipeline}"
        if self.workload.body_bytes:
            text += f", {self.workload.method} of {self.workload.body_bytes:,} bytes"
        return text


def wrk_script(workload: Workload, pipeline: int) -> str:
    """wrk's Lua: the method and body of ``workload``, ``pipeline`` requests per write."""
    lines = [f'wrk.method = "{workload.method}"']
    if workload.body_bytes:
        lines.append(f'wrk.body = string.rep("x", {workload.body_bytes})')
        lines.append('wrk.headers["Content-Type"] = "application/octet-stream"')
    if pipeline > 1:
        lines += [
            "init = function(args)",
            "  local batch = {}",
            f"  for i = 1, {pipeline} do batch[i] = wrk.format() end",
            "  pipelined = table.concat(batch)",
            "end",
            "request = function() return pipelined end",
        ]
    return "\n".join(lines) + "\n"


def check_http_answer(workload: Workload, port: int) -> str | None:
    body = b"x" * workload.body_bytes
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request(workload.method, "/", body=body or None)
        response = connection.getresponse()
        answer = response.read()
    except (OSError, http.client.HTTPException) as exc:
        return f"no answer: {type(exc).__name__}: {exc}"
    finally:
        connection.close()
    if response.status != 200:
        return f"status {response.status}"
    if workload.name == "fastapi":
        try:
            decoded = json.loads(answer)
        except ValueError:
            decoded = None
        return None if decoded == asgi_apps.JSON_MESSAGE else f"JSON {answer[:40]!r}"
    expected = body if workload.method == "POST" else asgi_apps.HELLO_BODY
    return None if answer == expected else f"a body of {len(answer)} bytes, not {len(expected)}"


def wrk_seconds(args: argparse.Namespace) -> int:
    """wrk takes whole seconds only."""
    seconds: float = args.duration
    return max(1, round(seconds))


# --------------------------------------------------------------------- one workload

Result = Measurement | str  # a measurement, or why the server has none


def measure(load: Load, contenders: list[Contender], args: argparse.Namespace) -> dict[str, Result]:
    """Start every contender on the load's workload, drive them in alternating rounds, stop them."""
    workload = load.workload
    results: dict[str, Result] = {}
    running: list[ServerProcess] = []
    try:
        for contender in contenders:
            reason = contender.unavailable(workload)
            if reason is not None:
                results[contender.name] = reason
                continue
            port = free_port()
            server = ServerProcess(
                contender.name, contender.command(workload, port, args.workers), port
            )
            try:
                server.start()
            except RuntimeError as exc:
                print(f"{workload.name}: {exc}", file=sys.stderr)
                results[contender.name] = "did not start (its error is on stderr)"
                continue
            running.append(server)
            problem = load.check(port)
            if problem is None and args.warmup > 0:
                problem = _attempt(load, server, args.warmup)
            if problem is not None:
                results[contender.name] = f"left out: {problem}"
                server.stop()
                running.remove(server)
                continue
            results[contender.name] = Measurement()
        for round_number in range(args.rounds):
            order = running if round_number % 2 == 0 else running[::-1]
            for server in order:
                measurement = results[server.name]
                assert isinstance(measurement, Measurement)
                before = server.cpu()
                try:
                    run = load.run(server.port, wrk_seconds(args))
                except Exception as exc:  # noqa: BLE001 - the row says what failed
                    results[server.name] = f"failed in round {round_number + 1}: {_brief(exc)}"
                    server.stop()
                    running.remove(server)
                    continue
                measurement.add(run, server.cpu() - before)
                unit = "msg/s" if workload.websocket else "req/s"
                print(
                    f"{workload.name} round {round_number + 1}: {server.name}: "
                    f"{run['rate']:,.0f} {unit}",
                    file=sys.stderr,
                )
    finally:
        for server in running:
            server.stop()
    return results


def _attempt(load: Load, server: ServerProcess, seconds: int) -> str | None:
    try:
        load.run(server.port, seconds)
    except Exception as exc:  # noqa: BLE001 - the row says what failed
        return f"warm-up failed: {_brief(exc)}"
    return None


def _brief(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:80]}" if text else type(error).__name__


# --------------------------------------------------------------------- tables


def _measured(results: dict[str, Result], name: str) -> Measurement | None:
    result = results.get(name)
    if isinstance(result, Measurement) and result.requests > 0:
        return result
    return None


def format_table(
    workload: Workload, results: dict[str, Result], heading: str, load_description: str
) -> str:
    """One workload's Markdown table, with ratios against the reference peers that ran."""
    unit = "msg" if workload.websocket else "req"
    references = [(name, m) for name in REFERENCES if (m := _measured(results, name)) is not None]
    columns = [f"{unit}/s", "p50 ms", "p99 ms", f"user µs/{unit}", f"sys µs/{unit}"]
    columns.append(f"total µs/{unit}")
    for name, _ in references:
        columns += [f"user vs {name}", f"total vs {name}"]
    columns.append("errors")
    lines = [
        f"**{workload.title}** ({workload.name}): {load_description}, {heading}",
        "",
        "| server | " + " | ".join(columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for name, result in results.items():
        if isinstance(result, str) or result.requests == 0:
            reason = result if isinstance(result, str) else "no request answered"
            lines.append(f"| {name} | {reason} |" + " - |" * (len(columns) - 1))
            continue
        user, system = result.user_us(), result.system_us()
        cells = [
            f"{statistics.median(result.rates):,.0f}",
            median_ms(result.p50_ms),
            median_ms(result.p99_ms),
            f"{user:.2f}",
            f"{system:.2f}",
            f"{user + system:.2f}",
        ]
        for _, reference in references:
            cells.append(f"{user / reference.user_us():.2f}x")
            cells.append(f"{(user + system) / _total_us(reference):.2f}x")
        cells.append(str(result.errors))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _total_us(measurement: Measurement) -> float:
    return measurement.user_us() + measurement.system_us()


def target_verdicts(results: dict[str, Result]) -> list[str]:
    """The issue's targets on the bare hello, judged on this run's figures."""
    forkloop = {
        name: measurement
        for name in results
        if name.startswith("forkloop ") and (measurement := _measured(results, name)) is not None
    }
    lines = []
    for peer, kind, limit in TARGETS:
        target = f"forkloop's best backend at <= {limit:.1f}x {peer}'s {kind} CPU per request"
        reference = _measured(results, peer)
        if reference is None or not forkloop:
            missing = peer if reference is None else "forkloop"
            lines.append(f"Target: {target}: not judged ({missing} was not measured).")
            continue
        cost = Measurement.user_us if kind == "user" else _total_us
        best = min(forkloop, key=lambda name: cost(forkloop[name]))
        ratio = cost(forkloop[best]) / cost(reference)
        verdict = "met" if ratio <= limit else f"not met, {ratio / limit:.2f}x the target"
        lines.append(f"Target: {target}: {best} at {ratio:.2f}x, {verdict}.")
    return lines


# --------------------------------------------------------------------- command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("--asgi", "the ASGI benchmark (forkloop bench --asgi)")
    group.add_argument(
        "--workloads",
        default=",".join(WORKLOADS),
        help=f"comma-separated, of {', '.join(WORKLOADS)} (default: all)",
    )
    group.add_argument(
        "--peers",
        default=",".join(PEERS),
        help=f"comma-separated ASGI servers to compare, of {', '.join(PEERS)} (default: all)",
    )
    group.add_argument(
        "--warmup", type=int, default=1, help="seconds of load per server before the rounds"
    )
    group.add_argument(
        "--ws-message-size", type=int, default=64, help="bytes per WebSocket text message"
    )
    group.add_argument(
        "--ws-in-flight", type=int, default=1, help="WebSocket messages outstanding at once"
    )
    group.add_argument(
        "--forkloop-via",
        choices=("auto", "cli", "runner"),
        default="auto",
        help="start forkloop with forkloop serve (cli), with loadtest.asgi_server (runner), "
        "or cli when it loads ASGI apps (auto)",
    )


def _names(text: str, known: Collection[str], what: str) -> list[str]:
    names = [name for name in text.split(",") if name]
    for name in names:
        if name not in known:
            raise ValueError(f"unknown {what} {name!r}; known: {', '.join(known)}")
    return names


def main(args: argparse.Namespace) -> int:
    if args.raw or args.path != "/":
        return _refuse("--raw and --path belong to the plain bench; leave them out with --asgi")
    if args.ws_in_flight < 1 or args.ws_message_size < 1 or args.warmup < 0 or args.rounds < 1:
        return _refuse("--ws-in-flight, --ws-message-size and --rounds are at least 1")
    try:
        workloads = [WORKLOADS[name] for name in _names(args.workloads, WORKLOADS, "workload")]
        peers = [] if args.no_peer else _names(args.peers, PEERS, "peer")
        loops = _names(args.loops, backends.names(), "loop backend")
        for loop in loops:
            backends.loop_factory(loop)  # fail early, with the registry's message
    except (ValueError, backends.BackendUnavailable) as exc:
        return _refuse(str(exc))
    if shutil.which("wrk") is None and any(not w.websocket for w in workloads):
        return _refuse("forkloop bench needs wrk: apt-get install wrk (or brew install wrk)")
    launch = forkloop_launch(args.forkloop_via)
    if launch == "runner" and args.workers != 1 and loops:
        return _refuse(
            "forkloop's ASGI runner serves one worker: --workers 1, or --forkloop-via cli"
        )
    print(f"forkloop via {launch}", file=sys.stderr)
    contenders = [forkloop_contender(loop, launch) for loop in loops]
    contenders += [peer_contender(name) for name in peers]
    heading = (
        f"{args.workers} worker(s), forkloop via {launch}, "
        f"{os.cpu_count()} cores, Python {sys.version.split()[0]}"
    )
    sections = []
    with tempfile.TemporaryDirectory(prefix="forkloop-bench-") as scripts:
        for workload in workloads:
            load = Load(workload, args, scripts)
            results = measure(load, contenders, args)
            section = format_table(workload, results, heading, load.describe())
            if workload.name == "hello":
                section += "\n\n" + "\n".join(target_verdicts(results))
            print(section + "\n", flush=True)
            sections.append(section)
    if args.output:
        with open(args.output, "w") as output:
            output.write("\n\n".join(sections) + "\n")
    return 0


def _refuse(message: str) -> int:
    print(f"forkloop bench --asgi: {message}", file=sys.stderr)
    return 2
