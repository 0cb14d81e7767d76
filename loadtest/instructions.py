"""Where a loop's time goes: user-space instructions per request, counted by callgrind.

    apt-get install valgrind
    python -m forkloop.loadtest.instructions                        # asyncio, uvloop, reactor
    python -m forkloop.loadtest.instructions --loops reactor --requests 20000
    python -m forkloop.loadtest.instructions --loops reactor,proactor-uring --connections 1
    python -m forkloop.loadtest.instructions --full        # the whole server, not the bare protocol
    python -m forkloop.loadtest.instructions --loops uvloop --uvicorn \\
        --app forkloop.loadtest.asgi_apps:hello            # an ASGI app, against uvicorn
    python -m forkloop.loadtest.instructions --loops reactor \\
        --app forkloop.loadtest.instructions:cached_hello  # a cache hit (server.instant)

Each loop serves the bare httptools protocol (`loadtest.raw`), or with
``--full`` forkloop's whole server (one worker, no master, the demo app's
``/``), under ``valgrind --tool=callgrind``. After a warm-up the counters are
zeroed, a client sends ``--requests`` requests over ``--connections`` (10)
keep-alive connections (one request per connection in flight; with one, one
request per loop iteration), and the counters are dumped. Every
instruction the server executed in user space is counted, in C and in the
interpreter alike; the kernel's side of each system call is not. The counts
do not depend on the machine's load, so unlike CPU seconds they compare well
between runs: a change worth 3 % shows as 3 %.

The table splits each loop's count by where it was spent (by the C function
that executed it): the parser, the interpreter running Python code (the
protocol's and, for asyncio and the reactor, the loop's own), the GIL released
and taken back around each blocking call, the wrappers of those calls, memory
management, and the rest. README "Benchmark" quotes it.
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..server.app import App
from ..server.cache import CachePolicy
from ..server.http import Request, Response
from .servers import ServerProcess, free_port, python

CONNECTIONS = 10
WARM_UP_REQUESTS = 2000
REQUEST = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"
RESPONSE_END = b"Hello, World!"

# (group, pattern on the function name); the first match wins.
GROUPS = [
    ("parser", r"llhttp|httptools"),
    ("libuv + uvloop", r"uvloop|^uv_"),
    ("GIL", r"take_gil|drop_gil|pthread_|PyEval_SaveThread|PyEval_RestoreThread|MustExit"),
    (
        "call wrappers",
        r"^os_|^_Py_read|^_Py_write|epoll|^sock_|vgetargs|convertitem|mkvalue|"
        r"mktuple|countformat|_PyArg_|PyBuffer_|PyBytes_|_PyBytes_|PyLong_From",
    ),
    ("memory", r"malloc|free|realloc|_PyObject_Malloc|_PyObject_Free|unlink_chunk|memset|memcpy"),
    ("garbage collector", r"^gc_|visit_|_traverse|VisitInstance"),
    ("interpreter", r"."),
]


cached_hello = App()


@cached_hello.get("/", cache=CachePolicy(ttl=3600))
def hello(request: Request) -> Response:
    """Computed once: every request after the first is a fresh cache hit."""
    return Response(b"Hello, World!")


def self_costs(dump: Path) -> collections.Counter[str]:
    """Instructions executed in each function itself (not in what it called)."""
    names: dict[str, str] = {}
    costs: collections.Counter[str] = collections.Counter()
    function = None
    skip_next = False  # the line after "calls=" is the callee's inclusive cost

    def name(token: str) -> str:
        match = re.match(r"\((\d+)\)(?: (.*))?", token)
        if match is None:
            return token
        if match.group(2):
            names[match.group(1)] = match.group(2)
        return names.get(match.group(1), match.group(1))

    for line in dump.read_text().splitlines():
        if line.startswith("fn="):
            function = name(line[3:])
        elif line.startswith("cfn="):
            name(line[4:])
        elif line.startswith("calls="):
            skip_next = True
        elif line[:1].isdigit() or line[:1] in "+-*":
            if skip_next:
                skip_next = False
            elif function is not None:
                fields = line.split()
                if len(fields) >= 2:
                    costs[function] += int(fields[1])
    return costs


def grouped(costs: collections.Counter[str]) -> dict[str, int]:
    totals = dict.fromkeys((group for group, _ in GROUPS), 0)
    for function, cost in costs.items():
        bare = function.split("'")[0]  # callgrind marks recursion levels with '2, '3 ...
        for group, pattern in GROUPS:
            if re.search(pattern, bare):
                totals[group] += cost
                break
    return totals


def drive(port: int, requests: int, count: int = CONNECTIONS) -> None:
    """``requests`` requests over ``count`` keep-alive connections, in lock-step."""
    connections = [socket.create_connection(("127.0.0.1", port)) for _ in range(count)]
    try:
        for _ in range(requests // count):
            for connection in connections:
                connection.sendall(REQUEST)
            for connection in connections:
                received = b""
                while not received.endswith(RESPONSE_END):
                    chunk = connection.recv(4096)
                    if not chunk:
                        raise ConnectionError("the server closed the connection")
                    received += chunk
    finally:
        for connection in connections:
            connection.close()


def server_command(loop: str, port: int, full: bool, app: str | None = None) -> list[str]:
    """The server a column counts: the bare protocol, or forkloop's whole server
    (one process, no access log, no metrics) serving ``app`` (the demo app's ``/``)."""
    if not full and app is None:
        return [python(), "-m", "forkloop.loadtest.raw", "--loop", loop, "--port", str(port)]
    return [
        python(), "-m", "forkloop", *([app] if app else []), "--no-master", "--loop", loop,
        "--bind", f"127.0.0.1:{port}", "--no-access-log", "--metrics-bind", "off",
        "--log-level", "warning",
    ]  # fmt: skip


def uvicorn_command(app: str, port: int) -> list[str]:
    """uvicorn as `forkloop bench` runs it: uvloop, httptools, no access log."""
    return [
        python(), "-m", "uvicorn", app, "--port", str(port), "--loop", "uvloop",
        "--http", "httptools", "--no-access-log", "--log-level", "warning",
    ]  # fmt: skip


def count(
    loop: str,
    requests: int,
    workdir: Path,
    full: bool = False,
    app: str | None = None,
    peer: bool = False,
    connections: int = CONNECTIONS,
) -> collections.Counter[str]:
    """Instructions by function over ``requests`` requests to one server under callgrind:
    forkloop on ``loop`` (see `server_command`), or uvicorn serving ``app`` (``peer``)."""
    port = free_port()
    dump = workdir / f"callgrind.{loop}"
    if peer:
        assert app is not None
        served = uvicorn_command(app, port)
    else:
        served = server_command(loop, port, full, app)
    command = [
        "valgrind", "--tool=callgrind", f"--callgrind-out-file={dump}", "--dump-instr=no",
        *served,
    ]  # fmt: skip
    server = ServerProcess(f"{loop} under callgrind", command, port).start(timeout=180.0)
    try:
        assert server.process is not None
        pid = server.process.pid
        drive(port, WARM_UP_REQUESTS, connections)
        subprocess.run(["callgrind_control", "--zero", str(pid)], check=True, capture_output=True)
        drive(port, requests, connections)
        subprocess.run(["callgrind_control", "--dump", str(pid)], check=True, capture_output=True)
        parts = sorted(workdir.glob(f"callgrind.{loop}.*"))
        deadline = time.monotonic() + 30
        while not parts and time.monotonic() < deadline:
            time.sleep(0.2)
            parts = sorted(workdir.glob(f"callgrind.{loop}.*"))
        if not parts:
            raise RuntimeError(f"callgrind wrote no dump for {loop}")
        return self_costs(parts[-1])
    finally:
        server.stop()


def table(per_request: dict[str, dict[str, float]]) -> str:
    loops = list(per_request)
    lines = [
        "| instructions per request | " + " | ".join(loops) + " |",
        "|---|" + "---:|" * len(loops),
    ]
    for group, _ in GROUPS:
        if any(per_request[loop][group] >= 0.5 for loop in loops):
            cells = " | ".join(f"{per_request[loop][group]:,.0f}" for loop in loops)
            lines.append(f"| {group} | {cells} |")
    totals = " | ".join(f"**{sum(per_request[loop].values()):,.0f}**" for loop in loops)
    lines.append(f"| **total** | {totals} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loops", default="asyncio,uvloop,reactor")
    parser.add_argument("--requests", type=int, default=6000)
    parser.add_argument(
        "--connections",
        type=int,
        default=CONNECTIONS,
        help="keep-alive connections in lock-step (1: one request per loop iteration)",
    )
    parser.add_argument(
        "--full", action="store_true", help="count forkloop's whole server, not the bare protocol"
    )
    parser.add_argument(
        "--app",
        help="serve this module:attribute with forkloop's whole server (an App or an ASGI app "
        "answering GET / with Hello, World!), e.g. forkloop.loadtest.asgi_apps:hello",
    )
    parser.add_argument(
        "--uvicorn", action="store_true", help="a column more: uvicorn serving --app (an ASGI app)"
    )
    args = parser.parse_args(argv)
    if args.uvicorn and not args.app:
        parser.error("--uvicorn needs --app (the ASGI app it serves)")
    if not 1 <= args.connections <= args.requests:
        parser.error("--connections must be between 1 and --requests")
    for tool in ("valgrind", "callgrind_control"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} not found: apt-get install valgrind")
    per_request: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="forkloop-callgrind-") as workdir:
        columns = [(loop, False) for loop in args.loops.split(",")]
        if args.uvicorn:
            columns.append(("uvicorn", True))
        for name, peer in columns:
            costs = count(
                name, args.requests, Path(workdir), args.full, args.app, peer, args.connections
            )
            per_request[name] = {g: c / args.requests for g, c in grouped(costs).items()}
            total = sum(per_request[name].values())
            print(f"{name}: {total:,.0f} instructions per request", flush=True)
    print()
    print(table(per_request))


if __name__ == "__main__":
    main()
