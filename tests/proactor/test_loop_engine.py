"""The proactor loop on its engines: buffers, cancellation, partial sends, leaks, engine choice.

These run through the loop (real sockets on 127.0.0.1) on both engines, and
look underneath it where the behaviour is about completions: which results the
transports saw, what the engine still holds, how many ``io_uring_enter`` calls
an iteration made. The io_uring variant never skips quietly: without io_uring
it fails, unless ``FORKLOOP_EXPECT_NO_IO_URING=1`` declares the machine has none.
"""

from __future__ import annotations

import asyncio
import errno
import gc
import logging
import os
import socket
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from ring_support import EXPECT_NO_IO_URING

import proactor
from proactor import abi, engine
from proactor import loop as loop_module
from proactor import ring as ring_module
from proactor.emulated import EmulatedRing
from proactor.ring import Ring
from proactor.transports import StreamTransport

ENGINES = ["uring", "emulated"]


def new_loop(engine_name: str) -> proactor.EventLoop:
    try:
        return proactor.EventLoop(engine_name)
    except proactor.EngineUnavailable as error:
        if EXPECT_NO_IO_URING:
            pytest.skip(f"FORKLOOP_EXPECT_NO_IO_URING=1 declares io_uring missing: {error}")
        pytest.fail(f"{error}. The io_uring loop tests must run.", pytrace=False)


def run_on(engine_name: str, main: Callable[[], Awaitable[Any]], timeout: float = 30.0) -> Any:
    async def bounded() -> Any:
        async with asyncio.timeout(timeout):
            return await main()

    with asyncio.Runner(loop_factory=lambda: new_loop(engine_name)) as runner:
        return runner.run(bounded())


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class Collector(asyncio.Protocol):
    """Keeps what arrives; ``received(n)`` waits for n bytes, ``lost`` for connection_lost."""

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self.data = bytearray()
        self.made = loop.create_future()
        self.lost = loop.create_future()
        self.paused = loop.create_future()
        self._waiters: list[tuple[int, asyncio.Future]] = []

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.made.set_result(transport)

    def data_received(self, data: bytes) -> None:
        self.data += data
        for count, waiter in self._waiters:
            if len(self.data) >= count and not waiter.done():
                waiter.set_result(None)

    def pause_writing(self) -> None:
        if not self.paused.done():
            self.paused.set_result(None)

    def connection_lost(self, exc: BaseException | None) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)

    async def received(self, count: int) -> bytes:
        if len(self.data) < count:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append((count, waiter))
            await waiter
        return bytes(self.data)


async def connected_pair(**server_options: Any) -> tuple[Collector, Collector, Any]:
    """A (server side, client side) pair of collectors over TCP, and the server."""
    loop = asyncio.get_running_loop()
    accepted: asyncio.Future = loop.create_future()

    def factory() -> Collector:
        protocol = Collector()
        accepted.set_result(protocol)
        return protocol

    server = await loop.create_server(factory, "127.0.0.1", 0, **server_options)
    port = server.sockets[0].getsockname()[1]
    _, client = await loop.create_connection(Collector, "127.0.0.1", port)
    server_side = await accepted
    await server_side.made
    return server_side, client, server


def record_results(monkeypatch: pytest.MonkeyPatch, method: str) -> list[tuple[Any, int, int]]:
    """Record ``(transport, result, flags)`` for every call of a StreamTransport handler."""
    calls: list[tuple[Any, int, int]] = []
    original = getattr(StreamTransport, method)

    def recording(self: StreamTransport, result: int, flags: int) -> None:
        calls.append((self, result, flags))
        original(self, result, flags)

    monkeypatch.setattr(StreamTransport, method, recording)
    return calls


# receiving ---------------------------------------------------------------------


@pytest.mark.parametrize("engine_name", ENGINES)
def test_multishot_recv_keeps_delivering_after_the_buffer_group_runs_dry(
    engine_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(loop_module, "RECEIVE_BUFFER_COUNT", 2)
    monkeypatch.setattr(loop_module, "RECEIVE_BUFFER_SIZE", 256)
    results = record_results(monkeypatch, "_on_received")
    payload = bytes(range(256)) * 4096  # 1 MiB: thousands of 256-byte buffers' worth

    async def main() -> tuple[bool, bool, int]:
        server_side, client, server = await connected_pair()
        assert asyncio.get_running_loop()._multishot_recv
        client.transport.write(payload)
        received = await server_side.received(len(payload))
        buffers = asyncio.get_running_loop()._receive_buffers
        client.transport.close()
        await server_side.lost
        server.close()
        return received == payload, buffers.lent == 0, len(results)

    intact, nothing_lent, completions = run_on(engine_name, main)
    assert intact and nothing_lent
    server_results = [result for transport, result, _ in results if result < 0]
    assert -errno.ENOBUFS in server_results, "the 2-buffer group never ran dry"
    assert any(flags & abi.CQE_F_MORE for _, _, flags in results), "no multishot completion"


@pytest.mark.parametrize("engine_name", ENGINES)
def test_multishot_accept_takes_a_burst_of_connections_on_a_private_listener(
    engine_name: str,
) -> None:
    count = 200

    async def main() -> tuple[int, bool]:
        loop = asyncio.get_running_loop()
        accepted: list[Collector] = []
        done = loop.create_future()

        def factory() -> Collector:
            protocol = Collector()
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


@pytest.mark.parametrize("engine_name", ENGINES)
def test_closing_releases_an_in_flight_recv_buffer_only_after_its_cancel_completed(
    engine_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Without provided buffers each transport receives into a buffer of its own.
    monkeypatch.setattr(loop_module.EventLoop, "_choose_receive_mode", lambda self: None)
    timeline: list[tuple[str, int]] = []
    original = StreamTransport._on_received

    def on_received(self: StreamTransport, result: int, flags: int) -> None:
        if not flags & abi.CQE_F_MORE:
            timeline.append(("recv ended", result))
        original(self, result, flags)

    monkeypatch.setattr(StreamTransport, "_on_received", on_received)

    engine_class = Ring if engine_name == "uring" else EmulatedRing
    real_prepare_close = engine_class.prepare_close

    def prepare_close(self: Any, user_data: int, fd: int) -> None:
        timeline.append(("close", fd))
        real_prepare_close(self, user_data, fd)

    monkeypatch.setattr(engine_class, "prepare_close", prepare_close)

    async def main() -> tuple[bool, bool, bool, bool]:
        loop = asyncio.get_running_loop()
        server_side, client, server = await connected_pair()
        transport = server_side.transport
        await asyncio.sleep(0.01)  # the recv is armed and waiting in the kernel
        recv = transport._recv_user_data
        buffer = transport._own_buffer.buffer
        fd = transport._fd
        transport.close()
        owned_at_close = loop._ring.owns(recv)
        try:
            buffer.extend(b"!")
            pinned_at_close = False
        except BufferError:
            pinned_at_close = True  # the kernel may write into it until the cancel completes
        timeline.append(("closed by the protocol", fd))
        await server_side.lost
        await client.lost
        server.close()
        await asyncio.sleep(0.01)
        try:
            buffer.extend(b"!")
            pinned_after = False
        except BufferError:
            pinned_after = True
        return owned_at_close, pinned_at_close, loop._ring.owns(recv), pinned_after

    owned_at_close, pinned_at_close, owned_after, pinned_after = run_on(engine_name, main)
    assert owned_at_close and pinned_at_close
    assert not owned_after and not pinned_after
    fd = next(fd for event, fd in timeline if event == "closed by the protocol")
    after_close = timeline[timeline.index(("closed by the protocol", fd)) :]
    ended = after_close.index(("recv ended", -errno.ECANCELED))
    assert ("close", fd) in after_close[ended:], f"fd closed before its recv ended: {timeline}"


@pytest.mark.parametrize("engine_name", ENGINES)
def test_data_completing_after_pause_reading_is_held_and_delivered_once(
    engine_name: str,
) -> None:
    async def main() -> bytes:
        server_side, client, server = await connected_pair()
        transport = server_side.transport
        chunks = [b"%05d" % i for i in range(2000)]
        for index, chunk in enumerate(chunks):
            client.transport.write(chunk)
            if index % 50 == 0:
                transport.pause_reading()
                await asyncio.sleep(0)
                transport.resume_reading()
            await asyncio.sleep(0)
        received = await server_side.received(5 * len(chunks))
        client.transport.close()
        await server_side.lost
        server.close()
        return received

    assert run_on(engine_name, main) == b"".join(b"%05d" % i for i in range(2000))


RECEIVE_MODES = ["multishot", "single-shot provided", "own buffer"]


def force_receive_mode(monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    real = loop_module.EventLoop._choose_receive_mode

    def choose(self: proactor.EventLoop) -> None:
        if mode == "own buffer":
            return
        real(self)
        if mode == "single-shot provided":
            self._multishot_recv = False

    monkeypatch.setattr(loop_module.EventLoop, "_choose_receive_mode", choose)


@pytest.mark.parametrize("mode", RECEIVE_MODES)
@pytest.mark.parametrize("engine_name", ENGINES)
def test_every_receive_mode_carries_a_stream_intact(
    engine_name: str, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    force_receive_mode(monkeypatch, mode)
    payload = os.urandom(3 * 1024 * 1024)

    async def main() -> tuple[bool, bool, Any]:
        server_side, client, server = await connected_pair()
        for chunk in range(0, len(payload), 100_000):
            client.transport.write(payload[chunk : chunk + 100_000])
        received = await server_side.received(len(payload))
        server_side.transport.write(b"bye")
        await client.received(3)
        client.transport.close()
        lost = await server_side.lost
        server.close()
        loop = asyncio.get_running_loop()
        return received == payload, loop._multishot_recv, lost

    intact, multishot, lost = run_on(engine_name, main)
    assert intact and lost is None
    assert multishot == (mode == "multishot")


@pytest.mark.parametrize("setup", ["cooperative", "plain"])
def test_the_loop_runs_on_rings_of_older_kernels(
    setup: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without DEFER_TASKRUN (before 6.1) completions may be posted outside the loop's enter."""
    flags = 0
    if setup == "cooperative":
        flags = abi.SETUP_SUBMIT_ALL | abi.SETUP_COOP_TASKRUN | abi.SETUP_TASKRUN_FLAG
    monkeypatch.setattr(ring_module, "_SETUP_ATTEMPTS", (flags,))
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


# sending ------------------------------------------------------------------------


@pytest.mark.parametrize("engine_name", ENGINES)
def test_a_short_send_is_resubmitted_from_where_it_stopped(
    engine_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    sends = record_results(monkeypatch, "_on_sent")
    payload = os.urandom(8 * 1024 * 1024)  # more than the socket buffers hold

    async def main() -> tuple[bool, bool]:
        server_side, client, server = await connected_pair()
        client.transport.pause_reading()
        server_side.transport.write(payload)
        await server_side.paused
        client.transport.resume_reading()
        received = await client.received(len(payload))
        drained = server_side.transport.get_write_buffer_size() == 0
        client.transport.close()
        await server_side.lost
        server.close()
        return received == payload, drained

    assert run_on(engine_name, main, timeout=60) == (True, True)
    results = [result for _, result, _ in sends]
    assert all(result > 0 for result in results)
    assert sum(results) >= len(payload)
    assert any(result < len(payload) for result in results), "no send completed short"


def test_writes_of_one_iteration_reach_the_kernel_in_one_enter(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    enters: list[int] = []
    real = ring_module._syscall

    def counting(number: int, *args: int) -> int:
        if number == abi.NR_IO_URING_ENTER:
            enters.append(args[1])
        return real(number, *args)

    async def main() -> list[int]:
        loop = asyncio.get_running_loop()
        pairs = [await connected_pair() for _ in range(20)]
        await asyncio.sleep(0.01)
        monkeypatch.setattr(ring_module, "_syscall", counting)
        for server_side, _, _ in pairs:
            server_side.transport.write(b"one iteration")
        await asyncio.gather(*(client.received(13) for _, client, _ in pairs))
        monkeypatch.setattr(ring_module, "_syscall", real)
        submitted_first = list(enters)
        for _, client, server in pairs:
            client.transport.close()
            server.close()
        await asyncio.gather(*(server_side.lost for server_side, _, _ in pairs))
        assert loop.engine_name == "uring"
        return submitted_first

    submitted = run_on("uring", main)
    assert submitted[0] >= 20, f"the 20 sends were split over several enters: {submitted}"


# no leaks -------------------------------------------------------------------------


class Echo(asyncio.Protocol):
    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


@pytest.mark.parametrize("engine_name", ENGINES)
def test_ten_thousand_connections_leave_no_fd_buffer_or_operation_behind(
    engine_name: str,
) -> None:
    total, wave = 10_000, 100

    async def one_exchange(loop: Any, port: int, payload: bytes) -> bytes:
        transport, client = await loop.create_connection(Collector, "127.0.0.1", port)
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
    real = ring_module._syscall

    def refusing(number: int, *args: int) -> int:
        if number == abi.NR_IO_URING_SETUP:
            return -errno.EPERM
        return real(number, *args)

    monkeypatch.setattr(ring_module, "_syscall", refusing)


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


# accepting on a shared listener ----------------------------------------------------------


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


# sendfile and interruptions ---------------------------------------------------------------


@pytest.mark.parametrize("engine_name", ENGINES)
def test_loop_sendfile_sends_a_file_over_a_transport(engine_name: str, tmp_path: Any) -> None:
    content = os.urandom(700_000)
    path = tmp_path / "payload.bin"
    path.write_bytes(content)

    async def main() -> tuple[int, bool, int]:
        loop = asyncio.get_running_loop()
        server_side, client, server = await connected_pair()
        with open(path, "rb") as file:
            sent = await loop.sendfile(server_side.transport, file, 1000, 500_000)
            position = file.tell()
        received = await client.received(500_000)
        client.transport.close()
        server.close()
        return sent, received == content[1000:501_000], position

    assert run_on(engine_name, main) == (500_000, True, 501_000)


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
