"""Which sans-I/O WebSocket library the server should speak through: measured.

    python -m forkloop.loadtest.wsbench                          # CPU per message, both libraries
    python -m forkloop.loadtest.wsbench --callgrind --messages 2000
    python -m forkloop.loadtest.wsbench --servers wsproto,websockets,forkloop --connections 1,500

forkloop's WebSocket support (`server.websocket`) hands the socket's bytes to
a sans-I/O library and writes what the library gives back: the library does
the framing, masking, UTF-8 checks, control frames and compression. Two
well-kept ones exist, ``wsproto`` (pure Python, h11's authors) and the
protocol layer of ``websockets`` (``websockets.server.ServerProtocol``, with a
C extension for unmasking). This script puts each behind the same minimal
echo server (`WsprotoEcho`, `WebsocketsEcho`: one ``asyncio.Protocol`` per
connection, the bytes of one read fed at once, every answer of that read
written in one ``transport.write``, text decoded to ``str`` and encoded back as
an ASGI server must), so that what differs between the rows is the library.
The ``forkloop`` row is the whole server instead: ``forkloop serve`` running
the ASGI echo app of the ASGI bench (`loadtest.asgi_apps.websocket_echo`), to
show what the server adds around the library.

How it measures
---------------
The server runs in a process of its own, the client (``websockets``' asyncio
client, in this process) opens ``--connections`` connections, warms them up,
then each connection echoes ``--messages`` text messages of ``--size`` bytes
one at a time (ping-pong: every message wakes the server once), all
connections at once. What is reported per message:

* the server's CPU time (user + system, from ``/proc``) over the measured
  phase, which is what the machine pays; the client's CPU is never in it;
* with ``--callgrind``, the server's user-space instructions counted by
  callgrind (zeroed after the warm-up, dumped after the run): a count that
  does not depend on the machine's load, so two runs on a shared machine
  compare where their CPU seconds would not.

Messages per second are wall-clock and only meaningful on a quiet machine.
Results go in the README beside this command, never in a docstring.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .instructions import self_costs
from .servers import ServerProcess, free_port, python

LIBRARIES = ("wsproto", "websockets")
WARM_UP_MESSAGES = 20


# --------------------------------------------------------------------- the echo servers


class WebsocketsEcho(asyncio.Protocol):
    """An echo server on ``websockets``' sans-I/O ``ServerProtocol``."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        from websockets.server import ServerProtocol

        self.transport: Any = transport
        self.protocol = ServerProtocol(max_size=2**20)

    def data_received(self, data: bytes) -> None:
        from websockets.frames import Frame, Opcode
        from websockets.http11 import Request

        protocol = self.protocol
        protocol.receive_data(data)
        for event in protocol.events_received():
            if isinstance(event, Request):
                protocol.send_response(protocol.accept(event))
            elif not isinstance(event, Frame):
                continue
            elif event.opcode is Opcode.TEXT:
                protocol.send_text(bytes(event.data).decode().encode())
            elif event.opcode is Opcode.BINARY:
                protocol.send_binary(event.data)
        output = protocol.data_to_send()
        if output:
            self.transport.write(b"".join(output))
            if output[-1] == b"":  # the library's end of stream
                self.transport.close()


class WsprotoEcho(asyncio.Protocol):
    """An echo server on ``wsproto``'s ``WSConnection``."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        from wsproto import ConnectionType, WSConnection

        self.transport: Any = transport
        self.connection = WSConnection(ConnectionType.SERVER)

    def data_received(self, data: bytes) -> None:
        from wsproto.events import (
            AcceptConnection,
            BytesMessage,
            CloseConnection,
            Message,
            Ping,
            Request,
            TextMessage,
        )
        from wsproto.utilities import RemoteProtocolError

        connection = self.connection
        try:
            connection.receive_data(data)
            output = []
            for event in connection.events():
                if isinstance(event, Request):
                    output.append(connection.send(AcceptConnection()))
                elif isinstance(event, TextMessage | BytesMessage):
                    message: Message[Any] = event
                    output.append(connection.send(type(event)(data=message.data)))
                elif isinstance(event, Ping):
                    output.append(connection.send(event.response()))
                elif isinstance(event, CloseConnection):
                    output.append(connection.send(event.response()))
                    self.transport.write(b"".join(output))
                    self.transport.close()
                    return
        except RemoteProtocolError:
            self.transport.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
            self.transport.close()
            return
        if output:
            self.transport.write(b"".join(output))


async def serve(library: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    protocol = WsprotoEcho if library == "wsproto" else WebsocketsEcho
    server = await loop.create_server(protocol, "127.0.0.1", port, backlog=2048)
    async with server:
        await server.serve_forever()


def server_command(name: str, port: int, loop: str) -> list[str]:
    if name == "forkloop":
        return [
            python(), "-m", "forkloop", "forkloop.loadtest.asgi_apps:websocket_echo",
            "--no-master", "--loop", loop, "--bind", f"127.0.0.1:{port}", "--no-access-log",
            "--log-level", "warning", "--metrics-bind", "off", "--health-path", "off",
            "--ws-ping-interval", "0", "--no-ws-per-message-deflate",
        ]  # fmt: skip
    return [python(), "-m", "forkloop.loadtest.wsbench", "serve", name, "--port", str(port),
            "--loop", loop]  # fmt: skip


# --------------------------------------------------------------------- the client


async def _connect_all(port: int, connections: int) -> list[Any]:
    from websockets.asyncio.client import connect

    uri = f"ws://127.0.0.1:{port}/"
    opened = []
    for _ in range(connections):  # one at a time: the server's backlog is not the test
        opened.append(
            await connect(uri, compression=None, ping_interval=None, max_size=None, open_timeout=60)
        )
    return opened


async def _echo(websocket: Any, messages: int, message: str) -> None:
    for _ in range(messages):
        await websocket.send(message)
        reply = await websocket.recv()
        if reply != message:
            raise RuntimeError(f"the echo came back as {str(reply)[:40]!r}")


async def _drive(
    port: int, connections: int, messages: int, message: str, before: Any, after: Any
) -> float:
    """Connect, warm up, then echo; ``before``/``after`` mark the measured phase."""
    opened = await _connect_all(port, connections)
    try:
        await asyncio.gather(*(_echo(ws, WARM_UP_MESSAGES, message) for ws in opened))
        before()
        start = time.perf_counter()
        await asyncio.gather(*(_echo(ws, messages, message) for ws in opened))
        elapsed = time.perf_counter() - start
        after()
    finally:
        await asyncio.gather(*(ws.close() for ws in opened), return_exceptions=True)
    return elapsed


def _client_loop() -> Any:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop
    return uvloop.new_event_loop


def measure(
    name: str, connections: int, args: argparse.Namespace, workdir: Path
) -> dict[str, float]:
    """One row: messages per second, CPU and (with --callgrind) instructions per message."""
    port = free_port()
    command = server_command(name, port, args.loop)
    dump = workdir / f"callgrind.{name}.{connections}"
    if args.callgrind:
        command = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={dump}",
                   "--dump-instr=no", *command]  # fmt: skip
    server = ServerProcess(name, command, port).start(timeout=180.0 if args.callgrind else 20.0)
    assert server.process is not None
    pid = server.process.pid
    cpu: list[float] = []

    def mark() -> None:
        if args.callgrind:
            action = "--zero" if not cpu else "--dump"
            subprocess.run(["callgrind_control", action, str(pid)], check=True, capture_output=True)
        spent = server.cpu()
        cpu.append(spent.user + spent.system)

    message = "x" * args.size
    try:
        with asyncio.Runner(loop_factory=_client_loop()) as runner:
            elapsed = runner.run(_drive(port, connections, args.messages, message, mark, mark))
    finally:
        server.stop()
    total = connections * args.messages
    row = {"rate": total / elapsed, "cpu_us": (cpu[1] - cpu[0]) / total * 1e6}
    if args.callgrind:
        parts = sorted(workdir.glob(f"{dump.name}.*"))
        if not parts:
            raise RuntimeError(f"callgrind wrote no dump for {name}")
        row["instructions"] = sum(self_costs(parts[-1]).values()) / total
    return row


def table(rows: dict[tuple[str, int], dict[str, float]], callgrind: bool) -> str:
    header = "| server | connections | msg/s | server CPU µs/msg |"
    rule = "|---|---:|---:|---:|"
    if callgrind:
        header += " instructions/msg |"
        rule += "---:|"
    lines = [header, rule]
    for (name, connections), row in rows.items():
        line = f"| {name} | {connections} | {row['rate']:,.0f} | {row['cpu_us']:,.1f} |"
        if callgrind:
            line += f" {row['instructions']:,.0f} |"
        lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:
        parser = argparse.ArgumentParser(prog="wsbench serve")
        parser.add_argument("library", choices=LIBRARIES)
        parser.add_argument("--port", type=int, required=True)
        parser.add_argument("--loop", default="asyncio")
        served = parser.parse_args(argv[1:])
        from ..server import backends

        with asyncio.Runner(loop_factory=backends.loop_factory(served.loop)) as runner:
            runner.run(serve(served.library, served.port))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--servers", default=",".join(LIBRARIES),
                        help="wsproto, websockets and/or forkloop (the whole server)")  # fmt: skip
    parser.add_argument("--connections", default="1,500", help="comma-separated counts")
    parser.add_argument("--messages", type=int, default=200, help="echoes per connection")
    parser.add_argument("--size", type=int, default=64, help="bytes per text message")
    parser.add_argument("--loop", default="asyncio", help="the servers' loop backend")
    parser.add_argument("--callgrind", action="store_true", help="count instructions too")
    args = parser.parse_args(argv)
    if args.callgrind and shutil.which("callgrind_control") is None:
        sys.exit("callgrind_control not found: apt-get install valgrind")
    rows: dict[tuple[str, int], dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="forkloop-wsbench-") as workdir:
        for connections in (int(n) for n in args.connections.split(",")):
            for name in args.servers.split(","):
                rows[(name, connections)] = measure(name, connections, args, Path(workdir))
                print(f"{name}, {connections} connections: {rows[(name, connections)]}", flush=True)
    print()
    print(table(rows, args.callgrind))


if __name__ == "__main__":
    main()
