"""Stream transports on completions: receiving, cancelling, holding, sending, flow control.

Each test runs on both engines and watches the completions the transport was
handed (`completion_support.record_results`) where the behaviour is about
them: a provided-buffer group running dry, a recv cancelled on close, data
completing after ``pause_reading``, a send completing short.
"""

from __future__ import annotations

import asyncio
import errno
import io
import os
from typing import Any

import pytest
from completion_support import (
    ENGINES,
    RECEIVE_MODES,
    connected_pair,
    force_receive_mode,
    record_results,
    run_on,
)

from forkloop.proactor import abi
from forkloop.proactor import loop as loop_module
from forkloop.proactor.emulated import EmulatedRing
from forkloop.proactor.ring import Ring
from forkloop.proactor.transports import StreamTransport
from tests.waiting import until

# receiving ------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["bundles", "multishot"])
@pytest.mark.parametrize("engine_name", ENGINES)
def test_multishot_recv_keeps_delivering_after_the_buffer_group_runs_dry(
    engine_name: str, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for count, size in (
        ("RECEIVE_BUFFER_COUNT", "RECEIVE_BUFFER_SIZE"),
        ("BUNDLE_BUFFER_COUNT", "BUNDLE_BUFFER_SIZE"),
    ):
        monkeypatch.setattr(loop_module, count, 2)
        monkeypatch.setattr(loop_module, size, 256)
    force_receive_mode(monkeypatch, mode)
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
    # A bundle that takes the group's last buffer ends the recv with its data instead
    # (no F_MORE, no -ENOBUFS); one buffer per completion runs dry the classic way.
    if mode == "multishot" or engine_name == "emulated":
        server_results = [result for transport, result, _ in results if result < 0]
        assert -errno.ENOBUFS in server_results, "the 2-buffer group never ran dry"
        assert any(flags & abi.CQE_F_MORE for _, _, flags in results), "no multishot completion"
    else:
        assert sum(not flags & abi.CQE_F_MORE for _, _, flags in results) > 1, "never re-armed"


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
    assert multishot == (mode in ("bundles", "multishot"))


# sending --------------------------------------------------------------------------------


@pytest.mark.parametrize("engine_name", ENGINES)
def test_a_short_send_is_resubmitted_from_where_it_stopped(
    engine_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    sends = record_results(monkeypatch, "_on_sent")
    # A reader taking bundles drains so fast that the parked send may finish whole when
    # it is retried; one buffer per completion leaves it room for only part of it.
    force_receive_mode(monkeypatch, "multishot")
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
    # what write(2) took at once (the first write of a quiet iteration) has no completion
    assert 0 < sum(results) <= len(payload)
    assert len(results) > 1, "no send completed short"


@pytest.mark.parametrize("engine_name", ENGINES)
def test_a_write_the_kernel_takes_at_once_does_not_pause_the_protocol(engine_name: str) -> None:
    async def main() -> tuple[bool, bool]:
        server_side, client, server = await connected_pair()
        writer = server_side.transport
        writer.write(b"w" * (96 * 1024))  # above the 64 KiB mark, well within socket buffers
        paused_by_a_taken_write = server_side.paused.done()
        client.transport.pause_reading()
        while not server_side.paused.done():  # now the kernel runs out of room
            writer.write(b"w" * (96 * 1024))
            await asyncio.sleep(0)
        stays_paused = writer.get_write_buffer_size() > 64 * 1024
        client.transport.close()
        server.close()
        return paused_by_a_taken_write, stays_paused

    assert run_on(engine_name, main) == (False, True)


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
def test_loop_sendfile_sends_a_large_file_to_a_slow_reader_without_copying_it(
    engine_name: str, tmp_path: Any
) -> None:
    content = os.urandom(6 * 1024 * 1024)  # more than the socket buffers hold
    path = tmp_path / "payload.bin"
    path.write_bytes(content)

    class Unreadable(io.FileIO):
        def read(self, size: int = -1) -> bytes:
            raise AssertionError("the file was read into Python instead of sent by the kernel")

        readinto = read  # type: ignore[assignment]

    async def main() -> tuple[int, bool]:
        loop = asyncio.get_running_loop()
        server_side, client, server = await connected_pair()
        writer = server_side.transport
        client.transport.pause_reading()
        with Unreadable(path, "rb") as file:
            sending = asyncio.ensure_future(loop.sendfile(writer, file, fallback=False))
            fd = writer.get_extra_info("socket").fileno()
            await until(lambda: loop._poller.writer_of(fd) is not None)  # full: waits for room
            with pytest.raises(RuntimeError, match="sendfile is in progress"):
                writer.write(b"too early")
            client.transport.resume_reading()
            sent = await sending
        writer.write(b"after")  # in order, behind the file
        received = await client.received(len(content) + 5)
        client.transport.close()
        server.close()
        return sent, received == content + b"after"

    assert run_on(engine_name, main, timeout=60) == (len(content), True)


@pytest.mark.parametrize("engine_name", ENGINES)
def test_loop_sendfile_of_a_file_without_an_fd_reads_it_or_refuses_without_fallback(
    engine_name: str,
) -> None:
    async def main() -> tuple[int, bytes]:
        loop = asyncio.get_running_loop()
        server_side, client, server = await connected_pair()
        with pytest.raises(asyncio.SendfileNotAvailableError):
            await loop.sendfile(server_side.transport, io.BytesIO(b"x" * 100), fallback=False)
        sent = await loop.sendfile(server_side.transport, io.BytesIO(b"y" * 100_000))
        received = await client.received(100_000)
        client.transport.close()
        server.close()
        return sent, received

    assert run_on(engine_name, main) == (100_000, b"y" * 100_000)


@pytest.mark.parametrize("engine_name", ENGINES)
def test_a_large_write_goes_zero_copy_to_a_peer_elsewhere_and_arrives_intact(
    engine_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Loopback peers are excluded (the kernel copies at delivery); pretend this one is not.
    monkeypatch.setattr(StreamTransport, "_zero_copy_pays", lambda self: True)
    monkeypatch.setattr(loop_module, "SEND_THROUGH_RING_FROM", 0)  # no write(2) shortcut
    completions = record_results(monkeypatch, "_on_sent_zero_copy")
    payload = os.urandom(4 * 1024 * 1024)

    async def main() -> bool:
        server_side, client, server = await connected_pair()
        server_side.transport.write(b"head")
        await client.received(4)
        server_side.transport.write(payload)  # alone, as one send
        server_side.transport.write(b"tail")
        received = await client.received(len(payload) + 8)
        client.transport.close()
        await server_side.lost
        server.close()
        return received == b"head" + payload + b"tail"

    assert run_on(engine_name, main, timeout=60)
    if engine_name == "uring":
        assert any(flags & abi.CQE_F_NOTIF for _, _, flags in completions), "no notification"
        assert sum(result for _, result, flags in completions if not flags & abi.CQE_F_NOTIF) > 0
