"""Unconfirmed sends: all of it now and no completion, or a completion saying what is left.

`prepare_send_unconfirmed` (`proactor.ring`, `proactor.emulated`) is what lets
the loop send a response without a completion to dispatch. What it promises
is checked here on both engines, and on io_uring in each ring setup mode
(``ring`` fixture): a send that fits posts nothing; one that does not fit at
all fails at once with ``-EAGAIN`` instead of waiting for room (so the bytes
are the caller's again when the enter returns); one that fits partly reports
the count it sent, and the peer receives exactly that much.
"""

from __future__ import annotations

import errno
import os
import socket
import time
from collections.abc import Iterator

import pytest
from ring_support import SETUP_MODES, collect, open_ring

from forkloop.proactor import kernel as kernel_module
from forkloop.proactor.emulated import EmulatedRing
from forkloop.proactor.ring import Ring

SMALL_BUFFER = 16 * 1024


@pytest.fixture(params=[*SETUP_MODES, "emulated"])
def engine(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Ring | EmulatedRing]:
    """Each io_uring setup mode (see ``ring_support.SETUP_MODES``), and the emulated engine."""
    if request.param == "emulated":
        made: Ring | EmulatedRing = EmulatedRing()
    else:
        flags = SETUP_MODES[request.param]
        if flags is not None:
            monkeypatch.setattr(kernel_module, "_SETUP_ATTEMPTS", (flags,))
        made = open_ring(256)
    try:
        yield made
    finally:
        made.close()


def fill(sock: socket.socket) -> int:
    """Write into ``sock`` until its send buffer (and the peer's receive buffer) is full."""
    written = 0
    chunk = b"f" * 65536
    while True:
        try:
            written += sock.send(chunk)
        except BlockingIOError:
            return written


def read_exactly(sock: socket.socket, count: int, timeout: float = 5.0) -> bytes:
    data = bytearray()
    deadline = time.monotonic() + timeout
    while len(data) < count:
        assert time.monotonic() < deadline, f"{len(data)} of {count} bytes in {timeout} s"
        try:
            data += sock.recv(count - len(data))
        except BlockingIOError:
            time.sleep(0.001)
    return bytes(data)


def assert_nothing_more(sock: socket.socket) -> None:
    with pytest.raises(BlockingIOError):
        sock.recv(1)


def test_a_send_that_fits_posts_no_completion(
    engine: Ring | EmulatedRing, connection: tuple[socket.socket, socket.socket]
) -> None:
    client, server = connection
    engine.prepare_send_unconfirmed(1, server.fileno(), b"all of it")
    engine.submit()
    assert engine.completions() == []
    assert read_exactly(client, 9) == b"all of it"
    assert engine.settled and engine.in_flight == 0
    if isinstance(engine, Ring):
        assert engine._unconfirmed_pins == [], "the bytes are let go once their enter returned"


def test_a_send_with_no_room_fails_at_once_instead_of_waiting(
    engine: Ring | EmulatedRing, connection: tuple[socket.socket, socket.socket]
) -> None:
    client, server = connection
    server.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SMALL_BUFFER)
    fill(server)
    engine.prepare_send_unconfirmed(7, server.fileno(), b"no room")
    engine.submit()  # no wait: the completion is posted by the enter that tried it
    assert engine.completions() == [(7, -errno.EAGAIN, 0)]
    if isinstance(engine, Ring):
        assert engine._unconfirmed_pins == []


def test_a_send_that_fits_partly_reports_what_it_sent(
    engine: Ring | EmulatedRing, connection: tuple[socket.socket, socket.socket]
) -> None:
    client, server = connection
    server.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SMALL_BUFFER)
    payload = os.urandom(4 * 1024 * 1024)  # more than both socket buffers hold
    engine.prepare_send_unconfirmed(3, server.fileno(), payload)
    [(user_data, sent, flags)] = collect(engine, 1)
    assert user_data == 3 and 0 < sent < len(payload)
    assert read_exactly(client, sent) == payload[:sent]
    assert_nothing_more(client)


def test_a_send_to_a_peer_that_left_reports_the_error(
    engine: Ring | EmulatedRing, connection: tuple[socket.socket, socket.socket]
) -> None:
    client, server = connection
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
    client.close()  # a reset
    time.sleep(0.01)
    engine.prepare_send_unconfirmed(4, server.fileno(), b"to nobody")
    [(user_data, result, _)] = collect(engine, 1)
    assert user_data == 4 and result in (-errno.ECONNRESET, -errno.EPIPE)


def test_unconfirmed_sends_of_one_submit_keep_their_order(
    engine: Ring | EmulatedRing, connection: tuple[socket.socket, socket.socket]
) -> None:
    client, server = connection
    for index in range(20):
        engine.prepare_send_unconfirmed(100 + index, server.fileno(), b"%02d" % index)
    engine.submit()
    assert engine.completions() == []
    assert read_exactly(client, 40) == b"".join(b"%02d" % index for index in range(20))


def test_an_unconfirmed_send_queued_when_the_engine_closes_still_goes_out(
    engine: Ring | EmulatedRing, connection: tuple[socket.socket, socket.socket]
) -> None:
    client, server = connection
    engine.prepare_send_unconfirmed(1, server.fileno(), b"last words")
    engine.close()
    assert read_exactly(client, 10) == b"last words"


def test_a_transports_sender_sends_what_fits_silently_and_reports_what_did_not(
    engine: Ring | EmulatedRing, connection: tuple[socket.socket, socket.socket]
) -> None:
    """`unconfirmed_sender`: the same operation with its user_data and fd fixed, as a
    transport makes one per response."""
    client, server = connection
    send = engine.unconfirmed_sender(5, server.fileno())
    for word in (b"first ", b"second"):  # one per enter, as a transport makes them
        send(word)
        engine.submit()
        assert engine.completions() == []
    assert read_exactly(client, 12) == b"first second"
    server.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SMALL_BUFFER)
    fill(server)
    send(b"no room")
    engine.submit()
    assert engine.completions() == [(5, -errno.EAGAIN, 0)]


def test_the_rings_sender_refuses_anything_but_bytes(
    ring: Ring, connection: tuple[socket.socket, socket.socket]
) -> None:
    """The SQE carries the address of a bytes object's data: another object's would be wrong."""
    _, server = connection
    send = ring.unconfirmed_sender(5, server.fileno())
    with pytest.raises(TypeError, match="takes bytes"):
        send(bytearray(b"mutable"))  # type: ignore[arg-type]
    assert ring.submit() == 0, "nothing was queued"
