"""Socket operations on real TCP connections over 127.0.0.1: accept, connect, recv, send,
cancel, close, shutdown and poll, with the ownership of every buffer checked."""

from __future__ import annotations

import errno
import os
import select
import socket

import pytest
from ring_support import by_user_data, collect, run_until

from forkloop.proactor import abi
from forkloop.proactor.ring import Ring

MORE = abi.CQE_F_MORE


def test_multishot_accept_delivers_several_connections(ring: Ring, listener: socket.socket) -> None:
    ring.prepare_accept(1, listener.fileno(), multishot=True)
    clients = [socket.create_connection(listener.getsockname(), timeout=5) for _ in range(5)]
    accepted: list[int] = []
    try:
        for user_data, result, flags in collect(ring, 5):
            assert user_data == 1 and result >= 0 and flags & MORE
            accepted.append(result)
        assert ring.owns(1), "the multishot accept is still armed"
        peers = {socket.socket(fileno=os.dup(fd)).getpeername() for fd in accepted}
        assert peers == {client.getsockname() for client in clients}
        ring.prepare_cancel(2, 1)
        completions = by_user_data(collect(ring, 2))
        assert completions[2] == [(2, 0, 0)]
        assert completions[1] == [(1, -errno.ECANCELED, 0)]
        assert not ring.owns(1)
    finally:
        for fd in accepted:
            os.close(fd)
        for client in clients:
            client.close()


def test_single_accept_makes_a_non_blocking_close_on_exec_socket(
    ring: Ring, listener: socket.socket
) -> None:
    ring.prepare_accept(1, listener.fileno())
    with socket.create_connection(listener.getsockname(), timeout=5):
        [(_, fd, flags)] = collect(ring, 1)
        assert fd >= 0 and not flags & MORE
        try:
            assert not os.get_blocking(fd)
            assert not os.get_inheritable(fd)
        finally:
            os.close(fd)


def test_connect_then_send_reaches_the_listener(ring: Ring, listener: socket.socket) -> None:
    client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    client.setblocking(False)
    try:
        ring.prepare_connect(1, client.fileno(), socket.AF_INET, listener.getsockname())
        assert collect(ring, 1) == [(1, 0, 0)]
        ring.prepare_send(2, client.fileno(), b"hello over io_uring")
        assert collect(ring, 1) == [(2, 19, 0)]
        listener.settimeout(5)
        server, _ = listener.accept()
        with server:
            server.settimeout(5)
            assert server.recv(64) == b"hello over io_uring"
    finally:
        client.close()


def test_connect_to_a_closed_port_reports_the_refusal(ring: Ring) -> None:
    placeholder = socket.socket()
    placeholder.bind(("127.0.0.1", 0))
    address = placeholder.getsockname()
    placeholder.close()
    client = socket.socket()
    client.setblocking(False)
    with client:
        ring.prepare_connect(1, client.fileno(), socket.AF_INET, address)
        assert collect(ring, 1) == [(1, -errno.ECONNREFUSED, 0)]


def test_connect_over_ipv6_and_unix_sockets(ring: Ring, tmp_path) -> None:
    listeners = []
    if socket.has_ipv6:
        try:
            six = socket.socket(socket.AF_INET6)
            six.bind(("::1", 0))
            listeners.append(six)
        except OSError:
            six.close()  # no IPv6 loopback on this machine
    unix = socket.socket(socket.AF_UNIX)
    unix.bind(str(tmp_path / "ring.sock"))
    listeners.append(unix)
    clients = []
    try:
        for number, listening in enumerate(listeners, start=1):
            listening.listen(1)
            client = socket.socket(listening.family)
            client.setblocking(False)
            clients.append(client)
            ring.prepare_connect(number, client.fileno(), listening.family, listening.getsockname())
        assert sorted(collect(ring, len(listeners))) == [
            (number, 0, 0) for number in range(1, len(listeners) + 1)
        ]
    finally:
        for sock in listeners + clients:
            sock.close()


def test_sendmsg_to_an_address_sends_a_datagram(ring: Ring) -> None:
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with receiver, sender:
        receiver.bind(("127.0.0.1", 0))
        receiver.settimeout(5)
        destination = abi.sockaddr(socket.AF_INET, receiver.getsockname())
        ring.prepare_sendmsg(1, sender.fileno(), [b"data", b"gram"], address=destination)
        assert collect(ring, 1) == [(1, 8, 0)]
        assert receiver.recv(64) == b"datagram"


def test_single_shot_recv_fills_the_callers_buffer_and_pins_it(
    ring: Ring, connection: tuple[socket.socket, socket.socket]
) -> None:
    client, server = connection
    buffer = bytearray(b"." * 32)
    ring.prepare_recv(1, server.fileno(), buffer, offset=4, length=16)
    ring.submit()
    with pytest.raises(BufferError):
        buffer.extend(b"the kernel owns this buffer: it must not move")
    client.send(b"ping")
    assert collect(ring, 1) == [(1, 4, 0)]
    assert buffer[:12] == b"....ping...."
    buffer.extend(b"!")  # released with the completion


def test_recv_reports_end_of_stream_as_zero(
    ring: Ring, connection: tuple[socket.socket, socket.socket]
) -> None:
    client, server = connection
    ring.prepare_recv(1, server.fileno(), bytearray(16))
    ring.submit()
    client.shutdown(socket.SHUT_WR)
    [(user_data, result, flags)] = collect(ring, 1)
    assert (user_data, result) == (1, 0) and not flags & MORE


def test_a_completion_that_arrives_while_the_loop_is_busy_is_reaped_without_waiting(
    ring: Ring, connection: tuple[socket.socket, socket.socket]
) -> None:
    client, server = connection
    ring.prepare_recv(1, server.fileno(), bytearray(16))
    ring.submit()
    client.send(b"x")
    seen: list[tuple[int, int, int]] = []
    for _ in range(100_000):  # non-blocking submits only, as a busy loop makes them
        ring.submit()
        seen.extend(ring.completions())
        if seen:
            break
    assert seen == [(1, 1, 0)]


def send_to_slow_reader(
    ring: Ring, connection: tuple[socket.socket, socket.socket], payload: bytes, flags: int
) -> list[int]:
    """Send ``payload`` server→client, finishing short sends; the client reads 4 KiB a turn.

    Both sides run on the ring. Returns the result of every send completion.
    """
    client, server = connection
    server.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    received = bytearray()
    chunk = bytearray(4096)
    send_results: list[int] = []
    sent = 0
    ring.prepare_send(1, server.fileno(), payload, flags=flags)
    ring.prepare_recv(2, client.fileno(), chunk)

    def on_completion(completion: tuple[int, int, int]) -> None:
        nonlocal sent
        user_data, result, _ = completion
        assert result > 0, completion
        if user_data == 1:
            send_results.append(result)
            sent += result
            if sent < len(payload):  # a short send: the rest goes next, nothing else in flight
                ring.prepare_send(1, server.fileno(), payload, offset=sent, flags=flags)
        else:
            received.extend(chunk[:result])
            if len(received) < len(payload):
                ring.prepare_recv(2, client.fileno(), chunk)

    run_until(ring, lambda: len(received) == len(payload), on_completion, timeout=20.0)
    assert sent == len(payload)
    assert received == payload
    assert ring.in_flight == 0
    return send_results


def test_partial_sends_are_completed_to_a_slow_reader(
    ring: Ring, connection: tuple[socket.socket, socket.socket]
) -> None:
    payload = os.urandom(1024 * 1024)
    results = send_to_slow_reader(ring, connection, payload, socket.MSG_NOSIGNAL)
    assert len(results) > 1, "the socket buffer never filled; the test proved nothing"
    assert sum(results) == len(payload)


def test_send_with_msg_waitall_finishes_the_whole_buffer_in_one_completion(
    ring: Ring, connection: tuple[socket.socket, socket.socket]
) -> None:
    payload = os.urandom(1024 * 1024)
    flags = socket.MSG_WAITALL | socket.MSG_NOSIGNAL
    assert send_to_slow_reader(ring, connection, payload, flags) == [len(payload)]


def test_sendmsg_gathers_several_buffers(
    ring: Ring, connection: tuple[socket.socket, socket.socket]
) -> None:
    client, server = connection
    parts = [b"GET / HTTP/1.1\r\n", bytearray(b"Host: a\r\n"), memoryview(b"\r\n")]
    ring.prepare_sendmsg(1, server.fileno(), parts)
    assert collect(ring, 1) == [(1, 27, 0)]
    client.settimeout(5)
    assert client.recv(64) == b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"


def test_cancelling_an_in_flight_recv_releases_its_buffer_only_with_the_recv_completion(
    ring: Ring, connection: tuple[socket.socket, socket.socket]
) -> None:
    _, server = connection
    buffer = bytearray(64)
    ring.prepare_recv(1, server.fileno(), buffer)
    ring.submit()
    ring.prepare_cancel(2, 1)
    seen: dict[int, tuple[int, int, int]] = {}
    while len(seen) < 2:
        ring.submit(1, 5.0)
        batch = ring.completions()
        assert batch, "no completion within 5 s"
        seen.update((completion[0], completion) for completion in batch)
        if 1 not in seen:
            assert ring.owns(1), "the cancel's completion must not release the recv's buffer"
            with pytest.raises(BufferError):
                buffer.extend(b"still the kernel's")
    assert seen[2][1] == 0
    assert seen[1][1] in (-errno.ECANCELED, -errno.EINTR)
    assert not ring.owns(1)
    buffer.extend(b"the caller's again")


def test_a_cancel_that_loses_the_race_leaves_the_data_to_be_delivered(
    ring: Ring, connection: tuple[socket.socket, socket.socket]
) -> None:
    client, server = connection
    client.send(b"early")
    buffer = bytearray(16)
    ring.prepare_recv(1, server.fileno(), buffer)
    ring.prepare_cancel(2, 1)
    completions = by_user_data(collect(ring, 2))
    assert completions[1] == [(1, 5, 0)]
    assert completions[2][0][1] in (-errno.ENOENT, -errno.EALREADY)
    assert buffer[:5] == b"early"


def test_cancel_by_fd_cancels_every_operation_on_the_socket(
    ring: Ring, connection: tuple[socket.socket, socket.socket]
) -> None:
    _, server = connection
    ring.prepare_recv(1, server.fileno(), bytearray(16))
    ring.prepare_poll_add(2, server.fileno(), select.POLLIN, multishot=True)
    ring.submit()
    ring.prepare_cancel_fd(3, server.fileno())
    completions = by_user_data(collect(ring, 3))
    assert completions[3] == [(3, 2, 0)]
    assert completions[1][0][1] in (-errno.ECANCELED, -errno.EINTR)
    assert completions[2][0][1] == -errno.ECANCELED
    assert ring.in_flight == 0


def test_closing_the_fd_does_not_cancel_a_recv_in_flight(
    ring: Ring, connection: tuple[socket.socket, socket.socket]
) -> None:
    client, server = connection
    fd = os.dup(server.fileno())
    buffer = bytearray(16)
    ring.prepare_recv(1, fd, buffer)
    ring.submit()
    ring.prepare_close(2, fd)
    assert collect(ring, 1) == [(2, 0, 0)]
    assert ring.owns(1), "the recv survived the close"
    client.send(b"late")
    # The kernel still holds the socket: the old recv consumes the data.
    assert collect(ring, 1) == [(1, 4, 0)]
    assert buffer[:4] == b"late"


def test_close_operation_closes_the_fd(ring: Ring) -> None:
    reader, writer = os.pipe()
    ring.prepare_close(1, reader)
    assert collect(ring, 1) == [(1, 0, 0)]
    with pytest.raises(OSError) as raised:
        os.fstat(reader)
    assert raised.value.errno == errno.EBADF
    os.close(writer)


def test_shutdown_ends_an_in_flight_recv(
    ring: Ring, connection: tuple[socket.socket, socket.socket]
) -> None:
    _, server = connection
    ring.prepare_recv(1, server.fileno(), bytearray(16))
    ring.submit()
    ring.prepare_shutdown(2, server.fileno())
    completions = by_user_data(collect(ring, 2))
    assert completions == {1: [(1, 0, 0)], 2: [(2, 0, 0)]}


def test_poll_reports_readiness_and_re_arming_it_is_level_triggered(
    ring: Ring, connection: tuple[socket.socket, socket.socket]
) -> None:
    client, server = connection
    ring.prepare_poll_add(1, server.fileno(), select.POLLIN)
    ring.submit()
    client.send(b"ab")
    [(_, mask, flags)] = collect(ring, 1)
    assert mask & select.POLLIN and not flags & MORE
    assert server.recv(1) == b"a"
    ring.prepare_poll_add(1, server.fileno(), select.POLLIN)  # one byte still unread
    [(_, mask, _)] = collect(ring, 1)
    assert mask & select.POLLIN


def test_multishot_poll_reports_each_wakeup(
    ring: Ring, connection: tuple[socket.socket, socket.socket]
) -> None:
    client, server = connection
    ring.prepare_poll_add(1, server.fileno(), select.POLLIN, multishot=True)
    ring.submit()
    for chunk in (b"one", b"two"):
        client.send(chunk)
        [(user_data, mask, flags)] = collect(ring, 1)
        assert user_data == 1 and mask & select.POLLIN and flags & MORE
        assert server.recv(16) == chunk
    assert ring.owns(1)
    ring.prepare_cancel(2, 1)
    collect(ring, 2)
    assert not ring.owns(1)


def test_poll_for_writing(ring: Ring, connection: tuple[socket.socket, socket.socket]) -> None:
    _, server = connection
    ring.prepare_poll_add(1, server.fileno(), select.POLLOUT)
    [(_, mask, _)] = collect(ring, 1)
    assert mask & select.POLLOUT


def test_a_zero_copy_send_holds_its_buffer_until_the_notification(
    ring: Ring, connection: tuple[socket.socket, socket.socket]
) -> None:
    client, server = connection
    payload = os.urandom(32 * 1024)  # fits the socket buffers: no reader needed
    ring.prepare_send_zero_copy(1, server.fileno(), payload)
    seen: list[tuple[int, int]] = []

    def on_completion(completion: tuple[int, int, int]) -> None:
        user_data, result, flags = completion
        assert user_data == 1
        seen.append((result, flags & (MORE | abi.CQE_F_NOTIF)))

    ring.submit()
    assert ring.owns(1), "the pages are the kernel's until the notification is reaped"
    run_until(ring, lambda: not ring.owns(1), on_completion)
    assert seen == [(len(payload), MORE), (0, abi.CQE_F_NOTIF)]
    received = bytearray()
    while len(received) < len(payload):
        received += client.recv(len(payload))
    assert received == payload
