"""The proactor loop on its engines: choosing one, batching, leaks, accepting, interruptions.

These run through the loop (real sockets on 127.0.0.1), on both engines where
both apply, and look underneath it where the behaviour is the engine's: which
engine was chosen and why, how many ``io_uring_enter`` calls an iteration
made, what the engine still holds after ten thousand connections. The io_uring
variant never skips quietly (`completion_support.new_loop`).
"""

from __future__ import annotations

import asyncio
import errno
import gc
import logging
import os
import socket
import threading
from typing import Any

import pytest
from completion_support import ENGINES, connected_pair, new_loop, open_fds, run_on

from forkloop import proactor
from forkloop.proactor import abi, engine
from forkloop.proactor import kernel as kernel_module
from forkloop.proactor import ring as ring_module
from forkloop.proactor.emulated import EmulatedRing
from forkloop.proactor.ring import Ring
from tests.loops.loop_support import Echo, Recorder

# accepting ------------------------------------------------------------------------------


@pytest.mark.parametrize("engine_name", ENGINES)
def test_multishot_accept_takes_a_burst_of_connections_on_a_private_listener(
    engine_name: str,
) -> None:
    count = 200

    async def main() -> tuple[int, bool]:
        loop = asyncio.get_running_loop()
        accepted: list[Recorder] = []
        done = loop.create_future()

        def factory() -> Recorder:
            protocol = Recorder()
            accepted.append(protocol)
            if len(accepted) == count:
                done.set_result(None)
            return protocol

        server = await loop.create_server(factory, "127.0.0.1", 0, reuse_port=True, backlog=512)
        acceptor = next(iter(loop._acceptors.values()))
        port = server.sockets[0].getsockname()[1]
        clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(count)]
        await done
        for client in clients:
            client.close()
        await asyncio.gather(*(protocol.lost for protocol in accepted))
        server.close()
        return len(accepted), acceptor._multishot

    assert run_on(engine_name, main) == (count, True)


def test_a_listener_shared_by_two_io_uring_loops_spreads_connections_over_both() -> None:
    """io_uring wakes one exclusive waiter per connection: a standing multishot accept
    would take them all, so on a shared socket each loop re-arms a single-shot accept."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    port = listener.getsockname()[1]
    accepted = {0: 0, 1: 0}
    ready = [threading.Event(), threading.Event()]
    stop: list[asyncio.AbstractEventLoop] = []

    def serve(index: int) -> None:
        async def main() -> None:
            loop = asyncio.get_running_loop()
            stop.append(loop)
            done = loop.create_future()
            loop.stop_serving = lambda: done.set_result(None)  # type: ignore[attr-defined]

            def factory() -> Echo:
                accepted[index] += 1
                return Echo()

            duplicate = socket.socket(fileno=os.dup(listener.fileno()))
            server = await loop.create_server(factory, sock=duplicate)
            ready[index].set()
            await done
            server.close()

        run_on("uring", main)

    threads = [threading.Thread(target=serve, args=(index,)) for index in (0, 1)]
    for thread in threads:
        thread.start()
    try:
        for event in ready:
            assert event.wait(10)
        for _ in range(40):
            with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
                client.sendall(b"ping")
                assert client.recv(4) == b"ping"
    finally:
        for loop in stop:
            loop.call_soon_threadsafe(loop.stop_serving)  # type: ignore[attr-defined]
        for thread in threads:
            thread.join(10)
        listener.close()
    assert accepted[0] + accepted[1] == 40
    assert accepted[0] and accepted[1], f"one loop took every connection: {accepted}"


# batching and older kernels ------------------------------------------------------------


def test_writes_of_one_iteration_reach_the_kernel_in_one_enter(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    enters: list[int] = []
    real = ring_module._libc_enter  # the system call the loop's iteration makes itself

    def counting(number: object, fd: int, to_submit: int, *args: object) -> int:
        enters.append(to_submit)
        return real(number, fd, to_submit, *args)

    async def main() -> list[int]:
        loop = asyncio.get_running_loop()
        pairs = [await connected_pair() for _ in range(20)]
        await asyncio.sleep(0.01)
        monkeypatch.setattr(ring_module, "_libc_enter", counting)
        for server_side, _, _ in pairs:
            server_side.transport.write(b"one iteration")
        await asyncio.gather(*(client.received(13) for _, client, _ in pairs))
        monkeypatch.setattr(ring_module, "_libc_enter", real)
        submitted_first = list(enters)
        for _, client, server in pairs:
            client.transport.close()
            server.close()
        await asyncio.gather(*(server_side.lost for server_side, _, _ in pairs))
        assert loop.engine_name == "uring"
        return submitted_first

    submitted = run_on("uring", main)
    # the first write of a quiet iteration goes out at once (write(2)); the others share an enter
    assert submitted[0] >= 19, f"the 20 sends were split over several enters: {submitted}"


def test_a_lone_request_and_its_answer_cost_one_enter(monkeypatch: pytest.MonkeyPatch) -> None:
    """One client asking and waiting: the answer is written at once, not sent through the
    ring, whose completion would end the next enter by itself (two enters a request)."""
    exchanges = 200
    enters: list[int] = []
    real = ring_module._libc_enter  # the system call the loop's iteration makes itself

    def counting(number: object, fd: int, to_submit: int, *args: object) -> int:
        enters.append(to_submit)
        return real(number, fd, to_submit, *args)

    def client(port: int) -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            for _ in range(exchanges):
                sock.sendall(b"ping")
                assert sock.recv(4) == b"ping"

    async def main() -> int:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(Echo, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)) as warm:
            warm.sendall(b"ping")
            await loop.run_in_executor(None, warm.recv, 4)
        monkeypatch.setattr(ring_module, "_libc_enter", counting)
        await loop.run_in_executor(None, client, port)
        monkeypatch.setattr(ring_module, "_libc_enter", real)
        server.close()
        assert loop.engine_name == "uring"
        return len(enters)

    made = run_on("uring", main)
    assert made < 1.5 * exchanges, f"{made} enters for {exchanges} exchanges"


@pytest.mark.parametrize("setup", ["cooperative", "plain"])
def test_the_loop_runs_on_rings_of_older_kernels(
    setup: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without DEFER_TASKRUN (before 6.1) completions may be posted outside the loop's enter."""
    flags = 0
    if setup == "cooperative":
        flags = abi.SETUP_SUBMIT_ALL | abi.SETUP_COOP_TASKRUN | abi.SETUP_TASKRUN_FLAG
    monkeypatch.setattr(kernel_module, "_SETUP_ATTEMPTS", (flags,))
    payload = os.urandom(1024 * 1024)

    async def main() -> tuple[int, bool, bool]:
        loop = asyncio.get_running_loop()
        server_side, client, server = await connected_pair()
        client.transport.write(payload)
        received = await server_side.received(len(payload))
        woken = loop.create_future()
        threading.Thread(target=loop.call_soon_threadsafe, args=(woken.set_result, True)).start()
        await woken
        client.transport.close()
        await server_side.lost
        server.close()
        return loop._ring.setup_flags, received == payload, woken.result()

    assert run_on("uring", main) == (flags, True, True)


# no leaks -------------------------------------------------------------------------------


@pytest.mark.parametrize("engine_name", ENGINES)
def test_ten_thousand_connections_leave_no_fd_buffer_or_operation_behind(
    engine_name: str,
) -> None:
    total, wave = 10_000, 100

    async def one_exchange(loop: Any, port: int, payload: bytes) -> bytes:
        transport, client = await loop.create_connection(Recorder, "127.0.0.1", port)
        transport.write(payload)
        echoed = await client.received(len(payload))
        transport.close()
        await client.lost
        return echoed

    async def main() -> dict[str, int]:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(Echo, "127.0.0.1", 0, backlog=1024)
        port = server.sockets[0].getsockname()[1]
        standing = len(loop._handlers)  # the wakeup poll and the accept
        wrong = 0
        for start in range(0, total, wave):
            replies = await asyncio.gather(
                *(one_exchange(loop, port, b"%d" % i) for i in range(start, start + wave))
            )
            wrong += sum(reply != b"%d" % (start + i) for i, reply in enumerate(replies))
        while loop._transports:
            await asyncio.sleep(0.001)
        await asyncio.sleep(0.01)  # the last closes complete
        state = {
            "wrong": wrong,
            "transports": len(loop._transports),
            "extra_handlers": len(loop._handlers) - standing,
            "extra_in_flight": loop._ring.in_flight - standing,
            "buffers_lent": loop._receive_buffers.lent,
            "watches": len(loop._poller) - 1,  # the wakeup channel's
        }
        server.close()
        return state

    gc.collect()
    before = open_fds()
    state = run_on(engine_name, main, timeout=120)
    assert state == {
        "wrong": 0,
        "transports": 0,
        "extra_handlers": 0,
        "extra_in_flight": 0,
        "buffers_lent": 0,
        "watches": 0,
    }
    gc.collect()
    assert open_fds() <= before


# choosing the engine ------------------------------------------------------------------


def test_emulated_engine_is_used_when_forced(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(engine.ENVIRONMENT_VARIABLE, "emulated")

    async def main() -> tuple[str, type, bytes]:
        loop = asyncio.get_running_loop()
        server_side, client, server = await connected_pair()
        client.transport.write(b"emulated")
        received = await server_side.received(8)
        client.transport.close()
        server.close()
        return loop.engine_name, type(loop._ring), received

    with asyncio.Runner(loop_factory=proactor.new_event_loop) as runner:
        assert runner.run(main()) == ("emulated", EmulatedRing, b"emulated")


def refuse_io_uring_setup(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make io_uring_setup fail with EPERM, as a seccomp profile or io_uring_disabled does."""
    real = kernel_module._syscall

    def refusing(number: int, *args: int) -> int:
        if number == abi.NR_IO_URING_SETUP:
            return -errno.EPERM
        return real(number, *args)

    monkeypatch.setattr(kernel_module, "_syscall", refusing)


def test_auto_falls_back_to_emulated_with_a_warning_when_io_uring_setup_fails(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    refuse_io_uring_setup(monkeypatch)
    monkeypatch.setenv(engine.ENVIRONMENT_VARIABLE, "auto")
    with caplog.at_level(logging.WARNING, logger="proactor"):
        loop = proactor.new_event_loop()
    try:
        assert loop.engine_name == "emulated"
        assert isinstance(loop._ring, EmulatedRing)

        async def echo() -> bytes:
            server_side, client, server = await connected_pair()
            client.transport.write(b"fallback")
            received = await server_side.received(8)
            client.transport.close()
            server.close()
            return received

        assert loop.run_until_complete(echo()) == b"fallback"
    finally:
        loop.close()
    warning = " ".join(record.getMessage() for record in caplog.records)
    assert "emulated engine" in warning and "io_uring" in warning


def test_uring_engine_refuses_to_fall_back_and_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    refuse_io_uring_setup(monkeypatch)
    with pytest.raises(proactor.EngineUnavailable) as failure:
        proactor.EventLoop("uring")
    message = str(failure.value)
    assert "FORKLOOP_PROACTOR_ENGINE=uring" in message
    assert "io_uring" in message and "emulated" in message


def test_unknown_engine_names_the_choices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(engine.ENVIRONMENT_VARIABLE, "iocp")
    with pytest.raises(ValueError, match="auto, uring, emulated"):
        proactor.new_event_loop()


def test_auto_picks_io_uring_where_the_kernel_allows_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(engine.ENVIRONMENT_VARIABLE, "auto")
    new_loop("uring").close()  # fails loudly here if io_uring is missing
    loop = proactor.new_event_loop()
    try:
        assert loop.engine_name == "uring"
        assert isinstance(loop._ring, Ring)
    finally:
        loop.close()


# interruptions -------------------------------------------------------------------------


@pytest.mark.parametrize("engine_name", ENGINES)
def test_completions_after_a_keyboard_interrupt_in_a_handler_are_still_dispatched(
    engine_name: str,
) -> None:
    loop = new_loop(engine_name)
    try:
        seen: list[str] = []

        def interrupting(result: int, flags: int) -> None:
            seen.append("first")
            raise KeyboardInterrupt

        loop._handlers[1001] = interrupting
        loop._handlers[1002] = lambda result, flags: seen.append("second")
        with pytest.raises(KeyboardInterrupt):
            loop._dispatch([(1001, 0, 0), (1002, 0, 0)])
        assert seen == ["first"]
        loop.call_soon(loop.stop)
        loop.run_forever()  # the next iteration delivers what the interrupt left
        assert seen == ["first", "second"]
    finally:
        loop.close()
