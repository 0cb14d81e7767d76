"""Provided-buffer rings under multishot recv, and pinning of the caller's buffers."""

from __future__ import annotations

import ctypes
import errno
import os
import socket

import pytest
from ring_support import collect, open_ring, run_until

from forkloop.proactor import abi
from forkloop.proactor.buffers import Pinned, pin
from forkloop.proactor.ring import Ring

MORE = abi.CQE_F_MORE
HAS_BUFFER = abi.CQE_F_BUFFER


def test_multishot_recv_keeps_delivering_after_buffer_exhaustion(
    ring: Ring, connection: tuple[socket.socket, socket.socket]
) -> None:
    client, server = connection
    buffers = ring.provide_buffers(count=4, size=64)
    payload = os.urandom(32 * 1024)  # fits the socket buffers: sendall cannot block
    received = bytearray()
    held: list[tuple[int, memoryview]] = []  # buffers the "application" sits on
    exhausted = 0
    armed = 1
    ring.prepare_recv_provided(1, server.fileno(), buffers.group_id)

    def on_completion(completion: tuple[int, int, int]) -> None:
        nonlocal exhausted, armed
        _, result, flags = completion
        if flags & HAS_BUFFER:
            held.append(buffers.take(flags, result))
        if result == -errno.ENOBUFS:
            exhausted += 1
            assert not flags & MORE, "ENOBUFS ends the multishot recv"
        else:
            assert result > 0, completion
        if not flags & MORE:
            # Hand everything back, in order, then arm a new multishot recv.
            for buffer_id, view in held:
                received.extend(view)
                view.release()
                buffers.recycle(buffer_id)
            held.clear()
            armed += 1
            ring.prepare_recv_provided(1, server.fileno(), buffers.group_id)

    client.sendall(payload)
    run_until(
        ring, lambda: len(received) + sum(len(v) for _, v in held) >= len(payload), on_completion
    )
    for buffer_id, view in held:
        received.extend(view)
        view.release()
        buffers.recycle(buffer_id)
    assert received == payload
    assert exhausted > 0 and armed > 1, "the group never ran dry; the test proved nothing"
    assert buffers.lent == 0
    ring.prepare_cancel(2, 1)
    collect(ring, 2)
    assert ring.in_flight == 0


def test_consuming_as_data_arrives_never_exhausts_the_group(
    ring: Ring, connection: tuple[socket.socket, socket.socket]
) -> None:
    client, server = connection
    buffers = ring.provide_buffers(count=8, size=256)
    received = bytearray()
    ring.prepare_recv_provided(1, server.fileno(), buffers.group_id)
    payload = os.urandom(16 * 1024)

    def on_completion(completion: tuple[int, int, int]) -> None:
        _, result, flags = completion
        assert result > 0 and flags & MORE, completion
        received.extend(buffers.consume(flags, result))

    for offset in range(0, len(payload), 1024):
        client.send(payload[offset : offset + 1024])
        run_until(ring, lambda end=offset + 1024: len(received) >= end, on_completion)
    assert received == payload
    assert buffers.lent == 0


def test_multishot_recv_ends_at_end_of_stream(
    ring: Ring, connection: tuple[socket.socket, socket.socket]
) -> None:
    client, server = connection
    buffers = ring.provide_buffers(count=4, size=64)
    ring.prepare_recv_provided(1, server.fileno(), buffers.group_id)
    client.send(b"last words")
    client.shutdown(socket.SHUT_WR)
    data = bytearray()
    final: list[int] = []

    def on_completion(completion: tuple[int, int, int]) -> None:
        _, result, flags = completion
        if flags & HAS_BUFFER:
            data.extend(buffers.consume(flags, result))
        if not flags & MORE:
            final.append(result)

    run_until(ring, lambda: bool(final), on_completion)
    assert data == b"last words" and final == [0]
    assert not ring.owns(1) and buffers.lent == 0


def test_single_shot_recv_from_a_provided_buffer(
    ring: Ring, connection: tuple[socket.socket, socket.socket]
) -> None:
    client, server = connection
    buffers = ring.provide_buffers(count=2, size=32, group_id=5)
    client.send(b"one shot")
    ring.prepare_recv_provided(1, server.fileno(), 5, multishot=False)
    [(user_data, result, flags)] = collect(ring, 1)
    assert (user_data, result) == (1, 8) and flags & HAS_BUFFER and not flags & MORE
    assert buffers.consume(flags, result) == b"one shot"


def test_cancelling_a_multishot_recv_hands_back_no_buffer_twice(
    ring: Ring, connection: tuple[socket.socket, socket.socket]
) -> None:
    client, server = connection
    buffers = ring.provide_buffers(count=4, size=64)
    ring.prepare_recv_provided(1, server.fileno(), buffers.group_id)
    client.send(b"before the cancel")
    [(_, result, flags)] = collect(ring, 1)
    assert buffers.consume(flags, result) == b"before the cancel"
    ring.prepare_cancel(2, 1)
    completions = collect(ring, 2)
    for _, result, flags in completions:
        if flags & HAS_BUFFER:
            buffers.consume(flags, result)
    assert {user_data for user_data, _, _ in completions} == {1, 2}
    assert buffers.lent == 0 and ring.in_flight == 0


def test_recycling_a_buffer_twice_is_refused(ring: Ring) -> None:
    buffers = ring.provide_buffers(count=2, size=16)
    with pytest.raises(ValueError, match="not lent out"):
        buffers.recycle(0)
    with pytest.raises(ValueError, match="carries no provided buffer"):
        buffers.take(0, 5)


@pytest.mark.parametrize("count", [0, 3, 65536])
def test_a_buffer_ring_holds_a_power_of_two_of_buffers(ring: Ring, count: int) -> None:
    with pytest.raises(ValueError, match="power of two"):
        ring.provide_buffers(count=count, size=16)


def test_a_buffer_group_is_registered_once(ring: Ring) -> None:
    ring.provide_buffers(count=2, size=16, group_id=3)
    with pytest.raises(ValueError, match="registered already"):
        ring.provide_buffers(count=2, size=16, group_id=3)


def test_closing_the_ring_unregisters_its_buffer_groups() -> None:

    ring = open_ring(16)
    buffers = ring.provide_buffers(count=2, size=16)
    ring.close()
    assert buffers._ring_memory.closed and buffers._arena.closed


def test_pin_bytes_gives_the_address_of_their_data() -> None:
    data = b"immutable payload"
    address, keep = pin(data)
    assert keep is data
    assert ctypes.string_at(address, len(data)) == data


def test_pin_holds_a_writable_buffer_still() -> None:
    buffer = bytearray(b"abc")
    address, keep = pin(buffer)
    assert ctypes.string_at(address, 3) == b"abc"
    with pytest.raises(BufferError):
        buffer.append(1)
    del keep
    buffer.append(1)


def test_pin_of_a_view_points_into_the_view() -> None:
    buffer = bytearray(b"0123456789")
    address, _ = pin(memoryview(buffer)[4:])
    assert ctypes.string_at(address, 3) == b"456"


def test_pin_copies_a_read_only_buffer_that_is_not_bytes() -> None:
    view = memoryview(b"0123456789")[2:5]
    address, keep = pin(view)
    assert keep == b"234"
    assert ctypes.string_at(address, 3) == b"234"


def test_the_kernel_is_never_handed_a_read_only_buffer_to_write(ring: Ring) -> None:
    for read_only in (b"immutable", memoryview(b"immutable"), Pinned(b"immutable")):
        with pytest.raises(TypeError, match="read-only|pinned bytes"):
            ring.prepare_recv(1, 0, read_only)
    assert ring.in_flight == 0


def test_a_pinned_buffer_is_reused_for_every_receive(
    ring: Ring, connection: tuple[socket.socket, socket.socket]
) -> None:
    client, server = connection
    pinned = Pinned(bytearray(8))
    for word in (b"first", b"second"):
        ring.prepare_recv(1, server.fileno(), pinned)
        client.send(word)
        assert collect(ring, 1) == [(1, len(word), 0)]
        assert pinned.buffer[: len(word)] == word
    with pytest.raises(BufferError):
        pinned.buffer.append(0)
    greeting = Pinned(b"hello")
    ring.prepare_send(2, server.fileno(), greeting, offset=1)
    assert collect(ring, 1) == [(2, 4, 0)]
    client.settimeout(5)
    assert client.recv(16) == b"ello"


def test_a_bundle_fills_several_buffers_with_one_completion(
    ring: Ring, connection: tuple[socket.socket, socket.socket]
) -> None:
    if not ring.capabilities.receive_bundles:
        pytest.skip("this kernel has no recv bundles (before 6.10)")
    client, server = connection
    buffers = ring.provide_buffers(count=8, size=64)  # the arena wraps every 512 bytes
    payload = os.urandom(64 * 1024)
    received = bytearray()
    sizes: list[int] = []
    ring.prepare_recv_provided(1, server.fileno(), buffers.group_id, bundle=True)

    def on_completion(completion: tuple[int, int, int]) -> None:
        _, result, flags = completion
        if flags & HAS_BUFFER:
            sizes.append(result)
            received.extend(buffers.consume(flags, result))
        if not flags & MORE:
            assert result in (-errno.ENOBUFS, 0) or result > 0, completion
            ring.prepare_recv_provided(1, server.fileno(), buffers.group_id, bundle=True)

    for offset in range(0, len(payload), 4096):
        client.send(payload[offset : offset + 4096])
        run_until(ring, lambda end=offset + 4096: len(received) >= end, on_completion)
    assert received == payload
    assert max(sizes) > 64, "no completion carried more than one buffer"
    assert buffers.lent == 0


def test_a_bundle_carries_at_most_the_length_asked_for(
    ring: Ring, connection: tuple[socket.socket, socket.socket]
) -> None:
    if not ring.capabilities.receive_bundles:
        pytest.skip("this kernel has no recv bundles (before 6.10)")
    client, server = connection
    buffers = ring.provide_buffers(count=64, size=64)
    payload = os.urandom(2048)
    client.sendall(payload)  # all of it waits in the socket before the recv is armed
    received = bytearray()
    sizes: list[int] = []
    ring.prepare_recv_provided(1, server.fileno(), buffers.group_id, bundle=True, length=256)

    def on_completion(completion: tuple[int, int, int]) -> None:
        _, result, flags = completion
        assert flags & MORE, completion
        sizes.append(result)
        received.extend(buffers.consume(flags, result))

    run_until(ring, lambda: len(received) >= len(payload), on_completion)
    assert received == payload
    assert max(sizes) == 256 and all(size <= 256 for size in sizes), sizes
