"""Fixtures for the io_uring engine tests: a ring in each setup mode, a listener, a connection.

The ``ring`` fixture runs each test on three rings: the one this kernel gives
by default (``DEFER_TASKRUN`` since 6.1), the ``COOP_TASKRUN`` ring of 5.19,
and a ring with no setup flags at all, as kernels before 5.5 make. The older
modes are produced by narrowing the flag sets ``Ring`` tries, so each fallback
is exercised here on a new kernel.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
from ring_support import SETUP_MODES, open_ring

from forkloop.proactor import kernel as kernel_module
from forkloop.proactor import ring as ring_module
from forkloop.proactor.ring import Ring


@pytest.fixture(params=list(SETUP_MODES))
def ring(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[Ring]:
    flags = SETUP_MODES[request.param]
    if flags is not None:
        monkeypatch.setattr(kernel_module, "_SETUP_ATTEMPTS", (flags,))
    ring = open_ring(256)
    assert ring.setup_flags == flags or flags is None
    try:
        yield ring
    finally:
        ring.close()
    assert not ring_module._ABANDONED, "the ring closed with memory the kernel never gave back"


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    sock.setblocking(False)
    try:
        yield sock
    finally:
        sock.close()


@pytest.fixture
def connection(listener: socket.socket) -> Iterator[tuple[socket.socket, socket.socket]]:
    """A connected (client, server) pair of non-blocking TCP sockets on 127.0.0.1."""
    client = socket.create_connection(listener.getsockname(), timeout=5)
    listener.setblocking(True)
    listener.settimeout(5)
    server, _ = listener.accept()
    for sock in (client, server):
        sock.setblocking(False)
    try:
        yield client, server
    finally:
        client.close()
        server.close()
