"""Ten thousand connections through one ring leave no fd, buffer or operation behind.

Every step runs on the ring: clients connect, send and close through it; the
server accepts with one multishot accept, receives with multishot recv from a
provided-buffer group, and closes through it. 250 connections are open at a
time. The user_data of an operation is its kind in the low bits and its fd
above them, so the ring's refusal of a user_data in flight also checks that no
fd number is reused while an operation on it is pending.
"""

from __future__ import annotations

import errno
import os
import socket

from ring_support import open_ring, run_until

from forkloop.proactor import abi

CONNECTIONS = 10_000
AT_ONCE = 250
GREETING = b"hello, ring"

ACCEPT, CONNECT, SEND, CLIENT_CLOSE, RECV, SERVER_CLOSE = range(6)
KIND_BITS = 3


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_ten_thousand_connections_leave_no_fd_or_buffer_behind(listener: socket.socket) -> None:
    fds_before = fd_count()
    ring = open_ring(1024)
    buffers = ring.provide_buffers(count=512, size=64)
    address = listener.getsockname()
    state = {"opened": 0, "client_closed": 0, "server_closed": 0, "open_clients": 0}
    greetings: dict[int, bytearray] = {}

    def open_clients() -> None:
        while state["open_clients"] < AT_ONCE and state["opened"] < CONNECTIONS:
            client = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
            fd = client.detach()  # from here on the ring closes it
            ring.prepare_connect(fd << KIND_BITS | CONNECT, fd, socket.AF_INET, address)
            state["opened"] += 1
            state["open_clients"] += 1

    def on_completion(completion: tuple[int, int, int]) -> None:
        user_data, result, flags = completion
        kind, fd = user_data & ((1 << KIND_BITS) - 1), user_data >> KIND_BITS
        if kind == ACCEPT:
            assert result >= 0 and flags & abi.CQE_F_MORE, completion
            greetings[result] = bytearray()
            ring.prepare_recv_provided(result << KIND_BITS | RECV, result, buffers.group_id)
        elif kind == CONNECT:
            assert result == 0, completion
            ring.prepare_send(fd << KIND_BITS | SEND, fd, GREETING)
        elif kind == SEND:
            assert result == len(GREETING), completion
            ring.prepare_close(fd << KIND_BITS | CLIENT_CLOSE, fd)
        elif kind == CLIENT_CLOSE:
            assert result == 0, completion
            state["client_closed"] += 1
            state["open_clients"] -= 1
            open_clients()
        elif kind == RECV:
            if flags & abi.CQE_F_BUFFER:
                greetings[fd] += buffers.consume(flags, result)
            elif result == -errno.ENOBUFS:
                ring.prepare_recv_provided(fd << KIND_BITS | RECV, fd, buffers.group_id)
                return
            if not flags & abi.CQE_F_MORE:
                assert result == 0 and greetings.pop(fd) == GREETING, completion
                ring.prepare_close(fd << KIND_BITS | SERVER_CLOSE, fd)
        elif kind == SERVER_CLOSE:
            assert result == 0, completion
            state["server_closed"] += 1

    try:
        ring.prepare_accept(ACCEPT, listener.fileno(), multishot=True)
        open_clients()
        run_until(
            ring,
            lambda: state["server_closed"] == CONNECTIONS,
            on_completion,
            timeout=60.0,
        )
        assert state["client_closed"] == CONNECTIONS
        assert ring.in_flight == 1, "only the multishot accept is left"
        ring.prepare_cancel(1 << KIND_BITS, ACCEPT)
        run_until(ring, lambda: ring.in_flight == 0, lambda completion: None)
        assert buffers.lent == 0
        assert not greetings
    finally:
        ring.close()
    assert fd_count() == fds_before
