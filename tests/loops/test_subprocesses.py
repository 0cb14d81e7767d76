"""Subprocesses and pipes: real child processes, real pipes, real signals."""

from __future__ import annotations

import asyncio
import os
import signal
import sys

from tests.loop_under_test import LoopUnderTest
from tests.loops.loop_support import Recorder

PYTHON = sys.executable


def test_subprocess_exec_talks_through_all_three_pipes(backend: LoopUnderTest):
    script = (
        "import sys; data = sys.stdin.buffer.read(); "
        "sys.stdout.buffer.write(data.upper()); sys.stderr.write('to stderr'); sys.exit(3)"
    )

    async def main():
        process = await asyncio.create_subprocess_exec(
            PYTHON,
            "-c",
            script,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await process.communicate(b"shout this")
        return out, err, process.returncode

    assert backend.run(main, timeout=20) == (b"SHOUT THIS", b"to stderr", 3)


def test_subprocess_shell_runs_a_command_line(backend: LoopUnderTest):
    async def main():
        process = await asyncio.create_subprocess_shell(
            "printf 'one\\ntwo\\n' | wc -l", stdout=asyncio.subprocess.PIPE
        )
        out, _ = await process.communicate()
        return out.strip(), process.returncode

    assert backend.run(main, timeout=20) == (b"2", 0)


def test_subprocess_moves_megabytes_both_ways(backend: LoopUnderTest):
    payload = os.urandom(512 * 1024) * 8  # 4 MiB, far beyond a pipe's 64 KiB buffer

    async def main():
        process = await asyncio.create_subprocess_exec(
            "cat", stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
        )
        out, _ = await process.communicate(payload)
        return out == payload, process.returncode

    assert backend.run(main, timeout=30) == (True, 0)


def test_terminated_subprocess_reports_the_signal_as_a_negative_returncode(
    backend: LoopUnderTest,
):
    async def main():
        process = await asyncio.create_subprocess_exec(
            PYTHON,
            "-c",
            "import sys, time; print('ready', flush=True); time.sleep(60)",
            stdout=asyncio.subprocess.PIPE,
        )
        assert await process.stdout.readline() == b"ready\n"
        process.send_signal(signal.SIGTERM)
        terminated = await process.wait()
        killed_process = await asyncio.create_subprocess_exec("sleep", "60")
        killed_process.kill()
        killed = await killed_process.wait()
        return terminated, killed, process.pid > 0

    assert backend.run(main, timeout=20) == (-signal.SIGTERM, -signal.SIGKILL, True)


def test_subprocess_protocol_sees_connection_made_first_and_connection_lost_last(
    backend: LoopUnderTest,
):
    class Watcher(asyncio.SubprocessProtocol):
        def __init__(self):
            self.events = []
            self.done = asyncio.get_running_loop().create_future()

        def connection_made(self, transport):
            self.events.append("connection_made")

        def pipe_data_received(self, fd, data):
            self.events.append(f"data:{fd}")

        def pipe_connection_lost(self, fd, exc):
            self.events.append(f"pipe_lost:{fd}")

        def process_exited(self):
            self.events.append("process_exited")

        def connection_lost(self, exc):
            self.events.append("connection_lost")
            self.done.set_result(exc)

    async def main():
        loop = asyncio.get_running_loop()
        transport, watcher = await loop.subprocess_exec(
            Watcher, PYTHON, "-c", "print('out')", stdin=None
        )
        lost = await watcher.done
        returncode = transport.get_returncode()
        transport.close()
        return watcher.events, lost, returncode

    events, lost, returncode = backend.run(main, timeout=20)
    assert events[0] == "connection_made"
    assert events[-1] == "connection_lost"
    assert {"data:1", "pipe_lost:1", "pipe_lost:2", "process_exited"} <= set(events)
    assert (lost, returncode) == (None, 0)


def test_connect_read_and_write_pipe_carry_data_and_eof(backend: LoopUnderTest):
    async def main():
        loop = asyncio.get_running_loop()
        read_fd, write_fd = os.pipe()
        reader_transport, reader = await loop.connect_read_pipe(
            Recorder, os.fdopen(read_fd, "rb", 0)
        )
        writer_transport, _ = await loop.connect_write_pipe(
            asyncio.BaseProtocol, os.fdopen(write_fd, "wb", 0)
        )
        writer_transport.write(b"through ")
        writer_transport.write(b"a pipe")
        writer_transport.close()
        lost = await reader.lost
        return bytes(reader.data), lost, reader_transport.is_closing()

    assert backend.run(main, timeout=10) == (b"through a pipe", None, True)
