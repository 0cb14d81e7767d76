"""Faults the server must survive, and TLS: on every loop backend.

TLS with the suites' self-signed certificate (the ``certificate`` fixture);
--max-connections; an access log that cannot be written; a worker out of file
descriptors (accept backs off instead of spinning); workers killed with SIGKILL
under load; a handler that leaks a task.
"""

from __future__ import annotations

import resource
import signal
import socket
import ssl
import subprocess
import sys
import time

from forkloop.loadtest.servers import free_port, tree_cpu, wait_until_answering
from forkloop.server.app import App
from forkloop.server.http import Request, Response
from forkloop.server.logs import AccessLog
from tests.server.master_support import LoadLoop, MasterUnderTest, alive, wait_for
from tests.server.support import RawClient, running_server

app = App()


@app.get("/")
def hello(request: Request) -> Response:
    return Response(b"Hello, World!")


def test_https_serves_keep_alive_requests(backend, certificate):
    cert, _ = certificate
    with running_server(backend, app, tls=certificate) as server:
        context = ssl.create_default_context(cafile=cert)
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw:
            with context.wrap_socket(raw, server_hostname="localhost") as tls:
                for _ in range(2):
                    tls.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
                    reply = b""
                    while not reply.endswith(b"Hello, World!"):
                        chunk = tls.recv(4096)
                        assert chunk, "server closed the TLS connection"
                        reply += chunk
                    assert reply.startswith(b"HTTP/1.1 200 OK")


def test_plain_http_to_the_tls_port_is_refused_and_the_server_goes_on(backend, certificate):
    cert, _ = certificate
    with running_server(backend, app, tls=certificate) as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw:
            raw.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            try:
                assert not raw.recv(4096).startswith(b"HTTP/1.1 200")
            except ConnectionResetError:
                pass
        context = ssl.create_default_context(cafile=cert)
        with context.wrap_socket(
            socket.create_connection(("127.0.0.1", server.port), timeout=5),
            server_hostname="localhost",
        ) as tls:
            tls.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            assert tls.recv(4096).startswith(b"HTTP/1.1 200")


def test_bad_certificate_is_a_clear_start_up_error(tmp_path):
    bogus = tmp_path / "bogus.pem"
    bogus.write_text("not a certificate")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "forkloop",
            "--bind",
            f"127.0.0.1:{free_port()}",
            "--certfile",
            str(bogus),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert f"cannot use {bogus} for TLS" in result.stderr


def test_connections_beyond_max_connections_get_503_and_are_closed(backend):
    with running_server(backend, app, max_connections=3) as server:
        held = [RawClient(server.port) for _ in range(3)]
        try:
            for client in held:  # make sure all three are accepted and counted
                client.request("GET", "/")
                assert client.read_reply().status == 200
            with socket.create_connection(("127.0.0.1", server.port), timeout=5) as extra:
                answer = b""
                while chunk := extra.recv(4096):
                    answer += chunk
            assert answer.startswith(b"HTTP/1.1 503 ")
            assert b"too many connections" in answer
            held[0].request("GET", "/")
            assert held[0].read_reply().status == 200
        finally:
            for client in held:
                client.close()
        assert wait_for(lambda: server.call(lambda: len(server.service.connections)) == 0, 3)
        with RawClient(server.port) as client:
            client.request("GET", "/")
            assert client.read_reply().status == 200
        assert server.call(lambda: server.service.stats.connections_refused) == 1


def test_unwritable_access_log_never_stops_the_worker(backend):
    access_log = AccessLog("/dev/full")  # every write fails with ENOSPC
    with running_server(backend, app, access_log=access_log) as server:
        with RawClient(server.port) as client:
            for _ in range(50):
                client.request("GET", "/")
                assert client.read_reply().status == 200
    assert access_log.failures > 0


def _limit_descriptors() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))


def test_worker_out_of_descriptors_backs_off_then_accepts_again(backend, tmp_path):
    port = free_port()
    log = open(tmp_path / "server.log", "wb")  # noqa: SIM115
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "forkloop",
            "--no-master",
            "--bind",
            f"127.0.0.1:{port}",
            "--loop",
            backend.backend,
        ],
        stdout=log,
        stderr=log,
        preexec_fn=_limit_descriptors,
    )
    held: list[socket.socket] = []
    try:
        wait_until_answering(port, 20, process)
        for _ in range(80):  # more than the worker can hold: it hits EMFILE
            held.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        time.sleep(0.5)
        before = tree_cpu(process.pid)
        time.sleep(2.0)
        spent = tree_cpu(process.pid) - before
        assert spent.user + spent.system < 0.5, f"accept spun at EMFILE: {spent}"
        for sock in held:
            sock.close()
        held.clear()
        wait_until_answering(port, 10, process)  # it accepts again once descriptors are free
        assert process.poll() is None
    finally:
        for sock in held:
            sock.close()
        process.send_signal(signal.SIGTERM)
        process.wait(10)
        log.close()


def test_killing_workers_under_load_fails_only_their_in_flight_requests(backend, tmp_path):
    master = MasterUnderTest(backend.backend, tmp_path, "--workers", "2")
    try:
        master.start(workers=2)
        load = LoadLoop(master.port, clients=3)
        load.start()
        assert wait_for(lambda: load.ok > 200, 10)
        for _ in range(2):
            victim = min(master.workers())
            master_kill(victim)
            assert wait_for(
                lambda v=victim: v not in master.workers() and len(master.workers()) == 2, 5
            )
            before = load.ok
            assert wait_for(lambda b=before: load.ok > b + 100, 10)
        load.stop()
        # each kill can fail at most the requests in flight on the victim: one per client
        assert load.failed <= 2 * (load.clients + 1), load.errors
        assert load.ok > 400
    finally:
        master.stop()


def master_kill(pid: int) -> None:
    import os

    os.kill(pid, signal.SIGKILL)


def test_a_leaked_task_does_not_stop_a_graceful_shutdown(backend, tmp_path):
    module = tmp_path / "leaky_app.py"
    module.write_text(LEAKY_APP)
    master = MasterUnderTest(
        backend.backend,
        tmp_path,
        "--workers",
        "1",
        "--graceful-timeout",
        "2",
        app="leaky_app:app",
        env={"PYTHONPATH": str(tmp_path)},
    )
    try:
        master.start(workers=1)
        workers = master.workers()
        assert master.get("/leak")[1] == b"leaked"
        master.signal(signal.SIGQUIT)
        assert master.process.wait(15) == 0
        assert not any(alive(pid) for pid in workers)
    finally:
        master.stop()


LEAKY_APP = """
import asyncio
from forkloop.server import App, Response
app = App()
leaked = []

@app.get("/leak")
async def leak(request):
    leaked.append(asyncio.get_running_loop().create_task(asyncio.sleep(3600)))
    return Response("leaked")
"""
